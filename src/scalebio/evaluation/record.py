"""The compact ``eval.json`` record (``{tasks: {task: {metric: value}}, model, limit, lm_eval_version, n_samples}``)
and lm-eval's full results beside it."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

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

    _atomic_write(out.with_suffix(".full.json"), json.dumps(results, indent=2, default=handle_non_serializable))
    _atomic_write(out, json.dumps(compact, indent=2))
    for task, row in compact["tasks"].items():
        log.info("%s: %s", task, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
    return compact


def _atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
