"""Sharding models over ranks: torch FSDP (``fully_shard``) for u and w, and a DeepSpeed engine for fine-tuning.

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
- a DeepSpeed config with ZeRO stage 3, for `scalebio reweight`. The solver does not build DeepSpeed engines:
  a ZeRO engine fixes the set of parameters it partitions and steps when it is initialised, and LISA changes the
  trainable blocks every K steps (measured with DeepSpeed 0.19.8, ZeRO-2 and ZeRO-3: after a switch the newly
  frozen block kept moving on its Adam moments and the newly active block never moved). So u and w are sharded
  with FSDP, which partitions parameters, gradients and optimizer state as ZeRO-3 does; offload is on when the
  DeepSpeed JSON offloads parameters to the CPU; stages 1 and 2 (full parameters on every rank) run replicated.
  ``resolve_mode`` logs a warning saying so, and ``deepspeed_fsdp_mapping`` records which DeepSpeed setting
  became which FSDP setting (the run's meta.json).
`scalebio finetune` trains one model with a fixed trainable set, so there a DeepSpeed launch (or
``sharding: deepspeed``) runs a real DeepSpeed engine (``deepspeed.initialize``) with the ZeRO stage, offload
and precision of the JSON (``deepspeed_config``).
Otherwise none. FSDP checkpoints gather the full state on rank 0 (CPU), so a run can resume on another number
of ranks.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError
from .distributed import rank_and_world
from .lisa import find_blocks

log = logging.getLogger(__name__)

MODES = ("auto", "none", "fsdp")
ENGINE_MODES = MODES + ("deepspeed",)
"""Modes of `scalebio finetune`, which can also run a DeepSpeed engine."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def resolve_mode(requested: str, world: int, deepspeed_engine: bool = False) -> tuple[str, bool]:
    """(mode, cpu_offload) for a run on ``world`` ranks; ``requested`` is the config's ``sharding``.

    ``deepspeed_engine``: the caller can train in a DeepSpeed engine (`scalebio finetune`), so ``deepspeed`` is
    a valid mode and ``auto`` under an accelerate DeepSpeed launch picks it (offload is then the engine's,
    from its JSON: the returned flag is False). Otherwise a DeepSpeed launch is mapped onto FSDP (module
    docstring), with a warning."""
    modes = ENGINE_MODES if deepspeed_engine else MODES
    if requested not in modes:
        raise ConfigError(f"sharding: {requested!r} is not one of {', '.join(modes)}")
    offload = _env_true("FSDP_OFFLOAD_PARAMS")
    if requested == "auto":
        requested = "none"
        if _env_true("ACCELERATE_USE_FSDP"):
            requested = "fsdp"
        elif _env_true("ACCELERATE_USE_DEEPSPEED") and deepspeed_engine:
            requested = "deepspeed"
        elif _env_true("ACCELERATE_USE_DEEPSPEED"):
            stage, offload = _deepspeed_zero()
            requested = "fsdp" if stage == 3 else "none"
            if world > 1 and rank_and_world()[0] == 0:
                log.warning("DeepSpeed launch (ZeRO stage %d%s): scalebio reweight does not build DeepSpeed engines "
                            "(LISA changes the trainable blocks, which a ZeRO engine cannot follow); u and w run "
                            "with sharding=%s%s instead (meta.json: deepspeed_mapped_to_fsdp)", stage,
                            ", parameters offloaded to CPU" if offload else "", requested,
                            " and FSDP CPU offload" if requested == "fsdp" and offload else "")
    if world == 1 and requested != "deepspeed":
        requested = "none"  # one rank: nothing to shard (a DeepSpeed engine still offloads)
    return requested, requested == "fsdp" and offload


def deepspeed_launched() -> bool:
    """Whether ``accelerate launch`` runs with a DeepSpeed config (``ACCELERATE_USE_DEEPSPEED``)."""
    return _env_true("ACCELERATE_USE_DEEPSPEED")


def deepspeed_launch_file() -> str | None:
    """The DeepSpeed JSON of an accelerate DeepSpeed launch (``ACCELERATE_DEEPSPEED_CONFIG_FILE``), if any."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    return path if _env_true("ACCELERATE_USE_DEEPSPEED") and path and path != "none" else None


def deepspeed_fsdp_mapping(mode: str, offload: bool) -> dict | None:
    """For a `scalebio reweight` run under an accelerate DeepSpeed launch: which DeepSpeed setting became which
    setting of this run (``mode``, ``offload``: what ``resolve_mode`` returned), and which settings have no
    effect. None when the launch is not DeepSpeed."""
    if not _env_true("ACCELERATE_USE_DEEPSPEED"):
        return None
    stage, offload_param = _deepspeed_zero()
    zero, precision = {}, None
    path = deepspeed_launch_file()
    if path:
        ds = _read_json(path)
        zero = ds.get("zero_optimization", {})
        precision = "bf16" if ds.get("bf16", {}).get("enabled") is True else "fp16" if ds.get("fp16", {}).get("enabled") is True else None
    offload_optimizer = str(zero.get("offload_optimizer", {}).get("device",
                            os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"))).lower()
    return {
        "deepspeed_config_file": path,
        "engine": "torch FSDP (fully_shard per decoder block, then the model)" if mode == "fsdp" else
                  "replicated (gradients all-reduced)",
        "mapped": {
            "zero_optimization.stage": {"deepspeed": stage, "scalebio": f"sharding: {mode}",
                                        "why": "stage 3 partitions parameters, gradients and optimizer state, as FSDP "
                                               "full shard does; stages 0-2 keep full parameters on every rank"},
            "zero_optimization.offload_param.device": {"deepspeed": "cpu" if offload_param else "none",
                                                       "scalebio": f"FSDP CPU offload: {offload}"},
        },
        "not_mapped": {
            "zero_optimization.offload_optimizer.device": f"{offload_optimizer}: FSDP's CPU offload moves parameters, "
                                                          "gradients and optimizer state together, or none of them",
            "bf16 / fp16": f"{precision or 'off'}: the precision comes from the run config, not the JSON",
            "gradient_clipping, batch sizes, buckets": "from the run config (solver.*); the JSON's are not read",
        },
        "why": "scalebio reweight does not build DeepSpeed engines: a ZeRO engine fixes the parameters it partitions "
               "and steps at initialisation, and LISA changes the trainable blocks every lisa.interval steps",
    }


def _read_json(path: str) -> dict:
    try:
        out = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the DeepSpeed config: {e}") from e
    if not isinstance(out, dict):
        raise ConfigError(f"{path}: the DeepSpeed config must be a JSON object")
    return out


def _deepspeed_zero() -> tuple[int, bool]:
    """(ZeRO stage, parameters offloaded to CPU) of the DeepSpeed launch accelerate describes in the environment."""
    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
    offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower() == "cpu"
    path = deepspeed_launch_file()
    if path:
        zero = _read_json(path).get("zero_optimization", {})
        stage = int(zero.get("stage", stage))
        offload = str(zero.get("offload_param", {}).get("device", "none")).lower() == "cpu"
    return stage, offload


def shard(model: nn.Module, cpu_offload: bool = False) -> nn.Module:
    """Wrap every decoder block, then the model, with ``fully_shard`` (in place); gradients are summed.

    The shards are fp32 master weights (scalebio.precision, rule 1): a bf16-loaded block is upcast just before it
    is sharded, so a rank holds the fp32 copy of one block at a time, not of the whole model. bf16 compute comes
    from autocast (``precision``), not from an FSDP ``MixedPrecisionPolicy``: λ's fp32 forwards need the fp32
    weights gathered."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

    from .precision import check_fp32_master, fp32_master

    # Pinned host memory speeds up the copies to the GPU; it needs one to exist.
    kwargs = {"offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available())} if cpu_offload else {}
    _, blocks = find_blocks(model)
    for block in blocks:
        fp32_master(block)
        fully_shard(block, **kwargs)
    fp32_master(model)  # the rest: embeddings, final norm, head (the blocks are DTensor shards now, left alone)
    check_fp32_master(model)
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


# ---------------------------------------------------------------------------------------------------------
# A DeepSpeed engine for `scalebio finetune`.

# HF's defaults for the bucket sizes a DeepSpeed JSON may leave "auto" (d = the model's hidden size).
_ZERO_AUTO = {"reduce_bucket_size": lambda d: d * d, "stage3_prefetch_bucket_size": lambda d: int(0.9 * d * d),
              "stage3_param_persistence_threshold": lambda d: 10 * d}


def deepspeed_config(path: str | None, *, micro_batch: int, global_batch: int, world: int,
                     clip_grad_norm: float | None, hidden_size: int, bf16: bool) -> dict:
    """The DeepSpeed config that ``deepspeed.initialize`` gets, from the JSON at ``path`` (or, without one, from
    the ZeRO stage and offload devices accelerate exports) and the fine-tuning config.

    The JSON owns the engine: ZeRO stage, offload, buckets, precision. The fine-tuning config owns training:
    batch sizes, gradient clipping, the optimizer (torch AdamW, as in the one-process path). Its ``"auto"``
    fields are filled from the fine-tuning config; an explicit value that disagrees with it is an error, as is
    an ``optimizer`` or ``scheduler`` section. ``bf16``: the model's dtype is bfloat16 (fills ``bf16: auto``)."""
    where = path or "the accelerate DeepSpeed launch"
    if path:
        ds = _read_json(path)
    else:
        zero = {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)}
        for key, var in (("offload_param", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"),
                         ("offload_optimizer", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE")):
            if os.environ.get(var, "none").lower() not in ("", "none"):
                zero[key] = {"device": os.environ[var].lower()}
        ds = {"zero_optimization": zero, "bf16": {"enabled": "auto"}}
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{where}: {section}: scalebio finetune builds AdamW and its learning-rate schedule from "
                              f"lr, weight_decay, warmup_ratio and schedule; remove the JSON's {section} section")
    if global_batch % (micro_batch * world):
        raise ConfigError(f"global_batch: {global_batch} is not a multiple of micro_batch × ranks = {micro_batch} × "
                          f"{world} (a DeepSpeed engine takes the same number of equal micro-batches on every rank)")
    wanted = {"train_micro_batch_size_per_gpu": micro_batch, "train_batch_size": global_batch,
              "gradient_accumulation_steps": global_batch // (micro_batch * world),
              "gradient_clipping": float(clip_grad_norm or 0.0)}
    source = {"train_micro_batch_size_per_gpu": "micro_batch", "train_batch_size": "global_batch",
              "gradient_accumulation_steps": "global_batch / (micro_batch × ranks)", "gradient_clipping": "clip_grad_norm"}
    for key, value in wanted.items():
        given = ds.get(key, "auto")
        if given != "auto" and float(given) != float(value):
            raise ConfigError(f"{where}: {key}: {given} disagrees with the fine-tuning config's {source[key]} "
                              f"({value}); set it to \"auto\"")
        ds[key] = value
    for name, on in (("bf16", bf16), ("fp16", False)):
        if isinstance(ds.get(name), dict) and ds[name].get("enabled") == "auto":
            ds[name]["enabled"] = on
    # DeepSpeed's bf16 / fp16 modes keep fp32 master weights and fp32 Adam moments in the optimizer (ZeRO 1-2:
    # single_partition_of_fp32_groups, ZeRO-3: fp32_partitioned_groups_flat, no ZeRO: fp32 copies in the fp16
    # optimizer; DeepSpeed 0.19.8) while the module computes in 16 bits, unless told otherwise by these keys:
    for name, key in (("bf16", "bf16_master_weights_and_grads"), ("bf16", "bf16_optimizer_states"),
                      ("fp16", "fp16_master_weights_and_grads")):
        if isinstance(ds.get(name), dict) and ds[name].get(key):
            raise ConfigError(f"{where}: {name}.{key}: true keeps master weights or optimizer state in 16 bits, which "
                              f"loses small updates (scalebio.precision, rule 1); remove it or set it to false")
    zero = ds.setdefault("zero_optimization", {})
    for key, rule in _ZERO_AUTO.items():
        if zero.get(key) == "auto":
            zero[key] = rule(hidden_size)
    # Our optimizer is torch AdamW; DeepSpeed accepts it with optimizer offload only when told to.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("zero_allow_untested_optimizer", True)
    left = [name for name, value in _walk(ds) if value == "auto"]
    if left:
        raise ConfigError(f"{where}: {left[0]}: \"auto\" is not resolved by scalebio finetune; give a value")
    return ds


def _walk(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def deepspeed_summary(engine, path: str | None) -> dict:
    """What meta.json records of the engine, read from the engine itself: its JSON, ZeRO stage, offload devices,
    precision, accumulation steps, optimizer class, and how many parameter elements rank 0 holds."""
    def device(offload) -> str:
        return str(getattr(offload.device, "value", offload.device)) if offload is not None else "none"

    params = list(engine.module.parameters())
    return {"config_file": path, "zero_stage": int(engine.zero_optimization_stage()),
            "offload_param": device(engine.zero_offload_param()),
            "offload_optimizer": device(engine.zero_offload_optimizer()),
            "bf16": bool(engine.bfloat16_enabled()), "fp16": bool(engine.fp16_enabled()),
            "gradient_accumulation_steps": int(engine.gradient_accumulation_steps()),
            "optimizer": type(engine.optimizer).__name__,
            # ZeRO-3 leaves each parameter a 1/world partition (ds_tensor); stages 0-2 keep full parameters.
            "rank0_parameter_numel": sum(getattr(q, "ds_tensor", q).numel() for q in params),
            "parameter_numel": sum(getattr(q, "ds_numel", q.numel()) for q in params)}


def single_process_group(device: torch.device) -> None:
    """A process group of one, on a free local port: a DeepSpeed engine needs one even on a single rank (ZeRO
    offload on one GPU is a real use)."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):  # DeepSpeed reads these
        os.environ.setdefault(name, value)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def deepspeed_engine(model: nn.Module, optimizer: torch.optim.Optimizer, ds: dict):
    """``deepspeed.initialize`` on the process group the launcher set up; returns the engine. The engine's
    ``backward`` averages gradients over ranks and accumulation steps, its ``step`` clips and steps at the
    accumulation boundary."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False)
    return engine


def deepspeed_full_state(engine) -> dict:
    """The engine's full model state dict on rank 0 (CPU), ``{}`` on the others. Collective under ZeRO-3 (the
    partitions are gathered)."""
    import deepspeed

    rank = rank_and_world()[0]
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
        if rank != 0:
            return {}
        return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
