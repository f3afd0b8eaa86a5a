"""`scalebio reweight`: build everything a RunConfig names (``assemble``), run the ScaleBiO loop (``Reweighting``),
keep the run's record (scalebio.recorder).

The loop reads top to bottom: schedule → LISA → draw B and V → one solver step → log → checkpoint.

Reliability (README "Reliability"): the sha256 of every data file is taken at the start and stored in each
checkpoint; a resume whose files differ is refused (scalebio.recorder). A trained tokenizer is reused only while
its data are unchanged (scalebio.models.run_tokenizer). λ and p are checked after every step and the parameters
before every checkpoint: nothing non-finite is written. ``run_reweight`` owns the run directory for the run
(``results.RunLock``, taken by rank 0 before anything there changes) and catches SIGTERM, SIGINT and SIGUSR1: the
step in progress completes, a checkpoint is written, and ``RunInterrupted`` says how to resume.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import data as data_mod
from . import precision, sharding
from .config import RunConfig, sampling_mode
from .conventions import resolve as resolve_conventions
from .data import BatchSampler, TokenizedSet, data_files
from .distributed import init_distributed, rank_and_world, rank_slice
from .lisa import Lisa, solver_streams
from .models import build_model, check_max_length, model_position_limit, position_limit, run_tokenizer, special_token_ids
from .recorder import (RunRecorder, check_source_sizes, mark_failed, prepare_run_dir, resume_state, run_facts)
from .results import RunDir, RunDirError, RunInterrupted, SignalWatch, kill_point, own_run_dir
from .solver import CausalLMObjective, ScaleBiO

log = logging.getLogger(__name__)


@dataclass
class RunParts:
    """Everything one run needs, as ``assemble`` builds it from a RunConfig."""

    cfg: RunConfig
    rank: int
    world: int
    device: torch.device
    recorder: RunRecorder
    resume: dict | None
    """The checked checkpoint to resume from (scalebio.recorder.resume_state), or None."""
    tokenizer: object
    sources: list[TokenizedSet]
    validation: TokenizedSet
    data_report: dict
    solver: ScaleBiO
    train_sampler: BatchSampler
    val_sampler: BatchSampler
    steps_per_outer: int
    sharding: str
    offload: bool

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def total_steps(self) -> int:
        return self.steps_per_outer * self.cfg.solver.outer_iterations

    @property
    def run(self) -> RunDir:
        return self.recorder.run

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def assemble(cfg: RunConfig) -> RunParts:
    """Build a run from its config: the run directory (cleared or checked for resuming), the tokenizer, the data,
    u and w (equal at the start; sharded with FSDP when configured), LISA, the solver and the samplers."""
    device = init_distributed()
    rank, world = rank_and_world()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = RunDir(cfg.run_dir)
    prepare_run_dir(run, cfg.resume, rank, world)
    files = data_files(cfg)
    resume = resume_state(run, cfg, files)
    check_max_length(cfg.data.max_length, position_limit(cfg.model))
    tokenizer = run_tokenizer(cfg, run.path / "tokenizer", files, save=rank == 0)
    sources, validation, data_report = data_mod.build_datasets(cfg, tokenizer)

    u = build_model(cfg.model, vocab_size=len(tokenizer), seed=cfg.seed, token_ids=special_token_ids(tokenizer))
    u.to(device)
    w = copy.deepcopy(u)  # u and w start equal
    mode, offload = sharding.resolve_mode(cfg.sharding, world)
    if mode == "fsdp":  # before LISA and the optimizers see the parameters
        sharding.check_even_batches({"solver.global_batch": cfg.solver.global_batch,
                                     "solver.val_batch": cfg.solver.val_batch or cfg.solver.global_batch}, world)
        sharding.shard(u, offload)
        sharding.shard(w, offload)
        log.info("u and w sharded over %d ranks with FSDP%s", world, " (CPU offload)" if offload else "")
    lisa_u = lisa_w = None
    if cfg.lisa.enabled:
        stream_u, stream_w = solver_streams(cfg.lisa.shared)
        lisa_u = Lisa(u, cfg.lisa.gamma, cfg.lisa.interval, cfg.seed, stream_u, cfg.lisa.keep_all_state)
        lisa_w = Lisa(w, cfg.lisa.gamma, cfg.lisa.interval, cfg.seed, stream_w, cfg.lisa.keep_all_state)
    compute_dtype = precision.resolve(cfg.precision, device)
    objective = CausalLMObjective(chunked=mode != "fsdp", per_example=resolve_conventions(cfg.solver.conventions).per_example)
    solver = ScaleBiO(u, w, objective, len(sources), cfg.solver, lisa_u, lisa_w, compute_dtype=compute_dtype,
                      device=device)
    sizes = [len(s.examples) for s in sources]
    train_sampler = BatchSampler(sizes, cfg.solver.global_batch, sampling_mode(cfg), seed=cfg.seed)
    val_sampler = BatchSampler([len(validation.examples)], cfg.solver.val_batch or cfg.solver.global_batch, "pooled",
                               seed=cfg.seed + 1)
    steps_per_outer = cfg.solver.steps or max(1, sum(sizes) // cfg.solver.global_batch)
    check_max_length(cfg.data.max_length, model_position_limit(solver.w))  # a pretrained model's limit
    facts = run_facts(cfg, world, compute_dtype, device, steps_per_outer * cfg.solver.outer_iterations, solver.w,
                      mode, offload)
    recorder = RunRecorder(cfg, run, rank, files, sharded=mode == "fsdp", facts=facts)
    return RunParts(cfg, rank, world, device, recorder, resume, tokenizer, sources, validation, data_report, solver,
                    train_sampler, val_sampler, steps_per_outer, mode, offload)


class Reweighting(RunParts):
    """The ScaleBiO loop over what ``assemble`` builds from ``cfg``; ``run_loop`` runs it."""

    def __init__(self, cfg: RunConfig):
        super().__init__(**vars(assemble(cfg)))

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
            self.recorder.write_meta_safely("interrupted", time.time() - t0, "KeyboardInterrupt")
            raise
        except Exception as e:
            self.recorder.write_meta_safely("failed", time.time() - t0, f"{type(e).__name__}: {e}")
            raise

    def _loop(self, stop_after: int | None, progress: bool, t0: float, signals: SignalWatch) -> dict | None:
        solver = self.solver
        start = self._start()
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
            solver.check_weights(step)
            self.recorder.log_step(step, step // self.steps_per_outer, alpha, self.names, solver, stats)
            bar.set_postfix_str(self._postfix(stats))
            kill_point("step.end")
            if (step + 1) % self.cfg.checkpoint_every == 0 or step + 1 == end:
                self._checkpoint(step + 1)
                # the wall time so far: a process killed outright (no signal) loses only what followed
                self.recorder.write_meta("running", time.time() - t0)
        if end < self.total_steps:
            self.recorder.write_meta("stopped", time.time() - t0)
            return None
        record = self._write_weights(end)
        self.recorder.write_meta("finished", time.time() - t0)
        return record

    def _start(self) -> int:
        """Resume from the checked checkpoint, or start fresh (clearing logs of an older run in the folder)."""
        state, self.resume = self.resume, None
        if state is None:
            self.recorder.start(self.data_report)
            torch.manual_seed(self.cfg.seed)
            self._saved_step = 0
            return 0
        check_source_sizes(state, self.names, [len(s.examples) for s in self.sources])
        self.solver.load_state_dict(state["solver"])
        self.train_sampler.load_state_dict(state["train_sampler"])
        self.val_sampler.load_state_dict(state["val_sampler"])
        torch.set_rng_state(state["torch_rng"])
        if torch.cuda.is_available() and state.get("cuda_rng") is not None:  # dropout on the GPU resumes too
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.recorder.resumed(state["step"])
        log.info("resumed from %s (step %d of %d)", state["path"], state["step"], self.total_steps)
        self._saved_step = state["step"]
        return state["step"]

    def _draw(self) -> tuple[list[dict], list[dict]]:
        """B from the training sources and V from the validation set; this rank's share, in micro-batches."""
        micro = self.cfg.solver.micro_batch
        train = [self.sources[s].examples[i] for s, i in self.train_sampler.next_batch()]
        val = [self.validation.examples[i] for _, i in self.val_sampler.next_batch()]
        train = rank_slice(train, self.rank, self.world)
        val = rank_slice(val, self.rank, self.world)
        return (data_mod.micro_batches(train, micro, self.pad_id, self.device),
                data_mod.micro_batches(val, micro, self.pad_id, self.device))

    def _checkpoint(self, completed: int) -> None:
        """Check λ, p and the parameters (nothing non-finite is written), then save the state after ``completed``."""
        self.solver.check_weights(completed - 1)
        self.solver.check_parameters(completed - 1)
        self._saved_step = completed
        self.recorder.checkpoint(completed, self.solver, self.train_sampler, self.val_sampler)

    def _write_weights(self, step: int) -> dict | None:
        self.solver.check_weights(step - 1)
        return self.recorder.write_weights(step, self.solver.lam, self.sources)

    def _interrupt(self, signal_name: str, completed: int, wall: float) -> None:
        """After a signal, between steps: checkpoint the ``completed`` steps (unless just saved), mark meta.json
        ``interrupted`` with the signal, raise RunInterrupted."""
        if completed > self._saved_step:
            self._checkpoint(completed)
        latest = self.run.latest_checkpoint() if completed else None
        self.recorder.write_meta("interrupted", wall, extra={"signal": signal_name, "steps_completed": completed})
        if self.world > 1:  # no rank exits (and has a launcher stop the others) before rank 0 has saved
            torch.distributed.barrier()
        raise RunInterrupted(signal_name, self.run.path, completed, self.total_steps, latest)

    def _postfix(self, stats) -> str:
        top = sorted(zip(self.names, self.solver.weights().tolist()), key=lambda x: -x[1])[:3]
        lead = " ".join(f"{n}={v:.3f}" for n, v in top)
        return f"val={stats.val_loss:.3f} L2u={stats.train_loss_u:.3f} L2w={stats.train_loss_w:.3f} | {lead}"


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
