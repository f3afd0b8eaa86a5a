"""Run one GPT-2 experiment end to end: build data → reweight (per variant and seed) → retrain on data drawn by
the learned and by uniform weights → evaluate both with lm-eval on the test set
(through the task YAML in ``experiments/gpt2/<task>/lm_eval/``) → copy small results.

    python experiments/gpt2/pipeline.py denoising [--preset cpu] [--smoke]

The experiment is described by ``experiments/gpt2/<task>/pipeline.yaml``; every step is a library call
(scalebio.reweight, scalebio.resample, scalebio.finetune, scalebio.evaluation). Every stage is recomputed and
its small files are written over ``results/gpt2/<task>/`` (files there that this run did not produce are
removed), so ``git diff results/`` shows what changed. The work happens under ``runs/gpt2/<task>/`` (not
committed): a stage this checkout already finished there is not redone, and an interrupted run continues where
it stopped (reweighting resumes from its checkpoint). ``make clean`` removes runs/ to recompute everything.
``--smoke`` works under ``runs/gpt2/<task>/smoke/`` and leaves results/ alone.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from scalebio.config import load_config
from scalebio.evaluation import evaluate, load_task_yaml
from scalebio.finetune import FinetuneConfig, finetune
from scalebio.resample import pool_from_run, resample
from scalebio.results import copy_retrain_results, copy_run_results
from scalebio.reproduce import arm_finished, prune, reweight_finished
from scalebio.reweight import run_reweight
from scalebio.stages import Campaign, Unit

log = logging.getLogger("gpt2.pipeline")

REPO = Path(__file__).resolve().parents[2]


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


def retrain_arm(plan: dict, variant: dict, seed: int, method: str, run_dir: Path, data_dir: Path, work: Path) -> dict:
    """Resample ``plan["retrain"]["n"]`` examples by the run's learned weights (or uniformly), fine-tune a fresh
    model on them, evaluate it on the test set → ``work``/eval.json. Returns the resample manifest."""
    r = plan["retrain"]
    work.mkdir(parents=True, exist_ok=True)
    sample = work / "train.jsonl"
    weights = None if method == "uniform" else run_dir / "weights.json"
    # replace=True: the instruction-following retrain set (4,800) is larger than its pool (3,000), by design.
    manifest = resample(weights, pool_from_run(run_dir), r["n"], seed, sample, replace=True)
    ft = load_config(plan["folder"] / r["config"], [f"seed={seed}", f"output_dir={work / 'finetune'}",
                                                    f"train.path={sample}", f"tokenizer.name_or_path={run_dir / 'tokenizer'}",
                                                    *r.get("overrides", [])], FinetuneConfig)
    model_dir = finetune(ft, progress=sys.stderr.isatty())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    # The task YAML kept in the experiment folder, pointed at this variant's test file; scored within the window
    # the model was trained on.
    task_cfg = load_task_yaml(plan["folder"] / (variant.get("eval_task") or r["eval_task"]), data_dir / "test.jsonl")
    evaluate(str(model_dir), tok, [task_cfg], work / "eval.json", limit=r.get("eval_limit"), max_length=ft.max_length)
    return manifest


def run_task(task: str, preset: str = "cpu", smoke: bool = False, runs_root: Path | None = None,
             results_root: Path | None = None) -> Path:
    """Recompute every stage of one experiment and write its results over ``results_root``.

    The stages are units of one campaign (scalebio.stages): the data of each variant, a reweighting run per variant
    and seed, a retrain arm per variant, seed and method, run in that order. A unit is skipped only when
    ``runs_root`` holds its finished output (this checkout's own work), never because results are committed: in a
    fresh clone every unit runs. Returns ``results_root``.
    """
    plan = load_plan(task, preset, smoke)
    runs_root = runs_root or REPO / "runs" / "gpt2" / task / ("smoke" if smoke else "")
    results_root = results_root or (runs_root / "results" if smoke else REPO / "results" / "gpt2" / task)
    data_root = (runs_root / "data") if smoke else REPO / "data" / "gpt2"
    written: set[Path] = set()
    units: list[Unit] = []

    for variant in plan["variants"]:
        data_dir = data_root / variant.get("data", task)
        if not any(u.name == f"data {data_dir.name}" for u in units):
            units.append(Unit(f"data {data_dir.name}", run=lambda v=variant, d=data_dir: build_data(plan, v, d, smoke),
                              done=(data_dir / "manifest.json").is_file, kind="data"))

    def reweight_unit(variant: dict, seed: int) -> Unit:
        name = variant["name"]
        data_dir = data_root / variant.get("data", task)
        run_dir = runs_root / name / f"reweight_seed{seed}"
        out = results_root / name / f"reweight_seed{seed}"
        cfg = load_config(plan["config"], [f"seed={seed}", f"run_dir={run_dir}", f"data.root={data_dir}",
                                           *variant.get("overrides", []), *plan.get("overrides", [])])

        def publish():
            shutil.rmtree(out, ignore_errors=True)
            copy_run_results(run_dir, out, REPO)
            written.add(out)

        return Unit(f"reweight {name} seed {seed}", run=lambda: run_reweight(cfg, progress=sys.stderr.isatty()),
                    done=lambda: reweight_finished(run_dir, cfg), publish=publish, needs=(f"data {data_dir.name}",),
                    kind="reweight", where=run_dir)

    def retrain_unit(variant: dict, seed: int, method: str) -> Unit:
        name = variant["name"]
        data_dir = data_root / variant.get("data", task)
        rw_seed = plan["seeds"][seed % len(plan["seeds"])]
        run_dir = runs_root / name / f"reweight_seed{rw_seed}"
        out = results_root / name / "retrain" / f"{method}_seed{seed}"
        work = runs_root / name / "retrain" / f"{method}_seed{seed}"
        weights = run_dir / "weights.json"

        def finished():
            return arm_finished(work, None if method == "uniform" else weights, run_weights=weights)

        def publish():
            shutil.rmtree(out, ignore_errors=True)
            copy_retrain_results(work, out, finished(), REPO)
            written.add(out)

        return Unit(f"retrain {name} {method} seed {seed}",
                    run=lambda: retrain_arm(plan, variant, seed, method, run_dir, data_dir, work),
                    done=lambda: finished() is not None, publish=publish,
                    needs=(f"reweight {name} seed {rw_seed}",), kind="retrain", where=work)

    units += [reweight_unit(v, s) for v in plan["variants"] for s in plan["seeds"]]
    units += [retrain_unit(v, s, m) for v in plan["variants"] for s in plan["retrain"]["seeds"]
              for m in ("learned", "uniform")]
    Campaign(task, units).run()
    written.add(results_root / "compare")  # the baselines comparison's results (compare.py), not this pipeline's
    for path in prune(results_root, written):
        log.info("removed %s: not produced by this run", path.relative_to(results_root))
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
    out = run_task(args.task, preset, args.smoke)
    if not args.smoke:
        log.info("wrote %s; committed vs recomputed claims: python experiments/gpt2/report.py --reproduce "
                 "(the last step of make reproduce-gpt2)", out.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
