"""Compute precision: ``precision: auto | fp32 | bf16`` for `scalebio reweight`, `finetune` and `evaluate`.

Three rules hold in every mode (issue 18, "bf16 must not change the answer"):

1. Master weights and optimizer state are fp32. A model loaded with ``model.dtype: bfloat16`` (or float16) is
   upcast before its optimizer is built (``fp32_master``): plain and LISA runs, torch FSDP (each block upcast just
   before it is sharded, scalebio.sharding.shard) and DeepSpeed (its bf16 mode keeps fp32 master weights and
   moments in the optimizer; the settings that would not are refused, scalebio.sharding.deepspeed_config).
   Why: AdamW at lr 2e-6 moves a bf16-stored N(0, 0.02) weight in only ~1% of its entries per step, the rest
   round back to where they were (environment.md, "bf16 changes ScaleBiO's answer").
2. ``bf16`` is bf16 matrix work under ``torch.autocast`` for the forward and backward passes that give u's and
   w's gradients. Autocast caches each weight's bf16 cast for one pass (``cache_enabled``), so a weight is cast
   once per pass and the optimizer steps fp32 parameters with no copy-back (benchmarks/README.md).
3. λ's gradient uses per-source losses computed in fp32: in ``bf16`` the solver recomputes ℓ_i(u) and ℓ_i(w) on
   B by fp32 forwards without gradients (``solver.gap_precision: fp32``, the default). λ moves by the gap
   ℓ_i(w) − ℓ_i(u), which is 1e-5 to 1e-3 when a pretrained model is fine-tuned at a small lr; bf16 rounding of
   each loss is 1e-3 to 1e-2, so a gap taken from the bf16 passes is noise, often of the wrong sign
   (benchmarks/gap_noise.py, results/bench/gap_noise.json). Cost of a bf16 step: 3 bf16 forward+backward passes
   (u on B, w on V and B) + 2 fp32 forwards on B. ``solver.gap_precision: compute`` takes the gap from the bf16
   passes instead: the behaviour before issue 18, kept only to reproduce runs made with it (the GPT-2
   experiments: models trained from scratch at lr 1e-3, whose gaps are far above bf16 rounding).

fp32 runs with TF32 and reduced-precision fp32 matmuls off (``exact_fp32``: on CUDA, TF32 keeps 10 mantissa
bits, close to bf16's 8, and would lose the gap the same way; on a CPU, ``torch.set_float32_matmul_precision
("medium")`` lets oneDNN use bf16 inside fp32 matmuls).

``auto`` picks bf16 on a CUDA device that supports it, or on a CPU with bf16 matrix instructions (AMX-BF16 or
AVX-512 BF16), else fp32: the fastest of the two where both give λ's gradient at cosine >= 0.99 with an fp64
reference at every point measured (benchmarks/README.md, "Gap noise"). ``SCALEBIO_CPU_AUTO=fp32|bf16`` fixes the
CPU's choice instead of detecting it (the test suite sets fp32). Without bf16 units the CPU emulates bf16
matmuls, 5.9× slower than fp32.
"""

from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError

CHOICES = ("auto", "fp32", "bf16")
GAP_CHOICES = ("fp32", "compute")
"""``solver.gap_precision``: where the per-source losses of λ's step come from (module docstring, rule 3)."""
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
LOW_PRECISION = (torch.bfloat16, torch.float16)
CPU_AUTO_ENV = "SCALEBIO_CPU_AUTO"
"""Set to ``fp32`` or ``bf16`` to fix what ``auto`` picks on a CPU instead of detecting bf16 units. The test suite
sets ``fp32`` so that no verdict depends on the machine's bf16 units (tests of bf16 name ``bf16`` explicitly)."""


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
    forced = cpu_auto_override()
    if forced is not None:
        return DTYPES[forced]
    return torch.bfloat16 if cpu_bf16_flags() else torch.float32


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_auto_override() -> str | None:
    """``fp32`` / ``bf16`` when the environment fixes what ``auto`` picks on a CPU (``SCALEBIO_CPU_AUTO``), else None."""
    value = os.environ.get(CPU_AUTO_ENV, "").strip()
    if not value:
        return None
    if value not in DTYPES:
        raise ConfigError(f"environment variable {CPU_AUTO_ENV}={value!r}: expected fp32 or bf16 (or unset, to detect "
                          f"the CPU's bf16 units)")
    return value


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls at full precision inside the block: no TF32 on CUDA, no bf16 passes inside oneDNN's fp32
    matmuls on a CPU (``torch.set_float32_matmul_precision("highest")``, torch's default); restored after."""
    matmul = torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


def autocast(dtype: torch.dtype, device: torch.device):
    """The context every forward and backward runs under: autocast to bf16, or exact fp32 (``exact_fp32``)."""
    if dtype in (torch.float32, torch.float64):
        return exact_fp32()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def fp32_master(module: nn.Module) -> int:
    """Upcast ``module``'s bf16 / fp16 parameters and floating buffers to fp32, in place (the Parameter objects
    stay the same, so optimizers, LISA and hooks built on them still hold them); returns how many parameter
    elements changed dtype. fp32 and fp64 tensors, and FSDP shards (DTensors: scalebio.sharding.shard upcasts
    before sharding), are left alone."""
    changed = 0
    with torch.no_grad():
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                if param.dtype in LOW_PRECISION and not _is_dtensor(param):
                    param.data = param.data.float()
                    changed += param.numel()
            for name, buf in sub.named_buffers(recurse=False):
                if buf is not None and buf.dtype in LOW_PRECISION and not _is_dtensor(buf):
                    sub._buffers[name] = buf.float()
    return changed


def check_fp32_master(module: nn.Module, field: str = "model.dtype") -> None:
    """Refuse to train parameters stored below fp32 (rule 1), naming the config ``field`` that loaded them."""
    low = sorted({str(p.dtype).replace("torch.", "") for p in module.parameters() if p.dtype in LOW_PRECISION})
    if low:
        raise ConfigError(f"{field}: parameters stored in {', '.join(low)} would be trained without fp32 master weights "
                         f"(small AdamW updates round away); load float32, or upcast with scalebio.precision.fp32_master "
                         f"before building the optimizer")


def record(choice: str, dtype: torch.dtype, device: torch.device, gap_precision: str | None = None) -> dict:
    """What meta.json says about the precision: the choice, what it resolved to and why, where λ's per-source
    losses came from (``gap_precision``: the solver's setting; None for fine-tuning and evaluation) and the
    master-weight dtype."""
    bf16 = dtype == torch.bfloat16
    out = {
        "precision": choice,
        "compute_dtype": "bf16" if bf16 else "fp32",
        "device": device.type,
        "cpu_bf16_flags": list(cpu_bf16_flags()),
        **({"cpu_auto_from": f"{CPU_AUTO_ENV}={forced}"} if (forced := cpu_auto_override()) else {}),
        "cuda_bf16": cuda_bf16(),
        "master_weights": "fp32 (parameters and AdamW moments; bf16/fp16-loaded models upcast)",
        "method": "torch.autocast bf16 forward/backward" if bf16 else "fp32 (TF32 and reduced-precision matmuls off)",
    }
    if bf16:
        out["gap_losses"] = {
            "fp32": "fp32 forwards on B without gradients (2 per step), TF32 off",
            "compute": "from the bf16 passes (solver.gap_precision: compute, pre-issue-18 behaviour)",
            None: "reweighting: fp32 forwards on B without gradients unless config.yaml has solver.gap_precision: "
                  "compute; fine-tuning and evaluation have no gap",
        }[gap_precision]
    return out
