"""Run one GPT-2 experiment end to end: build data → reweight (per variant and seed) → retrain each arm of
``methods.yaml`` (on data drawn by the learned and by uniform weights) → evaluate each with lm-eval on the test set
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
HERE = Path(__file__).resolve().parent


def load_methods() -> dict:
    """experiments/gpt2/methods.yaml: ``arms`` (this pipeline's retrain arms) and ``methods`` (compare.py's)."""
    return yaml.safe_load((HERE / "methods.yaml").read_text())


def load_plan(task: str, preset: str, smoke: bool) -> dict:
    """The experiment's pipeline.yaml (its ``smoke`` section overlaid for ``smoke``), the preset's config path and
    the retrain arms of methods.yaml."""
    folder = HERE / task
    plan = yaml.safe_load((folder / "pipeline.yaml").read_text())
    plan["folder"] = folder
    plan["config"] = folder / f"{preset}.yaml"
    plan["arms"] = load_methods()["arms"]
    if smoke:  # seconds, not minutes: for tests
        plan.update(plan.get("smoke", {}))
    return plan


def reweight_seed(plan: dict, retrain_seed: int) -> int:
    """The reweighting run whose weights retrain seed s draws by: seeds[s % len(seeds)]."""
    return plan["seeds"][retrain_seed % len(plan["seeds"])]


def arm_weights(plan: dict, arm: str, run_dir: Path) -> Path | None:
    """The weights file an arm draws its examples by: the run's learned weights, or None (uniform)."""
    return run_dir / "weights.json" if plan["arms"][arm]["weights"] == "learned" else None


def build_data(plan: dict, variant: dict, data_dir: Path, smoke: bool) -> None:
    if (data_dir / "manifest.json").is_file():
        return
    args = [sys.executable, str(plan["folder"] / "build_data.py"), "--out", str(data_dir),
            *map(str, variant.get("build_args", [])), *map(str, plan.get("build_args", []))]
    subprocess.run(args, check=True, cwd=REPO)


def retrain_config(plan: dict, seed: int, work: Path, sample: Path, run_dir: Path) -> FinetuneConfig:
    """The retrain config every arm and method is fine-tuned with: ``plan``'s finetune config on ``sample`` with the
    reweighting run's tokenizer, output under ``work``."""
    r = plan["retrain"]
    return load_config(plan["folder"] / r["config"], [f"seed={seed}", f"output_dir={work / 'finetune'}",
                                                      f"train.path={sample}",
                                                      f"tokenizer.name_or_path={run_dir / 'tokenizer'}",
                                                      *r.get("overrides", [])], FinetuneConfig)


def evaluate_arm(plan: dict, variant: dict, model_dir: Path, data_dir: Path, work: Path, max_length: int,
                 samples: bool = False) -> None:
    """``work``/eval.json of a retrained model: the task YAML kept in the experiment folder, pointed at this
    variant's test file, scored within the window the model was trained on. ``samples``: also the per-document
    values ``eval_samples.jsonl`` (for paired bootstrap intervals)."""
    from transformers import AutoTokenizer

    r = plan["retrain"]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    task_cfg = load_task_yaml(plan["folder"] / (variant.get("eval_task") or r["eval_task"]), data_dir / "test.jsonl")
    evaluate(str(model_dir), tok, [task_cfg], work / "eval.json", limit=r.get("eval_limit"), max_length=max_length,
             samples_out=work / "eval_samples.jsonl" if samples else None)


def draw(plan: dict, weights: Path | None, run_dir: Path, seed: int, sample: Path) -> dict:
    """``plan["retrain"]["n"]`` examples of the run's pool drawn by ``weights`` (None: uniformly) with this seed →
    ``sample``; returns the resample manifest."""
    # replace=True: the instruction-following retrain set (4,800) is larger than its pool (3,000), by design.
    return resample(weights, pool_from_run(run_dir), plan["retrain"]["n"], seed, sample, replace=True)


def retrain(plan: dict, variant: dict, seed: int, sample: Path, run_dir: Path, data_dir: Path, work: Path,
            samples: bool = False) -> None:
    """Fine-tune a fresh model of the retrain config on ``sample`` and evaluate it on the test set → ``work``/eval.json
    (and eval_samples.jsonl with ``samples``)."""
    ft = retrain_config(plan, seed, work, sample, run_dir)
    model_dir = finetune(ft, progress=sys.stderr.isatty())
    evaluate_arm(plan, variant, model_dir, data_dir, work, ft.max_length, samples)


def retrain_arm(plan: dict, variant: dict, seed: int, arm: str, run_dir: Path, data_dir: Path, work: Path) -> dict:
    """One retrain arm: N examples drawn as ``arm`` draws them (by the run's learned weights, or uniformly), a fresh
    model fine-tuned on them and evaluated on the test set → ``work``/eval.json. Returns the resample manifest."""
    work.mkdir(parents=True, exist_ok=True)
    sample = work / "train.jsonl"
    manifest = draw(plan, arm_weights(plan, arm, run_dir), run_dir, seed, sample)
    retrain(plan, variant, seed, sample, run_dir, data_dir, work)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Units (scalebio.stages). compare.py builds the same data, reweighting and retrain units (same names, folders and
# done-checks) without ``out``: whichever script runs first trains them, the other finds them done; only this
# pipeline publishes them into results/.


def data_root(runs_root: Path, smoke: bool) -> Path:
    return (runs_root / "data") if smoke else REPO / "data" / "gpt2"


def data_unit(plan: dict, variant: dict, data_dir: Path, smoke: bool) -> Unit:
    return Unit(f"data {data_dir.name}", run=lambda: build_data(plan, variant, data_dir, smoke),
                done=(data_dir / "manifest.json").is_file, kind="data")


def data_units(plan: dict, variants: list[dict], root: Path, smoke: bool, task: str) -> list[Unit]:
    """One unit per data folder under ``root`` (variants may share one)."""
    units: list[Unit] = []
    for variant in variants:
        data_dir = root / variant.get("data", task)
        if not any(u.name == f"data {data_dir.name}" for u in units):
            units.append(data_unit(plan, variant, data_dir, smoke))
    return units


def reweight_unit(plan: dict, variant: dict, seed: int, runs_root: Path, data_dir: Path, out: Path | None = None,
                  written: set[Path] | None = None) -> Unit:
    """One reweighting run; with ``out``, published there (and recorded in ``written``) once finished."""
    name = variant["name"]
    run_dir = runs_root / name / f"reweight_seed{seed}"
    cfg = load_config(plan["config"], [f"seed={seed}", f"run_dir={run_dir}", f"data.root={data_dir}",
                                       *variant.get("overrides", []), *plan.get("overrides", [])])

    def publish():
        shutil.rmtree(out, ignore_errors=True)
        copy_run_results(run_dir, out, REPO)
        written.add(out)

    return Unit(f"reweight {name} seed {seed}", run=lambda: run_reweight(cfg, progress=sys.stderr.isatty()),
                done=lambda: reweight_finished(run_dir, cfg), publish=publish if out else None,
                needs=(f"data {data_dir.name}",), kind="reweight", where=run_dir)


def retrain_unit(plan: dict, variant: dict, seed: int, arm: str, runs_root: Path, data_dir: Path,
                 out: Path | None = None, written: set[Path] | None = None) -> Unit:
    """One retrain arm (``retrain_arm``) of one retrain seed; with ``out``, published there once finished."""
    name = variant["name"]
    rw_seed = reweight_seed(plan, seed)
    run_dir = runs_root / name / f"reweight_seed{rw_seed}"
    work = runs_root / name / "retrain" / f"{arm}_seed{seed}"
    weights = run_dir / "weights.json"

    def finished():
        return arm_finished(work, arm_weights(plan, arm, run_dir), run_weights=weights)

    def publish():
        shutil.rmtree(out, ignore_errors=True)
        copy_retrain_results(work, out, finished(), REPO)
        written.add(out)

    return Unit(f"retrain {name} {arm} seed {seed}",
                run=lambda: retrain_arm(plan, variant, seed, arm, run_dir, data_dir, work),
                done=lambda: finished() is not None, publish=publish if out else None,
                needs=(f"reweight {name} seed {rw_seed}",), kind="retrain", where=work)


def run_task(task: str, preset: str = "cpu", smoke: bool = False, runs_root: Path | None = None,
             results_root: Path | None = None) -> Path:
    """Recompute every stage of one experiment and write its results over ``results_root``.

    The stages are units of one campaign (scalebio.stages): the data of each variant, a reweighting run per variant
    and seed, a retrain arm per variant, seed and arm (methods.yaml), run in that order. A unit is skipped only when
    ``runs_root`` holds its finished output (this checkout's own work), never because results are committed: in a
    fresh clone every unit runs. Returns ``results_root``.
    """
    plan = load_plan(task, preset, smoke)
    runs_root = runs_root or REPO / "runs" / "gpt2" / task / ("smoke" if smoke else "")
    results_root = results_root or (runs_root / "results" if smoke else REPO / "results" / "gpt2" / task)
    data = data_root(runs_root, smoke)
    written: set[Path] = set()
    units = data_units(plan, plan["variants"], data, smoke, task)
    units += [reweight_unit(plan, v, s, runs_root, data / v.get("data", task), results_root / v["name"] /
                            f"reweight_seed{s}", written) for v in plan["variants"] for s in plan["seeds"]]
    units += [retrain_unit(plan, v, s, arm, runs_root, data / v.get("data", task), results_root / v["name"] /
                           "retrain" / f"{arm}_seed{s}", written)
              for v in plan["variants"] for s in plan["retrain"]["seeds"] for arm in plan["arms"]]
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
