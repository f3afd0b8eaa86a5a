"""Tables and figures of the GPT-2 experiments, from results/gpt2/ alone (seconds on a CPU).

    python experiments/gpt2/report.py            # writes results/gpt2/summary.json, results/gpt2/claims.md,
                                                 # figures/gpt2_*.png, and the claims block of README.md
    python experiments/gpt2/report.py --reproduce    # only: each claim as committed (git HEAD) beside its value
                                                     # on results/gpt2 now → results/gpt2/reproduce_report.md

Each claim of method.md §6 is checked here on the committed runs; nothing is trained or evaluated.
`make reproduce-gpt2` recomputes results/gpt2 and ends with ``--reproduce``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from scalebio.files import write_text
from scalebio.plotting import save_figure, style
from scalebio.reproduce import Claim, reproduce_report
from scalebio.results import read_jsonl

REPO = Path(__file__).resolve().parents[2]
TASKS = ("denoising", "multilingual", "instruction_following")
METRIC = "bits_per_byte"
START, END = "<!-- gpt2-claims:start -->", "<!-- gpt2-claims:end -->"
REPORT = "reproduce_report.md"
"""Written by ``--reproduce`` only (the end of `make reproduce-gpt2`); the tables and figures never read it."""


def reweight_runs(root: Path, task: str) -> list[dict]:
    """One row per reweighting run: variant, seed, final weights, trajectory."""
    rows = []
    for weights_file in sorted((root / task).glob("*/reweight_seed*/weights.json")):
        run = weights_file.parent
        weights = json.loads(weights_file.read_text())
        rows.append({
            "variant": run.parent.name,
            "seed": int(run.name.removeprefix("reweight_seed")),
            "weights": weights["weights"],
            "trajectory": read_jsonl(run / "weights.jsonl"),
            "wall_time_s": json.loads((run / "meta.json").read_text())["wall_time_s"],
        })
    return rows


def retrain_results(root: Path, task: str) -> pd.DataFrame:
    rows = []
    for eval_file in sorted((root / task).glob("*/retrain/*_seed*/eval.json")):
        method, seed = eval_file.parent.name.rsplit("_seed", 1)
        ev = json.loads(eval_file.read_text())
        (task_name, metrics), = ev["tasks"].items()
        rows.append({"variant": eval_file.parents[2].name, "method": method, "seed": int(seed), METRIC: metrics[METRIC]})
    return pd.DataFrame(rows, columns=["variant", "method", "seed", METRIC])


def noise_rate(name: str) -> float:
    return float(re.fullmatch(r"noise_([0-9.]+)", name).group(1))


def mean_std(values) -> str:
    values = np.asarray(list(values), dtype=float)
    return f"{values.mean():.3f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"


def summarise(root: Path) -> dict:
    summary: dict = {}
    for task in TASKS:
        runs = reweight_runs(root, task)
        if not runs:
            continue
        entry: dict = {"runs": []}
        for r in runs:
            names = list(r["weights"])
            top = max(names, key=r["weights"].get)
            item = {"variant": r["variant"], "seed": r["seed"], "top_source": top, "weights": r["weights"]}
            if task == "denoising":
                rho = spearmanr([noise_rate(n) for n in names], [r["weights"][n] for n in names]).statistic
                item["spearman_noise_weight"] = float(rho)
            if task == "multilingual":
                item["target"] = r["variant"].removeprefix("target_")
            entry["runs"].append(item)
        retrain = retrain_results(root, task)
        if len(retrain):
            table = {}
            for (variant, method), g in retrain.groupby(["variant", "method"]):
                v = g[METRIC].to_numpy()
                table.setdefault(variant, {})[method] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                                                         "seeds": g["seed"].tolist(), "values": v.tolist()}
            entry["retrain_test_" + METRIC] = table
        if task == "denoising":
            rhos = [x["spearman_noise_weight"] for x in entry["runs"]]
            entry["claim_weights_fall_with_noise"] = all(rho <= -0.9 for rho in rhos)
        elif task == "multilingual":
            entry["claim_target_wins"] = all(x["top_source"] == x["target"] for x in entry["runs"])
        else:
            entry["claim_gpt4_wins"] = all(x["top_source"] == "alpaca_gpt4" for x in entry["runs"])
        if "retrain_test_" + METRIC in entry:
            entry["claim_learned_beats_uniform"] = all(
                m["learned"]["mean"] < m["uniform"]["mean"] for m in entry["retrain_test_" + METRIC].values()
                if "learned" in m and "uniform" in m)
        summary[task] = entry
    return summary


def claim_rows(summary: dict) -> list[dict]:
    """One row per claim of method.md §6: key (stable, pairs committed with recomputed), experiment, claim, file,
    measured, holds, paper."""
    rows = []

    def add(key, experiment, claim, file, measured, holds, paper):
        rows.append({"key": key, "experiment": experiment, "claim": claim, "file": file, "measured": measured,
                     "holds": bool(holds), "paper": paper})

    if "denoising" in summary:
        s = summary["denoising"]
        rhos = [x["spearman_noise_weight"] for x in s["runs"]]
        add("denoising/weights_fall_with_noise", "denoising", "Spearman(noise rate, weight) ≤ −0.9 in every seed",
            "results/gpt2/denoising/main/reweight_seed*/weights.json",
            f"{', '.join(f'{r:.2f}' for r in rhos)} ({len(rhos)} seeds)", s["claim_weights_fall_with_noise"],
            "weight falls with noise rate")
    if "multilingual" in summary:
        s = summary["multilingual"]
        got = ", ".join(f"{x['target']}/s{x['seed']}→{x['top_source']}" for x in s["runs"])
        add("multilingual/target_wins", "multilingual", "the target language gets the largest weight in every run",
            "results/gpt2/multilingual/target_*/reweight_seed*/weights.json", got, s["claim_target_wins"],
            "target language wins")
    if "instruction_following" in summary:
        s = summary["instruction_following"]
        got = ", ".join(f"s{x['seed']}: {x['top_source']} ({x['weights'][x['top_source']]:.3f})" for x in s["runs"])
        add("instruction_following/gpt4_wins", "instruction following", "Alpaca-GPT4 ends with the largest weight",
            "results/gpt2/instruction_following/main/reweight_seed*/weights.json", got, s["claim_gpt4_wins"],
            "GPT-4 source gains a large weight")
    for task, s in summary.items():
        table = s.get("retrain_test_" + METRIC)
        if not table:
            continue
        parts = []
        for variant, m in table.items():
            if "learned" in m and "uniform" in m:
                n = len(m["learned"]["values"])
                parts.append(f"{variant}: learned {m['learned']['mean']:.3f} ± {m['learned']['std']:.3f} vs uniform "
                             f"{m['uniform']['mean']:.3f} ± {m['uniform']['std']:.3f} ({n} seeds)")
        add(f"{task}/learned_beats_uniform", task.replace("_", " "), "retraining on learned weights beats uniform "
            "(test bits per byte through the lm-eval task YAML in the experiment folder; lower is better)",
            f"results/gpt2/{task}/*/retrain/*/eval.json", "; ".join(parts), s["claim_learned_beats_uniform"],
            "— (not reported for GPT-2)")
    return rows


def claims_table(summary: dict) -> str:
    lines = [
        "| experiment | claim | command | result file | measured (CPU preset) | holds | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in claim_rows(summary):
        lines.append(f"| {r['experiment']} | {r['claim']} | `make reproduce-gpt2` | `{r['file']}` | {r['measured']} "
                     f"| {'yes' if r['holds'] else 'no'} | {r['paper']} |")
    return "\n".join(lines) + "\n"


def claims(root: Path) -> list[Claim]:
    """The claims measured on one results/gpt2 folder (the committed one or the recomputed one)."""
    return [Claim(r["key"], r["experiment"], r["claim"], r["measured"], r["holds"]) for r in claim_rows(summarise(root))]


def reproduce(results: Path, repo: Path = REPO) -> str:
    """Committed (git HEAD) vs recomputed claims of results/gpt2 → ``results``/reproduce_report.md; returns it."""
    with tempfile.TemporaryDirectory() as scratch:
        return reproduce_report("GPT-2 experiments: committed vs recomputed (`make reproduce-gpt2`)", repo,
                                results.resolve().relative_to(repo.resolve()).as_posix(), claims,
                                results / REPORT, scratch)


def plot(summary: dict, root: Path, figures: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    import seaborn as sns

    style()
    out = []
    for task in summary:
        runs = reweight_runs(root, task)
        rows = [{"variant": r["variant"], "seed": r["seed"], "step": t["step"], "source": name, "weight": value}
                for r in runs for t in r["trajectory"] for name, value in t["weights"].items()]
        df = pd.DataFrame(rows)
        variants = sorted(df["variant"].unique())
        fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 3.8), squeeze=False, sharey=True)
        for ax, variant in zip(axes[0], variants):
            sns.lineplot(data=df[df["variant"] == variant], x="step", y="weight", hue="source", errorbar="sd", ax=ax)
            ax.set_title(f"{task.replace('_', ' ')}: {variant}")
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        out.append(save_figure(fig, figures / f"gpt2_{task}_weights.png"))
        plt.close(fig)

        final = pd.DataFrame([{"variant": x["variant"], "seed": x["seed"], "source": k, "weight": v}
                              for x in summary[task]["runs"] for k, v in x["weights"].items()])
        retrain = retrain_results(root, task)
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        if task == "denoising":
            final["noise rate"] = final["source"].map(noise_rate)
            sns.pointplot(data=final, x="noise rate", y="weight", errorbar="sd", ax=axes[0], native_scale=True)
            axes[0].axhline(1 / final["source"].nunique(), ls="--", c="grey", lw=1)
            axes[0].set_title("final weight vs noise rate (mean ± sd over seeds)")
        elif task == "multilingual":
            pivot = final.groupby(["variant", "source"])["weight"].mean().unstack()
            sns.heatmap(pivot, annot=True, fmt=".2f", cmap="viridis", ax=axes[0], cbar=False)
            axes[0].set_title("final weight (mean over seeds): rows = target")
        else:
            sns.barplot(data=final, x="source", y="weight", errorbar="sd", ax=axes[0])
            axes[0].axhline(1 / final["source"].nunique(), ls="--", c="grey", lw=1)
            axes[0].set_title("final weight (mean ± sd over seeds)")
        if len(retrain):
            sns.barplot(data=retrain, x="variant", y=METRIC, hue="method", errorbar="sd", ax=axes[1])
            lo = retrain[METRIC].min()
            axes[1].set_ylim(lo * 0.97, retrain[METRIC].max() * 1.01)
            axes[1].set_title("retrained model: test bits per byte (lower is better)")
        fig.tight_layout()
        out.append(save_figure(fig, figures / f"gpt2_{task}_summary.png"))
        plt.close(fig)
    return out


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        return
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    write_text(readme, f"{head}{START}\n{table}{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(REPO / "results" / "gpt2"))
    parser.add_argument("--figures", default=str(REPO / "figures"))
    parser.add_argument("--readme", default=str(REPO / "README.md"))
    parser.add_argument("--reproduce", action="store_true",
                        help=f"only compare the claims on --results with those committed in git HEAD: print the "
                             f"report and write it to <results>/{REPORT}")
    args = parser.parse_args(argv)
    root = Path(args.results)
    if args.reproduce:
        print(reproduce(root), end="")
        return 0
    summary = summarise(root)
    write_text(root / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    table = claims_table(summary)
    write_text(root / "claims.md", table)
    plot(summary, root, Path(args.figures))
    update_readme(Path(args.readme), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
