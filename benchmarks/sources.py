"""Number of sources (issue item 3): step time at k = 2 and k = 64 on the same tokens.

Both solvers see identical token batches (same ids, masks, labels); only ``source`` differs (example j
belongs to source j mod k). With as many examples as k = 64, every source is present in every batch, so
the per-source sums, counts and the λ update run at full size. The batch is split into micro-batches to
exercise accumulation as the solver does it.
"""

from __future__ import annotations

import logging

from .common import ModelSpec, SolverRunner, interleaved_times, split_micro, summarize, token_batch

log = logging.getLogger("benchmarks")


def run(arch: str, width: int, blocks: int, batch: int, micro: int, seq_len: int, ks: list[int],
        warmup: int, reps: int) -> dict:
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
    out = summarize(interleaved_times(variants, warmup, reps), f"k={ks[0]}")
    last = out[f"k={ks[-1]}"]
    return {
        "arch": arch,
        "model": spec.describe(),
        "settings": dict(width=width, blocks=blocks, batch=batch, micro_batch=micro, seq_len=seq_len, ks=ks,
                         warmup=warmup, reps=reps, lisa=False),
        "variants": out,
        "relative_difference": last["median_ratio"] - 1.0,
        "within_5_percent": abs(last["median_ratio"] - 1.0) <= 0.05,
    }
