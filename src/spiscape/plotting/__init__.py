"""Figure helpers shared by the stages: a headless backend and consistent styling."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from spiscape.utils.atomic import atomic_path  # noqa: E402


def save(fig, path, dpi: int = 120) -> None:
    """Save and close a figure atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


__all__ = ["plt", "save"]
