"""Table 1 of the large-model experiment, from results/llama3/ alone: ours beside the paper's reported numbers.

    python experiments/llama3/table1.py [--results results/llama3] [--out results] [--figures <out>/../figures]

Writes ``<out>/table1.md``, ``<out>/table1.csv`` and, when there are protocol results, ``<figures>/table1_weights.png``.
Reads (every file optional; nothing else is read):

    results/llama3/<preset>/reweight_seed<s>/weights.json    scalebio weights file (scalebio.weights): learned p per
                                                              source; provenance.model / config_file name the model
    results/llama3/<preset>/<method>_seed<s>/eval.json       scalebio.evaluation.evaluate's compact output,
                                                              {"tasks": {task: {metric: value}}, ...}
    results/llama3/<preset>/<method>_seed<s>/mt_bench.json   mt_bench.py's output; its "score" (null when unjudged)

``<preset>`` is a config name (8b, 70b, offline), ``<method>`` the arm (learned: fine-tuned on data drawn by the
learned weights; uniform: drawn uniformly; base: not fine-tuned). Several seeds give mean ± sample std. These are
the "small runs" section.

The protocol (``results/llama3/protocol/``, its own section; every part shown only when its files exist):

    reweight_seed<s>/weights.json, weights.jsonl   final weights and trajectory ({"step", "weights"}) of
                                                   reweighting seed s; a source whose name contains "control" is a
                                                   corrupted one that a working reweighter drives below 1/k
    learned_ft<i>/eval.json, eval_samples.jsonl    fine-tuned (seed i) on data drawn by reweighting seed i's weights
    uniform_ft<i>/eval.json, eval_samples.jsonl    fine-tuned (seed i) on data drawn uniformly: pairs with learned_ft<i>
    base/eval.json                                 not fine-tuned

Per task: learned / uniform / base mean ± std over fine-tuning seeds (eval.json), and learned − uniform with a
95% paired-bootstrap interval (scalebio.stats.paired_bootstrap over the pairs i present in both arms and the
documents of eval_samples.jsonl) and its verdict. Weights: each seed's beside REPORTED_WEIGHTS, the Spearman
correlation of every pair of seeds (and of each seed with the reported weights on the shared sources), and the
control source's final weight against 1/k. The CSV gains the columns ci_lo, ci_hi, verdict when these rows exist.

Each task is shown by one metric (scalebio.evaluation.record.primary_metric). Output is sorted and formatted with fixed decimals,
so the same results give byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import statistics
import sys
from itertools import combinations
from pathlib import Path

from scalebio.evaluation.record import LOWER_IS_BETTER, primary_metric, read_samples
from scalebio.files import write_text
from scalebio.results import read_jsonl
from scalebio.stats import Ratio, paired_bootstrap, spearman, task_ratios, verdict

log = logging.getLogger("llama3.table1")

REPO = Path(__file__).resolve().parents[2]
METHOD_ORDER = {"learned": 0, "uniform": 1, "uniform_real": 2, "base": 9}
"""Row order of the methods; a method not listed (a new arm) sorts after these, by name."""
RUN_DIR = re.compile(r"^(?P<method>.+)_seed(?P<seed>\d+)$")

# method.md §6, from the paper's public summaries. "reported": not reproduced here.
REPORTED_MT_BENCH = {
    "Llama-3-8B": {"uniform": 6.11, "LESS": 6.06, "RHO-LOSS": 6.89, "ScaleBiO": 7.12},
    "Qwen-2-7B": {"uniform": 6.66, "LESS": 7.18, "RHO-LOSS": 7.34, "ScaleBiO": 7.76},
    "Gemma-2-9B": {"uniform": 5.31, "LESS": 7.20, "RHO-LOSS": 7.38, "ScaleBiO": 7.51},
}
REPORTED_MATH = {"Qwen-2.5-32B": {"uniform": {"GSM8K": 78.1, "MATH": 54.0}, "ScaleBiO": {"GSM8K": 87.1, "MATH": 59.8}}}
"""Accuracy in %, after fine-tuning on 20,000 examples resampled by weight (plus the validation set)."""
REPORTED_WEIGHTS = {  # Llama-3-8B, lr 2e-6 (method.md §6; data_weight.py in the authors' repo has 5 decimals)
    "MathInstruct": 0.190, "GPT4-LLM-Cleaned": 0.144, "GPTeacher-General-Instruct": 0.130, "SlimOrca": 0.114,
    "UltraInteract_sft": 0.081, "WizardLM_evol_instruct_V2_196k": 0.075,
    "ShareGPT_V3_unfiltered_cleaned_split_no_imsorry": 0.070, "Magicoder-Evol-Instruct-110K": 0.069,
    "dart-math-uniform": 0.066, "orca-math-word-problems-200k": 0.061,
}
CSV_FIELDS = ["kind", "origin", "preset", "model", "method", "item", "metric", "mean", "std", "n", "seeds"]
PROTOCOL_FIELDS = ["ci_lo", "ci_hi", "verdict"]
PROTOCOL = "protocol"
"""The folder of the seeded protocol under the results root; the other folders are the small runs."""
ARM_DIR = re.compile(r"^(?P<arm>[a-z][a-z0-9_]*?)_ft(?P<seed>\d+)$")
"""An arm's folder: <method>_ft<fine-tuning seed>. Any method name: arms are data (protocol.ARMS)."""
REWEIGHT_DIR = re.compile(r"^reweight_seed(?P<seed>\d+)$")
BOOTSTRAP_ITERS, BOOTSTRAP_SEED = 2000, 0


def _runs(preset_dir: Path) -> list[tuple[str, int, Path]]:
    out = []
    for d in sorted(p for p in preset_dir.iterdir() if p.is_dir()):
        m = RUN_DIR.match(d.name)
        if m:
            out.append((m["method"], int(m["seed"]), d))
    return out


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _model_name(weights: dict) -> str:
    model = weights.get("provenance", {}).get("model", {})
    return model.get("name_or_path") or model.get("gguf_file") or model.get("architecture") or "unknown"


def collect(results: Path) -> tuple[list[dict], list[dict]]:
    """(benchmark rows, weight rows) of our runs, aggregated over seeds, sorted."""
    scores: dict[tuple[str, str, str, str], dict[int, float]] = {}
    weights: dict[tuple[str, str], dict[int, float]] = {}
    models: dict[str, set[str]] = {}
    presets = sorted(p for p in results.iterdir() if p.is_dir() and p.name != PROTOCOL) if results.is_dir() else []
    for preset_dir in presets:
        preset = preset_dir.name
        for method, seed, d in _runs(preset_dir):
            if method == "reweight":
                if (d / "weights.json").is_file():
                    record = json.loads((d / "weights.json").read_text())
                    models.setdefault(preset, set()).add(_model_name(record))
                    for source, p in record["weights"].items():
                        weights.setdefault((preset, source), {})[seed] = float(p)
                continue
            if (d / "eval.json").is_file():
                for task, metrics in json.loads((d / "eval.json").read_text()).get("tasks", {}).items():
                    metric = primary_metric(metrics)
                    if metric is not None:
                        scores.setdefault((preset, method, task, metric), {})[seed] = float(metrics[metric])
            if (d / "mt_bench.json").is_file():
                mt = json.loads((d / "mt_bench.json").read_text())
                if mt.get("score") is not None:
                    scores.setdefault((preset, method, "mt_bench", "score"), {})[seed] = float(mt["score"])
    bench_rows = []
    for (preset, method, task, metric), by_seed in scores.items():
        mean, std = _mean_std([by_seed[s] for s in sorted(by_seed)])
        bench_rows.append({"kind": "benchmark", "origin": "ours", "preset": preset,
                           "model": ", ".join(sorted(models.get(preset, {"unknown"}))), "method": method,
                           "item": task, "metric": metric, "mean": mean, "std": std, "n": len(by_seed),
                           "seeds": " ".join(map(str, sorted(by_seed)))})
    weight_rows = []
    for (preset, source), by_seed in weights.items():
        mean, std = _mean_std([by_seed[s] for s in sorted(by_seed)])
        weight_rows.append({"kind": "weight", "origin": "ours", "preset": preset,
                            "model": ", ".join(sorted(models.get(preset, {"unknown"}))), "method": "learned",
                            "item": source, "metric": "p", "mean": mean, "std": std, "n": len(by_seed),
                            "seeds": " ".join(map(str, sorted(by_seed)))})
    bench_rows.sort(key=lambda r: (r["preset"], METHOD_ORDER.get(r["method"], 9), r["method"], r["item"]))
    weight_rows.sort(key=lambda r: (r["preset"], r["item"].lower()))
    return bench_rows, weight_rows


def reported_rows() -> list[dict]:
    rows = []
    base = {"origin": "reported", "preset": "paper", "std": None, "n": None, "seeds": ""}
    for model, by_method in REPORTED_MT_BENCH.items():
        for method, value in by_method.items():
            rows.append({**base, "kind": "benchmark", "model": model, "method": method, "item": "mt_bench",
                         "metric": "score", "mean": value})
    for model, by_method in REPORTED_MATH.items():
        for method, by_bench in by_method.items():
            for bench, value in by_bench.items():
                rows.append({**base, "kind": "benchmark", "model": model, "method": method, "item": bench,
                             "metric": "accuracy_percent", "mean": value})
    for source, value in REPORTED_WEIGHTS.items():
        rows.append({**base, "kind": "weight", "model": "Llama-3-8B", "method": "learned", "item": source,
                     "metric": "p", "mean": value})
    return rows


def _fmt(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_markdown(bench: list[dict], weights: list[dict], results_label: str, protocol_md: str = "") -> str:
    out = ["# Table 1: large-model data reweighting (ScaleBiO learned weights vs uniform)\n",
           f"Built by `python experiments/llama3/table1.py` from `{results_label}` only. \"reported\" rows are the "
           "paper's numbers (method.md §6, from public summaries), not reproduced here. Mean ± sample std over "
           "seeds where there are several.\n"]
    if protocol_md:
        out.append(protocol_md)
    out.append(f"## Small runs: `{results_label}/<preset>/` (no intervals)\n")
    if not bench and not weights:
        out.append(f"No small runs: `{results_label}/<preset>/` holds no eval.json, mt_bench.json or weights.json.\n"
                   if protocol_md else
                   f"No runs yet: `{results_label}` holds no eval.json, mt_bench.json or weights.json. "
                   "Only the reported numbers are shown.\n")
    if bench:
        columns = sorted({(r["item"], r["metric"]) for r in bench})
        groups: dict[tuple, dict] = {}
        for r in bench:
            key = (r["preset"], r["model"], r["method"])
            groups.setdefault(key, {})[(r["item"], r["metric"])] = r
        header = ["preset", "model", "method", "seeds"] + [
            f"{item} ({metric}{', lower is better' if metric in LOWER_IS_BETTER else ''})" for item, metric in columns]
        rows = []
        for (preset, model, method), cells in groups.items():
            seeds = sorted({s for r in cells.values() for s in r["seeds"].split()}, key=int)
            rows.append([preset, model, method, " ".join(seeds)] +
                        [_fmt(cells[c]["mean"], cells[c]["std"]) if c in cells else "—" for c in columns])
        out.append(_md_table(header, rows))
    out.append("\n## Reported: MT-Bench (GPT-4 judge, 1–10)\n")
    out.append(_md_table(["model", *next(iter(REPORTED_MT_BENCH.values())).keys()],
                         [[m, *(f"{v:.2f}" for v in by.values())] for m, by in REPORTED_MT_BENCH.items()]))
    out.append("\n## Reported: math (accuracy %, 20,000 resampled examples)\n")
    out.append(_md_table(["model", "method", "GSM8K", "MATH"],
                         [[m, meth, f"{b['GSM8K']:.1f}", f"{b['MATH']:.1f}"]
                          for m, by in REPORTED_MATH.items() for meth, b in by.items()]))
    out.append("\n## Source weights: reported (Llama-3-8B, lr 2e-6) beside ours\n")
    presets = sorted({r["preset"] for r in weights})
    by_cell = {(r["preset"], r["item"]): r for r in weights}
    sources = sorted(set(REPORTED_WEIGHTS) | {r["item"] for r in weights}, key=str.lower)
    model_of = {r["preset"]: r["model"] for r in weights}
    header = ["source", "reported"] + [f"ours: {p} ({model_of[p]})" for p in presets]
    rows = [[s, f"{REPORTED_WEIGHTS[s]:.3f}" if s in REPORTED_WEIGHTS else "—"] +
            [_fmt(by_cell[(p, s)]["mean"], by_cell[(p, s)]["std"]) if (p, s) in by_cell else "—" for p in presets]
            for s in sources]
    out.append(_md_table(header, rows))
    if weights:
        out.append("\nA source absent from a column was not in that run (the offline pool holds 5 of the authors' "
                   "10 sources plus 3 stand-ins).\n")
    return "\n".join(out)

# ---------------------------------------------------------------------------------------------------------
# The seeded protocol (results/llama3/protocol/).


def read_protocol(folder: Path) -> dict:
    """The protocol's files: ``weights`` and ``trajectories`` by reweighting seed, ``evals`` and ``samples`` by
    (arm, fine-tuning seed), base under ("base", None). Empty where the files do not exist."""
    found: dict[str, dict] = {"weights": {}, "trajectories": {}, "evals": {}, "samples": {}}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        if m := REWEIGHT_DIR.match(d.name):
            if (d / "weights.json").is_file():
                found["weights"][int(m["seed"])] = json.loads((d / "weights.json").read_text())
            if (d / "weights.jsonl").is_file():
                found["trajectories"][int(m["seed"])] = read_jsonl(d / "weights.jsonl")
            continue
        m = ARM_DIR.match(d.name)
        key = (m["arm"], int(m["seed"])) if m else ("base", None) if d.name == "base" else None
        if key is None:
            continue
        if (d / "eval.json").is_file():
            found["evals"][key] = json.loads((d / "eval.json").read_text())
        if (d / "eval_samples.jsonl").is_file():
            found["samples"][key] = read_samples(d / "eval_samples.jsonl")
    return found


def _row(kind: str, model: str, method: str, item: str, metric: str, mean: float, n: int | None, seeds: str,
         **extra) -> dict:
    return {"kind": kind, "origin": "ours", "preset": PROTOCOL, "model": model, "method": method, "item": item,
            "metric": metric, "mean": mean, "std": None, "n": n, "seeds": seeds, **extra}


def protocol_bench_rows(evals: dict, model: str) -> list[dict]:
    """learned / uniform / base per task: mean ± sample std over fine-tuning seeds of the primary metric."""
    scores: dict[tuple[str, str, str], dict] = {}
    for (arm, seed), record in evals.items():
        for task, metrics in record.get("tasks", {}).items():
            if (metric := primary_metric(metrics)) is not None:
                scores.setdefault((arm, task, metric), {})[seed] = float(metrics[metric])
    rows = []
    for (arm, task, metric), by_seed in scores.items():
        seeds = sorted(s for s in by_seed if s is not None)
        values = [by_seed[s] for s in seeds] or [by_seed[None]]
        mean, std = _mean_std(values)
        rows.append({**_row("benchmark", model, arm, task, metric, mean, len(values), " ".join(map(str, seeds))),
                     "std": std})
    rows.sort(key=lambda r: (_method_key(r["method"]), r["item"]))
    return rows


def protocol_differences(samples: dict, model: str) -> list[dict]:
    """learned − every other fine-tuned arm, per task, over the fine-tuning seeds present in both: the paired-bootstrap
    interval and its verdict."""
    others = sorted({arm for arm, seed in samples if arm not in ("learned", "base")}, key=_method_key)
    rows = []
    for other in others:
        pairs = sorted(seed for arm, seed in samples if arm == "learned" and (other, seed) in samples)
        if not pairs:
            continue
        ratios = task_ratios([samples[("learned", i)] for i in pairs] + [samples[(other, i)] for i in pairs])
        n = len(pairs)
        for (task, metric), both in ratios.items():
            learned, baseline = Ratio(both.num[:n], both.den[:n]), Ratio(both.num[n:], both.den[n:])
            c = paired_bootstrap(learned, baseline, iters=BOOTSTRAP_ITERS, seed=BOOTSTRAP_SEED)
            lower = metric.partition(",")[0] in LOWER_IS_BETTER
            rows.append(_row("difference", model, f"learned-{other}", task, metric, c.difference, n,
                             " ".join(map(str, pairs)), ci_lo=c.lo, ci_hi=c.hi, verdict=verdict(c.lo, c.hi, lower),
                             docs=c.docs, lower_is_better=lower))
    return rows


def _method_key(method: str) -> tuple[int, str]:
    return METHOD_ORDER.get(method, 8), method


def control_sources(weights: dict) -> list[str]:
    """The sources whose name contains "control", over all weights records."""
    return sorted({s for record in weights.values() for s in record["weights"] if "control" in s.lower()})


def protocol_weight_rows(weights: dict, model: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(each seed's final weights, Spearman rows, control rows)."""
    finals = {seed: {k: float(v) for k, v in weights[seed]["weights"].items()} for seed in sorted(weights)}
    weight_rows = [_row("weight", model, "learned", source, "p", p, 1, str(seed))
                   for seed, w in finals.items() for source, p in sorted(w.items(), key=lambda kv: kv[0].lower())]
    rank_rows = []
    for a, b in combinations(finals, 2):
        shared = len(set(finals[a]) & set(finals[b]))
        rank_rows.append(_row("spearman", model, "learned", f"seed {a} vs seed {b}", "rho",
                              spearman(finals[a], finals[b]), shared, f"{a} {b}"))
    for seed, w in finals.items():
        shared = len(set(w) & set(REPORTED_WEIGHTS))
        if shared >= 2:
            rank_rows.append(_row("spearman", model, "learned", f"seed {seed} vs reported", "rho",
                                  spearman(w, REPORTED_WEIGHTS), shared, str(seed)))
    control_rows = []
    for seed, w in finals.items():
        for source in control_sources({seed: weights[seed]}):
            k = len(w)
            control_rows.append(_row("control", model, "learned", source, "p", w[source], k, str(seed),
                                     verdict="below 1/k" if w[source] < 1 / k else "not below 1/k"))
    return weight_rows, rank_rows, control_rows


def collect_protocol(folder: Path) -> dict:
    """Every protocol row (empty lists when the folder or a part of it is absent), and the trajectories."""
    found = read_protocol(folder)
    model = ", ".join(sorted({_model_name(r) for r in found["weights"].values()})) or \
        ", ".join(sorted({Path(str(e["model"])).name for e in found["evals"].values() if e.get("model")})) or "unknown"
    weight_rows, rank_rows, control_rows = protocol_weight_rows(found["weights"], model)
    return {"bench": protocol_bench_rows(found["evals"], model),
            "differences": protocol_differences(found["samples"], model), "weights": weight_rows,
            "spearman": rank_rows, "control": control_rows, "trajectories": found["trajectories"],
            "control_source": (control_sources({**{s: t[-1] for s, t in found["trajectories"].items() if t},
                                                **found["weights"]}) or [None])[0], "model": model,
            "finished_seeds": sorted(found["weights"])}


def _signed(x: float) -> str:
    return f"{x:+.4f}"


def render_protocol(protocol: dict, label: str) -> str:
    """The protocol section of table1.md ("" when there are no protocol results)."""
    parts = [protocol[k] for k in ("bench", "differences", "weights")]
    if not any(parts):
        return ""
    out = [f"## Protocol: `{label}` ({protocol['model']})\n",
           "learned_ft<i>: fine-tuned (seed i) on examples drawn by reweighting seed i's weights; uniform_ft<i>: the "
           "same fine-tuning seed on a uniform draw over all sources; uniform_real_ft<i>: a uniform draw over the "
           "real sources (the control left out); base: not fine-tuned.\n"]
    bench = protocol["bench"]
    if bench:
        columns = sorted({(r["item"], r["metric"]) for r in bench})
        cells = {(r["method"], r["item"], r["metric"]): r for r in bench}
        header = ["method", "seeds"] + [f"{item} ({metric}{', lower is better' if metric in LOWER_IS_BETTER else ''})"
                                        for item, metric in columns]
        rows = []
        for method in sorted({r["method"] for r in bench}, key=_method_key):
            seeds = sorted({s for r in bench if r["method"] == method for s in r["seeds"].split()}, key=int)
            rows.append([method, " ".join(seeds) or "—"] + [
                _fmt(cells[(method, *c)]["mean"], cells[(method, *c)]["std"]) if (method, *c) in cells else "—"
                for c in columns])
        out.append("### Benchmarks (mean ± sample std over fine-tuning seeds)\n")
        out.append(_md_table(header, rows))
    if protocol["differences"]:
        out.append("\n### Learned − each other arm: paired bootstrap, 95% interval\n")
        out.append(f"Each of {BOOTSTRAP_ITERS} draws (generator seed {BOOTSTRAP_SEED}) resamples the fine-tuning "
                   "seed pairs and the evaluation documents (the same documents for both arms); the interval is the "
                   "2.5–97.5 percentile of the mean paired difference. reproduced: it excludes 0 on the side where "
                   "learned is better, as the paper claims; contradicted: it excludes 0 on the other side; "
                   "inconclusive: it contains 0.\n")
        out.append(_md_table(["comparison", "task", "metric", "better", "difference", "95% interval", "pairs",
                              "documents", "verdict"],
                             [[r["method"].replace("-", " − "), r["item"], r["metric"],
                               "lower" if r["lower_is_better"] else "higher",
                               _signed(r["mean"]), f"[{_signed(r['ci_lo'])}, {_signed(r['ci_hi'])}]", r["seeds"],
                               str(r["docs"]), f"**{r['verdict']}**"] for r in protocol["differences"]]))
    if protocol["weights"]:
        seeds = sorted({int(r["seeds"]) for r in protocol["weights"]})
        by_cell = {(r["item"], int(r["seeds"])): r["mean"] for r in protocol["weights"]}
        sources = sorted({r["item"] for r in protocol["weights"]} | set(REPORTED_WEIGHTS), key=str.lower)
        out.append("\n### Learned weights per reweighting seed, beside the reported ones (Llama-3-8B)\n")
        out.append(_md_table(["source", "reported"] + [f"seed {s}" for s in seeds],
                             [[src, f"{REPORTED_WEIGHTS[src]:.3f}" if src in REPORTED_WEIGHTS else "—"] +
                              [f"{by_cell[(src, s)]:.4f}" if (src, s) in by_cell else "—" for s in seeds]
                              for src in sources]))
    if protocol["spearman"]:
        out.append("\n### Agreement of final weights (Spearman ρ over the shared sources)\n")
        out.append(_md_table(["pair", "sources", "ρ"],
                             [[r["item"], str(r["n"]), f"{r['mean']:.4f}"] for r in protocol["spearman"]]))
    if protocol["control"]:
        out.append("\n### Control source (corrupted: a working reweighter drives it below 1/k)\n")
        out.append(_md_table(["seed", "source", "final p", "1/k", "p · k", "below 1/k"],
                             [[r["seeds"], r["item"], f"{r['mean']:.4f}", f"{1 / r['n']:.4f}",
                               f"{r['mean'] * r['n']:.4f}", "yes" if r["verdict"] == "below 1/k" else "no"]
                              for r in protocol["control"]]))
    return "\n".join(out) + "\n"


def plot_protocol_weights(protocol: dict, figures: Path) -> Path | None:
    """figures/table1_weights.png: each reweighting seed's trajectory, the control source marked (None when
    there are no trajectories)."""
    if not protocol["trajectories"]:
        return None
    from scalebio.plotting import weight_trajectories

    runs = {f"reweighting seed {s}" + ("" if s in protocol["finished_seeds"] else
                                        f" (in flight: step {protocol['trajectories'][s][-1]['step']})"):
            protocol["trajectories"][s] for s in sorted(protocol["trajectories"])}
    return weight_trajectories(runs, figures / "table1_weights.png", highlight=protocol["control_source"],
                               title=f"Protocol source weights ({protocol['model']})")


def render_csv(rows: list[dict]) -> str:
    """One line per row; the columns PROTOCOL_FIELDS are added when a row has an interval or a verdict."""
    protocol = any("verdict" in r for r in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS + (PROTOCOL_FIELDS if protocol else []), lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        line = {**r, "mean": f"{r['mean']:.6f}", "std": "" if r["std"] is None else f"{r['std']:.6f}",
                "n": "" if r["n"] is None else r["n"]}
        if protocol:
            line.update({k: "" if r.get(k) is None else f"{r[k]:.6f}" for k in ("ci_lo", "ci_hi")},
                        verdict=r.get("verdict", ""))
        writer.writerow(line)
    return buf.getvalue()


def build_table(results: str | Path, out: str | Path, results_label: str | None = None,
                figures: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``out``/table1.md and ``out``/table1.csv from ``results`` (and, given ``figures`` and protocol
    trajectories, ``figures``/table1_weights.png); returns the table paths."""
    results, out = Path(results), Path(out)
    bench, weights = collect(results)
    protocol = collect_protocol(results / PROTOCOL)
    resolved = results.resolve()
    label = results_label or (str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else resolved.name)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / "table1.md", out / "table1.csv"
    write_text(md, render_markdown(bench, weights, label, render_protocol(protocol, f"{label}/{PROTOCOL}")))
    protocol_rows = [r for k in ("bench", "differences", "weights", "spearman", "control") for r in protocol[k]]
    write_text(csv_path, render_csv(bench + weights + protocol_rows + reported_rows()))
    if figures is not None:
        plot_protocol_weights(protocol, Path(figures))
    return md, csv_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(REPO / "results" / "llama3"))
    parser.add_argument("--out", default=str(REPO / "results"))
    parser.add_argument("--figures", default=None,
                        help="where table1_weights.png goes (default: figures/ beside --out, so the repo's figures/)")
    args = parser.parse_args(argv)
    figures = Path(args.figures) if args.figures else Path(args.out).resolve().parent / "figures"
    md, csv_path = build_table(args.results, args.out, figures=figures)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.info("wrote %s and %s", md, csv_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
