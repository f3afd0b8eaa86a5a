"""The paper's data-selection comparison on one GPT-2 experiment: uniform, ScaleBiO, RHO-LOSS, LESS and DoReMi, each
retrained on N examples it drew or selected and evaluated on the test set.

    python experiments/gpt2/compare.py denoising [--preset cpu] [--smoke]      # make compare-gpt2: all three

Settings: ``experiments/gpt2/<task>/compare.yaml`` (methods, variants, selection seeds, each baseline's settings);
the retrain side is the pipeline's (``pipeline.yaml`` ``retrain``: N, seeds, finetune config, lm-eval task YAML).

What is the same for every method
---------------------------------
N = ``retrain.n`` examples; a fresh model of the retrain config, the same steps, batch, lr and seeds
(``retrain.seeds``, ≥ 3); the same lm-eval task YAML on the same test file, with per-document values
(``eval_samples.jsonl``) so that each method is compared with uniform by ``scalebio.stats.paired_bootstrap`` (pairs =
retrain seeds, documents resampled jointly). uniform and ScaleBiO *are* the pipeline's retrain arms (the same units,
the same work folders ``runs/gpt2/<task>/<variant>/retrain/{uniform,learned}_seed<s>``: whichever of
``pipeline.py`` and this script runs first trains them, the other finds them done); this script evaluates their
models once more to get the per-document values. ScaleBiO's weights are the pipeline's reweighting runs (retrain
seed s uses reweighting seed ``seeds[s % len(seeds)]``).

How each method becomes N examples (``methods.yaml``)
----------------------------------------------------
* ``arm: NAME``: the pipeline's retrain arm NAME (uniform, learned); its model is evaluated once more.
* ``output: ranking`` (RHO-LOSS, LESS): the selection ranks the pool and keeps the top K = min(N, ⌊``max_fraction`` ·
  |pool|⌋); the training file is those K records repeated in rank order up to N lines
  (``scalebio.baselines.write_selection``). K < N only where N exceeds what a selection can sensibly keep:
  instruction following draws N = 4,800 from a pool of 3,000, so RHO-LOSS / LESS keep the top half (1,500) and see
  each ≈ 3.2 times, as ScaleBiO's draw sees its favoured source's records ≈ 2.5 times.
* ``output: weights`` (DoReMi): the selection learns source weights (ᾱ); they are written as a ``weights.json`` and
  drawn from exactly as ScaleBiO's weights are (``pipeline.draw``: with replacement, retrain seed = draw seed).

One selection per (variant, selection seed); retrain seed s uses selection seed ``selection_seeds[s % len]``. The
default is one selection seed (0) per variant: RHO-LOSS and LESS are deterministic top-K rankings given their
selection models, and the retrain seeds give the replicate spread, as for uniform. Settings: compare.yaml.

What each baseline keeps from its paper and what is scaled down, and how costs are counted (``cost.json`` beside
every selection and every arm): ``experiments/gpt2/selections.py``, where each method's selection function is.

Budget (an ESTIMATE: nothing was run at full size). Per-example costs measured on this 2-core machine (CPU time, one
thread, fp32, the cpu preset's 2-block model, 64 tokens): forward+backward in a batch of 16 ≈ 5.8 ms, forward only
≈ 1.7 ms, one LESS gradient feature (batch-1 backward, Adam direction, projection) ≈ 11 ms; a retrain + lm-eval arm
16–42 s (experiments/gpt2/README.md). Pools ≈ 7,450 (denoising), 12,000 (multilingual, per target), 2,800
(instruction following) examples. With compare.yaml's settings:

    | experiment | RHO-LOSS | DoReMi | LESS | 9 new arms | 6 re-evaluations | total |
    | denoising | 50 s | 30 s | 3.0 min | 4.1 min | 1.0 min | ≈ 9.5 min |
    | multilingual (3 targets) | 3.3 min | 1.6 min | 14 min | 7.2 min | 1.8 min | ≈ 28 min |
    | instruction following | 35 s | 35 s | 1.3 min | 6.3 min | 1.2 min | ≈ 10 min |

``make compare-gpt2`` runs two streams (multilingual | denoising then instruction following): ≈ 28 min after
``make reproduce-gpt2`` has trained the shared units (≈ 18 min), so ≈ 47 min for both, inside the 60-minute budget
on a quiet machine; alone on a fresh clone (it then trains the pipeline's units too) ≈ 36 min. LESS's per-example
gradients over the multilingual pools are half of it: ``less.epochs: 1`` (one checkpoint) saves ≈ 9 min.

Results: ``results/gpt2/<task>/compare/<variant>/<method>_seed<s>/`` (eval.json, eval_samples.jsonl,
resample.json or selection.json, finetune_metrics.jsonl, cost.json) and
``results/gpt2/<task>/compare/<variant>/selection/<method>_seed<k>/`` (manifest or weights.json, cost.json); the
table, summary and figure come from ``experiments/gpt2/compare_report.py`` (``make figures``) from results/ alone.
Work happens under ``runs/gpt2/<task>/`` (a unit finished there is not redone); ``--smoke`` works under
``runs/gpt2/<task>/smoke/`` and leaves results/ alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import yaml

from scalebio.files import write_text
from scalebio.reproduce import prune
from scalebio.results import write_json
from scalebio.stages import Campaign, Unit

if __name__ == "__main__" and not __package__:  # run by its path: run it as the module it is (scalebio.scripts)
    from scalebio.scripts import run_as_module
    run_as_module(__file__)

from experiments.gpt2 import pipeline, selections  # noqa: E402

log = logging.getLogger("gpt2.compare")

REPO = pipeline.REPO
METHODS: dict[str, dict] = pipeline.load_methods()["methods"]
"""Every method this script knows, in table order: methods.yaml's ``methods``."""
PIPELINE_ARM = {method: spec["arm"] for method, spec in METHODS.items() if "arm" in spec}
"""The pipeline's retrain arm each of these methods is."""
SELECTED = tuple(method for method, spec in METHODS.items() if spec.get("output") == "ranking")
"""Methods that rank the pool and keep the top K (the rest draw by source weights)."""


# ------------------------------------------------------------------------------------------------- settings


def load_settings(task: str, preset: str, smoke: bool) -> tuple[dict, dict]:
    """(pipeline plan, compare settings) of one experiment; ``--smoke`` overlays both files' ``smoke`` sections."""
    plan = pipeline.load_plan(task, preset, smoke)
    settings = yaml.safe_load((plan["folder"] / "compare.yaml").read_text())
    if smoke:
        for key, value in settings.get("smoke", {}).items():
            settings[key] = {**settings[key], **value} if isinstance(value, dict) else value
    settings.pop("smoke", None)
    unknown = [m for m in settings["methods"] if m not in METHODS]
    if unknown:
        raise SystemExit(f"{plan['folder'] / 'compare.yaml'}: methods {unknown} are not declared in "
                         f"{pipeline.HERE / 'methods.yaml'} (known: {', '.join(METHODS)})")
    return plan, settings


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ selections


def run_selection(plan: dict, settings: dict, method: str, seed: int, run_dir: Path, data_dir: Path,
                  work: Path) -> None:
    """One baseline's selection (methods.yaml's ``select`` function of selections.py) → ``work``/selection.jsonl
    (+ manifest) or ``work``/weights.json, and cost.json. The output file is written last: it is the unit's
    done-check."""
    from scalebio.baselines import write_selection
    from scalebio.weights import write_weights

    spec, cfg = METHODS[method], settings[method]
    select = getattr(selections, spec["select"])
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    ft = pipeline.retrain_config(plan, 0, run_dir, data_dir / "val.jsonl", run_dir)
    ctx = selections.Context(ft, plan["retrain"]["n"], run_dir, data_dir)
    counter = selections.PassCounter()
    if spec["output"] == "weights":
        record = select(ctx, cfg, seed, counter)
        record["provenance"]["settings_digest"] = digest(cfg)
    else:
        ranked, prov = select(ctx, cfg, seed, counter)
        prov["settings"].update(keep=len(ranked), n=ctx.n, pool=len(ctx.pool.examples))
        prov["settings_digest"] = digest(cfg)
    counter.close()
    totals = counter.totals()
    cost = selections.cost_record(method, time.time() - started, totals["fb"], totals["forward"], ctx.retrain_fb,
                                  counter.parts, "forward pre-hook on every model this selection built (compare.py)")
    write_json(work / "cost.json", cost)
    if spec["output"] == "weights":
        write_weights(work / "weights.json", record)
    else:
        write_selection(work / "selection.jsonl", ctx.sources, selections.repeated_picks(ctx, ranked, ctx.n), prov)


def selection_output(work: Path, method: str) -> Path:
    return work / ("weights.json" if METHODS[method]["output"] == "weights" else "selection.jsonl.manifest.json")


def selection_finished(work: Path, method: str, cfg: dict) -> bool:
    out = selection_output(work, method)
    if not (out.is_file() and (work / "cost.json").is_file()):
        return False
    record = json.loads(out.read_text())
    prov = record["provenance"] if METHODS[method]["output"] == "weights" else record["selection"]
    return prov.get("settings_digest") == digest(cfg)


def scalebio_cost(run_dir: Path, retrain_fb: int) -> dict:
    """The reweighting run as ScaleBiO's selection: steps × (2B + V) forward+backward examples, its wall time."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    meta = json.loads((run_dir / "meta.json").read_text())
    s = cfg["solver"]
    steps = meta.get("steps_total") or s["steps"]
    batch, val = s["global_batch"], s.get("val_batch") or s["global_batch"]
    fb = steps * (2 * batch + val)
    return selections.cost_record("scalebio", meta["wall_time_s"], fb, 0, retrain_fb,
                                  {"reweighting": {"fb": fb, "forward": 0}},
                                  "reweighting run: steps × (u on B + w on B + w on V), method.md §3")


# ------------------------------------------------------------------------------------------------------ arms


def run_arm(plan: dict, variant: dict, seed: int, method: str, run_dir: Path, data_dir: Path, sel_work: Path | None,
            pipeline_work: Path | None, work: Path) -> None:
    """One compare arm in ``work``: a pipeline arm's retrained model is evaluated again (with per-document values); a
    method with ``output: weights`` draws N by its weights (``pipeline.draw``, as the learned arm draws by
    ScaleBiO's), one with ``output: ranking`` takes its selection file; then the pipeline's retraining
    (``pipeline.retrain``: its finetune config and evaluation)."""
    from scalebio.files import file_sha256

    work.mkdir(parents=True, exist_ok=True)
    for name in ("eval.json", "eval_samples.jsonl"):
        (work / name).unlink(missing_ok=True)
    n = plan["retrain"]["n"]
    if method in PIPELINE_ARM:
        manifest = json.loads((pipeline_work / "train.jsonl.manifest.json").read_text())
        source = {"pipeline_arm": str(pipeline_work)}
    elif METHODS[method]["output"] == "weights":
        sample = work / "train.jsonl"
        manifest = pipeline.draw(plan, sel_work / "weights.json", run_dir, seed, sample)
        source = {"selection_sha256": file_sha256(sel_work / "weights.json")}
    else:
        sample = sel_work / "selection.jsonl"
        manifest = json.loads((sel_work / "selection.jsonl.manifest.json").read_text())
        source = {"selection_sha256": manifest["output_sha256"]}
    if sum(manifest["counts"].values()) != n:
        raise RuntimeError(f"{method} seed {seed}: the training file holds {sum(manifest['counts'].values())} "
                           f"examples, not N = {n}")
    write_json(work / "draw.json", {**{k: v for k, v in manifest.items() if k != "weights_file"}, **source})
    if method in PIPELINE_ARM:
        ft = pipeline.retrain_config(plan, seed, pipeline_work, pipeline_work / "train.jsonl", run_dir)
        pipeline.evaluate_arm(plan, variant, pipeline_work / "finetune" / "model", data_dir, work, ft.max_length,
                              samples=True)
    else:
        pipeline.retrain(plan, variant, seed, sample, run_dir, data_dir, work, samples=True)


def arm_cost(method: str, plan: dict, seed: int, run_dir: Path, sel_work: Path | None, train_dir: Path) -> dict:
    """The arm's cost.json: its selection's cost (a uniform draw: none; a learned-weights draw: the reweighting
    run; a baseline: its selection's cost.json) and the retraining run's."""
    ft = pipeline.retrain_config(plan, seed, train_dir, train_dir / "train.jsonl", run_dir)
    retrain_fb = selections.retrain_passes(ft, plan["retrain"]["n"])
    arm = PIPELINE_ARM.get(method)
    if arm is not None and plan["arms"][arm]["weights"] == "uniform":
        selection = selections.cost_record(method, 0.0, 0, 0, retrain_fb, {}, "no selection")
    elif arm is not None:
        selection = scalebio_cost(run_dir, retrain_fb)
    else:
        selection = json.loads((sel_work / "cost.json").read_text())
    meta = json.loads((train_dir / "finetune" / "meta.json").read_text())
    return {"method": method, "selection": selection,
            "retrain": {"forward_backward_examples": retrain_fb, "wall_time_s": round(meta["wall_time_s"], 2)},
            "total_retrain_multiple": 1 + (selection["retrain_multiple"] or 0.0)}


# ------------------------------------------------------------------------------------------------ campaign


def build_units(task: str, plan: dict, settings: dict, smoke: bool, runs_root: Path, compare_root: Path,
                written: set[Path]) -> list[Unit]:
    """The pipeline's units this comparison needs (pipeline.data_units, reweight_unit, retrain_unit without
    publishing: results/gpt2/<task>/<variant>/retrain is the pipeline's to write), then a selection unit per
    baseline, variant and selection seed, then an arm per method, variant and retrain seed."""
    data_root = pipeline.data_root(runs_root, smoke)
    variants = [v for v in plan["variants"] if v["name"] in settings["variants"]]
    methods = settings["methods"]
    sel_seeds = settings["selection_seeds"]

    def data_dir_of(v):
        return data_root / v.get("data", task)

    units = pipeline.data_units(plan, variants, data_root, smoke, task)
    rw_seeds = sorted({pipeline.reweight_seed(plan, s) for s in plan["retrain"]["seeds"]})
    units += [pipeline.reweight_unit(plan, v, s, runs_root, data_dir_of(v)) for v in variants for s in rw_seeds]
    arms = sorted({PIPELINE_ARM[m] for m in methods if m in PIPELINE_ARM})
    units += [pipeline.retrain_unit(plan, v, s, arm, runs_root, data_dir_of(v))
              for v in variants for s in plan["retrain"]["seeds"] for arm in arms]

    def sel_dir(v, method, k):
        return runs_root / v["name"] / "compare" / "selection" / f"{method}_seed{k}"

    # The pool and tokenizer of every selection are the reweighting run's (its decontaminated sources), seed 0's.
    sel_rw = pipeline.reweight_seed(plan, 0)
    for v in variants:
        for method in [m for m in methods if m not in PIPELINE_ARM]:
            for k in sel_seeds:
                run_dir = runs_root / v["name"] / f"reweight_seed{sel_rw}"
                work = sel_dir(v, method, k)
                out = compare_root / v["name"] / "selection" / f"{method}_seed{k}"

                def publish(work=work, out=out, method=method):
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir(parents=True)
                    shutil.copy2(work / "cost.json", out / "cost.json")
                    shutil.copy2(selection_output(work, method), out / selection_output(work, method).name)
                    pipeline_relativize(out)
                    written.add(out)

                units.append(Unit(
                    f"select {v['name']} {method} seed {k}",
                    run=lambda v=v, method=method, k=k, run_dir=run_dir, work=work: run_selection(
                        plan, settings, method, k, run_dir, data_dir_of(v), work),
                    done=lambda work=work, method=method: selection_finished(work, method, settings[method]),
                    publish=publish, needs=(f"reweight {v['name']} seed {sel_rw}",), kind="select", where=work))

    for v in variants:
        for s in plan["retrain"]["seeds"]:
            for method in methods:
                run_dir = runs_root / v["name"] / f"reweight_seed{pipeline.reweight_seed(plan, s)}"
                work = runs_root / v["name"] / "compare" / f"{method}_seed{s}"
                out = compare_root / v["name"] / f"{method}_seed{s}"
                if method in PIPELINE_ARM:
                    pipe = runs_root / v["name"] / "retrain" / f"{PIPELINE_ARM[method]}_seed{s}"
                    sel, needs = None, (f"retrain {v['name']} {PIPELINE_ARM[method]} seed {s}",)
                    upstream = pipe / "eval.json"
                else:
                    k = sel_seeds[s % len(sel_seeds)]
                    pipe, sel = None, sel_dir(v, method, k)
                    needs = (f"select {v['name']} {method} seed {k}",)
                    upstream = selection_output(sel, method)
                train_dir = pipe or work

                def finished(work=work, upstream=upstream):
                    done = all((work / f).is_file() for f in ("eval.json", "eval_samples.jsonl", "draw.json"))
                    # Redone upstream (a new selection, a retrained pipeline arm) → this arm is stale.
                    return done and upstream.is_file() and upstream.stat().st_mtime <= (work / "eval.json").stat().st_mtime

                def publish(work=work, out=out, method=method, s=s, run_dir=run_dir, sel=sel, train_dir=train_dir):
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir(parents=True)
                    for name in ("eval.json", "eval_samples.jsonl"):
                        shutil.copy2(work / name, out / name)
                    draw = json.loads((work / "draw.json").read_text())
                    name = "selection.json" if method in SELECTED else "resample.json"
                    write_text(out / name, json.dumps(draw, indent=2) + "\n")
                    shutil.copy2(train_dir / "finetune" / "metrics.jsonl", out / "finetune_metrics.jsonl")
                    write_json(out / "cost.json", arm_cost(method, plan, s, run_dir, sel, train_dir))
                    pipeline_relativize(out)
                    written.add(out)

                units.append(Unit(
                    f"compare {v['name']} {method} seed {s}",
                    run=lambda v=v, s=s, method=method, run_dir=run_dir, sel=sel, pipe=pipe, work=work: run_arm(
                        plan, v, s, method, run_dir, data_dir_of(v), sel, pipe, work),
                    done=finished, publish=publish, needs=needs, kind="arm", where=work))
    return units


def pipeline_relativize(folder: Path) -> None:
    from scalebio.results import relativize

    relativize(folder, REPO)


def run_compare(task: str, preset: str = "cpu", smoke: bool = False, runs_root: Path | None = None,
                results_root: Path | None = None) -> Path:
    """Run (or continue) the comparison of one experiment; results under ``results_root``/compare (files there that
    this run did not produce are removed). Returns that folder."""
    plan, settings = load_settings(task, preset, smoke)
    runs_root = runs_root or REPO / "runs" / "gpt2" / task / ("smoke" if smoke else "")
    results_root = results_root or (runs_root / "results" if smoke else REPO / "results" / "gpt2" / task)
    compare_root = results_root / "compare"
    written: set[Path] = set()
    units = build_units(task, plan, settings, smoke, runs_root, compare_root, written)
    Campaign(f"compare {task}", units).run()
    # The methods' labels go beside the settings, so that compare_report.py reads everything from results/.
    write_json(compare_root / "settings.json", {"task": task, "preset": preset, "n": plan["retrain"]["n"],
                                                "retrain_seeds": plan["retrain"]["seeds"], **settings,
                                                "labels": {m: METHODS[m]["label"] for m in settings["methods"]}})
    # settings.json, and the report's summary.json and table.md (compare_report.py rebuilds them from results/).
    written.update(compare_root / name for name in ("settings.json", "summary.json", "table.md"))
    for path in prune(compare_root, written):
        log.info("removed %s: not produced by this run", path.relative_to(compare_root))
    return compare_root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["denoising", "multilingual", "instruction_following"])
    parser.add_argument("--preset", default=None, help="cpu (default without CUDA) or paper (GPU, hub)")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few dozen examples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch

    preset = args.preset or ("paper" if torch.cuda.is_available() else "cpu")
    out = run_compare(args.task, preset, args.smoke)
    log.info("wrote %s; table and figure: python experiments/gpt2/compare_report.py", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
