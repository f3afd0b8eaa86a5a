"""Peak memory (issue item 2): SFT of one copy vs ScaleBiO without LISA vs ScaleBiO + LISA, and LISA's
optimizer-state policy across switches (ours: state for the active set only; ``keep_all_state``: the
released code's, moments of every block ever active kept).

Method (stated in benchmarks/README.md): two allocator-independent counts, in the benchmark process.
1. Live tensor bytes over time from torch's profiler (``profile_memory=True``): every allocation and free
   through torch's CPU allocator, with the running total. All configurations are built first (outside the
   profile: profiling model initialisation costs seconds), then stepped one after another inside one
   profile, each freed before the next begins. A configuration's bytes = its tensors before the first step
   (parameters, buffers, λ, batches; counted directly) + the running total minus the total when its first
   step began (gradients, optimizer moments, activations, temporaries). Peak = max over its steps; per
   step: the peak inside the step and the live bytes when it ended.
2. Persistent state by direct count after every step: distinct storages of parameters, gradients and
   optimizer moments (a check on 1, and the clean view of the policy's growth).
LISA switches every step (K = 1) so that ``steps`` steps see ``steps − 1`` switches.
"""

from __future__ import annotations

import gc
import logging

from tqdm.auto import tqdm

from .common import SFT, AllocationTrace, ModelSpec, SolverRunner, fmt_mib, state_bytes, tensor_bytes, token_batch

log = logging.getLogger("benchmarks")

CONFIGS = {
    # name: (ScaleBiO?, LISA?, keep_all_state)
    "sft": (False, False, False),
    "scalebio": (True, False, False),
    "scalebio_lisa": (True, True, False),
    "scalebio_lisa_keep_all_state": (True, True, True),
}


def build(spec: ModelSpec, config: str, batch: int, seq_len: int, k: int):
    """(runner, train, val, bytes of its tensors before any step: parameters, buffers, λ, batches)."""
    solver, lisa, keep_all = CONFIGS[config]
    train = [token_batch(spec.vocab, batch, seq_len, k, seed=1)]
    val = [token_batch(spec.vocab, batch, seq_len, k, seed=2)]
    runner = SolverRunner(spec, k, lisa=lisa, keep_all_state=keep_all, interval=1) if solver else SFT(spec.build(0))
    tensors = [t for m in runner.models() for t in (*m.parameters(), *m.buffers())]
    tensors += [t for mb in train + val for t in mb.values()]
    if solver:
        tensors.append(runner.solver.lam)
    return runner, train, val, tensor_bytes(tensors)


def measure(trace: AllocationTrace, runner, train, val, config: str, steps: int) -> dict:
    """Step one configuration inside ``trace``; byte counts are filled in by ``finish``."""
    lisa = CONFIGS[config][1]
    if not lisa:  # no switches to see: the peak is reached once the optimizer moments exist (step 2)
        steps = min(steps, 3)
    per_step = []
    for i in range(steps):
        with trace.mark(f"{config}:step{i}"):
            runner.step(train, val)
        record = state_bytes(runner.models(), runner.optimizers())
        record["total_state"] = sum(record.values())
        if lisa:
            record["active_blocks_u"] = list(runner.solver.lisa_u.active)
            record["active_blocks_w"] = list(runner.solver.lisa_w.active)
        per_step.append(record)
    return {"config": config, "steps": per_step, "lisa_switches": steps - 1 if lisa else 0, "steps_run": steps}


def finish(result: dict, static_bytes: int, phases: dict) -> dict:
    """Bytes = tensors that existed before the first step (counted directly) + what the steps allocated on top
    (profiler running total minus the total when the first step began)."""
    name = result["config"]
    base = phases[f"{name}:step0"]["start_bytes"]
    result["before_first_step_bytes"] = static_bytes
    for i, record in enumerate(result["steps"]):
        phase = phases[f"{name}:step{i}"]
        record["peak_bytes"] = static_bytes + phase["peak_bytes"] - base
        record["end_bytes"] = static_bytes + phase["end_bytes"] - base
    result["peak_bytes"] = max(r["peak_bytes"] for r in result["steps"])
    result["peak_mib"] = fmt_mib(result["peak_bytes"])
    return result


def run(arch: str, width: int, blocks: int, batch: int, seq_len: int, k: int, steps: int) -> dict:
    spec = ModelSpec(arch, width, blocks, seq_len)
    configs, static = {}, {}
    built = {}
    for name in CONFIGS:  # built outside the profile: profiling model initialisation costs seconds
        runner, train, val, static[name] = build(spec, name, batch, seq_len, k)
        built[name] = (runner, train, val)
    with AllocationTrace() as trace:
        for name in tqdm(CONFIGS, desc=f"memory {arch}", leave=False):
            log.info("memory %s %s: %d steps", arch, name, steps)
            runner, train, val = built.pop(name)
            configs[name] = measure(trace, runner, train, val, name, steps)
            del runner, train, val  # freed before the next configuration's first step
            gc.collect()
    phases = trace.analyse()["phases"]
    configs = {name: finish(c, static[name], phases) for name, c in configs.items()}
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
