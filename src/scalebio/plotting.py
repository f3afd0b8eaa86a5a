"""One figure style, and PNGs that are byte-identical when rebuilt from the same results."""

from __future__ import annotations

from pathlib import Path


def style() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind")
    matplotlib.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "svg.hashsalt": "scalebio"})


def save_figure(fig, path: str | Path) -> Path:
    """Save without the creation metadata (software version, date) so `make verify` can compare bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    return path
