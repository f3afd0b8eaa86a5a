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


def weight_trajectories(trajectories: dict[str, list[dict]], path: str | Path, highlight: str | None = None,
                        title: str = "") -> Path:
    """One panel per run (``trajectories``: panel title → ``weights.jsonl`` lines ``{"step", "weights": {source:
    p}}``): every source's weight over steps, ``highlight`` (e.g. a corrupted source) black, bold and dashed, and
    a dotted line at 1/k (k sources). Saved to ``path``; returns it."""
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    style()
    rows = [{"run": run, "step": line["step"], "source": source, "weight": p}
            for run, lines in trajectories.items() for line in lines for source, p in line["weights"].items()]
    df = pd.DataFrame(rows, columns=["run", "step", "source", "weight"])
    sources = sorted(set(df["source"]) - {highlight}, key=str.lower)
    fig, axes = plt.subplots(1, len(trajectories), figsize=(4.2 * len(trajectories) + 2.2, 3.6), squeeze=False,
                             sharey=True)
    for ax, run in zip(axes[0], trajectories):
        run_df = df[df["run"] == run]
        sns.lineplot(data=run_df[run_df["source"] != highlight], x="step", y="weight", hue="source",
                     hue_order=sources, ax=ax, legend=ax is axes[0][-1], linewidth=1.2)
        if highlight is not None:
            mark = run_df[run_df["source"] == highlight]
            ax.plot(mark["step"], mark["weight"], color="black", linestyle="--", linewidth=2.4, label=highlight)
        k = run_df["source"].nunique()
        ax.axhline(1.0 / k, color="grey", linestyle=":", linewidth=1.2, label=f"1/k = 1/{k}")
        ax.set_title(run)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if axes[0][-1].get_legend() is not None:
        axes[0][-1].get_legend().remove()
    by_label = dict(zip(labels, handles))
    fig.legend(by_label.values(), by_label.keys(), loc="center right", fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / (4.2 * len(trajectories) + 2.2), 1))
    out = save_figure(fig, path)
    plt.close(fig)
    return out
