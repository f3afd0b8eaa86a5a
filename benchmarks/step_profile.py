"""Profile of one ScaleBiO step (issue 10, item 3): where the time goes before and after the step's changes.

  before   ``CausalLMObjective(chunked=False)`` (full [tokens × vocab] logits, fp32 log-softmax over all of them)
           and ``solver.fused_w = False`` (w on V, then w on B)
  after    the defaults: chunked cross-entropy on labelled tokens only, one w pass over V and B
One solver (u, w, λ, one LISA draw of γ blocks per copy) on SmolLM2-135M, in the precision ``auto`` resolves to
on this device; each configuration warms up on ``warmup_shape`` tokens, then one step on the full shape runs
under ``torch.profiler``. Every op's self time (CPU, or the device's on CUDA) goes to one category; ops anywhere
below an ``Optimizer.step`` / ``Optimizer.zero_grad`` range count as optimizer.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import defaultdict
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from scalebio import precision
from scalebio.config import SolverConfig
from scalebio.lisa import Lisa
from scalebio.solver import CausalLMObjective, ScaleBiO

from .common import SOLVER_CFG, token_batch
from .precision import build, sync

log = logging.getLogger("benchmarks")

CATEGORIES = ("matmul", "attention", "log-softmax / CE", "copies and casts", "optimizer", "other")
MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv", "aten::dot"}
COPIES = {"aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::index", "aten::index_put_",
          "aten::_index_put_impl_", "aten::masked_select", "aten::nonzero", "aten::constant_pad_nd",
          "aten::gather", "aten::index_select", "aten::masked_fill_", "aten::masked_fill"}


def category(name: str) -> str:
    """The category of one op by its name (optimizer membership is decided by its ancestors, not here)."""
    if name in MATMUL:
        return "matmul"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention"
    if any(s in name for s in ("log_softmax", "nll_loss", "cross_entropy", "logsumexp")):
        return "log-softmax / CE"
    if name in COPIES:
        return "copies and casts"
    return "other"


def categorize(events, device_time: bool) -> tuple[dict, list]:
    """Self time in ms per category, and the 12 ops with the most self time."""
    def under_optimizer(e) -> bool:
        while e is not None:
            if e.name.startswith(("Optimizer.step", "Optimizer.zero_grad")):
                return True
            e = e.cpu_parent
        return False

    totals, per_op = defaultdict(float), defaultdict(float)
    for e in events:
        us = e.self_device_time_total if device_time else e.self_cpu_time_total
        if us <= 0:
            continue
        cat = "optimizer" if under_optimizer(e) else category(e.name)
        totals[cat] += us / 1e3
        per_op[e.name] += us / 1e3
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:12]
    return {c: totals.get(c, 0.0) for c in CATEGORIES}, [{"op": n, "ms": ms} for n, ms in top]


def run(model: str, batch: int, seq_len: int, k: int, gamma: int, threads: int, warmup_shape: list[int],
        device: str = "cpu") -> dict:
    device = torch.device(device)
    before_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net = build(model, device)
        dtype = precision.resolve("auto", device)
        u, w = copy.deepcopy(net), copy.deepcopy(net)
        del net
        cfg = SolverConfig(**SOLVER_CFG)
        solver = ScaleBiO(u, w, CausalLMObjective(), k, cfg, Lisa(u, gamma, 10**9, seed=0, stream=1),
                          Lisa(w, gamma, 10**9, seed=0, stream=2), compute_dtype=dtype, device=device)
        solver.update_lisa(0)
        configs = {"before": (CausalLMObjective(chunked=False), replace(cfg, fused_w=False)),
                   "after": (CausalLMObjective(), cfg)}

        def batches(shape):
            vocab = u.config.vocab_size
            move = lambda b: {key: v.to(device) for key, v in b.items()}  # noqa: E731
            return ([move(token_batch(vocab, shape[0], shape[1], k, seed=1))],
                    [move(token_batch(vocab, shape[0], shape[1], k, seed=2))])

        warm, full = batches(warmup_shape), batches([batch, seq_len])
        for objective, c in configs.values():
            solver.objective, solver.cfg = objective, c
            solver.step(*warm)
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        out = {}
        for name, (objective, c) in configs.items():
            solver.objective, solver.cfg = objective, c
            log.info("profile: %s step on %dx%d", name, batch, seq_len)
            start = time.perf_counter()
            with profile(activities=activities) as prof:
                solver.step(*full)
                sync(device)
            wall = time.perf_counter() - start
            ms, top = categorize(prof.events(), device.type == "cuda")
            total = sum(ms.values())
            out[name] = {"wall_s": wall, "profiled_ms": total, "ms": ms,
                         "percent": {c: 100 * v / total for c, v in ms.items()}, "top_ops": top,
                         "chunked_ce": objective.chunked, "fused_w": c.fused_w}
    finally:
        torch.set_num_threads(before_threads)
    return {
        "model": {"name": model, "parameters": sum(p.numel() for p in u.parameters()), "gamma": gamma, "k": k},
        "device": device.type,
        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
        "time_basis": "device self time" if device.type == "cuda" else "CPU self time",
        "settings": dict(batch=batch, val_batch=batch, seq_len=seq_len, threads=threads, warmup_shape=warmup_shape),
        "configs": out,
        "after_over_before_wall": out["after"]["wall_s"] / out["before"]["wall_s"],
    }
