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

The protocol (``results/llama3/protocol/``) is its own section, built by table1_protocol.py: per task every arm and
the base model, learned − every other arm with a 95% paired-bootstrap interval and its verdict, the weights of each
reweighting seed, their agreement, and the control source against 1/k. The CSV gains the columns ci_lo, ci_hi,
verdict when these rows exist. The paper's reported numbers are data: reported.yaml.

Each task is shown by one metric (scalebio.evaluation.record.primary_metric). Output is sorted and formatted with
fixed decimals, so the same results give byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import sys
from pathlib import Path

from scalebio.evaluation.record import LOWER_IS_BETTER, primary_metric
from scalebio.files import write_text

if __name__ == "__main__" and not __package__:  # run by its path: run it as the module it is (scalebio.scripts)
    from scalebio.scripts import run_as_module
    run_as_module(__file__)

from experiments.llama3.table1_common import (REPORTED_MATH, REPORTED_MT_BENCH, REPORTED_WEIGHTS, TESTED,  # noqa: E402
                                              fmt, md_table, mean_std, method_key, model_name)
from experiments.llama3.table1_protocol import (PROTOCOL, collect_protocol, plot_protocol_weights,  # noqa: E402
                                                render_protocol)

log = logging.getLogger("llama3.table1")

REPO = Path(__file__).resolve().parents[2]
RUN_DIR = re.compile(r"^(?P<method>.+)_seed(?P<seed>\d+)$")
CSV_FIELDS = ["kind", "origin", "preset", "model", "method", "item", "metric", "mean", "std", "n", "seeds"]
PROTOCOL_FIELDS = ["ci_lo", "ci_hi", "verdict"]


def _runs(preset_dir: Path) -> list[tuple[str, int, Path]]:
    out = []
    for d in sorted(p for p in preset_dir.iterdir() if p.is_dir()):
        m = RUN_DIR.match(d.name)
        if m:
            out.append((m["method"], int(m["seed"]), d))
    return out


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
                    models.setdefault(preset, set()).add(model_name(record))
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
        mean, std = mean_std([by_seed[s] for s in sorted(by_seed)])
        bench_rows.append({"kind": "benchmark", "origin": "ours", "preset": preset,
                           "model": ", ".join(sorted(models.get(preset, {"unknown"}))), "method": method,
                           "item": task, "metric": metric, "mean": mean, "std": std, "n": len(by_seed),
                           "seeds": " ".join(map(str, sorted(by_seed)))})
    weight_rows = []
    for (preset, source), by_seed in weights.items():
        mean, std = mean_std([by_seed[s] for s in sorted(by_seed)])
        weight_rows.append({"kind": "weight", "origin": "ours", "preset": preset,
                            "model": ", ".join(sorted(models.get(preset, {"unknown"}))), "method": TESTED,
                            "item": source, "metric": "p", "mean": mean, "std": std, "n": len(by_seed),
                            "seeds": " ".join(map(str, sorted(by_seed)))})
    bench_rows.sort(key=lambda r: (r["preset"], *method_key(r["method"]), r["item"]))
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
        rows.append({**base, "kind": "weight", "model": "Llama-3-8B", "method": TESTED, "item": source,
                     "metric": "p", "mean": value})
    return rows


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
                        [fmt(cells[c]["mean"], cells[c]["std"]) if c in cells else "—" for c in columns])
        out.append(md_table(header, rows))
    out.append("\n## Reported: MT-Bench (GPT-4 judge, 1–10)\n")
    out.append(md_table(["model", *next(iter(REPORTED_MT_BENCH.values())).keys()],
                        [[m, *(f"{v:.2f}" for v in by.values())] for m, by in REPORTED_MT_BENCH.items()]))
    out.append("\n## Reported: math (accuracy %, 20,000 resampled examples)\n")
    out.append(md_table(["model", "method", "GSM8K", "MATH"],
                        [[m, meth, f"{b['GSM8K']:.1f}", f"{b['MATH']:.1f}"]
                         for m, by in REPORTED_MATH.items() for meth, b in by.items()]))
    out.append("\n## Source weights: reported (Llama-3-8B, lr 2e-6) beside ours\n")
    presets = sorted({r["preset"] for r in weights})
    by_cell = {(r["preset"], r["item"]): r for r in weights}
    sources = sorted(set(REPORTED_WEIGHTS) | {r["item"] for r in weights}, key=str.lower)
    model_of = {r["preset"]: r["model"] for r in weights}
    header = ["source", "reported"] + [f"ours: {p} ({model_of[p]})" for p in presets]
    rows = [[s, f"{REPORTED_WEIGHTS[s]:.3f}" if s in REPORTED_WEIGHTS else "—"] +
            [fmt(by_cell[(p, s)]["mean"], by_cell[(p, s)]["std"]) if (p, s) in by_cell else "—" for p in presets]
            for s in sources]
    out.append(md_table(header, rows))
    if weights:
        out.append("\nA source absent from a column was not in that run (the offline pool holds 5 of the authors' "
                   "10 sources plus 3 stand-ins).\n")
    return "\n".join(out)


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
    protocol_rows = [r for k in ("bench", "differences", "draws", "weights", "spearman", "control") for r in protocol[k]]
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
