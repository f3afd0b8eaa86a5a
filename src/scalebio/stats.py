"""Comparing two fine-tuning arms on per-document evaluation values, and comparing weight vectors.

A metric of one run is a ratio over documents, Σ_d num_d / Σ_d den_d: for NLL per token num = the document's
NLL and den = its number of target tokens (the token-weighted mean eval.json reports); for exact match num = 0/1
and den = 1 (the mean). ``Ratio`` holds these for several runs of one arm over the same documents.

``paired_bootstrap`` compares arm A (learned weights) with arm B (uniform), whose run i shares its fine-tuning
seed: each iteration draws the pairs (runs, with replacement) and the documents (with replacement, the same draw
for every run of both arms), and takes mean over the drawn pairs of metric_A − metric_B. So the interval covers
the spread from fine-tuning seeds and from the finite evaluation set together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VERDICTS = ("reproduced", "contradicted", "inconclusive")


@dataclass(frozen=True)
class Ratio:
    """Per-document numerators and denominators of one arm: ``num``, ``den`` float arrays [runs, docs]."""

    num: np.ndarray
    den: np.ndarray

    def __post_init__(self):
        if self.num.ndim != 2 or self.num.shape != self.den.shape:
            raise ValueError(f"Ratio: num {self.num.shape} and den {self.den.shape} must be the same [runs, docs]")

    def per_run(self) -> np.ndarray:
        """The metric of each run over all documents: [runs]."""
        return self.num.sum(axis=1) / self.den.sum(axis=1)


@dataclass(frozen=True)
class Comparison:
    """mean over pairs of metric_A − metric_B, and its bootstrap percentile interval."""

    difference: float
    lo: float
    hi: float
    pairs: int
    docs: int
    iters: int
    level: float


def _resampled(arm: Ratio, doc_counts: np.ndarray, run_draw: np.ndarray) -> np.ndarray:
    """The arm's metric for each iteration: doc_counts [iters, docs] (how often each document is drawn),
    run_draw [iters, pairs] (which runs are drawn) → [iters]."""
    num = (doc_counts[:, None, :] * arm.num[None]).sum(axis=2)  # [iters, runs]
    den = (doc_counts[:, None, :] * arm.den[None]).sum(axis=2)
    return np.take_along_axis(num / den, run_draw, axis=1).mean(axis=1)


def paired_bootstrap(a: Ratio, b: Ratio, iters: int = 2000, seed: int = 0, level: float = 0.95,
                     chunk: int = 200) -> Comparison:
    """Difference a − b (mean over paired runs of each run's metric) and its ``level`` percentile interval
    from ``iters`` draws of pairs and documents (module docstring). Deterministic in ``seed`` (and ``chunk``,
    the iterations drawn at once)."""
    if a.num.shape != b.num.shape:
        raise ValueError(f"paired_bootstrap: arms differ in [runs, docs]: {a.num.shape} vs {b.num.shape}")
    n_runs, n_docs = a.num.shape
    if n_runs == 0 or n_docs == 0:
        raise ValueError("paired_bootstrap: no runs or no documents")
    rng = np.random.default_rng(seed)
    diffs = np.empty(iters)
    for start in range(0, iters, chunk):
        size = min(chunk, iters - start)
        doc_counts = rng.multinomial(n_docs, np.full(n_docs, 1.0 / n_docs), size=size).astype(float)
        run_draw = rng.integers(n_runs, size=(size, n_runs))
        diffs[start:start + size] = _resampled(a, doc_counts, run_draw) - _resampled(b, doc_counts, run_draw)
    lo, hi = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
    difference = a.per_run().mean() - b.per_run().mean()
    return Comparison(float(difference), float(lo), float(hi), n_runs, n_docs, iters, level)


def verdict(lo: float, hi: float, lower_is_better: bool) -> str:
    """For an interval of a − b (a: the method the paper claims is better): "reproduced" when it excludes 0 on
    the side where a is better, "contradicted" when it excludes 0 on the other side, else "inconclusive"."""
    if lo > 0:
        return "contradicted" if lower_is_better else "reproduced"
    if hi < 0:
        return "reproduced" if lower_is_better else "contradicted"
    return "inconclusive"


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    """Spearman rank correlation of two weight dicts over their shared keys (at least 2)."""
    from scipy.stats import spearmanr

    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        raise ValueError(f"spearman: needs at least 2 shared keys, got {keys}")
    return float(spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic)


def sample_metric(line: dict) -> tuple[str, float, float]:
    """(eval.json metric name, num, den) of one ``eval_samples.jsonl`` line (scalebio.evaluation.record)."""
    if "exact_match" in line:
        return f"exact_match,{line['filter']}", float(line["exact_match"]), 1.0
    if "n_tokens" in line:
        return "nll_per_token", float(line["nll"]), float(line["n_tokens"])
    return "bits_per_byte", float(line["nll"]) / np.log(2), float(line["n_bytes"])


def task_ratios(runs: list[list[dict]]) -> dict[tuple[str, str], Ratio]:
    """``{(task, metric): Ratio}`` from the ``eval_samples.jsonl`` lines of several runs of one arm (run order
    kept), for the tasks every run has; documents in doc_id order. A task whose runs scored different documents
    is an error (the comparison would not be paired)."""
    per_run: list[dict[tuple[str, str], dict[int, tuple[float, float]]]] = []
    for lines in runs:
        table: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
        for line in lines:
            metric, num, den = sample_metric(line)
            table.setdefault((line["task"], metric), {})[int(line["doc_id"])] = (num, den)
        per_run.append(table)
    shared = set.intersection(*(set(t) for t in per_run)) if per_run else set()
    out = {}
    for key in sorted(shared):
        docs = sorted(per_run[0][key])
        if any(sorted(t[key]) != docs for t in per_run):
            raise ValueError(f"task_ratios: {key[0]}: runs scored different documents")
        values = np.array([[t[key][d] for d in docs] for t in per_run])  # [runs, docs, 2]
        out[key] = Ratio(values[..., 0], values[..., 1])
    return out
