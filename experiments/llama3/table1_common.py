"""What both sections of Table 1 share (table1.py: the small runs and the reported numbers; table1_protocol.py: the
protocol): the paper's reported numbers, the order of the arms, mean ± sample std over seeds, the model a weights
file names, and Markdown cells and tables."""

from __future__ import annotations

import statistics
from pathlib import Path

import yaml

REPORTED = yaml.safe_load((Path(__file__).resolve().parent / "reported.yaml").read_text())
"""The paper's numbers (reported.yaml): ``mt_bench`` model → method → score, ``math`` model → method → benchmark →
accuracy %, ``weights`` source → learned p (Llama-3-8B)."""
REPORTED_MT_BENCH: dict[str, dict[str, float]] = REPORTED["mt_bench"]
REPORTED_MATH: dict[str, dict[str, dict[str, float]]] = REPORTED["math"]
REPORTED_WEIGHTS: dict[str, float] = REPORTED["weights"]

TESTED = "learned"
"""The arm fine-tuned on data drawn by ScaleBiO's learned weights: every other arm is compared with it."""
BASE = "base"
"""The model before fine-tuning (a row, not an arm)."""


def method_key(method: str) -> tuple[int, str]:
    """Row order: the tested arm, then every other arm by name, then the base model."""
    return (0 if method == TESTED else 2 if method == BASE else 1), method


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def model_name(weights: dict) -> str:
    """The model a weights file's provenance names."""
    model = weights.get("provenance", {}).get("model", {})
    return model.get("name_or_path") or model.get("gguf_file") or model.get("architecture") or "unknown"


def fmt(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
