"""Table 1's protocol section (``results/llama3/protocol/``, written by protocol.py): every part shown only when its
files exist. Statistics, Markdown and the weights figure; table1.py puts the section into table1.md and its rows
into table1.csv.

    reweight_seed<s>/weights.json, weights.jsonl   final weights and trajectory ({"step", "weights"}) of
                                                   reweighting seed s; a source whose name contains "control" is a
                                                   corrupted one that a working reweighter drives below 1/k
    <arm>_ft<i>/eval.json, eval_samples.jsonl      arm <arm> (protocol.ARMS: any name) fine-tuned with seed i;
                                                   learned_ft<i> on data drawn by reweighting seed i's weights,
                                                   the other arms pair with it by i
    base/eval.json                                 not fine-tuned

Per task: each arm's and the base model's mean ± std over fine-tuning seeds (eval.json), and learned − every other
arm with a 95% paired-bootstrap interval (scalebio.stats.paired_bootstrap over the pairs i present in both arms and
the documents of eval_samples.jsonl) and its verdict. Weights: each seed's beside the reported ones
(reported.yaml), the Spearman correlation of every pair of seeds (and of each seed with the reported weights on the
shared sources), and the control source's final weight against 1/k.
"""

from __future__ import annotations

import json
import re
from itertools import combinations
from pathlib import Path

from scalebio.evaluation.record import LOWER_IS_BETTER, primary_metric, read_samples
from scalebio.results import read_jsonl
from scalebio.stats import Ratio, paired_bootstrap, spearman, task_ratios, verdict

from experiments.llama3.table1_common import (BASE, REPORTED_WEIGHTS, TESTED, fmt, md_table, mean_std, method_key,
                                              model_name)

PROTOCOL = "protocol"
"""The folder of the seeded protocol under the results root (its rows' preset)."""
ARM_DIR = re.compile(r"^(?P<arm>[a-z][a-z0-9_]*?)_ft(?P<seed>\d+)$")
"""An arm's folder: <method>_ft<fine-tuning seed>. Any method name: arms are data (protocol.ARMS)."""
REWEIGHT_DIR = re.compile(r"^reweight_seed(?P<seed>\d+)$")
BOOTSTRAP_ITERS, BOOTSTRAP_SEED = 2000, 0


def read_protocol(folder: Path) -> dict:
    """The protocol's files: ``weights`` and ``trajectories`` by reweighting seed, ``evals``, ``samples`` and
    ``draws`` (examples per source in the arm's training draw) by (arm, fine-tuning seed), base under (BASE, None).
    Empty where the files do not exist."""
    found: dict[str, dict] = {"weights": {}, "trajectories": {}, "evals": {}, "samples": {}, "draws": {}}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        if m := REWEIGHT_DIR.match(d.name):
            if (d / "weights.json").is_file():
                found["weights"][int(m["seed"])] = json.loads((d / "weights.json").read_text())
            if (d / "weights.jsonl").is_file():
                found["trajectories"][int(m["seed"])] = read_jsonl(d / "weights.jsonl")
            continue
        m = ARM_DIR.match(d.name)
        key = (m["arm"], int(m["seed"])) if m else (BASE, None) if d.name == BASE else None
        if key is None:
            continue
        if (d / "eval.json").is_file():
            found["evals"][key] = json.loads((d / "eval.json").read_text())
        if (d / "eval_samples.jsonl").is_file():
            found["samples"][key] = read_samples(d / "eval_samples.jsonl")
        if m and (d / "resample.json").is_file():
            found["draws"][key] = {k: int(v) for k, v in json.loads((d / "resample.json").read_text())["counts"].items()}
    return found


def _row(kind: str, model: str, method: str, item: str, metric: str, mean: float, n: int | None, seeds: str,
         **extra) -> dict:
    return {"kind": kind, "origin": "ours", "preset": PROTOCOL, "model": model, "method": method, "item": item,
            "metric": metric, "mean": mean, "std": None, "n": n, "seeds": seeds, **extra}


def protocol_bench_rows(evals: dict, model: str) -> list[dict]:
    """Every arm and the base model per task: mean ± sample std over fine-tuning seeds of the primary metric."""
    scores: dict[tuple[str, str, str], dict] = {}
    for (arm, seed), record in evals.items():
        for task, metrics in record.get("tasks", {}).items():
            if (metric := primary_metric(metrics)) is not None:
                scores.setdefault((arm, task, metric), {})[seed] = float(metrics[metric])
    rows = []
    for (arm, task, metric), by_seed in scores.items():
        seeds = sorted(s for s in by_seed if s is not None)
        values = [by_seed[s] for s in seeds] or [by_seed[None]]
        mean, std = mean_std(values)
        rows.append({**_row("benchmark", model, arm, task, metric, mean, len(values), " ".join(map(str, seeds))),
                     "std": std})
    rows.sort(key=lambda r: (method_key(r["method"]), r["item"]))
    return rows


def protocol_differences(samples: dict, model: str) -> list[dict]:
    """learned − every other fine-tuned arm, per task, over the fine-tuning seeds present in both: the paired-bootstrap
    interval and its verdict."""
    others = sorted({arm for arm, seed in samples if arm not in (TESTED, BASE)}, key=method_key)
    rows = []
    for other in others:
        pairs = sorted(seed for arm, seed in samples if arm == TESTED and (other, seed) in samples)
        if not pairs:
            continue
        ratios = task_ratios([samples[(TESTED, i)] for i in pairs] + [samples[(other, i)] for i in pairs])
        n = len(pairs)
        for (task, metric), both in ratios.items():
            learned, baseline = Ratio(both.num[:n], both.den[:n]), Ratio(both.num[n:], both.den[n:])
            c = paired_bootstrap(learned, baseline, iters=BOOTSTRAP_ITERS, seed=BOOTSTRAP_SEED)
            lower = metric.partition(",")[0] in LOWER_IS_BETTER
            rows.append(_row("difference", model, f"{TESTED}-{other}", task, metric, c.difference, n,
                             " ".join(map(str, pairs)), ci_lo=c.lo, ci_hi=c.hi, verdict=verdict(c.lo, c.hi, lower),
                             docs=c.docs, lower_is_better=lower))
    return rows


def protocol_draw_rows(draws: dict, model: str) -> list[dict]:
    """Each arm's training draw: every source's share of the examples (``n``: its count), per fine-tuning seed. What
    the fine-tuned model saw, so that a difference between arms can be read against the control's share."""
    rows = []
    for (arm, seed), counts in sorted(draws.items(), key=lambda kv: (method_key(kv[0][0]), kv[0][1])):
        total = sum(counts.values())
        rows += [_row("draw", model, arm, source, "share", count / total, count, str(seed))
                 for source, count in sorted(counts.items(), key=lambda kv: kv[0].lower())]
    return rows


def control_sources(weights: dict) -> list[str]:
    """The sources whose name contains "control", over all weights records."""
    return sorted({s for record in weights.values() for s in record["weights"] if "control" in s.lower()})


def protocol_weight_rows(weights: dict, model: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(each seed's final weights, Spearman rows, control rows)."""
    finals = {seed: {k: float(v) for k, v in weights[seed]["weights"].items()} for seed in sorted(weights)}
    weight_rows = [_row("weight", model, TESTED, source, "p", p, 1, str(seed))
                   for seed, w in finals.items() for source, p in sorted(w.items(), key=lambda kv: kv[0].lower())]
    rank_rows = []
    for a, b in combinations(finals, 2):
        shared = len(set(finals[a]) & set(finals[b]))
        rank_rows.append(_row("spearman", model, TESTED, f"seed {a} vs seed {b}", "rho",
                              spearman(finals[a], finals[b]), shared, f"{a} {b}"))
    for seed, w in finals.items():
        shared = len(set(w) & set(REPORTED_WEIGHTS))
        if shared >= 2:
            rank_rows.append(_row("spearman", model, TESTED, f"seed {seed} vs reported", "rho",
                                  spearman(w, REPORTED_WEIGHTS), shared, str(seed)))
    control_rows = []
    for seed, w in finals.items():
        for source in control_sources({seed: weights[seed]}):
            k = len(w)
            control_rows.append(_row("control", model, TESTED, source, "p", w[source], k, str(seed),
                                     verdict="below 1/k" if w[source] < 1 / k else "not below 1/k"))
    return weight_rows, rank_rows, control_rows


def collect_protocol(folder: Path) -> dict:
    """Every protocol row (empty lists when the folder or a part of it is absent), and the trajectories."""
    found = read_protocol(folder)
    model = ", ".join(sorted({model_name(r) for r in found["weights"].values()})) or \
        ", ".join(sorted({Path(str(e["model"])).name for e in found["evals"].values() if e.get("model")})) or "unknown"
    weight_rows, rank_rows, control_rows = protocol_weight_rows(found["weights"], model)
    return {"bench": protocol_bench_rows(found["evals"], model),
            "differences": protocol_differences(found["samples"], model),
            "draws": protocol_draw_rows(found["draws"], model), "weights": weight_rows,
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
        for method in sorted({r["method"] for r in bench}, key=method_key):
            seeds = sorted({s for r in bench if r["method"] == method for s in r["seeds"].split()}, key=int)
            rows.append([method, " ".join(seeds) or "—"] + [
                fmt(cells[(method, *c)]["mean"], cells[(method, *c)]["std"]) if (method, *c) in cells else "—"
                for c in columns])
        out.append("### Benchmarks (mean ± sample std over fine-tuning seeds)\n")
        out.append(md_table(header, rows))
    if protocol["differences"]:
        out.append("\n### Learned − each other arm: paired bootstrap, 95% interval\n")
        out.append(f"Each of {BOOTSTRAP_ITERS} draws (generator seed {BOOTSTRAP_SEED}) resamples the fine-tuning "
                   "seed pairs and the evaluation documents (the same documents for both arms); the interval is the "
                   "2.5–97.5 percentile of the mean paired difference. reproduced: it excludes 0 on the side where "
                   "learned is better, as the paper claims; contradicted: it excludes 0 on the other side; "
                   "inconclusive: it contains 0.\n")
        out.append(md_table(["comparison", "task", "metric", "better", "difference", "95% interval", "paired seeds",
                             "documents", "verdict"],
                            [[r["method"].replace("-", " − "), r["item"], r["metric"],
                              "lower" if r["lower_is_better"] else "higher",
                              _signed(r["mean"]), f"[{_signed(r['ci_lo'])}, {_signed(r['ci_hi'])}]", r["seeds"],
                              str(r["docs"]), f"**{r['verdict']}**"] for r in protocol["differences"]]))
    if protocol["draws"]:
        out.append(_render_draws(protocol["draws"]))
    if protocol["weights"]:
        seeds = sorted({int(r["seeds"]) for r in protocol["weights"]})
        by_cell = {(r["item"], int(r["seeds"])): r["mean"] for r in protocol["weights"]}
        sources = sorted({r["item"] for r in protocol["weights"]} | set(REPORTED_WEIGHTS), key=str.lower)
        out.append("\n### Learned weights per reweighting seed, beside the reported ones (Llama-3-8B)\n")
        out.append(md_table(["source", "reported"] + [f"seed {s}" for s in seeds],
                            [[src, f"{REPORTED_WEIGHTS[src]:.3f}" if src in REPORTED_WEIGHTS else "—"] +
                             [f"{by_cell[(src, s)]:.4f}" if (src, s) in by_cell else "—" for s in seeds]
                             for src in sources]))
    if protocol["spearman"]:
        out.append("\n### Agreement of final weights (Spearman ρ over the shared sources)\n")
        out.append(md_table(["pair", "sources", "ρ"],
                            [[r["item"], str(r["n"]), f"{r['mean']:.4f}"] for r in protocol["spearman"]]))
    if protocol["control"]:
        out.append("\n### Control source (corrupted: a working reweighter drives it below 1/k)\n")
        out.append(md_table(["seed", "source", "final p", "1/k", "p · k", "below 1/k"],
                            [[r["seeds"], r["item"], f"{r['mean']:.4f}", f"{1 / r['n']:.4f}",
                              f"{r['mean'] * r['n']:.4f}", "yes" if r["verdict"] == "below 1/k" else "no"]
                             for r in protocol["control"]]))
    return "\n".join(out) + "\n"


def _render_draws(draws: list[dict]) -> str:
    """One row per arm and fine-tuning seed: the examples per source, the control's first with its share."""
    sources = sorted({r["item"] for r in draws}, key=lambda s: ("control" not in s.lower(), s.lower()))
    by_run: dict[tuple[str, str], dict[str, dict]] = {}
    for r in draws:
        by_run.setdefault((r["method"], r["seeds"]), {})[r["item"]] = r

    def cell(run: dict[str, dict], source: str) -> str:
        r = run.get(source)
        return "—" if r is None else f"{r['n']} ({r['mean']:.1%})" if "control" in source.lower() else str(r["n"])

    rows = [[method, seed, str(sum(r["n"] for r in run.values()))] + [cell(run, s) for s in sources]
            for (method, seed), run in by_run.items()]
    return ("\n### Training draws (examples per source; the control's share in parentheses)\n\n" +
            md_table(["arm", "seed", "examples", *sources], rows))


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
