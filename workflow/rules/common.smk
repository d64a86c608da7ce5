# Configuration, validation and input functions shared by every stage.
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from snakemake.utils import validate

import spiscape
from spiscape.errors import ConfigError
from spiscape.workflow_config import (
    check_config,
    quoted,
    shell_words,
    split_photon_cell,
    with_defaults,
)


def config_failed(exc):
    """A config error as one line on stderr and exit status 1, before any job runs."""
    print(f"spiscape workflow: {exc}", file=sys.stderr)
    raise SystemExit(1)


# the stage defaults beside the Snakefile, under whatever config was given (with
# `--directory elsewhere --configfile mine.yaml` the `configfile:` of the Snakefile is not there)
DEFAULTS_FILE = Path(workflow.basedir) / "config" / "config.yaml"
if not Path("config/config.yaml").exists():
    print(f"spiscape workflow: no config/config.yaml in {os.getcwd()}; stage defaults from "
          f"{DEFAULTS_FILE}", file=sys.stderr)
_merged = with_defaults(config, yaml.safe_load(DEFAULTS_FILE.read_text()))
config.clear()
config.update(_merged)


def datasets_from_table(path):
    """Datasets (runs) listed in a TSV/CSV table: name, photons, detector, optional truth, and
    per-run overrides in columns named like `classify2d.options.num_classes` or
    `commonlines.num_tiles`. Several photon files are separated by `;`, or by spaces with a path
    that holds a space in quotes. Values are read as YAML scalars (numbers, booleans); empty
    cells are ignored.
    """
    import csv

    text = Path(path).read_text()
    dialect = "excel-tab" if "\t" in text.splitlines()[0] else "excel"
    entries = {}
    for number, row in enumerate(csv.DictReader(text.splitlines(), dialect=dialect), start=2):
        name = (row.pop("name", "") or "").strip()
        if not name:
            raise ValueError(f"{path}: line {number} has no name")
        if name in entries:
            raise ValueError(f"{path}: dataset {name!r} is listed twice")
        entry = {}
        for key, value in row.items():
            value = (value or "").strip()
            if not value or key is None:
                continue
            if key == "photons":
                entry["photons"] = split_photon_cell(value)
                continue
            if key in ("detector", "truth"):
                entry[key] = value
                continue
            node = entry
            *parents, leaf = key.strip().split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(value)
        entries[name] = entry
    return entries


try:
    if config.get("datasets_table"):
        table = datasets_from_table(config["datasets_table"])
        clash = set(table) & set(config.get("datasets") or {})
        if clash:
            raise ConfigError(f"datasets {sorted(clash)} are both in the config and in the table")
        config["datasets"] = {**(config.get("datasets") or {}), **table}
    check_config(config, yaml.safe_load((Path(workflow.basedir) / "workflow" / "schemas"
                                         / "config.schema.yaml").read_text()))
except (ConfigError, ValueError, OSError) as exc:
    config_failed(exc)

validate(config, schema="../schemas/config.schema.yaml")  # fills the schema's defaults

RESULTS = config["results"]
DATASETS = config["datasets"]
SPISCAPE = shell_words(config["spiscape_command"])


envvars:
    "PATH",


if shutil.which("spiscape") is None and (Path(sys.executable).parent / "spiscape").exists():
    # `.venv/bin/snakemake ...` without activating the environment: the jobs' shells find the
    # spiscape beside it. PATH, not the command: the command is a rule parameter, and a changed
    # parameter would rerun every stage between an activated and a plain call
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

if not DATASETS:
    raise ValueError("config: 'datasets' is empty; name at least one dataset to process")


wildcard_constraints:
    rep=r"\d+",
    tile=r"\d+",
    ds="|".join(map(re.escape, DATASETS)) if DATASETS else "[^/]+",


def dataset(ds):
    return DATASETS[ds]


def is_simulated(ds):
    return "simulate" in dataset(ds)


def _config_path(path):
    """Photon and detector paths in the config are relative to the working directory."""
    return os.path.normpath(os.path.expandvars(os.path.expanduser(str(path))))


def photons_input(wildcards):
    """The photon files of a dataset: simulated by the workflow, or named in the config."""
    ds = wildcards.ds
    if is_simulated(ds):
        return [f"{RESULTS}/{ds}/data/photons.h5"]
    photons = dataset(ds)["photons"]
    return [_config_path(p) for p in ([photons] if isinstance(photons, str) else photons)]


def detector_input(wildcards):
    ds = wildcards.ds
    if is_simulated(ds):
        return f"{RESULTS}/{ds}/data/detector.h5"
    return _config_path(dataset(ds)["detector"])


def truth_input(wildcards):
    """truth.h5 for simulated datasets (ground-truth scores), nothing for measured ones."""
    ds = wildcards.ds
    if is_simulated(ds):
        return f"{RESULTS}/{ds}/data/truth.h5"
    truth = dataset(ds).get("truth")
    return [_config_path(truth)] if truth else []


def cli_flags(options):
    """Turn a config mapping into command-line flags: {num_frames: 10} -> '--num-frames 10'.

    Mappings become 'key=value' pairs and lists become several values, so that every stage's
    options live in the config and reach the command line unchanged.
    """
    words = []
    for key, value in options.items():
        name = key.replace("_", "-")
        flag = f"--{name}"
        if value is None:
            continue
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{name}")
            continue
        words.append(flag)
        if isinstance(value, dict):
            words.extend(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            words.extend(str(v) for v in value)
        else:
            words.append(str(value))
    return " ".join(shlex.quote(w) for w in words)


def stage_version(stage):
    """A param that changes with the package version, so a new release reruns the stage."""
    return f"spiscape-{spiscape.__version__}"


def stage_config(ds, stage):
    """A stage's config section with the dataset's own overrides merged over it.

    The stage's `options` (flags of its `spiscape` subcommand) are merged key by key, so a dataset
    can change one option and keep the rest.
    """
    merged = dict(config[stage])
    override = dataset(ds).get(stage, {})
    merged.update({k: v for k, v in override.items() if k != "options"})
    merged["options"] = {**config[stage].get("options", {}), **override.get("options", {})}
    return merged


def q_scale_flag(ds, input):
    """The physical q scale of a dataset: from the simulator's truth, or the config's
    `q_per_pixel` (1/nm per detector pixel at the centre = pixel size / (wavelength x distance))."""
    if input.truth:
        return f"--truth {quoted(input.truth)}"
    q = dataset(ds).get("q_per_pixel")
    if q is None:
        raise ValueError(
            f"dataset {ds}: set q_per_pixel (1/nm per detector pixel) for the orientation stage"
        )
    return f"--q-per-pixel {float(q)!r}"


def mpi_launcher(ds, resources):
    """How classify2d starts its MPI ranks.

    On a cluster the profile sets the `mpi` resource (e.g. "srun") and `tasks` (ranks, one per
    GPU); otherwise the config's `classify2d.launcher` (e.g. "mpiexec -n 4") or nothing, in which
    case the EMC runs as one process.
    """
    mpi = getattr(resources, "mpi", "") or ""
    if mpi:
        return f"{shell_words(mpi)} -n {int(resources.tasks)}"
    return shell_words(stage_config(ds, "classify2d")["launcher"])


def torch_launcher(resources, command):
    """The VAE on the GPUs of one node: torchrun with one process per GPU when the profile gives
    the job more than one GPU (`gpu` resource), the plain command otherwise."""
    gpus = int(getattr(resources, "gpu", 0) or 0)
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node={gpus} -m spiscape"
    return command


def replicates(ds):
    return list(range(stage_config(ds, "classify2d")["replicates"]))


def replicate_files(wildcards):
    """The classify2d replicate files of a dataset."""
    return expand(
        f"{RESULTS}/{{ds}}/classify2d/rep{{rep}}.h5",
        ds=wildcards.ds,
        rep=replicates(wildcards.ds),
    )


def truth_flag(input):
    """--truth for stages that score against the simulator's truth when there is one."""
    return f"--truth {quoted(input.truth)}" if input.truth else ""


def has_q_scale(ds):
    """Orientation (and all 3D stages after it) needs the physical q scale of the detector."""
    return is_simulated(ds) or "truth" in dataset(ds) or "q_per_pixel" in dataset(ds)


def runs_3d(ds):
    """Whether the dataset goes on to the VAE, phasing and the volume curve: it has its own
    landscape, a q scale, and its `vae` section does not say `run: false`."""
    return (not reference_of(ds) and has_q_scale(ds)
            and bool(stage_config(ds, "vae").get("run", True)))


def frame_latent_input(wildcards):
    """The VAE's per-frame latents, copied into frames.h5, for datasets that run the VAE."""
    return f"{RESULTS}/{wildcards.ds}/vae/frame_latent.h5" if runs_3d(wildcards.ds) else []


def frame_latent_flag(input):
    return f"--frame-latent {quoted(input.frame_latent)}" if input.frame_latent else ""


def reference_of(ds):
    """The dataset whose landscape this one's frames are placed on (None: its own)."""
    return dataset(ds).get("reference")


def frames_file(ds):
    """Each frame's place: its own landscape's frames.h5, or placed.h5 on a reference's."""
    return f"{RESULTS}/{ds}/{'placed' if reference_of(ds) else 'frames'}.h5"


def reference_inputs(wildcards):
    """What `spiscape place` reads of the reference dataset's results."""
    ref = reference_of(wildcards.ds)
    return {
        "averages": f"{RESULTS}/{ref}/averages.h5",
        "embedding": f"{RESULTS}/{ref}/embedding.h5",
        "landscape": f"{RESULTS}/{ref}/frames.h5",  # the reference's frames, drawn under these
        "replicates": expand(f"{RESULTS}/{ref}/classify2d/rep{{rep}}.h5", rep=replicates(ref)),
    }


def runs_emc3d(ds):
    """Whether the dataset runs the 3D EMC and phases its models: `emc3d: {run: true}`, a q
    scale and a landscape of its own."""
    return (not reference_of(ds) and has_q_scale(ds)
            and bool(stage_config(ds, "emc3d").get("run", False)))


def emc3d_landscape_input(wildcards):
    """The landscape whose clusters seed the 3D EMC's models (unless init_from_landscape is
    false)."""
    if stage_config(wildcards.ds, "emc3d").get("init_from_landscape", True):
        return f"{RESULTS}/{wildcards.ds}/frames.h5"
    return []


def runs_amortise(ds):
    """Whether the dataset trains the amortised model: `amortise: {run: true}` on a dataset that
    runs the VAE (its decoder is the warm start)."""
    return runs_3d(ds) and bool(stage_config(ds, "amortise").get("run", False))


def all_targets():
    targets = [f"{RESULTS}/summary.tsv"]
    for ds in DATASETS:
        targets.append(f"{RESULTS}/{ds}/inspect/summary.json")
        targets.append(frames_file(ds))
        if reference_of(ds):
            continue
        if has_q_scale(ds):
            targets.append(f"{RESULTS}/{ds}/orientation.h5")
        if runs_3d(ds):
            targets.append(f"{RESULTS}/{ds}/volume_curve.csv")
        if runs_emc3d(ds):
            targets.append(f"{RESULTS}/{ds}/emc3d/phasing.h5")
        if runs_amortise(ds):
            targets.append(f"{RESULTS}/{ds}/amortise/amortise.h5")
    return targets
