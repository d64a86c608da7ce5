"""The structural landscape: embedding of the common-line matrix, clusters, per-frame coordinates.

:mod:`.embedding` (CLPCA and alternatives), :mod:`.clustering`, :mod:`.features` and
:mod:`.regressor` (the absolute-embedding regressor that places new averages), :mod:`.landscape`
(per-frame coordinates, ``frames.h5``) and :mod:`.figures`.
"""

from spiscape.embed.clustering import cluster
from spiscape.embed.embedding import clpca, embed
from spiscape.embed.landscape import frame_coordinates

__all__ = ["cluster", "clpca", "embed", "frame_coordinates"]
