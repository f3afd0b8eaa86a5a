"""What a reweighting run keeps in its run directory (scalebio.results.RunDir), and reading it back to resume.

Before anything is built: ``prepare_run_dir`` removes what a killed run left half-written (and, with
``resume=false``, an earlier run's outputs); ``resume_state`` reads the newest checkpoint and refuses one written
by another config or from data files whose sha256 has changed since, naming the file and both digests.

``RunRecorder`` writes, on rank 0: config.yaml (with paths that work from any directory), data.json and meta.json
when a run starts; a metrics.jsonl and a weights.jsonl line per step; checkpoints (the solver, the samplers, the
RNG, the config digest and the data digests); weights.json at the end. meta.json ends as ``finished``,
``stopped``, ``failed`` (with the error) or ``interrupted`` (with the signal).
"""

from __future__ import annotations

import copy
import json
import logging
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from . import precision, sharding
from .config import RunConfig, config_digest, to_dict
from .data import data_sources
from .results import ResumeError, RunDir, git_revision, hardware, kill_point, package_versions, write_json, write_text
from .weights import example_stats, weights_record

log = logging.getLogger(__name__)


def prepare_run_dir(run: RunDir, resume: bool, rank: int, world: int) -> None:
    """Remove what a killed run left half-written; with ``resume=false``, clear an earlier run's outputs."""
    if rank == 0:
        if not resume:
            run.clear()
        run.remove_temporaries()
    if world > 1:
        torch.distributed.barrier()


def resume_state(run: RunDir, cfg: RunConfig, files: dict[str, dict]) -> dict | None:
    """The newest checkpoint, when resuming, checked against this config and the sha256 of every data file
    (``files``: scalebio.data.data_files). Its path is added as ``path``."""
    ckpt = run.latest_checkpoint() if cfg.resume else None
    if ckpt is None:
        return None
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 (torch raises several types for a damaged file)
        raise ResumeError(f"{ckpt}: cannot read the checkpoint ({e}); delete it, or set resume=false to start "
                          f"over") from None
    if state["config_digest"] != config_digest(cfg):
        raise ResumeError(f"{ckpt}: checkpoint was written by a different config; use a new run_dir or resume=false")
    saved = state.get("data_files")
    if saved is None:
        log.warning("%s: written before data digests were recorded; resuming without checking the data files", ckpt)
    else:
        for key, now in files.items():
            then = saved.get(key, {})
            if then.get("sha256") != now.get("sha256"):
                where = f"source {key!r}" if key in {s.name for s in cfg.data.sources} else key
                raise ResumeError(
                    f"{ckpt}: the data file of {where} changed since the checkpoint was written: "
                    f"{cfg.resolve_path(now['path'])}: sha256 {then.get('sha256')} (checkpoint) vs "
                    f"{now.get('sha256') or 'missing'} (now). Restore the file, use a new run_dir, or set "
                    f"resume=false to start over")
    state["path"] = str(ckpt)
    return state


def check_source_sizes(state: dict, names: list[str], sizes: list[int]) -> None:
    """A checkpoint resumes only onto sources of the sizes it was written with (its sampler indexes them)."""
    then = state["train_sampler"]["sizes"]
    for name, a, b in zip(names, then, sizes):
        if a != b:
            raise ResumeError(f"{state['path']}: source {name!r} has {b} examples now, {a} when the checkpoint was "
                              f"written; use a new run_dir or resume=false")


def portable_config(cfg: RunConfig) -> RunConfig:
    """The config as saved in run_dir/config.yaml: relative data paths stay relative to the config file, whose
    location is recorded as an absolute path (or, for a config built in code, the data paths are made absolute),
    so `scalebio resample RUN_DIR` finds the data from any directory."""
    saved = copy.deepcopy(cfg)
    if saved.source_file:
        saved.source_file = str(Path(saved.source_file).resolve())
    else:
        for _, src in data_sources(saved):
            if src.path:
                src.path = str(cfg.resolve_path(src.path).resolve())
        saved.data.root = None
    return saved


class RunRecorder:
    """Writes one reweighting run's record into ``run`` (rank 0 only; other ranks' calls write nothing).

    ``files``: the data files' digests taken when the data were read (scalebio.data.data_files); ``facts``: what
    meta.json says about how the run is built (world size, precision record, total steps, parameters, sharding).
    """

    def __init__(self, cfg: RunConfig, run: RunDir, rank: int, files: dict[str, dict], sharded: bool, facts: dict):
        self.cfg, self.run, self.rank, self.files, self.sharded, self.facts = cfg, run, rank, files, sharded, facts
        self._counted = 0.0  # this process's wall time already added to meta.json's wall_time_s

    # -- start ---------------------------------------------------------------------------------------------
    def start(self, data_report: dict) -> None:
        """A fresh run: clear logs of an older run in the folder; write config.yaml, data.json, meta.json."""
        if self.rank != 0:
            return
        self.run.reset_logs()
        write_text(self.run.path / "config.yaml", yaml.safe_dump(to_dict(portable_config(self.cfg)), sort_keys=False,
                                                                  allow_unicode=True))
        write_json(self.run.path / "data.json", data_report)
        self.write_meta("running", 0.0)

    def resumed(self, step: int) -> None:
        """A resumed run: drop log lines of steps after the checkpoint (they will be redone identically)."""
        if self.rank == 0:
            self.run.truncate_logs(step)

    # -- every step ----------------------------------------------------------------------------------------
    def log_step(self, step: int, outer: int, alpha: float, names: list[str], solver, stats) -> None:
        """One metrics.jsonl line (losses, learning rates, α, active LISA blocks), then one weights.jsonl line."""
        if self.rank != 0:
            return
        weights = dict(zip(names, solver.weights().tolist()))
        self.run.append("metrics.jsonl", {
            "step": step,
            "outer_iteration": outer,
            "alpha": alpha,
            "lr_u": solver.opt_u.param_groups[0]["lr"],
            "lr_w": solver.opt_w.param_groups[0]["lr"],
            "lr_lambda": solver.opt_lam.param_groups[0]["lr"],
            "val_loss": stats.val_loss,
            "train_loss_u": stats.train_loss_u,
            "train_loss_w": stats.train_loss_w,
            "train_loss_gap": stats.train_loss_w - stats.train_loss_u,
            "source_loss_u": dict(zip(names, stats.source_loss_u)),
            "source_loss_w": dict(zip(names, stats.source_loss_w)),
            "source_counts": dict(zip(names, stats.source_counts)),
            "active_blocks_u": list(solver.lisa_u.active) if solver.lisa_u else None,
            "active_blocks_w": list(solver.lisa_w.active) if solver.lisa_w else None,
        })
        kill_point("log.between")
        self.run.append("weights.jsonl", {"step": step, "weights": weights})

    def checkpoint(self, completed: int, solver, train_sampler, val_sampler) -> None:
        """The state after ``completed`` steps: rank 0 saves; with FSDP every rank takes part in gathering it."""
        if self.rank != 0 and not self.sharded:
            return
        solver_state = solver.state_dict()  # with FSDP a collective: every rank gathers, rank 0 saves
        if self.rank != 0:
            return
        self.run.save_checkpoint(completed, {
            "step": completed,
            "config_digest": config_digest(self.cfg),
            "data_files": self.files,
            "solver": solver_state,
            "train_sampler": train_sampler.state_dict(),
            "val_sampler": val_sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        })

    # -- the end -------------------------------------------------------------------------------------------
    def write_weights(self, step: int, lam: torch.Tensor, sources) -> dict | None:
        """weights.json: p = softmax(λ) after ``step`` steps, with provenance and what was trained on per source."""
        if self.rank != 0:
            return None
        cfg = self.cfg
        provenance = {
            "run_dir": str(cfg.run_dir),
            "config_file": cfg.source_file,
            "config_digest": config_digest(cfg),
            "git_revision": git_revision(),
            "scalebio_version": package_versions()["scalebio"],
            "seed": cfg.seed,
            "step": step,
            "model": to_dict(cfg.model),
            "data_files": {key: dict(entry) for key, entry in self.files.items()},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        names = [s.name for s in sources]
        counts = {s.name: len(s.examples) for s in sources}
        stats = {s.name: example_stats(s.examples) for s in sources}  # what was trained on, per source
        record = weights_record(names, lam, counts, provenance, source_stats=stats)
        write_json(self.run.path / "weights.json", record)
        return record

    def write_meta(self, status: str, wall: float, error: str | None = None, extra: dict | None = None) -> None:
        """meta.json: ``status``, versions, revision, hardware, how the run is built, and the wall time so far.
        ``wall``: this process's seconds since it started; meta.json's ``wall_time_s`` sums every process of the run
        (a resumed run adds to it), each counted once however often it writes."""
        if self.rank != 0:
            return
        path = self.run.path / "meta.json"
        try:
            previous = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:
            previous = {}
        f = self.facts
        meta = {
            "status": status,
            "seed": self.cfg.seed,
            "versions": package_versions(),
            "git_revision": git_revision(),
            "hardware": hardware(),
            "world_size": f["world_size"],
            "precision": f["precision"],
            "started": previous.get("started", datetime.now(timezone.utc).isoformat(timespec="seconds")),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": previous.get("wall_time_s", 0.0) + max(0.0, wall - self._counted),
            "steps_total": f["steps_total"],
            "parameters": f["parameters"],
            "sharding": f["sharding"],
            "deepspeed_mapped_to_fsdp": f["deepspeed_mapped_to_fsdp"],
        }
        if error is not None:
            meta["error"] = error
        meta.update(extra or {})
        write_json(path, meta)
        self._counted = max(self._counted, wall)

    def write_meta_safely(self, status: str, wall: float, error: str) -> None:
        """Record a failure without masking it: a meta.json that cannot be written only logs."""
        try:
            self.write_meta(status, wall, error)
        except Exception:  # noqa: BLE001
            log.warning("could not mark %s/meta.json %s:\n%s", self.run.path, status, traceback.format_exc())


def run_facts(cfg: RunConfig, world: int, compute_dtype: torch.dtype, device: torch.device, steps_total: int,
              w: torch.nn.Module, mode: str, offload: bool) -> dict:
    """What meta.json says about how a run is built (``RunRecorder.facts``)."""
    return {
        "world_size": world,
        "precision": precision.record(cfg.precision, compute_dtype, device, cfg.solver.gap_precision),
        "steps_total": steps_total,
        "parameters": sum(p.numel() for p in w.parameters()),
        "sharding": mode,
        "deepspeed_mapped_to_fsdp": sharding.deepspeed_fsdp_mapping(mode, offload),
    }


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
