"""The weights file: a run's product (method.md §7), p = softmax(λ) per source with the λ it came from and its
provenance. Recorded (``weights_record``, ``write_weights``), and read back checked (``load_weights``,
``load_probabilities``) by everything that uses it. The mixture loss and the λ gradient are in scalebio.mixture.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .files import write_text

WEIGHTS_FORMAT = "scalebio.weights/1"


def example_stats(examples) -> dict[str, int]:
    """What a run trains on from one source: ``examples`` (kept after decontamination and truncation),
    ``tokens`` (sum of their input lengths after truncation) and ``response_tokens`` (the tokens the loss
    scores: labels other than -100, position 0 excluded since it is never predicted). ``examples`` is a list of
    objects with ``input_ids`` and ``labels`` (``scalebio.data.Example``)."""
    return {
        "examples": len(examples),
        "tokens": sum(len(e.input_ids) for e in examples),
        "response_tokens": sum(sum(1 for x in e.labels[1:] if x != -100) for e in examples),
    }


def weights_record(names: list[str], lam: torch.Tensor, example_counts: dict[str, int], provenance: dict[str, Any],
                   source_stats: dict[str, dict[str, int]] | None = None) -> dict:
    """The weights file's content: source → weight in config order, plus the λ it came from and provenance.

    ``source_stats`` ({name: example_stats(...)}) lets exporters convert between example-weighted and
    token-weighted mixtures exactly (``scalebio export --basis``); files written before it existed lack it.
    """
    p = torch.softmax(lam.detach().double(), dim=0).tolist()
    record = {
        "format": WEIGHTS_FORMAT,
        "sources": list(names),
        "weights": dict(zip(names, p)),
        "probabilities": p,
        "lambda": lam.detach().double().tolist(),
        "example_counts": example_counts,
    }
    if source_stats is not None:
        missing = [n for n in names if n not in source_stats]
        if missing:
            raise ValueError(f"source_stats: no entry for source {missing[0]!r}")
        record["source_stats"] = {n: dict(source_stats[n]) for n in names}
    record["provenance"] = provenance
    return record


def write_weights(path: Path, record: dict) -> None:
    write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


WEIGHTS_TOLERANCE = 1e-6
"""How far the weights of a weights file may sum from 1 (a file scalebio writes is off by ~1e-16; a hand-edited
one rounds)."""


class WeightsFileError(ValueError):
    """A weights file that is not a valid mixture; the message names the file and the field."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def load_weights(path: str | Path, expected: list[str] | None = None) -> dict:
    """Read and check a weights file; every reader (resample, export, ``load_probabilities``) goes through here.

    A JSON object whose ``sources`` is a list of distinct names and whose ``weights`` maps exactly those names to
    finite numbers >= 0 that sum to 1 within ``WEIGHTS_TOLERANCE``; ``probabilities``, when present, the same
    numbers in ``sources`` order; with ``expected``, the sources are exactly those names. Otherwise
    WeightsFileError naming the file and the field (FileNotFoundError for a missing file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")

    def bad(field: str, what: str) -> WeightsFileError:
        return WeightsFileError(f"{path}: field {field!r}: {what}")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WeightsFileError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise WeightsFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        raise WeightsFileError(f"{path}: expected a JSON object with 'sources' and 'weights', got "
                               f"{type(data).__name__}")
    for key in ("sources", "weights"):
        if key not in data:
            raise WeightsFileError(f"{path}: missing field {key!r}")
    sources, weights = data["sources"], data["weights"]
    if not isinstance(sources, list) or not sources or not all(isinstance(n, str) and n for n in sources):
        raise bad("sources", "expected a non-empty list of source names")
    repeated = sorted({n for n in sources if sources.count(n) > 1})
    if repeated:
        raise bad("sources", f"source {repeated[0]!r} is listed twice")
    if not isinstance(weights, dict):
        raise bad("weights", f"expected an object source → weight, got {type(weights).__name__}")
    missing = [n for n in sources if n not in weights]
    extra = [n for n in weights if n not in sources]
    if missing:
        raise bad("weights", f"no weight for source {missing[0]!r} (field 'sources' lists it)")
    if extra:
        raise bad("weights", f"a weight for {extra[0]!r}, which field 'sources' does not list")
    for name in sources:
        value = _number(weights[name])
        if value is None:
            raise bad(f"weights.{name}", f"{weights[name]!r} is not a number")
        if not math.isfinite(value):
            raise bad(f"weights.{name}", f"{value} is not finite")
        if value < 0:
            raise bad(f"weights.{name}", f"{value} is negative")
    total = math.fsum(float(weights[n]) for n in sources)
    if abs(total - 1.0) > WEIGHTS_TOLERANCE:
        raise bad("weights", f"the weights sum to {total:.12g}, not 1 (tolerance {WEIGHTS_TOLERANCE:g})")
    probs = data.get("probabilities")
    if probs is not None:
        numbers = [_number(v) for v in probs] if isinstance(probs, list) else None
        if numbers is None or len(numbers) != len(sources) or any(
                v is None or not math.isclose(v, float(weights[n]), rel_tol=0, abs_tol=1e-12)
                for v, n in zip(numbers, sources)):
            raise bad("probabilities", "differs from field 'weights' (taken in the order of field 'sources')")
    if expected is not None:
        absent = [n for n in expected if n not in sources]
        unexpected = [n for n in sources if n not in expected]
        if absent or unexpected:
            parts = ([f"no weight for {', '.join(map(repr, absent))}"] if absent else []) + (
                [f"a weight for {', '.join(map(repr, unexpected))}, which is not expected"] if unexpected else [])
            raise bad("sources", f"{'; '.join(parts)} (expected exactly: {', '.join(expected)})")
    return data


def load_probabilities(path: str | Path, order: list[str] | None = None) -> list[float]:
    """Probabilities in ``order`` (default: the file's source order; given, it must name exactly the file's
    sources), ready for ``datasets.interleave_datasets(..., probabilities=...)``."""
    data = load_weights(path, expected=order)
    order = order or data["sources"]
    probs = [float(data["weights"][n]) for n in order]
    s = sum(probs)
    return [v / s for v in probs]
