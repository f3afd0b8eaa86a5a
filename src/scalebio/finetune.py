"""`scalebio finetune`: plain supervised fine-tuning (full or LISA) of one model on one data file.

Same model loading, data path (scalebio.data: per-record format detection, tokenisation, collate, the pooled
``BatchSampler``) and per-example response-token loss as the solver; the step is the solver's w-update without
the validation term: minimise the mean per-example loss with AdamW.

Distributed like the solver: launched by torchrun or ``accelerate launch``, every rank draws the same global
batch and takes its contiguous share; gradients are summed by an all-reduce (``sharding: none``) or by FSDP's
reduce-scatter (``sharding: fsdp``, or ``auto`` under an FSDP / ZeRO-3 accelerate config; scalebio.sharding).
Under a DeepSpeed launch (accelerate's DeepSpeed config, or ``deepspeed: FILE.json``) the model trains in a
DeepSpeed engine instead, with the JSON's ZeRO stage, offload and precision (``sharding: deepspeed``).
Rank 0 writes the logs and the model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data as data_mod
from . import precision, sharding
from .config import ConfigError, LisaConfig, ModelConfig, SourceConfig, TokenizerConfig, resolve_relative, save_config
from .lisa import Lisa
from .models import build_model, load_tokenizer, special_token_ids
from .results import RunDir, git_revision, hardware, package_versions, write_json
from .distributed import all_reduce, all_reduce_grads, init_distributed, rank_and_world, rank_slice
from .solver import CausalLMObjective, NonFiniteLossError, lr_shape

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """A fine-tuning run."""

    output_dir: str = "runs/finetune"
    """Gets config.yaml, meta.json, metrics.jsonl and model/ (the trained model and tokenizer)."""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: SourceConfig = field(default_factory=lambda: SourceConfig(name="train"))
    """The training file (e.g. the output of ``scalebio resample``)."""
    max_length: int = 512
    epochs: float = 1.0
    steps: int | None = None
    """Optimizer steps; ``null`` = epochs × examples // global_batch."""
    global_batch: int = 64
    micro_batch: int = 8
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    schedule: str = "cosine"
    clip_grad_norm: float | None = 1.0
    lisa: LisaConfig = field(default_factory=LisaConfig)
    save_model: bool = True
    threads: int | None = None
    precision: str = "auto"
    """auto | fp32 | bf16, as in RunConfig (scalebio.precision). Under DeepSpeed the JSON's bf16 section rules."""
    sharding: str = "auto"
    """none | fsdp | deepspeed | auto (scalebio.sharding): auto is deepspeed under a DeepSpeed launch or with
    ``deepspeed`` set, fsdp under an FSDP accelerate config, else none."""
    deepspeed: str | None = None
    """A DeepSpeed JSON (e.g. experiments/llama3/ds_zero3_offload.json): train in a DeepSpeed engine with its ZeRO
    stage, offload and precision, also on one rank. Unset: the JSON of an accelerate DeepSpeed launch, if any."""
    source_file: str | None = field(default=None, metadata={"internal": True})

    def resolve_path(self, path: str) -> Path:
        return resolve_relative(path, self.source_file)


def validate_finetune_config(cfg: FinetuneConfig) -> None:
    if not (cfg.train.path or cfg.train.hub_dataset):
        raise ConfigError("train.path: required")
    if cfg.precision not in precision.CHOICES:
        raise ConfigError(f"precision: {cfg.precision!r} is not one of {', '.join(precision.CHOICES)}")
    if cfg.global_batch % cfg.micro_batch:
        raise ConfigError(f"global_batch: {cfg.global_batch} is not a multiple of micro_batch {cfg.micro_batch}")
    if cfg.deepspeed and cfg.sharding not in ("auto", "deepspeed"):
        raise ConfigError(f"deepspeed: {cfg.deepspeed} is set but sharding is {cfg.sharding!r}; use sharding=auto or "
                          f"deepspeed, or drop the JSON")
    chosen = [k for k in ("name_or_path", "gguf_package", "architecture") if getattr(cfg.model, k)]
    if len(chosen) != 1:
        raise ConfigError("model: set exactly one of name_or_path, gguf_package, architecture")


def save_model(model, tokenizer, folder: Path, state_dict: dict | None = None) -> None:
    """save_pretrained, also for a GGUF-loaded model (which refuses it): rebuild a plain model of the same
    class from its config without the quantization entry and copy the weights in. ``state_dict``: the full
    weights when ``model`` is sharded."""
    folder.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    if (getattr(model.config, "quantization_config", None) is not None or getattr(model, "hf_quantizer", None) is not None
            or state_dict is not None):
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        cls = type(model)
        if sharding.is_sharded(model):  # fully_shard made the class FSDP<Model>(FSDPModule, Model)
            cls = next(b for b in cls.__mro__[1:] if not b.__name__.startswith("FSDP"))
        plain = cls(config)
        plain.load_state_dict(state)
        model = plain
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def _deepspeed_file(cfg: FinetuneConfig) -> str | None:
    if cfg.deepspeed:
        path = cfg.resolve_path(cfg.deepspeed)
        if not path.is_file():
            raise ConfigError(f"deepspeed: {cfg.deepspeed}: file not found")
        return str(path)
    return sharding.deepspeed_launch_file()


def finetune(cfg: FinetuneConfig, progress: bool = True) -> Path:
    """Train and save; returns the model folder."""
    validate_finetune_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = init_distributed()
    rank, world = rank_and_world()
    requested = "deepspeed" if cfg.deepspeed and cfg.sharding == "auto" else cfg.sharding
    mode, offload = sharding.resolve_mode(requested, world, deepspeed_engine=True)
    ds_file = _deepspeed_file(cfg) if mode == "deepspeed" else None
    if mode == "deepspeed":
        if cfg.lisa.enabled:
            # A ZeRO engine fixes the parameters it partitions and steps at initialize (scalebio.sharding).
            raise ConfigError("lisa.enabled: LISA changes the trainable blocks every lisa.interval steps, which a "
                              "DeepSpeed engine does not follow; use sharding=fsdp (or an FSDP accelerate config) "
                              "or lisa.enabled=false")
        if ds_file is None and not sharding.deepspeed_launched():
            raise ConfigError("sharding: deepspeed needs a DeepSpeed JSON: set deepspeed: FILE.json or launch with "
                              "accelerate's DeepSpeed config")
        if world == 1:
            sharding.single_process_group(device)
    if mode == "fsdp":
        sharding.check_even_batches({"global_batch": cfg.global_batch}, world)
    run = RunDir(cfg.output_dir)
    if rank == 0:
        save_config(cfg, run.path / "config.yaml")
        (run.path / "metrics.jsonl").unlink(missing_ok=True)
    tokenizer = load_tokenizer(cfg)  # type: ignore[arg-type]  (same fields as RunConfig's)
    train = data_mod.build_mixed_set(cfg.train, cfg, tokenizer, cfg.max_length)  # type: ignore[arg-type]
    examples = train.examples
    model = build_model(cfg.model, vocab_size=len(tokenizer), seed=cfg.seed, token_ids=special_token_ids(tokenizer))
    model.to(device)
    model.train()
    if mode == "fsdp":
        sharding.shard(model, offload)  # upcasts each block to fp32 just before sharding it
    # fp32 master weights and moments whatever model.dtype loaded (scalebio.precision, rule 1); a DeepSpeed bf16
    # engine casts the module to bf16 and keeps these fp32 values in its optimizer.
    precision.fp32_master(model)
    precision.check_fp32_master(model)
    opt = torch.optim.AdamW(list(model.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lisa = Lisa(model, cfg.lisa.gamma, cfg.lisa.interval, cfg.seed, 1, cfg.lisa.keep_all_state) if cfg.lisa.enabled else None
    engine, engine_meta = None, None
    if mode == "deepspeed":
        ds = sharding.deepspeed_config(ds_file, micro_batch=cfg.micro_batch, global_batch=cfg.global_batch, world=world,
                                       clip_grad_norm=cfg.clip_grad_norm,
                                       hidden_size=int(getattr(model.config, "hidden_size", 0) or 0),
                                       bf16=cfg.model.dtype == "bfloat16")
        engine = sharding.deepspeed_engine(model, opt, ds)
        opt = engine.optimizer  # its param_groups are AdamW's: the schedule below sets lr there
        engine_meta = sharding.deepspeed_summary(engine, ds_file)
        log.info("DeepSpeed engine: %s", engine_meta)
    objective = CausalLMObjective(chunked=mode == "none")
    compute_dtype = precision.resolve(cfg.precision, device) if engine is None else torch.float32
    steps = cfg.steps or max(1, int(cfg.epochs * len(examples)) // cfg.global_batch)
    sampler = data_mod.BatchSampler([len(examples)], cfg.global_batch, "pooled", seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    for step in tqdm(range(steps), desc="scalebio finetune", disable=not progress, dynamic_ncols=True):
        if lisa is not None:
            lisa.update(step, opt)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_shape(step, steps, cfg.warmup_ratio, cfg.schedule)
        picks = [examples[i] for _, i in sampler.next_batch()]
        mine = rank_slice(picks, rank, world)  # this rank's share; the loss is normalised by the global batch
        if engine is None:
            opt.zero_grad(set_to_none=True)
        total = 0.0
        for batch in data_mod.micro_batches(mine, cfg.micro_batch, tokenizer.pad_token_id, device):
            with precision.autocast(compute_dtype, device):
                ell = objective.per_example_loss(engine or model, batch)
            if not torch.isfinite(ell).all():
                raise NonFiniteLossError(step, "fine-tuning loss", float(ell[~torch.isfinite(ell)][0]))
            if engine is not None:
                # The engine divides by the accumulation steps and averages over ranks: with equal micro-batches
                # that is the global-batch mean, as below. Its step clips and steps at the last micro-batch.
                engine.backward(ell.mean())
                engine.step()
            else:
                (ell.sum() / len(picks)).backward()
            total += float(ell.detach().sum())
        if engine is None:
            trainable = [p for p in model.parameters() if p.requires_grad]
            if mode == "none":
                all_reduce_grads(trainable)  # FSDP has reduce-scattered (summed) them already
            # The norm before clipping (an infinite limit leaves the gradients as they are).
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad_norm or float("inf"))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
            opt.step()
        else:
            grad_norm = engine.get_global_grad_norm()  # the engine's, before its clipping
        total = float(all_reduce(torch.tensor(total, dtype=torch.float64)))
        if rank == 0:
            run.append("metrics.jsonl", {"step": step, "train_loss": total / len(picks), "grad_norm": float(grad_norm),
                                         "lr": opt.param_groups[0]["lr"],
                                         "active_blocks": list(lisa.active) if lisa else None})
    folder = run.path / "model"
    if cfg.save_model:
        full = None  # collectives: every rank gathers
        if mode == "fsdp":
            full = sharding.full_model_state(model)
        elif mode == "deepspeed":
            full = sharding.deepspeed_full_state(engine)
        if rank == 0:
            save_model(model, tokenizer, folder, full)
    if rank == 0:
        write_json(run.path / "meta.json", {
            "status": "finished", "seed": cfg.seed, "steps": steps, "examples": len(examples),
            "truncated": train.stats["truncated"], "data": train.stats,
            "world_size": world, "sharding": mode, "deepspeed": engine_meta,
            "precision": precision.record(cfg.precision, compute_dtype, device), "versions": package_versions(),
            "git_revision": git_revision(), "hardware": hardware(), "wall_time_s": time.time() - t0,
        })
    return folder
