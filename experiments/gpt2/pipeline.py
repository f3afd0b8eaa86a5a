"""Run one GPT-2 experiment end to end: build data → reweight (per variant and seed) → retrain on data drawn by
the learned and by uniform weights → evaluate both with lm-eval on the test set
(through the task YAML in ``experiments/gpt2/<task>/lm_eval/``) → copy small results.

    python experiments/gpt2/pipeline.py denoising [--preset cpu] [--smoke]

The experiment is described by ``experiments/gpt2/<task>/pipeline.yaml``; every step is a library call
(scalebio.reweight, scalebio.resample, scalebio.finetune, scalebio.evaluation). A step whose output already
exists is skipped, so an interrupted run continues where it stopped (reweighting resumes from its checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from scalebio.config import load_config  # noqa: E402
from scalebio.evaluation import evaluate, load_task_yaml  # noqa: E402
from scalebio.finetune import FinetuneConfig, finetune  # noqa: E402
from scalebio.resample import pool_from_run, resample  # noqa: E402
from scalebio.results import copy_retrain_results, copy_run_results  # noqa: E402
from scalebio.reweight import run_reweight  # noqa: E402

log = logging.getLogger("gpt2.pipeline")


def load_plan(task: str, preset: str, smoke: bool) -> dict:
    folder = REPO / "experiments" / "gpt2" / task
    plan = yaml.safe_load((folder / "pipeline.yaml").read_text())
    plan["folder"] = folder
    plan["config"] = folder / f"{preset}.yaml"
    if smoke:  # seconds, not minutes: for tests
        plan.update(plan.get("smoke", {}))
    return plan


def build_data(plan: dict, variant: dict, data_dir: Path, smoke: bool) -> None:
    if (data_dir / "manifest.json").is_file():
        return
    args = [sys.executable, str(plan["folder"] / "build_data.py"), "--out", str(data_dir),
            *map(str, variant.get("build_args", [])), *map(str, plan.get("build_args", []))]
    subprocess.run(args, check=True, cwd=REPO)


def run_task(task: str, preset: str = "cpu", smoke: bool = False, runs_root: Path | None = None,
             results_root: Path | None = None) -> Path:
    plan = load_plan(task, preset, smoke)
    runs_root = runs_root or REPO / "runs" / "gpt2" / task
    results_root = results_root or REPO / "results" / "gpt2" / task
    data_root = (runs_root / "data") if smoke else REPO / "data" / "gpt2"
    stages = [(v, s) for v in plan["variants"] for s in plan["seeds"]]
    retrains = [(v, s, m) for v in plan["variants"] for s in plan["retrain"]["seeds"] for m in ("learned", "uniform")]
    t_start, done, total = time.time(), 0, len(stages) + len(retrains)

    def progress(what: str) -> None:
        elapsed = time.time() - t_start
        eta = elapsed / done * (total - done) if done else float("nan")
        log.info("[%s %d/%d] %s (elapsed %.0f s, about %.0f s left)", task, done, total, what, elapsed, eta)

    for variant, seed in stages:
        name = variant["name"]
        data_dir = data_root / variant.get("data", task)
        build_data(plan, variant, data_dir, smoke)
        run_dir = runs_root / name / f"reweight_seed{seed}"
        out = results_root / name / f"reweight_seed{seed}"
        progress(f"reweight {name} seed {seed}")
        if not (out / "weights.json").is_file():
            overrides = [f"seed={seed}", f"run_dir={run_dir}", f"data.root={data_dir}",
                         *variant.get("overrides", []), *plan.get("overrides", [])]
            cfg = load_config(plan["config"], overrides)
            run_reweight(cfg, progress=sys.stderr.isatty())
            copy_run_results(run_dir, out, REPO)
        done += 1

    r = plan["retrain"]
    for variant, seed, method in retrains:
        name = variant["name"]
        data_dir = data_root / variant.get("data", task)
        weights_seed = seed % len(plan["seeds"])
        run_dir = runs_root / name / f"reweight_seed{plan['seeds'][weights_seed]}"
        out = results_root / name / "retrain" / f"{method}_seed{seed}"
        progress(f"retrain {name} {method} seed {seed}")
        if not (out / "eval.json").is_file():
            work = runs_root / name / "retrain" / f"{method}_seed{seed}"
            work.mkdir(parents=True, exist_ok=True)
            sample = work / "train.jsonl"
            weights = None if method == "uniform" else run_dir / "weights.json"
            manifest = resample(weights, pool_from_run(run_dir), r["n"], seed, sample)
            ft = load_config(plan["folder"] / r["config"], [f"seed={seed}", f"output_dir={work / 'finetune'}",
                                                            f"train.path={sample}", f"tokenizer.name_or_path={run_dir / 'tokenizer'}",
                                                            *r.get("overrides", [])], FinetuneConfig)
            model_dir = finetune(ft, progress=sys.stderr.isatty())
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model_dir))
            # The task YAML kept in the experiment folder, pointed at this variant's test file; scored within
            # the window the model was trained on.
            task_cfg = load_task_yaml(plan["folder"] / (variant.get("eval_task") or r["eval_task"]), data_dir / "test.jsonl")
            evaluate(str(model_dir), tok, [task_cfg], work / "eval.json", limit=r.get("eval_limit"),
                     max_length=ft.max_length)
            copy_retrain_results(work, out, manifest, REPO)
        done += 1
    progress("done")
    return results_root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["denoising", "multilingual", "instruction_following"])
    parser.add_argument("--preset", default=None, help="cpu (default without CUDA) or paper (GPU, hub)")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few dozen examples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch

    preset = args.preset or ("paper" if torch.cuda.is_available() else "cpu")
    run_task(args.task, preset, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
