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

Reliability (README "Reliability"): rank 0 owns output_dir for the run (``results.RunLock``). SIGTERM, SIGINT and
SIGUSR1 end the run after the step in progress with a checkpoint (output_dir/checkpoints/; not under a DeepSpeed
engine, which then restarts from step 0) and meta.json ``interrupted``; the same command resumes from it, bit for
bit, and a finished run removes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data as data_mod
from . import precision, sharding
from .config import ConfigError, LisaConfig, ModelConfig, SourceConfig, TokenizerConfig, resolve_relative, save_config
from .config import to_dict
from .lisa import FINETUNE_STREAM, Lisa
from .models import build_model, load_tokenizer, special_token_ids
from .results import (ResumeError, RunDir, RunInterrupted, SignalWatch, git_revision, hardware, kill_point,
                      own_run_dir, package_versions, write_json)
from .files import file_sha256
from .distributed import all_reduce, all_reduce_grads, init_distributed, rank_and_world, rank_slice
from .conventions import lr_shape
from .solver import CausalLMObjective, NonFiniteLossError

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


def _digest(cfg: FinetuneConfig) -> str:
    """What identifies a fine-tuning run's computation: the config without output_dir and the config file's path."""
    payload = {k: v for k, v in to_dict(cfg).items() if k not in ("output_dir", "source_file")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _train_sha256(cfg: FinetuneConfig) -> str | None:
    path = cfg.resolve_path(cfg.train.path) if cfg.train.path else None
    return file_sha256(path) if path is not None and path.is_file() else None


def finished_run(cfg: FinetuneConfig) -> Path | None:
    """The model folder of a run of exactly ``cfg`` already finished in ``cfg.output_dir`` (its meta.json says
    finished with this config's digest and this training file's sha256, and the model was saved), else None. A
    driver that must not train twice (a campaign unit stopped while it evaluated) asks this first."""
    path = Path(cfg.output_dir)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    folder = path / "model"
    if (meta.get("status") != "finished" or meta.get("config_digest") != _digest(cfg)
            or meta.get("train_sha256") != _train_sha256(cfg) or not (folder / "config.json").is_file()):
        return None
    return folder


def _resume_state(run: RunDir, cfg: FinetuneConfig, train_sha256: str | None) -> dict | None:
    """The checkpoint an interrupted run left in output_dir, checked against this config and training file."""
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        return None
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 (torch raises several types for a damaged file)
        raise ResumeError(f"{ckpt}: cannot read the checkpoint ({e}); delete it to start over") from None
    if state.get("config_digest") != _digest(cfg):
        raise ResumeError(f"{ckpt}: checkpoint of an interrupted run of a different config; use another output_dir, "
                          f"or delete {run.checkpoints} to start over")
    if state.get("train_sha256") != train_sha256:
        raise ResumeError(f"{ckpt}: the training file changed since the checkpoint was written: "
                          f"{cfg.resolve_path(cfg.train.path)}: sha256 {state.get('train_sha256')} (checkpoint) vs "
                          f"{train_sha256 or 'missing'} (now). Restore it, use another output_dir, or delete "
                          f"{run.checkpoints} to start over")
    state["path"] = str(ckpt)
    return state


def _save_checkpoint(run: RunDir, completed: int, model, opt, sampler, mode: str, rank: int, cfg: FinetuneConfig,
                     train_sha256: str | None) -> Path | None:
    """Model, optimizer, sampler and RNG after ``completed`` steps (rank 0 writes; with FSDP every rank gathers)."""
    if mode == "fsdp":
        model_state, opt_state = sharding.full_model_state(model), sharding.full_optimizer_state(opt)
    elif rank == 0:
        model_state, opt_state = model.state_dict(), opt.state_dict()
    if rank != 0:
        return None
    return run.save_checkpoint(completed, {
        "step": completed, "config_digest": _digest(cfg), "train_sha256": train_sha256, "model": model_state,
        "optimizer": opt_state, "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})


def _restore(state: dict, model, opt, lisa: Lisa | None, sampler, mode: str) -> int:
    """Load a checkpoint; the optimizer's parameter list is first put back as it was (the LISA blocks of the last
    completed step), so its state lines up. Returns the step to continue from."""
    if mode == "fsdp":
        sharding.load_full_model_state(model, state["model"])
    else:
        model.load_state_dict(state["model"])
    if lisa is not None:
        lisa.update(state["step"] - 1, opt)
    opt.load_state_dict(state["optimizer"])
    if mode == "fsdp":
        sharding.shard_optimizer_state(opt)
    sampler.load_state_dict(state["sampler"])
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    log.info("resumed from %s (step %d)", state["path"], state["step"])
    return state["step"]


def finetune(cfg: FinetuneConfig, progress: bool = True) -> Path:
    """Train and save; returns the model folder. Rank 0 owns output_dir meanwhile (another run on it is refused:
    RunLockedError); a signal ends the run with RunInterrupted (module docstring)."""
    validate_finetune_config(cfg)
    init_distributed()
    rank, world = rank_and_world()
    lock = own_run_dir(cfg.output_dir, rank, world)
    try:
        with SignalWatch(cfg.output_dir) as signals:
            return _train(cfg, progress, signals)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: FinetuneConfig, progress: bool, signals: SignalWatch) -> Path:
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
    train_sha256 = _train_sha256(cfg)
    resume = _resume_state(run, cfg, train_sha256)
    if rank == 0:
        run.remove_temporaries()
        save_config(cfg, run.path / "config.yaml")
        if resume is None:
            (run.path / "metrics.jsonl").unlink(missing_ok=True)
        else:
            run.truncate_logs(resume["step"])
    if world > 1:  # the other ranks start once rank 0 has cleared and truncated
        torch.distributed.barrier()
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
    lisa = Lisa(model, cfg.lisa.gamma, cfg.lisa.interval, cfg.seed, FINETUNE_STREAM, cfg.lisa.keep_all_state) if cfg.lisa.enabled else None
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
    start = _restore(resume, model, opt, lisa, sampler, mode) if resume is not None else 0
    signals.defer()  # from here a signal ends the run after the step in progress
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="scalebio finetune", disable=not progress,
                     dynamic_ncols=True):
        received = signals.pending(world)  # every rank agrees: a collective when distributed
        if received is not None:
            saved = None
            if engine is not None:
                log.warning("no checkpoint of a DeepSpeed engine: the next start begins again at step 0")
            elif step > start:
                saved = _save_checkpoint(run, step, model, opt, sampler, mode, rank, cfg, train_sha256)
            elif start:
                saved = resume["path"]
            if rank == 0:
                write_json(run.path / "meta.json", {
                    "status": "interrupted", "signal": received, "steps_completed": step, "steps": steps,
                    "seed": cfg.seed, "world_size": world, "sharding": mode, "versions": package_versions(),
                    "git_revision": git_revision(), "wall_time_s": time.time() - t0})
            if world > 1:  # no rank exits (and has a launcher stop the others) before rank 0 has saved
                torch.distributed.barrier()
            raise RunInterrupted(received, run.path, step, steps, saved)
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
        kill_point("step.end")
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
            "status": "finished", "config_digest": _digest(cfg), "train_sha256": train_sha256,
            "seed": cfg.seed, "steps": steps, "examples": len(examples),
            "truncated": train.stats["truncated"], "data": train.stats,
            "world_size": world, "sharding": mode, "deepspeed": engine_meta,
            "precision": precision.record(cfg.precision, compute_dtype, device), "versions": package_versions(),
            "git_revision": git_revision(), "hardware": hardware(), "wall_time_s": time.time() - t0,
        })
        shutil.rmtree(run.checkpoints, ignore_errors=True)  # an interruption's checkpoint is spent
    return folder
