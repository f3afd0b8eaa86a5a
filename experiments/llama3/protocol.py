"""Table 1's protocol on SmolLM2-135M-Instruct (method.md §6, the later math setting, scaled to 2 CPU cores), run as a
campaign of units that each fit in one session: pool with a control source → reweight with three seeds → resample N
per arm (by each seed's learned weights, uniformly over all sources, uniformly over the real sources) → fine-tune
every arm → evaluate base and fine-tuned models → results/llama3/protocol → Table 1.

    python experiments/llama3/protocol.py run [--jobs 2] [--only UNIT ...] [--runs DIR] [--results DIR] [--smoke]
    python experiments/llama3/protocol.py status [--write] [--runs DIR] [--results DIR]
    python experiments/llama3/protocol.py report

Units (scalebio.stages) and what each publishes under ``results/llama3/protocol/`` as soon as it finishes:

    pool                   data/llama3/protocol_pool: build_pool.py --control 600 --no-stand-ins
    reweight_seed{s}       protocol_smollm2.yaml with seed=s (a unit in flight publishes its trajectory, partial)
    base                   the model before fine-tuning, evaluated
    {arm}_ft{i}            N examples drawn with seed i, fine-tuned with seed i (protocol_finetune.yaml), evaluated;
                           arm ``learned`` draws by reweighting seed REWEIGHT_SEEDS[i % 3]'s weights, ``uniform``
                           uniformly over all six sources, ``uniform_real`` uniformly over the five real sources

Every unit writes ``unit.json`` (git revision, host, wall time, the CPU's bf16 units) beside its results. The
working folder (``--runs``, default runs/llama3/protocol) holds checkpoints and models: pick one that survives
between sessions (a folder outside the work tree). A finished unit is not redone; reweighting resumes from its
newest checkpoint; so re-running the command continues the campaign. ``--jobs 2`` runs two units at once as
one-thread processes.

The campaign's settings (both presets resolved, seeds, arms, N, evaluation) are recorded in
``results/llama3/protocol/campaign.json`` when it starts; a unit whose settings differ from them is refused, with
the names of the settings that differ. ``status --write`` publishes the trajectories of units in flight and writes
``STATUS.md`` (commit both before a session stops). ``--smoke``: the same units on a tiny random Llama and a
24-per-source pool (seconds per unit, for the slow tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scalebio.config import load_config, to_dict
from scalebio.files import file_sha256, write_text
from scalebio.finetune import FinetuneConfig, finetune, finished_run
from scalebio.resample import pool_from_run, resample
from scalebio.results import RUN_FILES, RunInterrupted, copy_retrain_results, relativize
from scalebio.reproduce import Claim, arm_finished, reproduce_report
from scalebio.reweight import run_reweight
from scalebio.stages import ABSENT, Campaign, CampaignStopped, Unit, counted, settings_diff, unit_record

if __name__ == "__main__" and not __package__:  # run by its path: run it as the module it is (scalebio.scripts)
    from scalebio.scripts import run_as_module
    run_as_module(__file__)

from experiments.llama3.table1_protocol import collect_protocol  # noqa: E402
from experiments.llama3.tasks import evaluate_model  # noqa: E402  (with settings "samples" and "mt_bench")

log = logging.getLogger("llama3.protocol")

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

REWEIGHT_SEEDS = [0, 1, 2]
FINETUNE_SEEDS = [0, 1, 2]
N = 2000
"""Examples drawn per arm (the same for every arm): 250 fine-tuning steps of 8, each seen once."""
CONTROL = "control-dot-responses"
ARMS = {
    "learned": {"weights": "learned", "exclude": []},
    "uniform": {"weights": "uniform", "exclude": []},
    "uniform_real": {"weights": "uniform", "exclude": [CONTROL]},
}
"""Each arm: how its N examples are drawn (the learned weights of one reweighting seed, or uniform) and which pool
sources it leaves out. uniform_real separates what dropping the control buys from what reweighting the real
sources buys (the paper's claim is the second)."""
POOL_ARGS = ["--control", "600", "--no-stand-ins"]
EVAL = {"loglik_limit": 300, "em_limit": 50, "max_gen_toks": 160, "test_limit": None, "mt_bench": True,
        "samples": True}
"""test.json whole; the first 300 GSM8K / MATH test records by log-likelihood; greedy exact match on the first 50
GSM8K questions (generation is the slow part on 2 cores); MT-Bench's GPT-4 reference answers by log-likelihood."""
ESTIMATE_S = {"pool": 10, "reweight_step": 142, "arm": 3600, "base": 540}
"""One-stream seconds used for the hours left until a unit of the kind has finished in this campaign: a reweighting
step with 48 + 8 sequences (measured on 2026-12-04: 141–145 s per step for each of two one-thread streams, AMD EPYC
with AVX-512 BF16, fp32), an arm (250 fine-tuning steps at ≈ 12 s plus an evaluation), the base evaluation (8.6 min,
results/llama3/protocol/base). Once a unit of a kind has finished, its unit.json wall time is used instead."""
UNIT_FILE = "unit.json"
CAMPAIGN_FILE = "campaign.json"
STATUS_FILE = "STATUS.md"
IGNORED_SETTINGS = {"seed", "run_dir", "output_dir", "resume", "source_file", "threads"}
"""Per-unit paths and seeds, and the thread count (which changes speed, not what is computed), are not campaign
settings."""

SMOKE = {
    "pool_args": ["--per-source", "24", "--control", "8", "--no-stand-ins"],
    "reweight": ["model={architecture: llama, config_overrides: {hidden_size: 32, intermediate_size: 64, "
                 "num_hidden_layers: 4, num_attention_heads: 2, num_key_value_heads: 2}}",
                 "tokenizer={kind: gpt2_bpe}", "data.max_length=64", "solver.steps=3", "solver.global_batch=12",
                 "solver.micro_batch=12", "solver.val_batch=4", "checkpoint_every=1", "lisa.gamma=2",
                 "lisa.interval=1", *[f"data.sources.{i}.limit=16" for i in range(6)]],
    "finetune": ["steps=2", "max_length=64", "lisa.gamma=2", "lisa.interval=1"],
    "n": 16,
    "eval": {"loglik_limit": 4, "em_limit": 2, "max_gen_toks": 4, "test_limit": 4, "mt_bench": True, "samples": True},
}


def arm_name(method: str, i: int) -> str:
    return f"{method}_ft{i}"


def _strip(d: dict) -> dict:
    return {k: _strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in IGNORED_SETTINGS}


class Protocol:
    """The campaign's paths, settings and units."""

    def __init__(self, smoke: bool = False, runs_root: Path | None = None, results_root: Path | None = None,
                 reweight_seeds: list[int] | None = None, finetune_seeds: list[int] | None = None,
                 threads: int | None = None, pool: Path | None = None, recompute: bool = False):
        self.smoke, self.recompute = smoke, recompute
        self.runs = Path(runs_root or REPO / "runs" / "llama3" / ("protocol_smoke" if smoke else "protocol")).resolve()
        self.results = Path(results_root or (self.runs / "results" if smoke else
                                             REPO / "results" / "llama3" / "protocol")).resolve()
        self.pool = Path(pool).resolve() if pool else (self.runs / "pool") if smoke else \
            REPO / "data" / "llama3" / "protocol_pool"
        self.extra = SMOKE if smoke else {"pool_args": POOL_ARGS, "reweight": [], "finetune": [], "n": N, "eval": EVAL}
        self.threads = [f"threads={threads}"] if threads else []
        self.rw_seeds = REWEIGHT_SEEDS if reweight_seeds is None else reweight_seeds
        self.ft_seeds = FINETUNE_SEEDS if finetune_seeds is None else finetune_seeds
        self._pools: dict[int, dict] = {}

    # ---- configs and settings -----------------------------------------------------------------------------

    def reweight_config(self, seed: int):
        return load_config(HERE / "protocol_smollm2.yaml", [f"seed={seed}", f"run_dir={self.runs / f'reweight_seed{seed}'}",
                                                             f"data.root={self.pool}", *self.extra["reweight"], *self.threads])

    def finetune_config(self, work: Path, seed: int) -> FinetuneConfig:
        ft = load_config(HERE / "protocol_finetune.yaml", [f"seed={seed}", f"output_dir={work / 'finetune'}",
                                                           f"train.path={work / 'train.jsonl'}", *self.extra["finetune"],
                                                           *self.threads], FinetuneConfig)
        if self.smoke:
            cfg = self.reweight_config(self.rw_seeds[0])
            ft.model, ft.tokenizer = cfg.model, cfg.tokenizer
        return ft

    def settings(self) -> dict:
        """Everything the table depends on, without per-unit paths and seeds."""
        rw = to_dict(self.reweight_config(self.rw_seeds[0]))
        rw["data"].pop("root", None)
        ft = to_dict(self.finetune_config(self.runs / "x", 0))
        ft.get("train", {}).pop("path", None)
        return {"reweight": _strip(rw), "finetune": _strip(ft), "n": self.extra["n"], "arms": ARMS,
                "reweight_seeds": self.rw_seeds, "finetune_seeds": self.ft_seeds, "evaluation": self.extra["eval"],
                "pool_args": self.extra["pool_args"], "pairing": "learned arm i uses reweighting seed i mod 3"}

    def check_settings(self) -> None:
        """Record the settings at the campaign's start; afterwards refuse settings that differ (naming them)."""
        path = self.results / CAMPAIGN_FILE
        now = json.loads(json.dumps(self.settings(), default=str))
        if not path.is_file():
            from scalebio.results import git_revision

            self.results.mkdir(parents=True, exist_ok=True)
            record = {"campaign": "Table 1 protocol", "started_revision": git_revision(), "settings": now}
            write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
            log.info("campaign settings recorded in %s", path)
            return
        self.check_numbers()
        recorded = json.loads(path.read_text())["settings"]
        differ = []
        for name, then, current in settings_diff(recorded, now):
            if ABSENT in (then, current) and name.startswith(("reweight.", "finetune.")):
                # a config field added to (or removed from) the code since the campaign started: its default must
                # not change the numbers, which the tests of that field guard; named, not refused
                log.warning("%s: config field %s is %r in the campaign's record and %r now (added or removed in "
                            "the code since)", path, name, then, current)
            else:
                differ.append(f"{name}: {then!r} in the campaign, {current!r} now")
        if differ:
            raise SystemExit(f"{path}: this campaign was started with other settings; refusing to run a unit with:\n  "
                             + "\n  ".join(differ) + "\nUse the campaign's presets, or new --runs and --results "
                             "folders for a new campaign.")

    def check_numbers(self) -> None:
        """Refuse when the code's numbers differ from the campaign's: the toy-size fingerprint (``fingerprint``)
        against the one campaign.json recorded when the campaign started. Checked once per invocation (a unit's own
        process, under --jobs, inherits the check)."""
        import os

        path = self.results / CAMPAIGN_FILE
        if os.environ.get("SCALEBIO_NUMBERS_CHECKED") == str(path) or not path.is_file():
            return
        if self.smoke or not (self.pool / "manifest.json").is_file():
            return  # the fingerprint runs on the pool; a smoke campaign is its own test
        record = json.loads(path.read_text())
        now = fingerprint(self.pool)
        recorded = record.get("fingerprint")
        if recorded is None:  # the campaign's first invocation since the pool was built: record it
            record["fingerprint"] = now
            write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
            recorded = now
        bad = fingerprint_differs(recorded, now)
        if bad:
            rev = json.loads(path.read_text()).get("started_revision")
            raise SystemExit(f"{path}: this code computes other numbers than the code that started the campaign "
                             f"({bad}). Continue the campaign from its revision (git worktree add DIR {rev}), or "
                             "rerun the units the change touched in a new campaign.")
        os.environ["SCALEBIO_NUMBERS_CHECKED"] = str(path)
        log.info("numbers fingerprint matches the campaign's (%s)", "bit-identical" if now["sha256"] ==
                 recorded.get("sha256") else "within 1e-5")

    # ---- units --------------------------------------------------------------------------------------------

    def _relativize(self, out: Path) -> None:
        """Committed files name no machine paths: paths under this checkout, under the checkout that ran a unit
        (a pinned worktree: its config.yaml's source_file), under the checkout that holds the pool and under the
        runs folder become relative to them."""
        import yaml

        roots = [REPO, self.runs]
        if self.pool.parent.parts[-2:] == ("data", "llama3"):  # a pool in another checkout: data/llama3/<name>
            roots.append(self.pool.parents[2])
        sources = []  # the preset's path as each process of the unit named it: a resumed unit may have run from two
        config, weights = out / "config.yaml", out / "weights.json"
        if config.is_file():
            sources.append((yaml.safe_load(config.read_text()) or {}).get("source_file"))
        if weights.is_file():
            sources.append(json.loads(weights.read_text()).get("provenance", {}).get("config_file"))
        roots += [Path(s).parents[2] for s in sources if s and Path(s).is_absolute()]  # <checkout>/experiments/llama3/x.yaml
        for root in roots:
            relativize(out, root)

    def _unit_file(self, work: Path, name: str, started: float, extra: dict | None = None) -> None:
        """unit.json: when, where and at which revision the unit ran, its wall time summed over its processes."""
        write_text(work / UNIT_FILE, json.dumps(unit_record(name, started, extra, work=work), indent=2) + "\n")

    def pool_unit(self) -> Unit:
        def run():
            subprocess.run([sys.executable, str(HERE / "build_pool.py"), "--out", str(self.pool),
                            *self.extra["pool_args"]], check=True, cwd=REPO)

        return Unit("pool", run=run, done=lambda: (self.pool / "manifest.json").is_file(), kind="pool",
                    estimate_s=ESTIMATE_S["pool"], where=self.pool)

    def reweight_unit(self, seed: int) -> Unit:
        name, cfg = f"reweight_seed{seed}", self.reweight_config(seed)
        run_dir, out = Path(cfg.run_dir), self.results / f"reweight_seed{seed}"
        steps = cfg.solver.steps

        def run():
            run_reweight(cfg, progress=sys.stderr.isatty())

        def logged() -> int:
            f = run_dir / "metrics.jsonl"
            return sum(1 for line in f.open() if line.strip()) if f.is_file() else 0

        def publish(partial: bool = False):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            for f in RUN_FILES:
                if (run_dir / f).is_file() and not (partial and f == "weights.json"):
                    shutil.copy2(run_dir / f, out / f)
            if partial:
                write_text(out / UNIT_FILE, json.dumps(
                    {"unit": name, "state": "partial", "step": logged(), "of": steps,
                     "checkpoint": str(run_dir / "checkpoints")}, indent=2) + "\n")
            else:  # the run's meta.json records revision, hardware and time: the unit record repeats them
                meta = json.loads((run_dir / "meta.json").read_text())
                write_text(out / UNIT_FILE, json.dumps(
                    {"unit": name, "state": "done", "steps": steps, **{k: meta.get(k) for k in (
                        "git_revision", "started", "updated", "wall_time_s", "hardware", "precision")},
                     **{k: meta[k] for k in ("timed", "paused_s", "paused_note") if k in meta}},
                    indent=2) + "\n")
            self._relativize(out)

        def done() -> bool:
            return self.reweight_done(run_dir, cfg) or (self.published(out) and self.reweight_done(out, cfg))

        def publish_finished():
            if self.reweight_done(run_dir, cfg):  # else it was published by an earlier session
                publish()

        return Unit(name, run=run, done=done, publish=publish_finished, needs=("pool",),
                    kind="reweight", estimate_s=ESTIMATE_S["reweight_step"] * steps,
                    progress=lambda: (logged(), steps) if logged() else None,
                    publish_partial=lambda: publish(partial=True), where=run_dir / "checkpoints",
                    check=self.check_settings)

    def published(self, out: Path) -> bool:
        """A unit finished in an earlier session (its results are in the results folder, its run folder may be
        gone) counts as done, unless the campaign recomputes everything (``make reproduce-llama3-offline``)."""
        if self.recompute or not (out / UNIT_FILE).is_file():
            return False
        return json.loads((out / UNIT_FILE).read_text()).get("state", "done") == "done"

    def reweight_done(self, run_dir: Path, cfg) -> bool:
        """A finished reweighting run of these settings: weights.json, and a config.yaml that equals ``cfg`` but for
        paths, seed-independent thread counts and config fields added to the code since (the data files themselves
        were checked by sha256 on every resume). Unlike scalebio.reproduce.reweight_finished, a pool or run folder
        that moved (a campaign continued on another machine) does not make a finished seed unfinished."""
        import yaml

        if not (run_dir / "weights.json").is_file() or not (run_dir / "config.yaml").is_file():
            return False
        then = yaml.safe_load((run_dir / "config.yaml").read_text())
        now = json.loads(json.dumps(to_dict(cfg), default=str))
        for d in (then, now):
            d.get("data", {}).pop("root", None)
            d.pop("threads", None)
        return all(ABSENT in (a, b) or key in ("run_dir", "resume", "source_file")
                   for key, a, b in settings_diff(then, now))

    def base_unit(self) -> Unit:
        work, out = self.runs / "base", self.results / "base"
        cfg = self.reweight_config(self.rw_seeds[0])

        def run():
            import torch

            from scalebio.models import build_model, load_tokenizer, special_token_ids

            started = time.time()
            with counted(work, started):
                if cfg.threads:
                    torch.set_num_threads(cfg.threads)
                tok = load_tokenizer(cfg)
                model = build_model(cfg.model, vocab_size=len(tok), seed=0, token_ids=special_token_ids(tok)).eval()
                work.mkdir(parents=True, exist_ok=True)
                evaluate_model(model, tok, work / "eval.json", self.runs / "eval_tasks", cfg.data.max_length,
                               self.extra["eval"])
            self._unit_file(work, "base", started)

        def publish():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            for f in ("eval.json", "eval_samples.jsonl", UNIT_FILE):
                if (work / f).is_file():
                    shutil.copy2(work / f, out / f)
            self._relativize(out)

        def finished() -> bool:
            return (work / "eval_samples.jsonl").is_file() and (work / UNIT_FILE).is_file()

        return Unit("base", run=run, done=lambda: finished() or self.published(out),
                    publish=lambda: finished() and publish(),
                    needs=("pool",), kind="base", estimate_s=ESTIMATE_S["base"], where=work,
                    check=self.check_settings)

    def arm_unit(self, method: str, i: int) -> Unit:
        name = arm_name(method, i)
        work, out = self.runs / name, self.results / name
        spec = ARMS[method]
        rw_seed = self.rw_seeds[i % len(self.rw_seeds)]
        # The published weights file: the one a later session has when this session's run folder is gone.
        weights = self.results / f"reweight_seed{rw_seed}" / "weights.json" if spec["weights"] == "learned" else None

        def finished():
            if weights is not None and not weights.is_file():
                return False
            manifest = arm_finished(work, weights)  # drawn from these weights (their sha256): not their file's age
            return manifest is not None and (work / "eval_samples.jsonl").is_file() and (work / UNIT_FILE).is_file()

        def published() -> bool:
            if not self.published(out):
                return False
            if weights is None:
                return True
            if not weights.is_file():
                return False
            drawn = json.loads((out / "resample.json").read_text())
            if drawn.get("weights_sha256") == file_sha256(weights):
                return True
            # The weights file published again with other provenance text (a machine path made relative): the draw
            # depends on the weights alone, so the arm stands when the weights it recorded are the file's, exactly.
            return drawn.get("weights") == json.loads(weights.read_text()).get("weights")

        def run():
            started = time.time()
            with counted(work, started):
                ft = self.finetune_config(work, i)
                pool = self.source_pool()
                pool = {k: v for k, v in pool.items() if k not in spec["exclude"]}
                resample(weights, pool, self.extra["n"], i, work / "train.jsonl")
                model_dir = finished_run(ft) or finetune(ft, progress=sys.stderr.isatty())  # stopped while evaluating
                from scalebio.evaluation import load_model

                model, tok = load_model(str(model_dir), device="cpu")
                evaluate_model(model, tok, work / "eval.json", self.runs / "eval_tasks", ft.max_length,
                               self.extra["eval"])
            self._unit_file(work, name, started, {"arm": method, "finetune_seed": i,
                                                  **({"reweight_seed": rw_seed} if weights else {})})

        def publish():
            manifest = json.loads((work / "train.jsonl.manifest.json").read_text())
            shutil.rmtree(out, ignore_errors=True)
            copy_retrain_results(work, out, manifest, REPO)
            for f in ("eval_samples.jsonl", UNIT_FILE):
                shutil.copy2(work / f, out / f)
            self._relativize(out)

        def progress():
            """Fine-tuning steps logged so far (an arm in flight resumes from its newest checkpoint), or None."""
            f = work / "finetune" / "metrics.jsonl"
            n = sum(1 for line in f.open() if line.strip()) if f.is_file() else 0
            return (n, self.finetune_config(work, i).steps) if n else None

        needs = ("pool", f"reweight_seed{rw_seed}") if weights else ("pool",)
        return Unit(name, run=run, done=lambda: finished() or published(), publish=lambda: finished() and publish(),
                    needs=needs, kind="arm", progress=progress,
                    estimate_s=ESTIMATE_S["arm"], where=work / "finetune" / "checkpoints", check=self.check_settings)

    def source_pool(self) -> dict:
        """The training sources as the reweighting runs read them (decontaminated), name → records."""
        if not self._pools:
            from scalebio import data as data_mod

            cfg = self.reweight_config(self.rw_seeds[0])
            held_out = set()
            for src in [cfg.data.validation, *cfg.data.decontaminate_against] if cfg.data.decontaminate else []:
                records, fmt = data_mod.load_with_format(src, cfg)
                held_out.update(data_mod.prompt_key(r, fmt) for r in records)
            for src in cfg.data.sources:
                records, fmt = data_mod.load_with_format(src, cfg)
                self._pools[src.name] = [r for r in records if data_mod.prompt_key(r, fmt) not in held_out]
        return self._pools

    def measured(self) -> dict[str, float]:
        """Seconds per unit kind (per step for reweighting) from the unit.json of the units finished so far. A unit
        whose processes were stopped for a while (SIGSTOP, to time a benchmark on idle cores) records that time as
        ``paused_s``, which is not the unit's cost. A reweighting seed whose ``wall_time_s`` is not its cost (a
        process killed between meta.json writes loses its time from the sum) records an uninterrupted stretch as
        ``timed``: {"steps", "wall_s"}, which is used instead."""
        found: dict[str, list[float]] = {}
        for f in sorted(self.results.glob(f"*/{UNIT_FILE}")):
            rec = json.loads(f.read_text())
            if rec.get("state") == "partial" or not rec.get("wall_time_s"):
                continue
            wall = rec["wall_time_s"] - rec.get("paused_s", 0.0)
            if f.parent.name.startswith("reweight_seed"):
                timed = rec.get("timed")
                found.setdefault("reweight_step", []).append(
                    timed["wall_s"] / timed["steps"] if timed else wall / rec["steps"])
            elif f.parent.name == "base":
                found.setdefault("base", []).append(wall)
            elif "arm" in rec:
                found.setdefault("arm", []).append(wall)
        return {k: sum(v) / len(v) for k, v in found.items()}

    def units(self) -> list[Unit]:
        speeds = {**ESTIMATE_S, **self.measured()}
        out = [self.pool_unit(), *(self.reweight_unit(s) for s in self.rw_seeds), self.base_unit()]
        out += [self.arm_unit(method, i) for i in self.ft_seeds for method in ARMS]
        for u in out:
            u.estimate_s = (speeds["reweight_step"] * self.reweight_config(0).solver.steps if u.kind == "reweight"
                            else speeds[u.kind])
        return out

    def campaign(self, command: list[str] | None = None) -> Campaign:
        cmd = command if command is not None else [sys.executable, str(Path(__file__).resolve()), "run",
                                                   "--runs", str(self.runs), "--results", str(self.results),
                                                   "--pool", str(self.pool), *(["--recompute"] if self.recompute else []),
                                                   *(["--smoke"] if self.smoke else [])]
        return Campaign("protocol", self.units(), command=cmd, logs=self.runs / "logs")


def run(smoke: bool = False, runs_root: Path | None = None, results_root: Path | None = None,
        reweight_seeds: list[int] | None = None, finetune_seeds: list[int] | None = None, threads: int | None = None,
        jobs: int = 1, only: list[str] | None = None, recompute: bool = False) -> Path:
    """Run every unit not yet done (``only``: these), ``jobs`` at a time, publishing each into ``results_root``."""
    p = Protocol(smoke, runs_root, results_root, reweight_seeds, finetune_seeds, threads, recompute=recompute)
    p.campaign().run(jobs=jobs, only=only)
    return p.results


FINGERPRINT_RTOL = 1e-5
"""Fingerprints from two kinds of CPU (AVX2, AVX-512) may differ in the last bits of fp32; a change to what the code
computes moves these toy-size weights and losses by far more (a learning-rate or loss-normalisation change: ≥ 1e-3)."""


def fingerprint(pool: Path) -> dict:
    """What the campaign's code computes, at toy size and fp32, in seconds: a tiny random Llama reweighted for 4 steps
    on the protocol pool by the protocol preset (LISA shared, stratified, two micro-batches), 16 examples drawn by its
    weights, then fine-tuned for 3 steps by the fine-tuning preset. Returns the final weights, the fine-tuning losses
    and sha256 of the files (equal hashes: bit-identical)."""
    import hashlib

    tiny = ["model={architecture: llama, config_overrides: {hidden_size: 32, intermediate_size: 64, "
            "num_hidden_layers: 4, num_attention_heads: 2, num_key_value_heads: 2}}", "tokenizer={kind: gpt2_bpe}",
            "data.max_length=64", "solver.steps=4", "solver.global_batch=12", "solver.micro_batch=6",
            "solver.val_batch=4", "checkpoint_every=2", "lisa.gamma=2", "lisa.interval=2",
            *[f"data.sources.{i}.limit=16" for i in range(6)]]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        cfg = load_config(HERE / "protocol_smollm2.yaml", [f"run_dir={t / 'rw'}", f"data.root={pool}", *tiny])
        run_reweight(cfg, progress=False)
        resample(t / "rw" / "weights.json", pool_from_run(t / "rw"), 16, 0, t / "train.jsonl")
        ft = load_config(HERE / "protocol_finetune.yaml", ["seed=0", f"output_dir={t / 'ft'}",
                                                           f"train.path={t / 'train.jsonl'}", "steps=3", "max_length=64",
                                                           "lisa.gamma=2", "lisa.interval=1"], FinetuneConfig)
        ft.model, ft.tokenizer = cfg.model, cfg.tokenizer
        finetune(ft, progress=False)
        files = {"weights.jsonl": t / "rw" / "weights.jsonl", "metrics.jsonl": t / "rw" / "metrics.jsonl",
                 "train.jsonl": t / "train.jsonl"}
        from scalebio.results import read_jsonl

        return {"weights": read_jsonl(t / "rw" / "weights.jsonl")[-1]["weights"],
                "finetune_losses": [r["train_loss"] for r in read_jsonl(t / "ft" / "metrics.jsonl")],
                "sha256": {k: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for k, p in files.items()}}


def fingerprint_differs(recorded: dict, now: dict, rtol: float = FINGERPRINT_RTOL) -> str:
    """"" when two fingerprints agree within ``rtol``, else what differs."""
    import math

    pairs = [(f"weight of {k}", recorded["weights"][k], now["weights"].get(k, math.nan)) for k in recorded["weights"]]
    pairs += [(f"fine-tuning loss {i}", a, b) for i, (a, b) in
              enumerate(zip(recorded["finetune_losses"], now["finetune_losses"]))]
    bad = [f"{what}: {a!r} then, {b!r} now" for what, a, b in pairs if not math.isclose(a, b, rel_tol=rtol)]
    if len(recorded["finetune_losses"]) != len(now["finetune_losses"]) or set(recorded["weights"]) != set(now["weights"]):
        bad.append("a different number of losses or sources")
    return "; ".join(bad)


REPORT = "reproduce_report.md"


def claims(folder: Path) -> list[Claim]:
    """The claims of README.md's Table 1 rows, measured on one results/llama3/protocol folder: per task and per
    comparison arm, the paired difference learned − arm with its 95% bootstrap interval (holds when the verdict is
    "reproduced"); per reweighting seed, the control source below 1/k; the seed-to-seed Spearman correlations."""
    rows = collect_protocol(folder)
    out = []
    for r in rows["differences"]:
        other = r["method"].split("-", 1)[1]
        key = f"learned_vs_{other}/{r['item']}"
        out.append(Claim(key, r["item"],
                         f"learned − {other} ({r['metric']}, {'lower' if r['lower_is_better'] else 'higher'} is better), "
                         "95% paired bootstrap interval", f"{r['mean']:+.4f} [{r['ci_lo']:+.4f}, {r['ci_hi']:+.4f}] "
                         f"over {r['n']} seed pairs: {r['verdict']}", r["verdict"] == "reproduced"))
    for r in rows["control"]:
        out.append(Claim(f"control_below_uniform/seed{r['seeds']}", "reweighting", f"{r['item']} ends below 1/k",
                         f"{r['mean']:.4f} vs 1/k = {1 / r['n']:.4f}", r["verdict"] == "below 1/k"))
    for r in rows["spearman"]:
        out.append(Claim(f"spearman/{r['item']}", "reweighting", f"Spearman of final weights, {r['item']}",
                         f"{r['mean']:+.3f}", None))
    return out


def reproduce(results_root: Path, repo: Path = REPO) -> str:
    """Committed (git HEAD) vs recomputed claims of ``results_root`` → ``results_root``/reproduce_report.md."""
    with tempfile.TemporaryDirectory() as scratch:
        return reproduce_report("Table 1 protocol: committed vs recomputed (`make reproduce-llama3-offline`)", repo,
                                results_root.resolve().relative_to(repo.resolve()).as_posix(), claims,
                                results_root / REPORT, scratch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", choices=("run", "status", "report"), default="run")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama on a few dozen examples")
    parser.add_argument("--jobs", type=int, default=1, help="units run at once, each as its own process (default 1)")
    parser.add_argument("--only", nargs="+", default=None, metavar="UNIT", help="run just these units")
    parser.add_argument("--reweight-seeds", type=int, nargs="+", default=None, help=f"default {REWEIGHT_SEEDS}")
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=None, help=f"default {FINETUNE_SEEDS}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per unit (default: the presets' 1)")
    parser.add_argument("--runs", default=None, help="working folder: checkpoints and models (default "
                        "runs/llama3/protocol); pick one that survives between sessions")
    parser.add_argument("--results", default=None, help="results folder (default results/llama3/protocol)")
    parser.add_argument("--pool", default=None, help="the pool folder (default data/llama3/protocol_pool; build_pool "
                        "writes the same bytes wherever it runs)")
    parser.add_argument("--recompute", action="store_true", help="count only units finished under --runs as done, "
                        "not units published in the results folder by an earlier session (make reproduce-llama3-offline)")
    parser.add_argument("--write", action="store_true", help="status: also publish units in flight (partial) and "
                        f"write {STATUS_FILE} into the results folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    p = Protocol(args.smoke, Path(args.runs) if args.runs else None, Path(args.results) if args.results else None,
                 args.reweight_seeds, args.finetune_seeds, args.threads, Path(args.pool) if args.pool else None,
                 args.recompute)
    if args.action == "status":
        campaign = p.campaign()
        if args.write:
            for u, s in zip(campaign.units, campaign.states()):
                if s.state == "partial" and u.publish_partial:
                    u.publish_partial()
        text = campaign.status(jobs=max(2, args.jobs))
        if args.write:
            write_text(p.results / STATUS_FILE, text)
        print(text, end="")
        return 0
    if args.action == "run":
        try:
            p.campaign().run(jobs=args.jobs, only=args.only)
        except (CampaignStopped, RunInterrupted) as e:  # a signal: the driver, or this unit's own process
            log.error("%s", e)
            return e.exit_code
        if args.only or args.smoke or args.results:
            return 0
    subprocess.run([sys.executable, str(HERE / "table1.py")], check=True, cwd=REPO)
    print(reproduce(p.results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
