"""The compact ``eval.json`` record (``{tasks: {task: {metric: value}}, model, limit, lm_eval_version, n_samples}``),
lm-eval's full results beside it, and the per-document ``eval_samples.jsonl``.

``eval_samples.jsonl``: one line per (task, document), sorted by task then doc_id, the values lm-eval aggregated:

* log-likelihood tasks: ``{"task", "doc_id", "nll", "n_tokens", "n_bytes"}`` with ``nll`` = -log p(target | context)
  in nats and the token / byte counts the task divides by (a count the task does not define is left out), so
  Σ nll / Σ n_tokens over a task's lines is its ``nll_per_token`` in eval.json;
* exact-match tasks: ``{"task", "doc_id", "filter", "exact_match": 0 | 1}``; the mean over a task's lines is
  eval.json's ``exact_match,<filter>``.

Documents of other tasks (e.g. multiple-choice ``acc``) are not written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..files import write_text

log = logging.getLogger(__name__)


def _metric_key(key: str) -> str:
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else key


def compact_results(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results: ",none" filter suffixes dropped (other filters stay,
    e.g. ``exact_match,extract``), stderr kept only when numeric."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            # sample_len repeats n_samples; stderr is "N/A" for weighted aggregations.
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            row[_metric_key(key)] = float(value)
        out[task] = row
    return out



PRIMARY_METRICS = ["exact_match,extract", "exact_match,strict-match", "exact_match,flexible-extract", "exact_match",
                   "acc_norm", "acc", "score", "nll_per_token", "bits_per_byte"]
"""The metric that stands for a task in a table: the first of these the task has (``primary_metric``)."""
LOWER_IS_BETTER = {"nll_per_token", "bits_per_byte", "token_perplexity", "word_perplexity", "byte_perplexity"}
"""Metrics (without a filter suffix) where lower is better; for the others higher is."""


def primary_metric(metrics: dict[str, float]) -> str | None:
    """The one metric of a task's compact record that stands for it: the first of PRIMARY_METRICS it has, else its
    alphabetically first metric that is not a stderr (None when it has none)."""
    for name in PRIMARY_METRICS:
        if name in metrics:
            return name
    rest = sorted(k for k in metrics if "stderr" not in k)
    return rest[0] if rest else None

def write_record(results: dict, out: Path, model_name: str, limit: int | None, lm_eval_version: str) -> dict:
    """Write ``out`` (the compact record) and ``out.with_suffix(".full.json")`` (lm-eval's results without
    per-sample logs) from ``simple_evaluate``'s results; log each task's metrics; return the compact record."""
    results.pop("samples", None)
    n_samples = {task: counts.get("effective", counts.get("original"))
                 for task, counts in results.get("n-samples", {}).items()}
    compact = {
        "tasks": compact_results(results),
        "model": model_name,
        "limit": limit,
        "lm_eval_version": lm_eval_version,
        "n_samples": n_samples,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from lm_eval.utils import handle_non_serializable

    write_text(out.with_suffix(".full.json"), json.dumps(results, indent=2, default=handle_non_serializable))
    write_text(out, json.dumps(compact, indent=2))
    for task, row in compact["tasks"].items():
        log.info("%s: %s", task, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
    return compact


def _loglik_line(task: str, sample: dict) -> dict | None:
    """The per-document line of a log-likelihood task, from the (loglik, count) items its metrics carry."""
    by_tokens, by_bytes = sample.get("nll_per_token"), sample.get("bits_per_byte")
    pairs = [item for item in (by_tokens, by_bytes) if isinstance(item, (tuple, list)) and len(item) == 2]
    if not pairs:
        return None
    line = {"task": task, "doc_id": int(sample["doc_id"]), "nll": -float(pairs[0][0])}
    if by_tokens is not None:
        line["n_tokens"] = int(by_tokens[1])
    if by_bytes is not None:
        line["n_bytes"] = int(by_bytes[1])
    return line


def compact_samples(samples: dict[str, list[dict]]) -> list[dict]:
    """``eval_samples.jsonl`` lines (module docstring) from ``simple_evaluate(log_samples=True)["samples"]``."""
    lines = []
    for task, task_samples in samples.items():
        for sample in task_samples:
            if "exact_match" in sample:
                value = float(sample["exact_match"])
                if value not in (0.0, 1.0):
                    raise ValueError(f"{task} doc {sample['doc_id']}: exact_match {value} is not 0 or 1")
                lines.append({"task": task, "doc_id": int(sample["doc_id"]), "filter": sample["filter"],
                              "exact_match": int(value)})
            elif (line := _loglik_line(task, sample)) is not None:
                lines.append(line)
    lines.sort(key=lambda r: (r["task"], r.get("filter", ""), r["doc_id"]))
    return lines


def write_samples(samples: dict[str, list[dict]], out: Path) -> list[dict]:
    """Write ``out`` (``eval_samples.jsonl``) from lm-eval's logged samples; returns its lines."""
    lines = compact_samples(samples)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, "".join(json.dumps(line) + "\n" for line in lines))
    return lines


def read_samples(path: Path) -> list[dict]:
    """The lines of an ``eval_samples.jsonl`` (a malformed line is an error naming the file and the line)."""
    from ..data import read_records

    return read_records(Path(path))
