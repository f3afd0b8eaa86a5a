"""Table 1's protocol on SmolLM2-135M-Instruct (method.md §6, the later math setting, scaled to 2 CPU cores):
pool with a control source → reweight with three seeds → resample N per arm by each seed's learned weights and
uniformly → fine-tune every arm → evaluate base and fine-tuned models → results/llama3/protocol → Table 1.

    python experiments/llama3/protocol.py [--smoke] [--stages pool reweight base arms] [--runs DIR] [--results DIR]

Stages and what they write (under ``results/llama3/protocol/``; the work happens under ``runs/llama3/protocol/``):

    pool        data/llama3/protocol_pool: build_pool.py --control 600 --no-stand-ins (the five authors' sources
                and control-dot-responses, whose responses are all ".")
    reweight    reweight_seed{s}/ for s in REWEIGHT_SEEDS: protocol_smollm2.yaml with seed=s (150 steps)
    base        base/: the model before fine-tuning, evaluated
    arms        learned_ft{i}/, uniform_ft{i}/ for i in FINETUNE_SEEDS: N examples drawn (seed i) by reweight seed
                REWEIGHT_SEEDS[i % 3]'s weights or uniformly, fine-tuned with seed i (protocol_finetune.yaml), evaluated

Every evaluation writes ``eval.json`` and the per-example ``eval_samples.jsonl`` the confidence intervals resample.
A stage this checkout finished under ``runs/`` is not redone and reweighting resumes from its newest checkpoint,
so re-running the command after a kill continues where it stopped; each stage's small results are copied into
``results/`` as soon as it finishes. The log shows ``[protocol i/n] stage`` with elapsed time and an estimate of
what is left. ``--smoke``: the same stages on a tiny random Llama and a 24-per-source pool (seconds per stage,
for the slow tests; results under the runs folder).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
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
from scalebio.reproduce import Claim, arm_finished, reproduce_report, reweight_finished  # noqa: E402
from scalebio.reweight import run_reweight  # noqa: E402
from offline import evaluate_model  # noqa: E402  (with settings "samples" and "mt_bench")

log = logging.getLogger("llama3.protocol")

REWEIGHT_SEEDS = [0, 1, 2]
FINETUNE_SEEDS = [0, 1, 2]
N = 2000
"""Examples drawn per arm (the same for both arms): 250 fine-tuning steps of 8, each seen once."""
STAGES = ("pool", "reweight", "base", "arms")
POOL_ARGS = ["--control", "600", "--no-stand-ins"]
EVAL = {"loglik_limit": 300, "em_limit": 50, "max_gen_toks": 160, "test_limit": None, "mt_bench": True,
        "samples": True}
"""test.json whole; the first 300 GSM8K / MATH test records by log-likelihood; greedy exact match on the first 50
GSM8K questions (generation is the slow part on 2 cores); MT-Bench's GPT-4 reference answers by log-likelihood."""

SMOKE = {
    "pool_args": ["--per-source", "24", "--control", "8", "--no-stand-ins"],
    "reweight": ["model={architecture: llama, config_overrides: {hidden_size: 32, intermediate_size: 64, "
                 "num_hidden_layers: 4, num_attention_heads: 2, num_key_value_heads: 2}}",
                 "tokenizer={kind: gpt2_bpe}", "data.max_length=64", "solver.steps=3", "solver.global_batch=12",
                 "solver.micro_batch=12", "solver.val_batch=4", "checkpoint_every=1", "lisa.gamma=2",
                 "lisa.interval=1", "threads=1", *[f"data.sources.{i}.limit=16" for i in range(6)]],
    "finetune": ["steps=2", "max_length=64", "lisa.gamma=2", "lisa.interval=1", "threads=1"],
    "n": 16,
    "eval": {"loglik_limit": 4, "em_limit": 2, "max_gen_toks": 4, "test_limit": 4, "mt_bench": True, "samples": True},
}


def arm_name(method: str, i: int) -> str:
    return f"{method}_ft{i}"


class Progress:
    """``[protocol done/total] what`` with elapsed time and an estimate from the stages computed so far."""

    def __init__(self, total: int):
        self.total, self.done, self.skipped, self.start = total, 0, 0, time.time()

    def __call__(self, what: str, skipped: bool = False) -> None:
        elapsed, ran = time.time() - self.start, self.done - self.skipped
        left = f"about {elapsed / ran * (self.total - self.done) / 60:.0f} min left" if ran else "estimate after the first stage"
        log.info("[protocol %d/%d] %s (elapsed %.0f min, %s)", self.done, self.total, what, elapsed / 60, left)

    def finish(self, skipped: bool = False) -> None:
        self.done += 1
        self.skipped += skipped


def _copy_eval(work: Path, out: Path) -> None:
    for name in ("eval.json", "eval_samples.jsonl"):
        shutil.copy2(work / name, out / name)


def run(smoke: bool = False, runs_root: Path | None = None, results_root: Path | None = None,
        stages: tuple[str, ...] = STAGES, reweight_seeds: list[int] | None = None,
        finetune_seeds: list[int] | None = None, threads: int | None = None) -> Path:
    """Run ``stages`` in order (each skips what this checkout already finished under ``runs_root``) and copy
    each finished stage's small files into ``results_root``."""
    runs_root = runs_root or REPO / "runs" / "llama3" / ("protocol_smoke" if smoke else "protocol")
    results_root = results_root or (runs_root / "results" if smoke else REPO / "results" / "llama3" / "protocol")
    pool = (runs_root / "pool") if smoke else REPO / "data" / "llama3" / "protocol_pool"
    extra = SMOKE if smoke else {"pool_args": POOL_ARGS, "reweight": [], "finetune": [], "n": N, "eval": EVAL}
    if threads is not None:  # torch threads of every stage (part of the reweighting config, so of its digest)
        extra = {**extra, "reweight": [*extra["reweight"], f"threads={threads}"],
                 "finetune": [*extra["finetune"], f"threads={threads}"]}
    rw_seeds = REWEIGHT_SEEDS if reweight_seeds is None else reweight_seeds
    ft_seeds = FINETUNE_SEEDS if finetune_seeds is None else finetune_seeds
    total = ("pool" in stages) + len(rw_seeds) * ("reweight" in stages) + ("base" in stages) \
        + 2 * len(ft_seeds) * ("arms" in stages)
    progress = Progress(total)

    if "pool" in stages:
        if (pool / "manifest.json").is_file():
            progress("pool: built earlier in " + str(pool))
            progress.finish(skipped=True)
        else:
            progress("pool")
            subprocess.run([sys.executable, str(HERE / "build_pool.py"), "--out", str(pool), *extra["pool_args"]],
                           check=True, cwd=REPO)
            progress.finish()

    def reweight_config(seed: int):
        return load_config(HERE / "protocol_smollm2.yaml", [f"seed={seed}", f"run_dir={runs_root / f'reweight_seed{seed}'}",
                                                             f"data.root={pool}", *extra["reweight"]])

    if "reweight" in stages:
        for seed in rw_seeds:
            cfg = reweight_config(seed)
            finished = reweight_finished(cfg.run_dir, cfg)
            progress(f"reweight seed {seed}" + (": finished earlier in " + str(cfg.run_dir) if finished else ""))
            if not finished:
                run_reweight(cfg, progress=sys.stderr.isatty())
            out = results_root / f"reweight_seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            copy_run_results(cfg.run_dir, out, REPO)
            progress.finish(skipped=finished)

    cfg = reweight_config(rw_seeds[0])
    if "base" in stages:
        work, out = runs_root / "base", results_root / "base"
        finished = (work / "eval_samples.jsonl").is_file()
        progress("evaluate base" + (": finished earlier in " + str(work) if finished else ""))
        if not finished:
            import torch

            from scalebio.models import build_model, load_tokenizer, special_token_ids

            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            tok = load_tokenizer(cfg)
            model = build_model(cfg.model, vocab_size=len(tok), seed=0, token_ids=special_token_ids(tok)).eval()
            work.mkdir(parents=True, exist_ok=True)
            evaluate_model(model, tok, work / "eval.json", runs_root / "eval_tasks", cfg.data.max_length, extra["eval"])
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        _copy_eval(work, out)
        relativize(out, REPO)
        progress.finish(skipped=finished)

    if "arms" in stages:
        pools: dict[int, dict] = {}
        for i in ft_seeds:
            rw_seed = rw_seeds[i % len(rw_seeds)]
            rw_dir = runs_root / f"reweight_seed{rw_seed}"
            for method in ("learned", "uniform"):
                work, out = runs_root / arm_name(method, i), results_root / arm_name(method, i)
                weights = rw_dir / "weights.json" if method == "learned" else None
                manifest = arm_finished(work, weights, run_weights=rw_dir / "weights.json")
                if manifest is not None and not (work / "eval_samples.jsonl").is_file():
                    manifest = None
                finished = manifest is not None
                what = f"{method} arm, fine-tuning seed {i}" + (f" (weights of reweight seed {rw_seed})" if weights else "")
                progress(what + (": finished earlier in " + str(work) if finished else ": resample, fine-tune, evaluate"))
                if not finished:
                    ft = load_config(HERE / "protocol_finetune.yaml", [f"seed={i}", f"output_dir={work / 'finetune'}",
                                                                       f"train.path={work / 'train.jsonl'}",
                                                                       *extra["finetune"]], FinetuneConfig)
                    if smoke:
                        ft.model, ft.tokenizer = cfg.model, cfg.tokenizer
                    if rw_seed not in pools:
                        pools[rw_seed] = pool_from_run(rw_dir)
                    manifest = resample(weights, pools[rw_seed], extra["n"], i, work / "train.jsonl")
                    model_dir = finetune(ft, progress=sys.stderr.isatty())
                    from scalebio.evaluation import load_model

                    model, tok = load_model(str(model_dir), device="cpu")
                    evaluate_model(model, tok, work / "eval.json", runs_root / "eval_tasks", ft.max_length, extra["eval"])
                shutil.rmtree(out, ignore_errors=True)
                copy_retrain_results(work, out, manifest, REPO)
                shutil.copy2(work / "eval_samples.jsonl", out / "eval_samples.jsonl")
                relativize(out, REPO)
                progress.finish(skipped=finished)
    progress("done")
    return results_root


REPORT = "reproduce_report.md"


def claims(folder: Path) -> list[Claim]:
    """The claims of README.md's Table 1 rows, measured on one results/llama3/protocol folder: per task, the paired
    difference learned − uniform with its 95% bootstrap interval (holds when the verdict is "reproduced"); per
    reweighting seed, the control source below 1/k; the seed-to-seed Spearman correlations (measured)."""
    from table1 import collect_protocol

    rows = collect_protocol(folder)
    out = []
    for r in rows["differences"]:
        out.append(Claim(f"learned_vs_uniform/{r['item']}", r["item"],
                         f"learned − uniform ({r['metric']}, {'lower' if r['lower_is_better'] else 'higher'} is better), "
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
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama on a few dozen examples")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to run, in order")
    parser.add_argument("--reweight-seeds", type=int, nargs="+", default=None, help=f"default {REWEIGHT_SEEDS}")
    parser.add_argument("--finetune-seeds", type=int, nargs="+", default=None, help=f"default {FINETUNE_SEEDS}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every stage (default: the presets' 2)")
    parser.add_argument("--runs", default=None, help="working folder (default runs/llama3/protocol)")
    parser.add_argument("--results", default=None, help="results folder (default results/llama3/protocol)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = run(args.smoke, Path(args.runs) if args.runs else None, Path(args.results) if args.results else None,
              tuple(args.stages), args.reweight_seeds, args.finetune_seeds, args.threads)
    if not args.smoke and not args.results:
        subprocess.run([sys.executable, str(HERE / "table1.py")], check=True, cwd=REPO)
        print(reproduce(out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
