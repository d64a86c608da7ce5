"""Figure helpers shared by the stages: a headless backend and consistent styling."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from spiscape.utils.atomic import atomic_path  # noqa: E402

#: one colour per true population, the same in every figure (ColorBrewer Dark2)
POPULATION_COLOURS = {"cube": "#1b9e77", "melting": "#d95f02", "sphere": "#7570b3",
                      "dimer": "#e7298a", "rod": "#66a61e", "trimer": "#e6ab02",
                      "spheroid": "#a6761d"}


def population_colour(name: str):
    return POPULATION_COLOURS.get(name, "#666666")


def cluster_colour(cluster: int):
    """Clusters (numbers the pipeline found, not truths) in another palette (tab20b, muted),
    outliers light grey."""
    return "lightgrey" if cluster < 0 else plt.get_cmap("tab20b")((4 * cluster + 1) % 20)


def save(fig, path, dpi: int = 120) -> None:
    """Save and close a figure atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


__all__ = ["POPULATION_COLOURS", "cluster_colour", "plt", "population_colour", "save"]
