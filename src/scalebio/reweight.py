"""`scalebio reweight`: build everything a RunConfig names, run the ScaleBiO loop, write the run directory.

The loop reads top to bottom: schedule → LISA → draw B and V → one solver step → log → checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from itertools import chain
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data as data_mod
from . import precision, sharding
from .distributed import init_distributed, rank_and_world, rank_slice
from .config import RunConfig, sampling_mode, save_config, to_dict
from .lisa import Lisa
from .models import build_model, load_tokenizer, special_token_ids
from .results import RunDir, git_revision, hardware, package_versions, write_json
from .solver import CausalLMObjective, ScaleBiO
from .weights import file_sha256, weights_record, write_weights

log = logging.getLogger(__name__)


def micro_batches(examples: list, micro: int, pad_id: int, device: torch.device | None = None) -> list[dict]:
    """This rank's examples, collated in micro-batches of at most ``micro``, on ``device``."""
    out = [data_mod.collate(examples[i:i + micro], pad_id) for i in range(0, len(examples), micro)]
    if device is not None and device.type != "cpu":
        out = [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in out]
    return out


def config_digest(cfg: RunConfig) -> str:
    payload = to_dict(cfg)
    payload.pop("resume", None)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Reweighting:
    """Everything one run needs, built from a RunConfig."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.device = init_distributed()
        self.rank, self.world = rank_and_world()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.run = RunDir(cfg.run_dir)
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
            streams = (0, 0) if cfg.lisa.shared else (1, 2)
            lisa_u = Lisa(u, cfg.lisa.gamma, cfg.lisa.interval, cfg.seed, streams[0], cfg.lisa.keep_all_state)
            lisa_w = Lisa(w, cfg.lisa.gamma, cfg.lisa.interval, cfg.seed, streams[1], cfg.lisa.keep_all_state)
        self.compute_dtype = precision.resolve(cfg.precision, self.device)
        objective = CausalLMObjective(chunked=self.sharding != "fsdp",
                                      per_example="padded" if cfg.solver.conventions == "v1" else "response")
        self.solver = ScaleBiO(u, w, objective, len(self.sources), cfg.solver, lisa_u, lisa_w,
                               compute_dtype=self.compute_dtype, device=self.device)
        sizes = [len(s.examples) for s in self.sources]
        self.train_sampler = data_mod.BatchSampler(sizes, cfg.solver.global_batch, sampling_mode(cfg), seed=cfg.seed)
        val_batch = cfg.solver.val_batch or cfg.solver.global_batch
        self.val_sampler = data_mod.BatchSampler([len(self.validation.examples)], val_batch, "pooled", seed=cfg.seed + 1)
        self.steps_per_outer = cfg.solver.steps or max(1, sum(sizes) // cfg.solver.global_batch)
        self.total_steps = self.steps_per_outer * cfg.solver.outer_iterations

    def _tokenizer(self):
        cfg = self.cfg
        saved = self.run.path / "tokenizer"
        if cfg.tokenizer.kind != "train_bpe":
            return load_tokenizer(cfg)
        if saved.is_dir():  # a resumed run reuses the tokenizer it trained
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(saved))
        texts = []
        for src in chain(cfg.data.sources, [cfg.data.validation]):
            texts.append(data_mod.source_texts(*data_mod.load_with_format(src, cfg)))
        tok = load_tokenizer(cfg, chain(*texts))
        if self.rank == 0:
            tok.save_pretrained(str(saved))
        return tok

    # -- the loop ------------------------------------------------------------------------------------------
    def run_loop(self, stop_after: int | None = None, progress: bool = True) -> dict | None:
        """Run to the end (or until ``stop_after`` completed steps, for tests of resuming). Returns the
        weights record when the run finished."""
        cfg, solver = self.cfg, self.solver
        start = self._start()
        end = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        t0 = time.time()
        bar = tqdm(range(start, end), initial=start, total=self.total_steps, desc="scalebio reweight",
                   disable=not progress or self.rank != 0, dynamic_ncols=True)
        for step in bar:
            alpha = solver.begin_step(step, self.steps_per_outer)
            train, val = self._draw()
            stats = solver.step(train, val)  # NonFiniteLossError propagates; the last checkpoint stays
            self._log(step, step // self.steps_per_outer, alpha, stats)
            bar.set_postfix_str(self._postfix(stats))
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
                self._checkpoint(step + 1)
        self._write_meta("finished" if end == self.total_steps else "stopped", time.time() - t0)
        if end < self.total_steps:
            return None
        return self._write_weights(end)

    def _start(self) -> int:
        """Resume from the newest checkpoint, or start fresh (clearing logs of an older run in the folder)."""
        cfg = self.cfg
        ckpt = self.run.latest_checkpoint() if cfg.resume else None
        if ckpt is not None:
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            if state["config_digest"] != config_digest(cfg):
                raise ValueError(f"{ckpt}: checkpoint was written by a different config; use a new run_dir or resume=false")
            self.solver.load_state_dict(state["solver"])
            self.train_sampler.load_state_dict(state["train_sampler"])
            self.val_sampler.load_state_dict(state["val_sampler"])
            torch.set_rng_state(state["torch_rng"])
            self.run.truncate_logs(state["step"])
            log.info("resumed from %s (step %d of %d)", ckpt, state["step"], self.total_steps)
            return state["step"]
        if self.rank == 0:
            self.run.reset_logs()
            save_config(cfg, self.run.path / "config.yaml")
            write_json(self.run.path / "data.json", self.data_report)
            self._write_meta("running", 0.0)
        torch.manual_seed(cfg.seed)
        return 0

    def _draw(self) -> tuple[list[dict], list[dict]]:
        """B from the training sources and V from the validation set; this rank's share, in micro-batches."""
        micro = self.cfg.solver.micro_batch
        picks = self.train_sampler.next_batch()
        train = [self.sources[s].examples[i] for s, i in picks]
        val = [self.validation.examples[i] for _, i in self.val_sampler.next_batch()]
        train = rank_slice(train, self.rank, self.world)
        val = rank_slice(val, self.rank, self.world)
        return (micro_batches(train, micro, self.pad_id, self.device),
                micro_batches(val, micro, self.pad_id, self.device))

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
        self.run.append("weights.jsonl", {"step": step, "weights": weights})

    def _postfix(self, stats) -> str:
        top = sorted(zip(self.names, self.solver.weights().tolist()), key=lambda x: -x[1])[:3]
        lead = " ".join(f"{n}={v:.3f}" for n, v in top)
        return f"val={stats.val_loss:.3f} L2u={stats.train_loss_u:.3f} L2w={stats.train_loss_w:.3f} | {lead}"

    def _checkpoint(self, completed: int) -> None:
        if self.rank != 0 and self.sharding == "none":
            return
        solver_state = self.solver.state_dict()  # with FSDP a collective: every rank gathers, rank 0 saves
        if self.rank != 0:
            return
        self.run.save_checkpoint(completed, {
            "step": completed,
            "config_digest": config_digest(self.cfg),
            "solver": solver_state,
            "train_sampler": self.train_sampler.state_dict(),
            "val_sampler": self.val_sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        })

    def _write_meta(self, status: str, wall: float) -> None:
        if self.rank != 0:
            return
        path = self.run.path / "meta.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
        write_json(path, {
            "status": status,
            "seed": self.cfg.seed,
            "versions": package_versions(),
            "git_revision": git_revision(),
            "hardware": hardware(),
            "world_size": self.world,
            "precision": precision.record(self.cfg.precision, self.compute_dtype, self.device),
            "started": previous.get("started", datetime.now(timezone.utc).isoformat(timespec="seconds")),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_time_s": previous.get("wall_time_s", 0.0) + wall,
            "steps_total": self.total_steps,
            "parameters": sum(p.numel() for p in self.solver.w.parameters()),
            "sharding": self.sharding,
            "deepspeed_mapped_to_fsdp": sharding.deepspeed_fsdp_mapping(self.sharding, self.offload),
        })

    def _write_weights(self, step: int) -> dict | None:
        if self.rank != 0:
            return None
        cfg = self.cfg
        files = {}
        for src in chain(cfg.data.sources, [cfg.data.validation]):
            if src.path:
                path = cfg.resolve_path(src.path)
                files[src.name or "validation"] = {"path": str(src.path), "sha256": file_sha256(path)}
            else:
                files[src.name or "validation"] = {"hub_dataset": src.hub_dataset, "split": src.split}
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
        write_weights(self.run.path / "weights.json", record)
        return record


def run_reweight(cfg: RunConfig, stop_after: int | None = None, progress: bool = True) -> dict | None:
    return Reweighting(cfg).run_loop(stop_after=stop_after, progress=progress)
