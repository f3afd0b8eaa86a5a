"""Number of sources (issue item 3): step time at k = 2 and k = 64 on the same tokens.

Both solvers see identical token batches (same ids, masks, labels); only ``source`` differs (example j
belongs to source j mod k). With as many examples as k = 64, every source is present in every batch, so
the per-source sums, counts and the λ update run at full size. The batch is split into micro-batches to
exercise accumulation as the solver does it. Beside the whole-step times (whose repetition-to-repetition
noise on a shared CPU can exceed 5%), the k-dependent work is timed alone (``k_dependent_work``), interleaved
k by k over many repetitions. Both ratios come with their spread (quartiles and range of per-repetition ratios).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from scalebio.mixture import mixture_loss, source_counts, source_sums

from .common import ModelSpec, SolverRunner, interleaved_times, split_micro, spread, summarize, token_batch

log = logging.getLogger("benchmarks")


def k_dependent_work(batch: int, micro: int, k: int) -> Callable[[], None]:
    """One step's worth of everything in ``ScaleBiO.step`` whose size depends on k, run alone on stand-in
    per-example losses: counts, the mixture losses and their backward (u and w), per-source sums, the λ
    objective and its backward, λ's AdamW step. The rest of the step (the passes, u's and w's AdamW) does
    not see k."""
    lam = torch.nn.Parameter(torch.zeros(k, dtype=torch.float64))
    opt = torch.optim.AdamW([lam], lr=1e-2)
    sources = [s % k for s in torch.arange(batch).split(micro)]
    ells = [torch.rand(len(s), requires_grad=True) for s in sources]

    def once() -> None:
        p = torch.softmax(lam.detach(), 0)
        counts = sum(source_counts(s, k) for s in sources)
        sums = {}
        for copy in ("u", "w"):
            sums[copy] = torch.zeros(k, dtype=torch.float64)
            for ell, s in zip(ells, sources):
                mixture_loss(ell, s, p, counts).backward()
                sums[copy] += source_sums(ell.detach().double(), s, k)
        mean = {c: v / counts.clamp(min=1) for c, v in sums.items()}
        opt.zero_grad(set_to_none=True)
        (100.0 * (torch.softmax(lam, 0) * (mean["w"] - mean["u"])).sum()).backward()
        opt.step()

    return once


def run(arch: str, width: int, blocks: int, batch: int, micro: int, seq_len: int, ks: list[int],
        warmup: int, reps: int, work_reps: int) -> dict:
    spec = ModelSpec(arch, width, blocks, seq_len)
    base_train = token_batch(spec.vocab, batch, seq_len, 1, seed=1)
    base_val = token_batch(spec.vocab, batch, seq_len, 1, seed=2)
    variants = {}
    for k in ks:
        train = split_micro({**base_train, "source": base_train["source"].new_tensor(range(batch)) % k}, micro)
        val = split_micro({**base_val, "source": base_val["source"].new_tensor(range(batch)) % k}, micro)
        runner = SolverRunner(spec, k, lisa=False)
        variants[f"k={k}"] = (lambda r, t, v: lambda: r.step(t, v))(runner, train, val)
    log.info("sources: k in %s, %d reps", ks, warmup + reps)
    first, last = f"k={ks[0]}", f"k={ks[-1]}"
    out = summarize(interleaved_times(variants, warmup, reps), first)
    ratio = spread(out[last]["ratio_to_" + first])
    work = summarize(interleaved_times({f"k={k}": k_dependent_work(batch, micro, k) for k in ks}, 10, work_reps),
                     first)
    extra = work[last]["median_s"] - work[first]["median_s"]
    return {
        "arch": arch,
        "model": spec.describe(),
        "settings": dict(width=width, blocks=blocks, batch=batch, micro_batch=micro, seq_len=seq_len, ks=ks,
                         warmup=warmup, reps=reps, work_reps=work_reps, lisa=False),
        "variants": out,
        "ratio": ratio,
        "relative_difference": ratio["median"] - 1.0,
        "within_5_percent": abs(ratio["median"] - 1.0) <= 0.05,
        "not_slower_by_5_percent": ratio["median"] <= 1.05,
        "k_dependent_work_s": {name: v["median_s"] for name, v in work.items()},
        "k_dependent_work_ratio": spread(work[last]["ratio_to_" + first]),
        "k_dependent_work_difference_fraction_of_step": extra / out[first]["median_s"],
        # The step ratio the isolated timing implies: the k = 2 step plus the extra k-dependent work.
        "ratio_from_k_dependent_work": 1.0 + extra / out[first]["median_s"],
    }
