"""Tables and figures of the baselines' comparison (experiments/gpt2/compare.py), from results/gpt2/ alone.

    python experiments/gpt2/compare_report.py      # per experiment with results: results/gpt2/<task>/compare/
                                                   # summary.json and table.md, figures/gpt2_<task>_compare.png,
                                                   # and the Baselines block of README.md

Per experiment and variant, one row per method: test bits per byte (lower is better) averaged over the retrain
seeds, its 95% interval, the difference from uniform with its 95% interval and verdict, ScaleBiO minus the method,
and the selection's cost. Every interval is ``scalebio.stats.paired_bootstrap`` on the per-document values
(``eval_samples.jsonl``): 2,000 draws of the retrain seeds (pairs: the same seed in both arms) and of the test
documents (the same draw for both arms), so it covers the spread from fine-tuning seeds and from the finite test
set. The interval of a method's own mean is the same bootstrap against a zero arm. Verdicts: ``scalebio.stats.verdict``
(an interval that excludes 0). Nothing is trained or evaluated here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from scalebio.evaluation.record import read_samples
from scalebio.files import write_text
from scalebio.plotting import save_figure, style
from scalebio.stats import Ratio, paired_bootstrap, task_ratios, verdict

REPO = Path(__file__).resolve().parents[2]
TASKS = ("denoising", "multilingual", "instruction_following")
REFERENCES = (("uniform", "vs_uniform"), ("scalebio", "scalebio_minus"))
"""The methods every other one is compared with: uniform (method − uniform) and ScaleBiO (ScaleBiO − method)."""
METRIC = "bits_per_byte"
ITERS, SEED = 2000, 0
START, END = "<!-- gpt2-compare:start -->", "<!-- gpt2-compare:end -->"
INTERVAL = ("95% paired bootstrap over retrain seeds and test documents (scalebio.stats.paired_bootstrap, "
            f"{ITERS} draws); per-document values from eval_samples.jsonl")


def arms(variant_dir: Path) -> dict[str, dict[int, Path]]:
    """method → {retrain seed: arm folder} of one variant's comparison."""
    out: dict[str, dict[int, Path]] = {}
    for eval_file in sorted(variant_dir.glob("*_seed*/eval.json")):
        method, seed = eval_file.parent.name.rsplit("_seed", 1)
        out.setdefault(method, {})[int(seed)] = eval_file.parent
    return out


def ratio(folders: list[Path]) -> Ratio:
    ratios = task_ratios([read_samples(f / "eval_samples.jsonl") for f in folders])
    (key,) = [k for k in ratios if k[1] == METRIC]
    return ratios[key]


def interval(a: Ratio, b: Ratio) -> dict:
    c = paired_bootstrap(a, b, iters=ITERS, seed=SEED)
    return {"difference": c.difference, "lo": c.lo, "hi": c.hi, "pairs": c.pairs, "docs": c.docs}


def summarise_variant(variant_dir: Path, order: list[str] = ()) -> dict:
    """method → row, the methods in ``order`` (the comparison's settings) first, any others by name."""
    found = arms(variant_dir)
    rows = {}
    for method in [m for m in order if m in found] + sorted(set(found) - set(order)):
        seeds = sorted(found[method])
        own = ratio([found[method][s] for s in seeds])
        zero = Ratio(np.zeros_like(own.num), np.ones_like(own.den))
        mean = interval(own, zero)
        cost = json.loads((found[method][seeds[0]] / "cost.json").read_text())
        row = {"seeds": seeds, "values": own.per_run().tolist(), "mean": mean["difference"], "lo": mean["lo"],
               "hi": mean["hi"], "docs": mean["docs"],
               "selection_retrain_multiple": cost["selection"]["retrain_multiple"],
               "selection_fb_equivalent": cost["selection"]["fb_equivalent"],
               "selection_wall_time_s": cost["selection"]["wall_time_s"],
               "total_retrain_multiple": cost["total_retrain_multiple"],
               "n": [json.loads((found[method][s] / name).read_text())["n"] for s in seeds
                     for name in ("resample.json", "selection.json") if (found[method][s] / name).is_file()]}
        for other, key in REFERENCES:
            if other == method or other not in found:
                continue
            pairs = sorted(set(seeds) & set(found[other]))
            if not pairs:
                continue
            a = ratio([found[method][s] for s in pairs])
            b = ratio([found[other][s] for s in pairs])
            if key == "vs_uniform":  # method − uniform: negative = the method beats uniform
                c = interval(a, b)
            else:  # ScaleBiO − method: negative = ScaleBiO beats the method
                c = interval(b, a)
            c["verdict"] = verdict(c["lo"], c["hi"], lower_is_better=True)
            row[key] = c
        rows[method] = row
    return rows


def comparison_settings(root: Path, task: str) -> dict:
    """The settings compare.py wrote beside the results (``methods`` in table order, their ``labels``); {} when
    absent."""
    path = root / task / "compare" / "settings.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def summarise(root: Path) -> dict:
    """task → variant → method → row, for every experiment with comparison results."""
    out = {}
    for task in TASKS:
        compare = root / task / "compare"
        variants = sorted(p.parent.parent.name for p in compare.glob("*/*_seed*/eval.json")) if compare.is_dir() else []
        order = comparison_settings(root, task).get("methods", [])
        if variants:
            out[task] = {v: summarise_variant(compare / v, order) for v in dict.fromkeys(variants)}
    return out


def _ci(lo: float, hi: float) -> str:
    return f"[{lo:+.3f}, {hi:+.3f}]"


def table(task: str, variants: dict, labels: dict[str, str]) -> str:
    """Markdown: one row per (variant, method)."""
    words = {"reproduced": "better", "contradicted": "worse", "inconclusive": "no clear difference"}
    lines = [f"Test bits per byte (lower is better), mean over retrain seeds; intervals: {INTERVAL}.", "",
             "| variant | method | seeds | N | bits per byte | 95% CI | − uniform [95% CI] | vs uniform | "
             "ScaleBiO − method [95% CI] | selection cost (× one retraining) | selection wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant, rows in variants.items():
        for method, r in rows.items():
            vs, sb = r.get("vs_uniform"), r.get("scalebio_minus")
            n = sorted(set(r["n"]))
            lines.append(
                f"| {variant} | {labels.get(method, method)} | {len(r['seeds'])} | {', '.join(map(str, n))} | "
                f"{r['mean']:.3f} | [{r['lo']:.3f}, {r['hi']:.3f}] | "
                + (f"{vs['difference']:+.3f} {_ci(vs['lo'], vs['hi'])} | {words[vs['verdict']]} | " if vs else "— | — | ")
                + (f"{sb['difference']:+.3f} {_ci(sb['lo'], sb['hi'])} | " if sb else "— | ")
                + f"{r['selection_retrain_multiple']:.2f} | {r['selection_wall_time_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(task: str, variants: dict, figures: Path, labels: dict[str, str]) -> Path:
    import matplotlib.pyplot as plt

    style()
    fig, axes = plt.subplots(len(variants), 2, figsize=(11, 3.2 * len(variants)), squeeze=False)
    for (variant, rows), (left, right) in zip(variants.items(), axes):
        methods = list(rows)
        y = np.arange(len(methods))
        means = [rows[m]["mean"] for m in methods]
        err = [[rows[m]["mean"] - rows[m]["lo"] for m in methods], [rows[m]["hi"] - rows[m]["mean"] for m in methods]]
        left.errorbar(means, y, xerr=err, fmt="o", capsize=3)
        for m, yy in zip(methods, y):
            left.scatter(rows[m]["values"], [yy] * len(rows[m]["values"]), marker="x", color="grey", s=14, zorder=3)
        left.set_yticks(y, [labels.get(m, m) for m in methods])
        left.invert_yaxis()
        left.set_xlabel("test bits per byte (lower is better)")
        left.set_title(f"{task.replace('_', ' ')} / {variant}: mean, 95% CI, seeds (×)")
        others = [m for m in methods if "vs_uniform" in rows[m]]
        d = [rows[m]["vs_uniform"] for m in others]
        cost = [rows[m]["selection_retrain_multiple"] for m in others]
        right.errorbar(cost, [c["difference"] for c in d],
                       yerr=[[c["difference"] - c["lo"] for c in d], [c["hi"] - c["difference"] for c in d]],
                       fmt="o", capsize=3)
        for m, x, c in zip(others, cost, d):
            right.annotate(labels.get(m, m), (x, c["difference"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        right.axhline(0, color="grey", lw=1, ls="--")
        right.set_xscale("symlog", linthresh=1)
        right.set_xlabel("selection cost (forward+backward passes, × one retraining run)")
        right.set_ylabel("− uniform (bits per byte)")
        right.set_title("difference from uniform (95% CI) vs cost")
    fig.tight_layout()
    path = save_figure(fig, figures / f"gpt2_{task}_compare.png")
    plt.close(fig)
    return path


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        return
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    write_text(readme, f"{head}{START}\n{block}{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(REPO / "results" / "gpt2"))
    parser.add_argument("--figures", default=str(REPO / "figures"))
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    args = parser.parse_args(argv)
    root = Path(args.results)
    summary = summarise(root)
    blocks = []
    for task, variants in summary.items():
        out = root / task / "compare"
        write_text(out / "summary.json", json.dumps({"interval": INTERVAL, "variants": variants}, indent=2) + "\n")
        labels = comparison_settings(root, task).get("labels", {})
        text = table(task, variants, labels)
        write_text(out / "table.md", text)
        plot(task, variants, Path(args.figures), labels)
        blocks.append(f"**{task.replace('_', ' ')}** (`results/gpt2/{task}/compare/`, "
                      f"`figures/gpt2_{task}_compare.png`)\n\n{text}")
    if blocks:  # no results yet: the README keeps its "not yet run" block
        update_readme(Path(args.readme), "\n".join(blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
