"""The weight logits λ, p = softmax(λ), per-source loss aggregation, and the weights file.

method.md §1: L2(λ, w) = Σ_i p_i · (1/n_i) Σ_j ℓ(w; a_ij): each source is averaged on its own, then mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

WEIGHTS_FORMAT = "scalebio.weights/1"


def source_sums(per_example: torch.Tensor, source: torch.Tensor, num_sources: int) -> torch.Tensor:
    """Sum of per-example losses per source with one scatter. per_example [B], source [B] → [k]."""
    out = torch.zeros(num_sources, dtype=per_example.dtype, device=per_example.device)
    return out.index_add_(0, source, per_example)


def source_counts(source: torch.Tensor, num_sources: int) -> torch.Tensor:
    """Examples per source in a batch. source [B] → [k] (float64 so it can be all-reduced with the sums)."""
    return torch.bincount(source, minlength=num_sources).to(torch.float64)


def mixture_loss(per_example: torch.Tensor, source: torch.Tensor, p: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """This micro-batch's share of L2 = Σ_i p_i (1/n_i) Σ_j ℓ_ij, with n_i counted over the global batch.

    per_example [b] (differentiable), source [b], p [k] (detached), counts [k] (global, ≥ 1 where a source
    appears in this micro-batch). A source absent from the batch has no terms, so it contributes nothing and
    its zero count is never a divisor.
    """
    coef = (p / counts.clamp(min=1)).to(device=per_example.device, dtype=per_example.dtype)
    return (coef[source] * per_example).sum()


def lambda_gradient(p: torch.Tensor, loss_w: torch.Tensor, loss_u: torch.Tensor, present: torch.Tensor, alpha: float) -> torch.Tensor:
    """α [∇λ L2(λ, w) − ∇λ L2(λ, u)] = α J (ℓ^w − ℓ^u), J = diag(p) − p pᵀ (method.md §3).

    p, loss_w, loss_u [k] (per-source mean losses), present [k] bool. Absent sources have no loss term.
    Used as a reference in tests; the solver gets the same number by autograd through softmax.
    """
    d = torch.where(present, loss_w - loss_u, torch.zeros_like(loss_w))
    jac = torch.diag(p) - torch.outer(p, p)
    return alpha * jac @ d


def atomic_write_text(path: Path, text: str, before_replace=None) -> None:
    """Write a file so that readers see the old content or the new one, never a partial file: a temporary file
    beside ``path``, fsynced, then renamed over it (``before_replace()`` runs just before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    atomic_write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def load_weights(path: str | Path) -> dict:
    """Read a weights.json; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    for key in ("sources", "weights"):
        if key not in data:
            raise ValueError(f"{path}: missing field {key!r}")
    total = sum(data["weights"].values())
    if abs(total - 1.0) > 1e-6 or any(v < 0 for v in data["weights"].values()):
        raise ValueError(f"{path}: field 'weights' is not a probability vector (sum {total})")
    return data


def load_probabilities(path: str | Path, order: list[str] | None = None) -> list[float]:
    """Probabilities in ``order`` (default: the file's source order), ready for
    ``datasets.interleave_datasets(..., probabilities=...)``."""
    data = load_weights(path)
    order = order or data["sources"]
    missing = [n for n in order if n not in data["weights"]]
    if missing:
        raise ValueError(f"{path}: no weight for source {missing[0]!r}")
    probs = [data["weights"][n] for n in order]
    s = sum(probs)
    return [v / s for v in probs]
