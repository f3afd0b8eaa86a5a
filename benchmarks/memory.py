"""Peak memory (issue item 2): SFT of one copy vs ScaleBiO without LISA vs ScaleBiO + LISA, and LISA's
optimizer-state policy across switches (ours: state for the active set only; ``keep_all_state``: the
released code's, moments of every block ever active kept).

Method (stated in benchmarks/README.md): two allocator-independent counts, in the benchmark process.
1. Live tensor bytes over time from torch's profiler (``profile_memory=True``): every allocation and free
   through torch's CPU allocator, with the running total since the profile opened. Each configuration is
   built inside its own profile, so the total counts exactly its tensors: parameters, gradients, optimizer
   moments, activations and temporaries. Peak = max of the running total; per step: peak inside the step
   and the live bytes when it ended.
2. Persistent state by direct count after every step: distinct storages of parameters, gradients and
   optimizer moments (a check on 1, and the clean view of the policy's growth).
LISA switches every step (K = 1) so that ``steps`` steps see ``steps − 1`` switches.
"""

from __future__ import annotations

import gc
import logging

from tqdm.auto import tqdm

from .common import SFT, AllocationTrace, ModelSpec, SolverRunner, fmt_mib, state_bytes, token_batch

log = logging.getLogger("benchmarks")

CONFIGS = {
    # name: (ScaleBiO?, LISA?, keep_all_state)
    "sft": (False, False, False),
    "scalebio": (True, False, False),
    "scalebio_lisa": (True, True, False),
    "scalebio_lisa_keep_all_state": (True, True, True),
}


def measure(spec: ModelSpec, config: str, steps: int, batch: int, seq_len: int, k: int) -> dict:
    solver, lisa, keep_all = CONFIGS[config]
    if not lisa:  # no switches to see: the peak is reached once the optimizer moments exist (step 2)
        steps = min(steps, 3)
    gc.collect()
    per_step = []
    with AllocationTrace() as trace:
        train = [token_batch(spec.vocab, batch, seq_len, k, seed=1)]
        val = [token_batch(spec.vocab, batch, seq_len, k, seed=2)]
        with trace.mark("build"):
            runner = SolverRunner(spec, k, lisa=lisa, keep_all_state=keep_all, interval=1) if solver \
                else SFT(spec.build(0))
        for i in range(steps):
            with trace.mark(f"step{i}"):
                runner.step(train, val)
            record = state_bytes(runner.models(), runner.optimizers())
            record["total_state"] = sum(record.values())
            if lisa:
                record["active_blocks_u"] = list(runner.solver.lisa_u.active)
                record["active_blocks_w"] = list(runner.solver.lisa_w.active)
            per_step.append(record)
    trace_out = trace.analyse()
    for i, record in enumerate(per_step):
        phase = trace_out["phases"][f"step{i}"]
        record["peak_bytes"] = phase["peak_bytes"]
        record["end_bytes"] = phase["end_bytes"]
    del runner
    gc.collect()
    return {
        "config": config,
        "peak_bytes": trace_out["peak_bytes"],
        "peak_mib": fmt_mib(trace_out["peak_bytes"]),
        "after_build_bytes": trace_out["phases"]["build"]["end_bytes"],
        "steps": per_step,
        "lisa_switches": steps - 1 if lisa else 0,
        "steps_run": steps,
    }


def run(arch: str, width: int, blocks: int, batch: int, seq_len: int, k: int, steps: int) -> dict:
    spec = ModelSpec(arch, width, blocks, seq_len)
    configs = {}
    for name in tqdm(CONFIGS, desc=f"memory {arch}", leave=False):
        log.info("memory %s %s: %d steps", arch, name, steps)
        configs[name] = measure(spec, name, steps, batch, seq_len, k)
    sft = configs["sft"]["peak_bytes"]
    ratios = {name: c["peak_bytes"] / sft for name, c in configs.items()}
    keep = configs["scalebio_lisa_keep_all_state"]["steps"]
    ours = configs["scalebio_lisa"]["steps"]
    return {
        "arch": arch,
        "model": spec.describe(spec.build(0)),
        "method": "torch profiler allocation events (live tensor bytes, allocator-independent) + direct count of "
                  "parameter/gradient/optimizer-state storages",
        "settings": dict(width=width, blocks=blocks, batch=batch, val_batch=batch, seq_len=seq_len, k=k, steps=steps,
                         lisa_interval=1, gamma=spec.gamma),
        "configs": configs,
        "peak_ratio_to_sft": ratios,
        "lisa_state_growth": {
            "ours_total_state_first_last": [ours[0]["total_state"], ours[-1]["total_state"]],
            "keep_all_total_state_first_last": [keep[0]["total_state"], keep[-1]["total_state"]],
            "ours_peak_first_last": [ours[0]["peak_bytes"], ours[-1]["peak_bytes"]],
            "keep_all_peak_first_last": [keep[0]["peak_bytes"], keep[-1]["peak_bytes"]],
        },
    }
