"""The mixture loss of method.md §1 and the λ gradient of §3: per-source sums and counts, and a micro-batch's share
of L2.

    L2(λ, w) = Σ_i p_i · (1/n_i) Σ_j ℓ(w; a_ij),   p = softmax(λ)

Each source is averaged on its own, then mixed by p_i, so a large source gets no weight just for being large.
"""

from __future__ import annotations

import torch


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
