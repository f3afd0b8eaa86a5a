"""The attention mask of right-padded batches: the objective's forward/backward with the padding mask passed to
the model (the old code) and without it (``scalebio.solver.padding_mask``: under causal attention a real token
never sees the pads to its right, so the mask changes no real token's output, and without it the model takes its
plain causal attention path).

One SmolLM2-135M copy (real weights) with LISA's trainable set (γ blocks, embeddings, norm, head), one
right-padded batch of ``batch`` × ``seq_len`` (rows 75–100% full, as every benchmark's), the chunked
cross-entropy; forward and backward of the mean per-example loss, the two variants interleaved ``reps`` times.
"""

from __future__ import annotations

import contextlib
import logging
from unittest import mock

import torch

from scalebio import solver as solver_mod
from scalebio.lisa import Lisa
from scalebio.solver import CausalLMObjective

from .common import interleaved_times, spread, summarize, token_batch
from .precision import build

log = logging.getLogger("benchmarks")


def run(model: str, batch: int, seq_len: int, gamma: int, threads: int, warmup: int, reps: int,
        device: str = "cpu") -> dict:
    torch.set_num_threads(threads)
    net = build(model, torch.device(device))
    net.requires_grad_(False)
    # one LISA draw (never redrawn); the optimizer is only there for Lisa.update to point at the active blocks
    Lisa(net, gamma, 10**9, seed=0, stream=1).update(0, torch.optim.SGD([torch.zeros(1)], lr=0.0))
    data = token_batch(net.config.vocab_size, batch, seq_len, 2, seed=0)
    objective = CausalLMObjective()

    def step(masked: bool) -> float:
        passes_mask = mock.patch.object(solver_mod, "padding_mask", lambda b: b["attention_mask"])
        with passes_mask if masked else contextlib.nullcontext():
            loss = objective.per_example_loss(net, data).mean()
            loss.backward()
        net.zero_grad(set_to_none=True)
        return float(loss)

    masked_loss, causal_loss = step(True), step(False)
    same = abs(masked_loss - causal_loss) <= 1e-5 * abs(masked_loss)
    times = interleaved_times({"padding_mask": lambda: step(True), "causal_only": lambda: step(False)},
                              warmup, reps)
    summary = summarize(times, "padding_mask")
    ratios = summary["causal_only"]["ratio_to_padding_mask"]
    log.info("padding: causal-only ÷ padding-mask %.3f (median of %d)", summary["causal_only"]["median_ratio"], reps)
    return {"settings": {"model": model, "batch": batch, "seq_len": seq_len, "gamma": gamma, "threads": threads,
                         "warmup": warmup, "reps": reps, "device": device},
            "padded_rows": int((data["attention_mask"] == 0).any(1).sum()),
            "same_loss": bool(same),
            "variants": summary,
            "causal_over_padding_mask": spread(ratios)}
