"""Rebuild figures/bench_*.png from results/bench/*.json alone (seconds, no model code).

    python -m benchmarks.figures --results results/bench --out figures
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

log = logging.getLogger("benchmarks")
TARGETS = {"scalebio": 3.3, "scalebio_lisa": 2.4}


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def step_cost_figure(data: dict, out: Path) -> None:
    rows = []
    for arch, res in data["results"].items():
        for entry in res["widths"]:
            for variant in ("scalebio", "scalebio_lisa"):
                for ratio in entry["variants"][variant]["ratio_to_sft"]:
                    rows.append(dict(arch=arch, width=entry["model"]["width"], variant=variant, ratio=ratio))
    df = pd.DataFrame(rows)
    grid = sns.catplot(df, x="width", y="ratio", hue="variant", col="arch", kind="point", estimator="median",
                       errorbar=("pi", 100), dodge=0.2, height=3.6, aspect=1.1)
    for ax, arch in zip(grid.axes.flat, grid.col_names):
        ax.axhline(3.0, color="grey", ls=":", lw=1)
        if arch == "llama":
            for variant, target in TARGETS.items():
                ax.axhline(target, color="C0" if variant == "scalebio" else "C1", ls="--", lw=1)
        ax.set_ylabel("ScaleBiO step ÷ SFT step")
    grid.figure.suptitle("Step cost (median, bars: min–max of reps; dashed: targets, dotted: 3×)", y=1.03)
    grid.savefig(out / "bench_step_cost.png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(grid.figure)


def memory_figure(data: dict, out: Path) -> None:
    peaks, steps = [], []
    for arch, res in data["results"].items():
        for name, cfg in res["configs"].items():
            peaks.append(dict(arch=arch, config=name, ratio=cfg["peak_bytes"] / res["configs"]["sft"]["peak_bytes"]))
            if name.startswith("scalebio_lisa"):
                policy = "keep_all_state (released)" if name.endswith("keep_all_state") else "active only (ours)"
                for i, st in enumerate(cfg["steps"]):
                    steps.append(dict(arch=arch, policy=policy, step=i, peak_mib=st["peak_bytes"] / 2**20,
                                      state_mib=st["total_state"] / 2**20))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    sns.barplot(pd.DataFrame(peaks), x="config", y="ratio", hue="arch", ax=axes[0])
    axes[0].axhline(1.0, color="grey", ls="--", lw=1)
    axes[0].set_ylabel("peak live tensor bytes ÷ SFT")
    axes[0].tick_params(axis="x", rotation=20)
    sdf = pd.DataFrame(steps)
    sns.lineplot(sdf, x="step", y="peak_mib", hue="policy", style="arch", marker="o", ax=axes[1])
    axes[1].set_title("peak per step, LISA switch every step")
    sns.lineplot(sdf, x="step", y="state_mib", hue="policy", style="arch", marker="o", ax=axes[2])
    axes[2].set_title("params + grads + optimizer state after step")
    for ax in axes[1:]:
        ax.set_ylabel("MiB")
    fig.tight_layout()
    fig.savefig(out / "bench_memory.png", dpi=120, metadata={"Software": None})
    plt.close(fig)


def sources_figure(data: dict, out: Path) -> None:
    res = data["results"]
    rows = [dict(k=name, seconds=t) for name, v in res["variants"].items() for t in v["seconds"]]
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    sns.stripplot(pd.DataFrame(rows), x="k", y="seconds", ax=ax, size=6, jitter=False)  # no random jitter: rebuilds are byte-identical
    sns.pointplot(pd.DataFrame(rows), x="k", y="seconds", estimator="median", errorbar=None, color="k",
                  markers="_", linestyles="none", ax=ax)
    ax.set_title(f"step time vs sources: {100 * res['relative_difference']:+.1f}%")
    fig.tight_layout()
    fig.savefig(out / "bench_sources.png", dpi=120, metadata={"Software": None})
    plt.close(fig)


def hypergradient_figure(data: dict, out: Path) -> None:
    res = data["results"]
    lm, convex = res["language_model"], res["convex"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    rows = [dict(method=m, quantity="time per update", ratio=lm["time"][m]["median_ratio"]) for m in lm["time"]]
    rows += [dict(method=m, quantity="peak memory", ratio=lm["memory"][m]["peak_bytes"] /
                  lm["memory"]["scalebio"]["peak_bytes"]) for m in lm["memory"]]
    sns.barplot(pd.DataFrame(rows), x="quantity", y="ratio", hue="method", ax=axes[0])
    axes[0].set_ylabel("÷ ScaleBiO")
    axes[0].set_title("small LM, per weight update")
    k = len(convex["p_star"])
    wrows = [dict(source=f"source {i}", who="p* (bilevel optimum)", p=convex["p_star"][i]) for i in range(k)]
    for m, v in convex["methods"].items():
        wrows += [dict(source=f"source {i}", who=m, p=v["p"][i]) for i in range(k)]
    sns.barplot(pd.DataFrame(wrows), x="source", y="p", hue="who", ax=axes[1])
    axes[1].set_title("convex least squares: final weights")
    fig.tight_layout()
    fig.savefig(out / "bench_hypergradient.png", dpi=120, metadata={"Software": None})
    plt.close(fig)


FIGURES = {"step_cost": step_cost_figure, "memory": memory_figure, "sources": sources_figure,
           "hypergradient": hypergradient_figure}


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/bench")
    parser.add_argument("--out", default="figures")
    args = parser.parse_args(argv)
    sns.set_theme(style="whitegrid", context="notebook")
    folder, out = Path(args.results), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in FIGURES.items():
        data = _load(folder, name)
        if data is None:
            log.warning("no %s.json in %s: figure skipped", name, folder)
            continue
        draw(data, out)
        written.append(out / f"bench_{name}.png")
    return written


if __name__ == "__main__":
    main()
