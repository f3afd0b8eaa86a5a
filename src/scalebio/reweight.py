"""`scalebio reweight`: build everything a RunConfig names, run the ScaleBiO loop, write the run directory.

The loop reads top to bottom: schedule → LISA → draw B and V → one solver step → log → checkpoint.

Reliability (README "Reliability"): the sha256 of every data file is taken at the start and stored in each
checkpoint; a resume whose files differ is refused, naming the file and both digests. ``resume=false`` clears an
earlier run's outputs first. A trained tokenizer is saved atomically beside the digest of the data it was trained
on and retrained when that digest no longer matches (or the folder is incomplete). λ and p are checked after
every step and the parameters before every checkpoint: nothing non-finite is written. meta.json ends as
``finished``, ``stopped``, ``failed`` (with the error) or ``interrupted`` (with the signal). ``run_reweight``
owns the run directory for the run (``results.RunLock``, taken by rank 0 before anything there changes) and
catches SIGTERM, SIGINT and SIGUSR1: the step in progress completes, a checkpoint is written, and
``RunInterrupted`` says how to resume.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
import traceback
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from . import data as data_mod
from . import precision, sharding
from .distributed import all_reduce, init_distributed, rank_and_world, rank_slice
from .config import RunConfig, sampling_mode, to_dict
from .conventions import resolve as resolve_conventions
from .lisa import Lisa, solver_streams
from .models import (build_model, check_max_length, load_tokenizer, model_position_limit, position_limit,
                     special_token_ids)
from .results import (ResumeError, RunDir, RunDirError, RunInterrupted, SignalWatch, git_revision, hardware,
                      kill_point, own_run_dir, package_versions, replace_dir, write_json, write_text)
from .solver import CausalLMObjective, NonFiniteLossError, ScaleBiO
from .files import file_sha256
from .weights import weights_record

log = logging.getLogger(__name__)


def config_digest(cfg: RunConfig) -> str:
    """What identifies a run's computation: the resolved config without ``resume``, ``run_dir`` and the config
    file's own path (a run folder that is moved, or a config named relative to another working directory, is the
    same run; the data files themselves are checked by sha256 on resume)."""
    payload = to_dict(cfg)
    for key in ("resume", "run_dir", "source_file"):
        payload.pop(key, None)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


TOKENIZER_STAMP = "scalebio_tokenizer.json"
"""Written inside run_dir/tokenizer/: the digest of the data (and tokenizer settings) it was trained on."""


def data_sources(cfg: RunConfig) -> list[tuple[str, object]]:
    """(key, SourceConfig) of every input a run reads: the sources by name, ``validation``,
    ``decontaminate_against[j]``."""
    out = [(s.name, s) for s in cfg.data.sources]
    if cfg.data.validation is not None:
        out.append(("validation", cfg.data.validation))
    out += [(f"decontaminate_against[{j}]", s) for j, s in enumerate(cfg.data.decontaminate_against)]
    return out


def data_files(cfg: RunConfig) -> dict[str, dict]:
    """key → {"path", "sha256"} of each local input file (sha256 None when the file is missing: the data
    loader then reports it), or {"hub_dataset", "split"}."""
    files = {}
    for key, src in data_sources(cfg):
        if src.path:
            path = cfg.resolve_path(src.path)
            files[key] = {"path": str(src.path), "sha256": file_sha256(path) if path.is_file() else None}
        else:
            files[key] = {"hub_dataset": src.hub_dataset, "split": src.split}
    return files


def tokenizer_digest(cfg: RunConfig, files: dict[str, dict]) -> str:
    """What a trained tokenizer depends on: its settings and the text it was trained on (the training sources
    and the validation set: their contents, limit and format)."""
    keys = [s.name for s in cfg.data.sources] + ["validation"]
    srcs = [*cfg.data.sources, cfg.data.validation]
    payload = {"tokenizer": to_dict(cfg.tokenizer),
               "data": [{**{k: v for k, v in files.get(key, {}).items() if k != "path"},
                         "limit": src.limit, "format": src.format} for key, src in zip(keys, srcs)]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class Reweighting:
    """Everything one run needs, built from a RunConfig."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.device = init_distributed()
        self.rank, self.world = rank_and_world()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.run = RunDir(cfg.run_dir)
        self._prepare_run_dir()
        self.data_files = data_files(cfg)
        self.resume_state = self._resume_state()
        check_max_length(cfg.data.max_length, position_limit(cfg.model))
        self.tokenizer = self._tokenizer()
        self.sources, self.validation, self.data_report = data_mod.build_datasets(cfg, self.tokenizer)
        self.names = [s.name for s in self.sources]
        self.pad_id = self.tokenizer.pad_token_id
        u = build_model(cfg.model, vocab_size=len(self.tokenizer), seed=cfg.seed,
                        token_ids=special_token_ids(self.tokenizer))
        u.to(self.device)
        w = copy.deepcopy(u)  # u and w start equal
        self.sharding, self.offload = sharding.resolve_mode(cfg.sharding, self.world)
        if self.sharding == "fsdp":  # before LISA and the optimizers see the parameters
            sharding.check_even_batches({"solver.global_batch": cfg.solver.global_batch,
                                         "solver.val_batch": cfg.solver.val_batch or cfg.solver.global_batch}, self.world)
            sharding.shard(u, self.offload)
            sharding.shard(w, self.offload)
            log.info("u and w sharded over %d ranks with FSDP%s", self.world, " (CPU offload)" if self.offload else "")
        lisa_u = lisa_w = None
        if cfg.lisa.enabled:
            stream_u, stream_w = solver_streams(cfg.lisa.shared)
            lisa_u = Lisa(u, cfg.lisa.gamma, cfg.lisa.interval, cfg.seed, stream_u, cfg.lisa.keep_all_state)
            lisa_w = Lisa(w, cfg.lisa.gamma, cfg.lisa.interval, cfg.seed, stream_w, cfg.lisa.keep_all_state)
        self.compute_dtype = precision.resolve(cfg.precision, self.device)
        objective = CausalLMObjective(chunked=self.sharding != "fsdp",
                                      per_example=resolve_conventions(cfg.solver.conventions).per_example)
        self.solver = ScaleBiO(u, w, objective, len(self.sources), cfg.solver, lisa_u, lisa_w,
                               compute_dtype=self.compute_dtype, device=self.device)
        sizes = [len(s.examples) for s in self.sources]
        self.train_sampler = data_mod.BatchSampler(sizes, cfg.solver.global_batch, sampling_mode(cfg), seed=cfg.seed)
        val_batch = cfg.solver.val_batch or cfg.solver.global_batch
        self.val_sampler = data_mod.BatchSampler([len(self.validation.examples)], val_batch, "pooled", seed=cfg.seed + 1)
        self.steps_per_outer = cfg.solver.steps or max(1, sum(sizes) // cfg.solver.global_batch)
        self.total_steps = self.steps_per_outer * cfg.solver.outer_iterations
        check_max_length(cfg.data.max_length, model_position_limit(self.solver.w))  # a pretrained model's limit

    def _prepare_run_dir(self) -> None:
        """Remove what a killed run left half-written; with ``resume=false``, clear an earlier run's outputs."""
        if self.rank == 0:
            if not self.cfg.resume:
                self.run.clear()
            self.run.remove_temporaries()
        if self.world > 1:
            torch.distributed.barrier()

    def _resume_state(self) -> dict | None:
        """The newest checkpoint, when resuming, checked against this config and the sha256 of every data file."""
        ckpt = self.run.latest_checkpoint() if self.cfg.resume else None
        if ckpt is None:
            return None
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 (torch raises several types for a damaged file)
            raise ResumeError(f"{ckpt}: cannot read the checkpoint ({e}); delete it, or set resume=false to start "
                              f"over") from None
        if state["config_digest"] != config_digest(self.cfg):
            raise ResumeError(f"{ckpt}: checkpoint was written by a different config; use a new run_dir or resume=false")
        saved = state.get("data_files")
        if saved is None:
            log.warning("%s: written before data digests were recorded; resuming without checking the data files", ckpt)
        else:
            for key, now in self.data_files.items():
                then = saved.get(key, {})
                if then.get("sha256") != now.get("sha256"):
                    where = f"source {key!r}" if key in {s.name for s in self.cfg.data.sources} else key
                    raise ResumeError(
                        f"{ckpt}: the data file of {where} changed since the checkpoint was written: "
                        f"{self.cfg.resolve_path(now['path'])}: sha256 {then.get('sha256')} (checkpoint) vs "
                        f"{now.get('sha256') or 'missing'} (now). Restore the file, use a new run_dir, or set "
                        f"resume=false to start over")
        state["path"] = str(ckpt)
        return state

    def _tokenizer(self):
        """The configured tokenizer; ``train_bpe`` reuses run_dir/tokenizer only when it was trained on these
        data (its stamp) and loads, else trains one and saves it atomically."""
        cfg = self.cfg
        saved = self.run.path / "tokenizer"
        if cfg.tokenizer.kind != "train_bpe":
            return load_tokenizer(cfg)
        digest = tokenizer_digest(cfg, self.data_files)
        if saved.is_dir():  # a resumed run reuses the tokenizer it trained
            tok = self._saved_tokenizer(saved, digest)
            if tok is not None:
                return tok
        texts = []
        for src in chain(cfg.data.sources, [cfg.data.validation]):
            texts.append(data_mod.source_texts(*data_mod.load_with_format(src, cfg)))
        tok = load_tokenizer(cfg, chain(*texts))
        if self.rank == 0:
            def fill(folder: Path) -> None:
                tok.save_pretrained(str(folder))
                (folder / TOKENIZER_STAMP).write_text(json.dumps({"data_digest": digest}) + "\n")

            replace_dir(saved, fill, "tokenizer")
        return tok

    @staticmethod
    def _saved_tokenizer(saved: Path, digest: str):
        stamp = saved / TOKENIZER_STAMP
        try:
            ok = json.loads(stamp.read_text()).get("data_digest") == digest
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            log.warning("%s: %s; training a new tokenizer", saved, "trained on other data" if stamp.is_file()
                        else "incomplete (no stamp of its data)")
            return None
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(saved))
        except Exception as e:  # noqa: BLE001 (a damaged folder raises many types)
            log.warning("%s: cannot be loaded (%s); training a new tokenizer", saved, e)
            return None

    # -- the loop ------------------------------------------------------------------------------------------
    def run_loop(self, stop_after: int | None = None, progress: bool = True) -> dict | None:
        """Run to the end (or until ``stop_after`` completed steps, for tests of resuming). Returns the
        weights record when the run finished. On any error meta.json says ``failed`` with the message. A
        SIGTERM, SIGINT or SIGUSR1 (on any rank) ends the run after the step in progress: checkpoint, meta.json
        ``interrupted`` with the signal, then RunInterrupted."""
        t0 = time.time()
        try:
            with SignalWatch(self.run.path) as signals:
                signals.defer()
                return self._loop(stop_after, progress, t0, signals)
        except RunInterrupted:
            raise  # meta.json says so already
        except KeyboardInterrupt:
            self._write_meta_safely("interrupted", time.time() - t0, "KeyboardInterrupt")
            raise
        except Exception as e:
            self._write_meta_safely("failed", time.time() - t0, f"{type(e).__name__}: {e}")
            raise

    def _loop(self, stop_after: int | None, progress: bool, t0: float, signals: SignalWatch) -> dict | None:
        cfg, solver = self.cfg, self.solver
        start = self._start()
        self._saved_step = start
        end = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        bar = tqdm(range(start, end), initial=start, total=self.total_steps, desc="scalebio reweight",
                   disable=not progress or self.rank != 0, dynamic_ncols=True)
        for step in bar:
            received = signals.pending(self.world)  # every rank agrees: a collective when distributed
            if received is not None:
                self._interrupt(received, step, time.time() - t0)
            alpha = solver.schedule_step(step, self.steps_per_outer)  # learning rates, α (× τ per outer iteration)
            solver.update_lisa(step)  # LISA: γ active blocks of u and of w, redrawn every K steps (method.md §4)
            train, val = self._draw()
            stats = solver.step(train, val)  # NonFiniteLossError propagates; the last checkpoint stays
            self._check_weights(step)
            self._log(step, step // self.steps_per_outer, alpha, stats)
            bar.set_postfix_str(self._postfix(stats))
            kill_point("step.end")
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
                self._checkpoint(step + 1)
        if end < self.total_steps:
            self._write_meta("stopped", time.time() - t0)
            return None
        record = self._write_weights(end)
        self._write_meta("finished", time.time() - t0)
        return record

    def _interrupt(self, signal_name: str, completed: int, wall: float) -> None:
        """After a signal, between steps: checkpoint the ``completed`` steps (unless just saved), mark meta.json
        ``interrupted`` with the signal, raise RunInterrupted."""
        if completed > self._saved_step:
            self._checkpoint(completed)
        latest = self.run.latest_checkpoint() if completed else None
        self._write_meta("interrupted", wall, extra={"signal": signal_name, "steps_completed": completed})
        if self.world > 1:  # no rank exits (and has a launcher stop the others) before rank 0 has saved
            torch.distributed.barrier()
        raise RunInterrupted(signal_name, self.run.path, completed, self.total_steps, latest)

    def _start(self) -> int:
        """Resume from the newest checkpoint, or start fresh (clearing logs of an older run in the folder)."""
        cfg = self.cfg
        state, self.resume_state = self.resume_state, None
        if state is not None:
            ckpt = state["path"]
            then = state["train_sampler"]["sizes"]
            for name, a, b in zip(self.names, then, [len(s.examples) for s in self.sources]):
                if a != b:
                    raise ResumeError(f"{ckpt}: source {name!r} has {b} examples now, {a} when the checkpoint was "
                                      f"written; use a new run_dir or resume=false")
            self.solver.load_state_dict(state["solver"])
            self.train_sampler.load_state_dict(state["train_sampler"])
            self.val_sampler.load_state_dict(state["val_sampler"])
            torch.set_rng_state(state["torch_rng"])
            if torch.cuda.is_available() and state.get("cuda_rng") is not None:  # dropout on the GPU resumes too
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            if self.rank == 0:
                self.run.truncate_logs(state["step"])
            log.info("resumed from %s (step %d of %d)", ckpt, state["step"], self.total_steps)
            return state["step"]
        if self.rank == 0:
            self.run.reset_logs()
            write_text(self.run.path / "config.yaml", yaml.safe_dump(to_dict(self._portable_config()), sort_keys=False,
                                                                      allow_unicode=True))
            write_json(self.run.path / "data.json", self.data_report)
            self._write_meta("running", 0.0)
        torch.manual_seed(cfg.seed)
        return 0

    def _portable_config(self) -> RunConfig:
        """The config as saved in run_dir/config.yaml: relative data paths stay relative to the config file, whose
        location is recorded as an absolute path (or, for a config built in code, the data paths are made
        absolute), so `scalebio resample RUN_DIR` finds the data from any directory."""
        saved = copy.deepcopy(self.cfg)
        if saved.source_file:
            saved.source_file = str(Path(saved.source_file).resolve())
        else:
            for _, src in data_sources(saved):
                if src.path:
                    src.path = str(self.cfg.resolve_path(src.path).resolve())
            saved.data.root = None
        return saved

    def _draw(self) -> tuple[list[dict], list[dict]]:
        """B from the training sources and V from the validation set; this rank's share, in micro-batches."""
        micro = self.cfg.solver.micro_batch
        picks = self.train_sampler.next_batch()
        train = [self.sources[s].examples[i] for s, i in picks]
        val = [self.validation.examples[i] for _, i in self.val_sampler.next_batch()]
        train = rank_slice(train, self.rank, self.world)
        val = rank_slice(val, self.rank, self.world)
        return (data_mod.micro_batches(train, micro, self.pad_id, self.device),
                data_mod.micro_batches(val, micro, self.pad_id, self.device))

    def _log(self, step: int, outer: int, alpha: float, stats) -> None:
        if self.rank != 0:
            return
        s = self.solver
        weights = dict(zip(self.names, s.weights().tolist()))
        self.run.append("metrics.jsonl", {
            "step": step,
            "outer_iteration": outer,
            "alpha": alpha,
            "lr_u": s.opt_u.param_groups[0]["lr"],
            "lr_w": s.opt_w.param_groups[0]["lr"],
            "lr_lambda": s.opt_lam.param_groups[0]["lr"],
            "val_loss": stats.val_loss,
            "train_loss_u": stats.train_loss_u,
            "train_loss_w": stats.train_loss_w,
            "train_loss_gap": stats.train_loss_w - stats.train_loss_u,
            "source_loss_u": dict(zip(self.names, stats.source_loss_u)),
            "source_loss_w": dict(zip(self.names, stats.source_loss_w)),
            "source_counts": dict(zip(self.names, stats.source_counts)),
            "active_blocks_u": list(s.lisa_u.active) if s.lisa_u else None,
            "active_blocks_w": list(s.lisa_w.active) if s.lisa_w else None,
        })
        kill_point("log.between")
        self.run.append("weights.jsonl", {"step": step, "weights": weights})

    def _postfix(self, stats) -> str:
        top = sorted(zip(self.names, self.solver.weights().tolist()), key=lambda x: -x[1])[:3]
        lead = " ".join(f"{n}={v:.3f}" for n, v in top)
        return f"val={stats.val_loss:.3f} L2u={stats.train_loss_u:.3f} L2w={stats.train_loss_w:.3f} | {lead}"

    # -- nothing non-finite is written ----------------------------------------------------------------------
    def _check_weights(self, step: int) -> None:
        """λ and p = softmax(λ) must be finite (checked after every step, before its log lines)."""
        lam = self.solver.lam.detach()
        for which, t in (("λ (source weight logits)", lam), ("p = softmax(λ)", torch.softmax(lam, dim=0))):
            if not torch.isfinite(t).all():
                raise NonFiniteLossError(step, which, t[~torch.isfinite(t)][0].item())

    def _check_parameters(self, step: int) -> None:
        """Cheap finiteness check of u and w: one float64 sum per parameter tensor (a NaN or inf anywhere makes
        the sum non-finite), summed over ranks when sharded. Every rank calls it."""
        for name, model in (("u", self.solver.u), ("w", self.solver.w)):
            total = torch.zeros((), dtype=torch.float64)
            for q in model.parameters():
                local = q.to_local() if hasattr(q, "to_local") else q  # an FSDP shard
                total += local.detach().sum(dtype=torch.float64).cpu()
            if self.sharding == "fsdp":
                total = all_reduce(total)
            if not torch.isfinite(total):
                raise NonFiniteLossError(step, f"parameters of {name} (their sum)", total.item())

    def _checkpoint(self, completed: int) -> None:
        self._check_weights(completed - 1)
        self._check_parameters(completed - 1)
        self._saved_step = completed
        if self.rank != 0 and self.sharding == "none":
            return
        solver_state = self.solver.state_dict()  # with FSDP a collective: every rank gathers, rank 0 saves
        if self.rank != 0:
            return
        self.run.save_checkpoint(completed, {
            "step": completed,
            "config_digest": config_digest(self.cfg),
            "data_files": self.data_files,
            "solver": solver_state,
            "train_sampler": self.train_sampler.state_dict(),
            "val_sampler": self.val_sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        })

    def _write_meta(self, status: str, wall: float, error: str | None = None, extra: dict | None = None) -> None:
        if self.rank != 0:
            return
        path = self.run.path / "meta.json"
        try:
            previous = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            previous = {}
        meta = {
            "status": status,
            "seed": self.cfg.seed,
            "versions": package_versions(),
            "git_revision": git_revision(),
            "hardware": hardware(),
            "world_size": self.world,
            "precision": precision.record(self.cfg.precision, self.compute_dtype, self.device,
                                          self.cfg.solver.gap_precision),
            "started": previous.get("started", datetime.now(timezone.utc).isoformat(timespec="seconds")),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": previous.get("wall_time_s", 0.0) + wall,
            "steps_total": self.total_steps,
            "parameters": sum(p.numel() for p in self.solver.w.parameters()),
            "sharding": self.sharding,
            "deepspeed_mapped_to_fsdp": sharding.deepspeed_fsdp_mapping(self.sharding, self.offload),
        }
        if error is not None:
            meta["error"] = error
        meta.update(extra or {})
        write_json(path, meta)

    def _write_meta_safely(self, status: str, wall: float, error: str) -> None:
        """Record a failure without masking it: a meta.json that cannot be written only logs."""
        try:
            self._write_meta(status, wall, error)
        except Exception:  # noqa: BLE001
            log.warning("could not mark %s/meta.json %s:\n%s", self.run.path, status, traceback.format_exc())

    def _write_weights(self, step: int) -> dict | None:
        self._check_weights(step - 1)
        if self.rank != 0:
            return None
        cfg = self.cfg
        files = {}
        for key, entry in self.data_files.items():  # the digests taken when the data were read
            files[key] = dict(entry)
        provenance = {
            "run_dir": str(cfg.run_dir),
            "config_file": cfg.source_file,
            "config_digest": config_digest(cfg),
            "git_revision": git_revision(),
            "scalebio_version": package_versions()["scalebio"],
            "seed": cfg.seed,
            "step": step,
            "model": to_dict(cfg.model),
            "data_files": files,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        from .weights import example_stats

        counts = {s.name: len(s.examples) for s in self.sources}
        stats = {s.name: example_stats(s.examples) for s in self.sources}  # what was trained on, per source
        record = weights_record(self.names, self.solver.lam, counts, provenance, source_stats=stats)
        write_json(self.run.path / "weights.json", record)
        return record


def mark_failed(run_dir: str | Path, error: str, status: str = "failed", **extra) -> None:
    """Set an existing run_dir/meta.json to ``failed`` (or ``status``) with the error (for errors before the loop
    starts)."""
    path = Path(run_dir) / "meta.json"
    try:
        if not path.is_file():
            return
        meta = json.loads(path.read_text())
        meta.update(status=status, error=error, updated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    **extra)
        write_json(path, meta)
    except (OSError, ValueError):
        log.warning("could not mark %s %s", path, status)


def run_reweight(cfg: RunConfig, stop_after: int | None = None, progress: bool = True) -> dict | None:
    """Build and run; rank 0 owns run_dir meanwhile (a second run on it is refused, RunLockedError). A signal
    before the loop ends the run at once (nothing to save yet), during it after the step in progress
    (RunInterrupted either way)."""
    init_distributed()
    rank, world = rank_and_world()
    lock = own_run_dir(cfg.run_dir, rank, world)
    try:
        with SignalWatch(cfg.run_dir):
            try:
                rw = Reweighting(cfg)
            except RunDirError:
                raise  # the folder itself is the problem
            except RunInterrupted as e:
                if rank == 0:
                    mark_failed(cfg.run_dir, str(e), status="interrupted", signal=e.signal_name)
                raise
            except Exception as e:
                if rank == 0:
                    mark_failed(cfg.run_dir, f"{type(e).__name__}: {e}")
                raise
            return rw.run_loop(stop_after=stop_after, progress=progress)
    finally:
        if lock is not None:
            lock.release()
