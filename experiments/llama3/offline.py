"""The offline preset of the large-model experiment, end to end: pool → reweight → resample (learned and uniform)
→ fine-tune each arm → evaluate the base model and every fine-tuned model → results/llama3/offline → Table 1.

    python experiments/llama3/offline.py [--seeds 0 1] [--smoke]

SmolLM2-135M-Instruct stands in for LLaMA-3 (a scaled-down stand-in, not the paper's model). Each stage is the
library call behind a CLI command (``scalebio reweight`` / ``resample`` / ``finetune``, ``tasks.py``), so the
cluster path in README.md runs the same code. Every stage is recomputed and its small files are written over
``results/llama3/offline/`` (files there that this run did not produce are removed); the work happens under
``runs/llama3/offline/`` (not committed), where a stage this checkout already finished is not redone and
reweighting resumes from its checkpoint, so an interrupted run continues where it stopped (``make clean``
removes runs/ to recompute everything). Logs show each stage with elapsed time and an estimate of what is left.
The run ends with Table 1 and a report, printed and written to ``results/llama3/offline/reproduce_report.md``:
each claim as committed (git HEAD) beside its recomputed value, and whether it still holds.

``--smoke`` runs the same pipeline on a tiny random Llama and a 24-per-source pool under
``runs/llama3/offline_smoke/`` (for tests: seconds; results/ is left alone). One reweighting seed (0) produces
the weights; ``--seeds`` are the fine-tuning seeds: each seed resamples and fine-tunes both arms.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from scalebio.config import load_config
from scalebio.evaluation.record import LOWER_IS_BETTER, primary_metric
from scalebio.finetune import FinetuneConfig, finetune
from scalebio.resample import pool_from_run, resample
from scalebio.results import copy_retrain_results, copy_run_results, relativize
from scalebio.reproduce import Claim, arm_finished, prune, reproduce_report, reweight_finished
from scalebio.reweight import run_reweight
from scalebio.stages import Campaign, Unit

if __name__ == "__main__" and not __package__:  # run by its path: run it as the module it is (scalebio.scripts)
    from scalebio.scripts import run_as_module
    run_as_module(__file__)

from experiments.llama3.tasks import evaluate_model  # noqa: E402

log = logging.getLogger("llama3.offline")

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

SEEDS = [0, 1]
"""The fine-tuning seeds of the committed run."""
ARMS = {"learned": {"weights": "learned"}, "uniform": {"weights": "uniform"}}
"""Each arm: the weights its examples are drawn by (the reweighting run's learned weights, or uniform), as
protocol.ARMS; every arm is fine-tuned and evaluated the same way."""

EVAL = {"loglik_limit": 300, "em_limit": 50, "max_gen_toks": 160}
"""Offline evaluation: the first 300 GSM8K / MATH test records by log-likelihood (test.json is whole), and greedy
exact match on the first 50 GSM8K questions (generation is the slow part on 2 cores)."""

SMOKE = {
    "pool_args": ["--per-source", "24"],
    "reweight": ["model={architecture: llama, config_overrides: {hidden_size: 32, intermediate_size: 64, "
                 "num_hidden_layers: 4, num_attention_heads: 2, num_key_value_heads: 2}}",
                 "tokenizer={kind: gpt2_bpe}", "data.max_length=64", "solver.steps=2", "solver.global_batch=8",
                 "solver.micro_batch=8", "solver.val_batch=4", "checkpoint_every=1", "lisa.gamma=2",
                 "lisa.interval=1"],
    "finetune": ["steps=2", "max_length=64", "lisa.gamma=2", "lisa.interval=1"],
    "n": 16,
    "eval": {"loglik_limit": 4, "em_limit": 2, "max_gen_toks": 4, "test_limit": 4},
}


def run(seeds: list[int], smoke: bool = False, runs_root: Path | None = None, results_root: Path | None = None,
        prune_stale: bool = True) -> Path:
    """Recompute every stage and write the results over ``results_root``; a stage is skipped only when
    ``runs_root`` holds its finished output (this checkout's own work), never because results are committed.
    ``prune_stale``: then remove the files under ``results_root`` this run did not write (off when only some of
    the seeds are run, so the other seeds' results stay)."""
    runs_root = runs_root or REPO / "runs" / "llama3" / ("offline_smoke" if smoke else "offline")
    results_root = results_root or (runs_root / "results" if smoke else REPO / "results" / "llama3" / "offline")
    pool = (runs_root / "pool") if smoke else REPO / "data" / "llama3" / "pool"
    extra = SMOKE if smoke else {"pool_args": [], "reweight": [], "finetune": [], "n": None, "eval": EVAL}
    written: set[Path] = set()

    def build_pool():
        subprocess.run([sys.executable, str(HERE / "build_pool.py"), "--out", str(pool), *extra["pool_args"]],
                       check=True, cwd=REPO)

    # 1. Reweighting (scalebio reweight experiments/llama3/offline_smollm2.yaml).
    rw_dir, rw_out = runs_root / "reweight_seed0", results_root / "reweight_seed0"
    cfg = load_config(HERE / "offline_smollm2.yaml", [f"run_dir={rw_dir}", f"data.root={pool}", *extra["reweight"]])

    def publish_reweight():
        shutil.rmtree(rw_out, ignore_errors=True)
        copy_run_results(rw_dir, rw_out, REPO)
        written.add(rw_out)

    # 2. The base model, before any fine-tuning.
    base_work, base_out = runs_root / "base_seed0", results_root / "base_seed0"

    def evaluate_base():
        import torch

        from scalebio.models import build_model, load_tokenizer, special_token_ids

        if cfg.threads:  # as in an uninterrupted run, where the reweighting (same process) has set it
            torch.set_num_threads(cfg.threads)
        tok = load_tokenizer(cfg)
        model = build_model(cfg.model, vocab_size=len(tok), seed=0, token_ids=special_token_ids(tok)).eval()
        evaluate_model(model, tok, base_work / "eval.json", runs_root / "eval_tasks", cfg.data.max_length,
                       extra["eval"])

    def publish_base():
        shutil.rmtree(base_out, ignore_errors=True)
        base_out.mkdir(parents=True)
        shutil.copy2(base_work / "eval.json", base_out / "eval.json")
        relativize(base_out, REPO)
        written.add(base_out)

    # 3. Per seed: resample N by the learned weights and uniformly, fine-tune each arm for the same steps, evaluate.
    pool_records: dict = {}

    def arm(seed: int, method: str) -> Unit:
        out, work = results_root / f"{method}_seed{seed}", runs_root / f"{method}_seed{seed}"
        weights = rw_dir / "weights.json" if ARMS[method]["weights"] == "learned" else None

        def finished():
            return arm_finished(work, weights, run_weights=rw_dir / "weights.json")

        def run_arm():
            ft = load_config(HERE / "finetune_offline.yaml", [f"seed={seed}", f"output_dir={work / 'finetune'}",
                                                              f"train.path={work / 'train.jsonl'}",
                                                              *extra["finetune"]], FinetuneConfig)
            if smoke:
                ft.model, ft.tokenizer = cfg.model, cfg.tokenizer
            n = extra["n"] or ft.steps * ft.global_batch  # every drawn example is seen once
            if not pool_records:
                pool_records.update(pool_from_run(rw_dir))
            resample(weights, pool_records, n, seed, work / "train.jsonl")
            model_dir = finetune(ft, progress=sys.stderr.isatty())
            from scalebio.evaluation import load_model

            model, tok = load_model(str(model_dir), device="cpu")
            evaluate_model(model, tok, work / "eval.json", runs_root / "eval_tasks", ft.max_length, extra["eval"])

        def publish():
            shutil.rmtree(out, ignore_errors=True)
            copy_retrain_results(work, out, finished(), REPO)
            written.add(out)

        return Unit(f"{method} seed {seed}", run=run_arm, done=lambda: finished() is not None, publish=publish,
                    needs=("reweight",), kind="arm", where=work)

    units = [Unit("pool", run=build_pool, done=(pool / "manifest.json").is_file, kind="pool"),
             Unit("reweight", run=lambda: run_reweight(cfg, progress=sys.stderr.isatty()),
                  done=lambda: reweight_finished(rw_dir, cfg), publish=publish_reweight, needs=("pool",),
                  kind="reweight", where=rw_dir),
             Unit("evaluate base", run=evaluate_base, done=(base_work / "eval.json").is_file, publish=publish_base,
                  needs=("pool",), kind="evaluate", where=base_work),
             *(arm(seed, method) for seed in seeds for method in ARMS)]
    Campaign("offline", units).run()
    for path in prune(results_root, written) if prune_stale else []:
        log.info("removed %s: not produced by this run", path.relative_to(results_root))
    return results_root


REPORT = "reproduce_report.md"
"""Written at the end of a full run (``make reproduce-llama3-offline``) into the results folder; table1.py reads
only the stage folders beside it."""


def _arm_means(folder: Path, method: str) -> dict[str, tuple[str, list[float]]]:
    """task → (primary metric, values over seeds) of one arm's eval.json files."""
    out: dict[str, tuple[str, list[float]]] = {}
    for eval_file in sorted(folder.glob(f"{method}_seed*/eval.json"), key=lambda p: int(p.parent.name.rsplit("seed", 1)[1])):
        for task, metrics in json.loads(eval_file.read_text()).get("tasks", {}).items():
            metric = primary_metric(metrics)
            if metric is not None:
                out.setdefault(task, (metric, []))[1].append(float(metrics[metric]))
    return out


def claims(folder: Path) -> list[Claim]:
    """The claims of README.md's LLaMA-3 table, measured on one results/llama3/offline folder.

    Per task (its primary metric, as table1.py): learned beats uniform when its mean is better by more than the
    larger seed-to-seed std of the two arms (a gap inside the spread over seeds is a tie), and both fine-tuned
    arms beat the base model; and the learned weights, largest first.
    """
    learned, uniform, base = (_arm_means(folder, m) for m in ("learned", "uniform", "base"))
    out = []
    for task in sorted(learned.keys() & uniform.keys()):
        metric, lv = learned[task]
        _, uv = uniform[task]
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0  # sign · (learned − uniform) > 0: learned better
        spread = max(statistics.stdev(lv) if len(lv) > 1 else 0.0, statistics.stdev(uv) if len(uv) > 1 else 0.0)
        gap = sign * (statistics.fmean(lv) - statistics.fmean(uv))

        def shown(v):
            return f"{statistics.fmean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")

        direction = "lower" if sign < 0 else "higher"
        out.append(Claim(f"learned_beats_uniform/{task}", task, f"learned beats uniform by more than the seed spread "
                         f"({metric}, {direction} is better)", f"learned {shown(lv)} vs uniform {shown(uv)} "
                         f"({len(lv)} seeds)", gap > spread))
        if task in base:
            b = statistics.fmean(base[task][1])
            holds = sign * (statistics.fmean(lv) - b) > 0 and sign * (statistics.fmean(uv) - b) > 0
            out.append(Claim(f"beats_base/{task}", task, f"both fine-tuned arms beat the base model ({metric})",
                             f"learned {statistics.fmean(lv):.3f}, uniform {statistics.fmean(uv):.3f}, base {b:.3f}",
                             holds))
    weights_file = folder / "reweight_seed0" / "weights.json"
    if weights_file.is_file():
        weights = json.loads(weights_file.read_text())["weights"]
        order = sorted(weights, key=lambda k: (-weights[k], k))
        out.append(Claim("weights", "reweighting", "learned weights, largest first",
                         " > ".join(f"{k} {weights[k]:.3f}" for k in order), None))
    return out


def reproduce(results_root: Path, repo: Path = REPO) -> str:
    """Committed (git HEAD) vs recomputed claims of ``results_root`` → ``results_root``/reproduce_report.md."""
    with tempfile.TemporaryDirectory() as scratch:
        return reproduce_report("LLaMA-3 offline preset: committed vs recomputed (`make reproduce-llama3-offline`)",
                                repo, results_root.resolve().relative_to(repo.resolve()).as_posix(), claims,
                                results_root / REPORT, scratch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS,
                        help="fine-tuning seeds (default 0 1); with others, the results of seeds not run are kept")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama on a few dozen examples")
    parser.add_argument("--runs", default=None, help="working folder (default runs/llama3/offline)")
    parser.add_argument("--results", default=None, help="results folder (default results/llama3/offline)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = run(args.seeds, args.smoke, Path(args.runs) if args.runs else None, Path(args.results) if args.results else None,
              prune_stale=sorted(args.seeds) == SEEDS)
    if not args.smoke and not args.results:
        subprocess.run([sys.executable, str(HERE / "table1.py")], check=True, cwd=REPO)
        print(reproduce(out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
