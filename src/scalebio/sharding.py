"""Sharding u and w over ranks with FSDP (torch's ``fully_shard``), for models too large to replicate.

Without sharding (``sharding: none``) every rank holds all of u and w and the solver sums gradients with one
all-reduce per parameter (data parallel, like DDP). With ``sharding: fsdp`` each decoder block and then the
whole model of u and of w is wrapped by ``fully_shard``: every parameter, its gradient and its AdamW moments
live as a 1/world shard on each rank, a block is gathered only for its forward and backward, and gradients
are reduce-scattered (summed: each rank's loss is its share of the global-batch objective, so the divide
factor is set to 1). LISA freezes and unfreezes whole blocks, which FSDP handles per block; the optimizer still
holds state only for the active blocks' shards.

``sharding: auto`` picks fsdp when more than one rank runs under ``accelerate launch`` with
- an FSDP config (accelerate exports ``ACCELERATE_USE_FSDP=true``; ``FSDP_OFFLOAD_PARAMS=true`` turns on CPU
  offload), or
- a DeepSpeed config with ZeRO stage 3. The solver does not build DeepSpeed engines (two models and a
  hand-made λ update do not fit ``accelerator.prepare``); it shards u and w with FSDP instead, which partitions
  parameters, gradients and optimizer state as ZeRO-3 does. Offload is on when the DeepSpeed JSON offloads
  parameters to the CPU. Stages 1 and 2 (which keep full parameters on every rank) run replicated.
Otherwise none. Checkpoints gather the full state on rank 0 (CPU), so a run can resume on another number of
ranks.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .config import ConfigError
from .lisa import find_blocks

MODES = ("auto", "none", "fsdp")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def resolve_mode(requested: str, world: int) -> tuple[str, bool]:
    """(mode, cpu_offload) for a run on ``world`` ranks; ``requested`` is the config's ``sharding``."""
    if requested not in MODES:
        raise ConfigError(f"sharding: {requested!r} is not one of {', '.join(MODES)}")
    offload = _env_true("FSDP_OFFLOAD_PARAMS")
    if requested == "auto":
        requested = "none"
        if _env_true("ACCELERATE_USE_FSDP"):
            requested = "fsdp"
        elif _env_true("ACCELERATE_USE_DEEPSPEED"):
            stage, offload = _deepspeed_zero()
            requested = "fsdp" if stage == 3 else "none"
    if world == 1:
        requested = "none"  # one rank: nothing to shard
    return requested, requested == "fsdp" and offload


def _deepspeed_zero() -> tuple[int, bool]:
    """(ZeRO stage, parameters offloaded to CPU) of the DeepSpeed launch accelerate describes in the environment."""
    import json

    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
    offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower() == "cpu"
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path != "none":
        try:
            zero = json.loads(open(path, encoding="utf-8").read()).get("zero_optimization", {})
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read the DeepSpeed config: {e}") from e
        stage = int(zero.get("stage", stage))
        offload = str(zero.get("offload_param", {}).get("device", "none")).lower() == "cpu"
    return stage, offload


def shard(model: nn.Module, cpu_offload: bool = False) -> nn.Module:
    """Wrap every decoder block, then the model, with ``fully_shard`` (in place); gradients are summed."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

    # Pinned host memory speeds up the copies to the GPU; it needs one to exist.
    kwargs = {"offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available())} if cpu_offload else {}
    _, blocks = find_blocks(model)
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_model_state(model: nn.Module) -> dict:
    """The model's full state dict on rank 0 (CPU), ``{}`` on the others. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: nn.Module, state: dict) -> None:
    """Load a full (unsharded) state dict, held by every rank, into a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded moment gathered to a full CPU tensor (on every rank; the
    caller saves rank 0's). Collective: every rank holds the same parameters and state keys (LISA draws the
    same blocks on every rank), so the gathers line up."""
    state = optimizer.state_dict()  # its per-parameter dicts are the live ones: build new dicts, never assign
    state["state"] = {idx: {key: (value.full_tensor().cpu() if _is_dtensor(value) else value)
                            for key, value in sorted(state["state"][idx].items())}
                      for idx in sorted(state["state"])}
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a full optimizer state: cut each moment to the shard of its parameter."""
    from torch.distributed.tensor import distribute_tensor

    for param, entry in optimizer.state.items():
        if not _is_dtensor(param):
            continue
        for key, value in list(entry.items()):
            if torch.is_tensor(value) and not _is_dtensor(value) and value.shape == param.shape:
                entry[key] = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def check_even_batches(sizes: dict[str, int], world: int) -> None:
    """FSDP runs a collective in every forward and backward, so every rank needs the same number of
    micro-batches: each batch size (config field → size) must split evenly over the ranks."""
    for name, size in sizes.items():
        if size % world:
            raise ConfigError(f"{name}: {size} does not split evenly over {world} ranks (needed with sharding: fsdp)")
