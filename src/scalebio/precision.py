"""Compute precision: ``precision: auto | fp32 | bf16`` for `scalebio reweight`, `finetune` and `evaluate`.

bf16 means bf16 matrix work under ``torch.autocast`` with fp32 master weights and fp32 optimizer state; the
losses, per-source means and λ stay in fp32 / fp64 (the solver casts them). ``auto`` picks bf16 on a CUDA device
that supports it, or on a CPU whose instruction set has bf16 matrix instructions (AMX-BF16 or AVX-512 BF16),
else fp32.

Why autocast and not bf16 working copies of the weights: autocast caches each weight's bf16 cast for the
whole forward and backward of one context (``cache_enabled``), so a weight is cast once per pass, and the
optimizer keeps stepping fp32 parameters with no copy-back to keep in sync (benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

CHOICES = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The bf16 matrix instruction sets this CPU reports (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return tuple(f for f in CPU_BF16_FLAGS if f in flags)


def cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve(choice: str, device: torch.device) -> torch.dtype:
    """The compute dtype for ``choice`` on ``device``: torch.float32 or torch.bfloat16."""
    if choice not in CHOICES:
        raise ValueError(f"precision: {choice!r} is not one of {', '.join(CHOICES)}")
    if choice == "fp32":
        return torch.float32
    if choice == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if cuda_bf16() else torch.float32
    return torch.bfloat16 if cpu_bf16_flags() else torch.float32


def autocast(dtype: torch.dtype, device: torch.device):
    """The context every forward and backward runs under: autocast to bf16, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def record(choice: str, dtype: torch.dtype, device: torch.device) -> dict:
    """What meta.json says about the precision: the choice, what it resolved to, and why."""
    return {
        "precision": choice,
        "compute_dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "device": device.type,
        "cpu_bf16_flags": list(cpu_bf16_flags()),
        "cuda_bf16": cuda_bf16(),
        "method": "torch.autocast, fp32 master weights and optimizer state" if dtype == torch.bfloat16 else "fp32",
    }
