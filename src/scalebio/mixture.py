"""The mixture loss of method.md §1 and the λ gradient of §3: per-source sums and counts, a micro-batch's share of
L2, and the two ways a batch split into micro-batches forms its per-source means.

    L2(λ, w) = Σ_i p_i · (1/n_i) Σ_j ℓ(w; a_ij),   p = softmax(λ)

Each source is averaged on its own, then mixed by p_i, so a large source gets no weight just for being large.
"""

from __future__ import annotations

from dataclasses import dataclass

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


# ---------------------------------------------------------------------------------------------------------
# One step's batch, split into micro-batches (and ranks): how n_i is counted and each micro-batch's term scaled.


@dataclass
class BatchTotals:
    """What one step knows about its whole batch before any forward pass, summed over ranks."""

    p: torch.Tensor
    """[k] the source weights softmax(λ), detached."""
    counts: torch.Tensor
    """[k] float64: examples of each source in B (all micro-batches, all ranks)."""
    val_terms: torch.Tensor
    """float64 scalar: the terms L1 averages over in V (all micro-batches, all ranks)."""
    train_micro_batches: int
    """G: B's micro-batches over all ranks."""
    val_micro_batches: int
    """V's micro-batches over all ranks."""

    @property
    def k(self) -> int:
        return self.p.numel()


class GlobalBatchMeans:
    """n_i counted over the global batch, and L1 the mean over all of V's terms: the micro-batch split does not
    change the objective (``scalebio`` and ``acl``)."""

    def training_share(self, per_example: torch.Tensor, source: torch.Tensor, totals: BatchTotals) -> torch.Tensor:
        """This micro-batch's share of L2 (differentiable)."""
        return mixture_loss(per_example, source, totals.p, totals.counts)

    def source_term(self, per_example: torch.Tensor, source: torch.Tensor, totals: BatchTotals) -> torch.Tensor:
        """This micro-batch's share of what ``source_means`` reads: its per-source loss sums [k] (float64, CPU)."""
        return source_sums(per_example.detach().double(), source, totals.k).cpu()

    def validation_share(self, loss_sum: torch.Tensor, terms: int, totals: BatchTotals) -> torch.Tensor:
        """This V micro-batch's share of L1 from its loss sum over its ``terms`` terms: the sum over all V's terms."""
        return loss_sum / float(totals.val_terms)

    def validation_record(self, share: torch.Tensor, loss_sum: torch.Tensor, totals: BatchTotals) -> torch.Tensor:
        """This V micro-batch's part of the sum that, over ``totals.val_terms``, is the logged L1."""
        return loss_sum.detach().double().cpu()

    def source_means(self, summed: torch.Tensor, totals: BatchTotals) -> torch.Tensor:
        """Per-source mean losses [k] from the summed ``source_term``s; 0 for a source absent from B."""
        return torch.where(totals.counts > 0, summed / totals.counts.clamp(min=1), torch.zeros_like(summed))


class MicroBatchMeans:
    """The v1 code's reductions: n_i counted in each micro-batch and every micro-batch's term divided by G (its
    count), L1 the mean of the V micro-batches' means. The objective then depends on how B and V are split."""

    def training_share(self, per_example: torch.Tensor, source: torch.Tensor, totals: BatchTotals) -> torch.Tensor:
        here = source_counts(source.cpu(), totals.k)
        return mixture_loss(per_example, source, totals.p, here) / totals.train_micro_batches

    def source_term(self, per_example: torch.Tensor, source: torch.Tensor, totals: BatchTotals) -> torch.Tensor:
        """This micro-batch's per-source means over G [k] (float64, CPU): summed over micro-batches, the means."""
        sums = source_sums(per_example.detach().double(), source, totals.k).cpu()
        here = source_counts(source.cpu(), totals.k)
        return torch.where(here > 0, sums / here.clamp(min=1), torch.zeros_like(sums)) / totals.train_micro_batches

    def validation_share(self, loss_sum: torch.Tensor, terms: int, totals: BatchTotals) -> torch.Tensor:
        return loss_sum / max(1, terms) / totals.val_micro_batches

    def validation_record(self, share: torch.Tensor, loss_sum: torch.Tensor, totals: BatchTotals) -> torch.Tensor:
        return share.detach().double().cpu() * totals.val_terms

    def source_means(self, summed: torch.Tensor, totals: BatchTotals) -> torch.Tensor:
        return summed  # the source terms are means already
