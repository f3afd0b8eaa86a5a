"""A prototype of a library change, measured by the benchmarks and proposed in benchmarks/README.md; the
library itself is not changed here.

``FusedWScaleBiO``: w's two passes of method.md §3 line 2 (validation batch V and training batch B) run as
ONE forward/backward over the concatenated batch, with the loss L1(w; V) + α L2(λ, w; B) built from the
per-row cross-entropies. The gradient is the same sum; what is saved is one pass's fixed overhead (kernel
launches, Python dispatch over every block, the LM-head GEMM split in two), not arithmetic.
"""

from __future__ import annotations

import torch

from scalebio.solver import ScaleBiO, StepStats
from scalebio.mixture import mixture_loss, source_counts, source_sums


class FusedWScaleBiO(ScaleBiO):
    """Single-rank prototype: training and validation micro-batches are paired and must share the sequence
    length; per-source statistics are as in ``ScaleBiO.step``."""

    def step(self, train, val) -> StepStats:
        k, alpha = self.k, self.alpha
        p = self.weights()
        counts = sum(source_counts(mb["source"], k) for mb in train)
        val_terms = float(sum(self.objective.validation_terms(mb) for mb in val))
        for opt in (self.opt_u, self.opt_w, self.opt_lam):
            opt.zero_grad(set_to_none=True)

        sums_u = torch.zeros(k, dtype=torch.float64)
        for mb in train:
            ell = self.objective.per_example_loss(self.u, mb)
            mixture_loss(ell, mb["source"], p, counts).backward()
            sums_u += source_sums(ell.detach().double(), mb["source"], k)

        # w on V and B in one pass: rows [0, b_val) are validation, the rest training.
        sums_w = torch.zeros(k, dtype=torch.float64)
        val_sum = torch.zeros((), dtype=torch.float64)
        for tmb, vmb in zip(train, val):
            n_val = vmb["input_ids"].shape[0]
            joint = {key: torch.cat([vmb[key], tmb[key]]) for key in ("input_ids", "attention_mask", "labels")}
            ce, mask = self.objective.token_losses(self.w, joint)
            val_total = ce[:n_val].sum()
            ell = ce[n_val:].sum(1) / mask[n_val:].sum(1).clamp(min=1)
            (val_total / val_terms + alpha * mixture_loss(ell, tmb["source"], p, counts)).backward()
            val_sum += val_total.detach().double()
            sums_w += source_sums(ell.detach().double(), tmb["source"], k)

        present = counts > 0
        mean_u = torch.where(present, sums_u / counts.clamp(min=1), torch.zeros_like(sums_u))
        mean_w = torch.where(present, sums_w / counts.clamp(min=1), torch.zeros_like(sums_w))
        self.lambda_objective(mean_w, mean_u).backward()
        self.opt_u.step()
        self.opt_w.step()
        self.opt_lam.step()
        self.step_index += 1
        return StepStats(float(val_sum / val_terms), float((p * mean_u).sum()), float((p * mean_w).sum()),
                         mean_u.tolist(), mean_w.tolist(), [int(c) for c in counts.tolist()])
