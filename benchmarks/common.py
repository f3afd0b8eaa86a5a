"""Shared pieces of the benchmarks: proportioned models, token batches, the SFT baseline, solver builders,
interleaved timing and the two memory meters.

Model proportions (random init; only shapes matter for cost):
- ``llama``: 32 blocks, FFN 3.5·d, heads d/32 with 4 query heads per KV head, untied embeddings and head,
  vocabulary 31.3·d, so embeddings + head are 13% of the parameters as in LLaMA-3-8B (128256 / 4096 = 31.3).
- ``gpt2``: 12 blocks, FFN 4·d, heads d/64, tied embeddings, vocabulary 65.4·d, so the (shared) embedding is
  31% of the parameters as in GPT-2 small (50257 / 768 = 65.4).
"""

from __future__ import annotations

import bisect
import gc
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from scalebio import precision
from scalebio.config import SolverConfig
from scalebio.lisa import Lisa, find_blocks
from scalebio.solver import CausalLMObjective, ScaleBiO

log = logging.getLogger("benchmarks")

# LISA γ per architecture (method.md §4: γ = 4 in the later Llama script, γ = 2 for GPT-2).
GAMMA = {"llama": 4, "gpt2": 2}
BLOCKS = {"llama": 32, "gpt2": 12}
VOCAB_PER_WIDTH = {"llama": 31.3, "gpt2": 65.4}


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # 'llama' | 'gpt2'
    width: int
    blocks: int
    seq_len: int
    attn: str = "sdpa"  # 'eager' where double backward is needed (hypergradient)

    @property
    def vocab(self) -> int:
        return max(32, round(VOCAB_PER_WIDTH[self.arch] * self.width))

    @property
    def gamma(self) -> int:
        return min(GAMMA[self.arch], self.blocks - 1)

    def build(self, seed: int = 0) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        d = self.width
        if self.arch == "llama":
            heads = max(1, d // 32)
            cfg = LlamaConfig(vocab_size=self.vocab, hidden_size=d, intermediate_size=int(3.5 * d),
                              num_hidden_layers=self.blocks, num_attention_heads=heads,
                              num_key_value_heads=max(1, heads // 4), tie_word_embeddings=False,
                              max_position_embeddings=max(64, self.seq_len))
            model = LlamaForCausalLM(cfg)
        elif self.arch == "gpt2":
            cfg = GPT2Config(vocab_size=self.vocab, n_embd=d, n_layer=self.blocks, n_head=max(1, d // 64),
                             n_positions=max(64, self.seq_len), tie_word_embeddings=True, bos_token_id=0,
                             eos_token_id=0)
            model = GPT2LMHeadModel(cfg)
        else:
            raise ValueError(f"unknown arch {self.arch!r}")
        model.config._attn_implementation = self.attn
        return model.float().train()

    def describe(self, model: nn.Module | None = None) -> dict:
        out = {**asdict(self), "vocab": self.vocab, "gamma": self.gamma}
        if model is not None:
            total = sum(p.numel() for p in model.parameters())
            _, blocks = find_blocks(model)
            in_blocks = sum(p.numel() for p in blocks.parameters())
            out.update(parameters=total, outside_blocks_fraction=round(1 - in_blocks / total, 4))
        return out


def token_batch(vocab: int, b: int, seq_len: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    """b examples of up to ``seq_len`` tokens, right-padded; the first 25–50% of each is the prompt (labels −100),
    the rest the response. ``source`` cycles through k sources."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, seq_len), generator=g)
    lengths = torch.randint(seq_len * 3 // 4, seq_len + 1, (b,), generator=g)
    prompt = (lengths.float() * (0.25 + 0.25 * torch.rand(b, generator=g))).long().clamp(min=1)
    pos = torch.arange(seq_len)[None]
    attention = (pos < lengths[:, None]).long()
    labels = ids.masked_fill((pos < prompt[:, None]) | (attention == 0), -100)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels, "source": torch.arange(b) % k}


def split_micro(batch: dict, micro: int) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{key: v[i:i + micro] for key, v in batch.items()} for i in range(0, n, micro)]


SOLVER_CFG = dict(lr_u=1e-5, lr_w=1e-5, lr_lambda=1e-2, alpha=100.0)


class SFT:
    """Plain full-parameter SFT of one copy: AdamW, loss = mean per-example response-token loss. The forward
    runs under ``compute_dtype``'s autocast, as the solver's does (fp32: no autocast)."""

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.model, self.objective = model, CausalLMObjective()
        self.compute_dtype, self.device = compute_dtype, torch.device(device)
        cfg = SolverConfig(**SOLVER_CFG)
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr_w, weight_decay=cfg.weight_decay_w,
                                     betas=tuple(cfg.betas), eps=cfg.eps)

    def step(self, train: list[dict], val: list[dict] | None = None) -> None:
        self.opt.zero_grad(set_to_none=True)
        n = sum(mb["input_ids"].shape[0] for mb in train)
        for mb in train:
            with precision.autocast(self.compute_dtype, self.device):
                loss = self.objective.per_example_loss(self.model, mb).sum() / n
            loss.backward()
        self.opt.step()

    def models(self) -> list[nn.Module]:
        return [self.model]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.opt]


class SolverRunner:
    """ScaleBiO from the library, driven as the reweight loop drives it: ``update_lisa`` then ``step``."""

    def __init__(self, spec: ModelSpec, k: int, lisa: bool, keep_all_state: bool = False, interval: int = 20,
                 seed: int = 0, solver_cls=ScaleBiO):
        u, w = spec.build(seed), spec.build(seed)
        lisa_u = Lisa(u, spec.gamma, interval, seed=0, stream=1, keep_all_state=keep_all_state) if lisa else None
        lisa_w = Lisa(w, spec.gamma, interval, seed=0, stream=2, keep_all_state=keep_all_state) if lisa else None
        self.solver = solver_cls(u, w, CausalLMObjective(), k, SolverConfig(**SOLVER_CFG), lisa_u, lisa_w)

    def step(self, train: list[dict], val: list[dict]) -> None:
        self.solver.update_lisa(self.solver.step_index)
        self.solver.step(train, val)

    def models(self) -> list[nn.Module]:
        return [self.solver.u, self.solver.w]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.solver.opt_u, self.solver.opt_w, self.solver.opt_lam]


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_bf16_flags": list(precision.cpu_bf16_flags()),
        "precision_auto_on_cpu": "bf16" if precision.resolve("auto", torch.device("cpu")) == torch.bfloat16 else "fp32",
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        info["cpu_model"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_bf16"] = torch.cuda.is_bf16_supported()
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_times(variants: dict[str, Callable[[], None]], warmup: int, reps: int) -> dict[str, list[float]]:
    """Run every variant once per repetition, in turn, so drift from other load on the machine hits all alike.
    Returns the timed repetitions (warm-up dropped) per variant, in seconds. The cyclic garbage collector is
    off while timing (reference counting still frees every tensor at once), so no collection pause lands
    inside one variant's time."""
    out: dict[str, list[float]] = {name: [] for name in variants}
    gc.collect()
    gc.disable()
    try:
        for r in range(warmup + reps):
            for name, fn in variants.items():
                t = timed(fn)
                if r >= warmup:
                    out[name].append(t)
    finally:
        gc.enable()
    return out


def summarize(times: dict[str, list[float]], baseline: str | None) -> dict:
    """Median seconds per variant, and per-repetition ratios to ``baseline`` with their median."""
    out = {name: {"seconds": ts, "median_s": statistics.median(ts)} for name, ts in times.items()}
    if baseline is not None:
        base = times[baseline]
        for name, ts in times.items():
            ratios = [t / b for t, b in zip(ts, base)]
            out[name]["ratio_to_" + baseline] = ratios
            out[name]["median_ratio"] = statistics.median(ratios)
            out[name]["ratio_of_medians"] = statistics.median(ts) / statistics.median(base)
    return out


def spread(values: list[float]) -> dict:
    """median, quartiles and range of ``values``."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


# -- memory ------------------------------------------------------------------------------------------------------
def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (shared storages, e.g. tied weights, counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def state_bytes(models: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """Persistent training state by direct count: parameters, gradients, optimizer moments."""
    params = [p for m in models for p in m.parameters()]
    opt = [v for o in optimizers for s in o.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "params": tensor_bytes(params),
        "grads": tensor_bytes(p.grad for p in params),
        "optimizer_state": tensor_bytes(opt),
    }


class AllocationTrace:
    """Exact bytes of live tensor memory over time, from the profiler's allocation events.

    With ``profile_memory=True`` every allocation and free through torch's CPU allocator is reported with
    the running total of bytes allocated since profiling started; this counts tensor bytes, not what malloc
    keeps around, so it is independent of the allocator. Everything measured must be created inside the
    ``with`` block: totals are taken relative to the one just before its first allocation. ``mark(name)``
    delimits phases.
    """

    def __init__(self):
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._marks: list[tuple[str, object]] = []

    def __enter__(self):
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)

    def mark(self, name: str):
        ctx = torch.profiler.record_function("bench::" + name)
        self._marks.append((name, ctx))
        return ctx

    def analyse(self) -> dict:
        """peak bytes overall, and per marked phase: the peak inside it and the live bytes when it ended."""
        from torch._C._profiler import _EventType

        allocs, ranges = [], {}
        stack = list(self._prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.tag == _EventType.Allocation:
                fields = node.extra_fields
                allocs.append((node.start_time_ns, fields.total_allocated, fields.alloc_size))
            elif node.name.startswith("bench::"):
                ranges[node.name[len("bench::"):]] = (node.start_time_ns, node.end_time_ns)
            stack.extend(node.children)
        allocs.sort()
        # The profiler's running total counts live allocations made under any earlier profile too; measure
        # from the total just before this profile's first allocation.
        base = allocs[0][1] - allocs[0][2] if allocs else 0
        times = [t for t, _, _ in allocs]
        totals = [v - base for _, v, _ in allocs]
        phases = {}
        for name, (start, end) in sorted(ranges.items(), key=lambda kv: kv[1][0]):
            i, j = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
            before = totals[i - 1] if i > 0 else 0
            inside = totals[i:j]
            phases[name] = {"peak_bytes": max([before] + inside), "end_bytes": totals[j - 1] if j > 0 else 0,
                            "start_bytes": before}
        return {"peak_bytes": max(totals) if totals else 0, "phases": phases}


def fmt_mib(n: int | float) -> float:
    return round(n / 2**20, 3)
