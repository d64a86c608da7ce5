"""Write a Jupyter notebook that explores a dataset's landscape and exports a chosen subset of
frames (as cryodrgn analyze does).

The notebook loads ``frames.h5``, draws every frame in the landscape coloured by cluster (and by
its VAE latent where the VAE ran), lets you choose frames by cluster or by a region such as
``pc1>0.1,z1<0``, shows how many frames and where they lie, and exports them with
``spiscape select`` as a photon file and list, ready to be a dataset of their own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from spiscape.errors import InputError

log = logging.getLogger(__name__)

#: outputs checked by the CLI before any work (argument -> 'file' or 'folder')
OUTPUTS = {"out": "file"}

#: shown under "Example" in ``spiscape notebook -h``
EXAMPLE = """\
spiscape notebook results/demo             # writes results/demo/analyze.ipynb
jupyter lab results/demo/analyze.ipynb
"""


def add_args(parser):
    parser.add_argument("results", help="a dataset's results folder (holds frames.h5)")
    parser.add_argument("--out", default=None,
                        help="the notebook to write (default: RESULTS/analyze.ipynb)")


CELLS = [
    ("markdown", """# The landscape of `{name}`

Every frame of the dataset placed in the landscape by `spiscape landscape` (`frames.h5`): its
coordinates (`clpca`, the CLPCA embedding of the class averages its frames belong to), its cluster
(`label`, -1: not placed) and, where the VAE ran, its latent (`latent`). Choose frames below and
export them with `spiscape select`."""),
    ("code", """import json
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from spiscape.embed.selection import select_frames
from spiscape.io.frames import read_landscape
from spiscape.plotting import cluster_colour

results = Path({results!r})
landscape = read_landscape(results / "frames.h5")
coords, label = landscape["clpca"], landscape["label"]
photons = json.loads(landscape["attrs"].get("photons", "[]"))  # set by hand if empty
placed = np.all(np.isfinite(coords), axis=1)
print(f"{{placed.sum()}} of {{len(label)}} frames placed; clusters",
      {{int(c): int((label == c).sum()) for c in np.unique(label)}})"""),
    ("code", """fig, ax = plt.subplots(figsize=(5, 4))
for c in np.unique(label):
    sel = (label == c) & placed
    ax.scatter(coords[sel, 0], coords[sel, min(1, coords.shape[1] - 1)], s=4,
               color=cluster_colour(int(c)), label="not placed" if c < 0 else f"cluster {{c}}")
ax.set_xlabel("PC1")
ax.set_ylabel("PC2")
ax.legend(markerscale=3, fontsize=7)
plt.show()"""),
    ("markdown", """## Choose frames

By cluster (`clusters = [1]`) or by a region of the landscape and the VAE latent
(`region = "pc1>0.1,z1<0"`: conditions that must all hold, components counted from 1)."""),
    ("code", """clusters = None          # e.g. [1]
region = "pc1>0"         # used when clusters is None

chosen = select_frames(landscape, clusters, None if clusters else region)
fig, ax = plt.subplots(figsize=(5, 4))
ax.scatter(coords[placed, 0], coords[placed, min(1, coords.shape[1] - 1)], s=3, color="lightgrey",
           label="all frames")
ax.scatter(coords[chosen, 0], coords[chosen, min(1, coords.shape[1] - 1)], s=3, color="C3",
           label=f"chosen ({{chosen.size}})")
ax.set_xlabel("PC1")
ax.set_ylabel("PC2")
ax.legend(markerscale=3, fontsize=7)
plt.show()"""),
    ("markdown", """## Export

Writes `subset/photons.h5`, `subset/photons.lst` and `subset/indices.txt`; add a dataset with
`photons: {{subset}}/photons.lst` and the same detector to reprocess these frames alone."""),
    ("code", """subset = results / "subset"
choice = ["--cluster", *map(str, clusters)] if clusters else ["--region", region]
subprocess.run(["spiscape", "select", "--landscape", str(results / "frames.h5"),
                "--photons", *photons, *choice, "--out", str(subset)], check=True)
print((subset / "indices.txt").read_text().splitlines()[0])"""),
]


def main(args):
    import nbformat

    results = Path(args.results)
    if not (results / "frames.h5").exists():
        raise InputError(results / "frames.h5", "no such file: run the landscape stage first")
    out = Path(args.out) if args.out else results / "analyze.ipynb"
    values = {"name": results.name, "results": str(results.resolve())}
    notebook = nbformat.v4.new_notebook()
    for kind, text in CELLS:
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        notebook.cells.append(make(text.format(**values)))
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    nbformat.validate(notebook)
    from spiscape.utils.atomic import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(nbformat.from_dict(notebook), indent=1) + "\n")
    log.info("wrote %s: open it with `jupyter lab %s`", out, out)
    return 0
