"""The offline preset of the large-model experiment, end to end: pool → reweight → resample (learned and uniform)
→ fine-tune each arm → evaluate the base model and every fine-tuned model → results/llama3/offline → Table 1.

    python experiments/llama3/offline.py [--seeds 0 1] [--smoke]

SmolLM2-135M-Instruct stands in for LLaMA-3 (a scaled-down stand-in, not the paper's model). Each stage is the
library call behind a CLI command (``scalebio reweight`` / ``resample`` / ``finetune``, ``tasks.py``), so the
cluster path in README.md runs the same code. A stage whose output exists is skipped and reweighting resumes
from its checkpoint, so an interrupted run continues where it stopped. Logs show each stage with elapsed time
and an estimate of what is left.

``--smoke`` runs the same pipeline on a tiny random Llama and a 24-per-source pool in a temporary folder (for
tests: seconds). One reweighting seed (0) produces the weights; ``--seeds`` are the fine-tuning seeds: each
seed resamples and fine-tunes both arms.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

from scalebio.config import load_config  # noqa: E402
from scalebio.finetune import FinetuneConfig, finetune  # noqa: E402
from scalebio.resample import pool_from_run, resample  # noqa: E402
from scalebio.results import copy_retrain_results, copy_run_results, relativize  # noqa: E402
from scalebio.reweight import run_reweight  # noqa: E402

log = logging.getLogger("llama3.offline")

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


def evaluate_model(model, tokenizer, out: Path, work: Path, max_length: int, settings: dict) -> None:
    """The offline tasks of tasks.py on one model (in memory) → ``out`` (eval.json)."""
    from scalebio.evaluation import evaluate
    from tasks import offline_tasks

    tasks = offline_tasks(tokenizer, work_dir=work, loglik_limit=settings["loglik_limit"],
                          em_limit=settings["em_limit"], max_gen_toks=settings["max_gen_toks"],
                          max_length=max_length, test_limit=settings.get("test_limit"))
    evaluate(model, tokenizer, tasks, out)


def run(seeds: list[int], smoke: bool = False, runs_root: Path | None = None, results_root: Path | None = None) -> Path:
    runs_root = runs_root or REPO / "runs" / "llama3" / "offline"
    results_root = results_root or REPO / "results" / "llama3" / "offline"
    pool = (runs_root / "pool") if smoke else REPO / "data" / "llama3" / "pool"
    extra = SMOKE if smoke else {"pool_args": [], "reweight": [], "finetune": [], "n": None, "eval": EVAL}
    stages = 2 + 2 * len(seeds)  # reweight, base evaluation, (learned, uniform) per seed
    t_start, done, skipped = time.time(), 0, 0  # skipped: stages whose output a previous run left

    def progress(what: str) -> None:
        elapsed, ran = time.time() - t_start, done - skipped
        left = f"about {elapsed / ran * (stages - done):.0f} s left" if ran else "estimate after the first stage"
        log.info("[offline %d/%d] %s (elapsed %.0f s, %s)", done, stages, what, elapsed, left)

    if not (pool / "manifest.json").is_file():
        subprocess.run([sys.executable, str(HERE / "build_pool.py"), "--out", str(pool), *extra["pool_args"]],
                       check=True, cwd=REPO)

    # 1. Reweighting (scalebio reweight experiments/llama3/offline_smollm2.yaml).
    rw_dir = runs_root / "reweight_seed0"
    rw_out = results_root / "reweight_seed0"
    progress("reweight")
    cfg = load_config(HERE / "offline_smollm2.yaml", [f"run_dir={rw_dir}", f"data.root={pool}", *extra["reweight"]])
    if not (rw_out / "weights.json").is_file():
        run_reweight(cfg, progress=sys.stderr.isatty())
        copy_run_results(rw_dir, rw_out, REPO)
    else:
        skipped += 1
    done += 1

    # 2. The base model, before any fine-tuning.
    progress("evaluate base")
    base_out = results_root / "base_seed0"
    if not (base_out / "eval.json").is_file():
        from scalebio.models import build_model, load_tokenizer, special_token_ids

        tok = load_tokenizer(cfg)
        model = build_model(cfg.model, vocab_size=len(tok), seed=0, token_ids=special_token_ids(tok)).eval()
        work = runs_root / "base_seed0"
        evaluate_model(model, tok, work / "eval.json", runs_root / "eval_tasks", cfg.data.max_length, extra["eval"])
        base_out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(work / "eval.json", base_out / "eval.json")
        relativize(base_out, REPO)
    else:
        skipped += 1
    done += 1

    # 3. Per seed: resample N by the learned weights and uniformly, fine-tune each arm for the same steps, evaluate.
    pool_records = None
    for seed in seeds:
        for method in ("learned", "uniform"):
            progress(f"{method} seed {seed}: resample, fine-tune, evaluate")
            out = results_root / f"{method}_seed{seed}"
            if (out / "eval.json").is_file():
                done, skipped = done + 1, skipped + 1
                continue
            work = runs_root / f"{method}_seed{seed}"
            ft = load_config(HERE / "finetune_offline.yaml", [f"seed={seed}", f"output_dir={work / 'finetune'}",
                                                              f"train.path={work / 'train.jsonl'}", *extra["finetune"]],
                             FinetuneConfig)
            if smoke:
                ft.model, ft.tokenizer = cfg.model, cfg.tokenizer
            n = extra["n"] or ft.steps * ft.global_batch  # every drawn example is seen once
            if pool_records is None:
                pool_records = pool_from_run(rw_dir)
            weights = None if method == "uniform" else rw_dir / "weights.json"
            manifest = resample(weights, pool_records, n, seed, work / "train.jsonl")
            model_dir = finetune(ft, progress=sys.stderr.isatty())
            from scalebio.evaluation import load_model

            model, tok = load_model(str(model_dir), device="cpu")
            evaluate_model(model, tok, work / "eval.json", runs_root / "eval_tasks", ft.max_length, extra["eval"])
            copy_retrain_results(work, out, manifest, REPO)
            done += 1
    progress("done")
    return results_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds (default 0 1)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama on a few dozen examples")
    parser.add_argument("--runs", default=None, help="working folder (default runs/llama3/offline)")
    parser.add_argument("--results", default=None, help="results folder (default results/llama3/offline)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    run(args.seeds, args.smoke, Path(args.runs) if args.runs else None, Path(args.results) if args.results else None)
    if not args.smoke and not args.results:
        subprocess.run([sys.executable, str(HERE / "table1.py")], check=True, cwd=REPO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
