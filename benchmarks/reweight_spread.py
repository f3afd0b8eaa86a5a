"""How far apart two reweighting runs end, and why: the context that ``weights_l1_bf16_vs_fp32`` (precision.py, one
pair of runs) needs before its value can be read.

ScaleBiO samples each step's training batch from the current weights p (``solver.conventions: scalebio``), so two
runs whose p differ in the 7th digit can draw a different source at some step and from then on follow different
batches. The L1 between two runs' final weights then mixes the precision's own error with that divergence. This
benchmark runs, per seed, the same ``steps``-step reweighting run in several modes on the same device:

  fp32          exact fp32 (no TF32)
  fp32_repeat   the same run again: the device's own nondeterminism (on a GPU, atomics in some backward
                kernels; on a CPU, none: the two runs must end bit-identical)
  bf16          bf16 autocast for every gradient pass, λ's losses from fp32 forwards (``gap_precision: fp32``,
                what ``auto`` runs on a bf16 device)
  bf16_gap_compute  bf16 with λ's losses taken from the bf16 passes (the behaviour before issue 18)

and reports, per seed and mode, the L1 between its final weights and the fp32 run's, the first step whose drawn
source counts differ from the fp32 run's (None: the same draws at every step), the L1 at every step, and the L1
between the fp32 runs of different seeds: the spread that a change of seed alone gives, against which a precision's
L1 is small or not. Each run goes through ``scalebio.reweight.run_reweight`` (the device it picks: CUDA when
present) with ``solver.steps``, ``precision``, ``seed`` and a temporary ``run_dir`` overridden; the per-step
weights and counts are read back from its ``weights.jsonl`` and ``metrics.jsonl``. The JSON is rewritten after
every run, so a run cut short by a time limit keeps what finished.

    python -m benchmarks.reweight_spread --out results/bench/gpu_reweight_spread.json          # ~5 min on an H200
    python -m benchmarks.reweight_spread --modes fp32 --label "..." --out ...                  # one mode, labelled

``table_lines`` renders every ``results/bench/*reweight_spread*.json`` (README.md and benchmarks/README.md,
block ``bench-spread``): per file, each mode against that seed's fp32 run; then the fp32 runs of each later file
against every mode of the first (same seed), which is how a code change is compared with the runs before it.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from scalebio.config import load_config
from scalebio.results import read_jsonl, write_json

from .common import machine_info

log = logging.getLogger("benchmarks")
REPO = Path(__file__).resolve().parents[1]
MODES = {
    "fp32": ["precision=fp32"],
    "fp32_repeat": ["precision=fp32"],
    "bf16": ["precision=bf16", "solver.gap_precision=fp32"],
    "bf16_gap_compute": ["precision=bf16", "solver.gap_precision=compute"],
}


def one_run(config: Path, overrides: list[str], seed: int, steps: int, mode: str, tmp: Path) -> dict:
    """One reweighting run; its weights and source counts at every step."""
    from scalebio.reweight import run_reweight

    run_dir = tmp / f"seed{seed}_{mode}"
    cfg = load_config(config, [*overrides, *MODES[mode], f"seed={seed}", f"solver.steps={steps}",
                               f"run_dir={run_dir}", "resume=false", f"checkpoint_every={steps}"])
    start = time.perf_counter()
    record = run_reweight(cfg, progress=False)
    seconds = time.perf_counter() - start
    sources = record["sources"]
    weights = {r["step"]: [r["weights"][s] for s in sources] for r in read_jsonl(run_dir / "weights.jsonl")}
    counts = {r["step"]: [r["source_counts"].get(s, 0) for s in sources] for r in read_jsonl(run_dir / "metrics.jsonl")}
    return {"sources": sources, "final": record["probabilities"], "seconds": seconds,
            "weights": [weights[s] for s in sorted(weights)], "counts": [counts[s] for s in sorted(counts)]}


def l1(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b))


def compare(run: dict, ref: dict) -> dict:
    """``run`` against ``ref`` (same seed): final L1, L1 per step, the first step whose draws differ."""
    first = next((i for i, (a, b) in enumerate(zip(run["counts"], ref["counts"])) if a != b), None)
    return {"final_l1": l1(run["final"], ref["final"]),
            "l1_per_step": [l1(a, b) for a, b in zip(run["weights"], ref["weights"])],
            "first_step_with_other_draws": first}


def summarize(runs: dict[int, dict[str, dict]]) -> dict:
    """Per seed, every mode against that seed's fp32 run; and the fp32 runs of each pair of seeds."""
    out = {"per_seed": {}, "between_seeds_fp32_l1": {}}
    for seed, modes in runs.items():
        if "fp32" in modes:
            out["per_seed"][str(seed)] = {mode: compare(r, modes["fp32"]) for mode, r in modes.items() if mode != "fp32"}
    seeds = [s for s in runs if "fp32" in runs[s]]
    for i, a in enumerate(seeds):
        for b in seeds[i + 1:]:
            out["between_seeds_fp32_l1"][f"{a}-{b}"] = l1(runs[a]["fp32"]["final"], runs[b]["fp32"]["final"])
    return out


def run(config: str, seeds: list[int], steps: int, modes: list[str], out: Path, overrides: list[str] | None = None,
        label: str | None = None) -> dict:
    path = Path(config) if Path(config).is_absolute() else REPO / config
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}: expected some of {', '.join(MODES)}")
    runs: dict[int, dict[str, dict]] = {}
    machine = machine_info()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scalebio-spread-") as tmp:
        for seed in seeds:
            for mode in modes:
                runs.setdefault(seed, {})[mode] = one_run(path, overrides or [], seed, steps, mode, Path(tmp))
                log.info("spread: seed %d %s done in %.0f s", seed, mode, runs[seed][mode]["seconds"])
                record = {
                    "schema": "scalebio.bench/1", "experiment": "reweight_spread", "machine": machine,
                    "torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
                    "settings": {"config": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
                                 "overrides": overrides or [], "seeds": seeds, "steps": steps, "modes": modes,
                                 "mode_overrides": {m: MODES[m] for m in modes}, "label": label},
                    "complete": seed == seeds[-1] and mode == modes[-1],
                    "results": {"summary": summarize(runs),
                                "runs": {str(s): rs for s, rs in runs.items()}},
                    "wall_seconds": time.perf_counter() - start,
                }
                write_json(out, record)
    return record


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="experiments/llama3/offline_smollm2.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--set", dest="overrides", action="append", default=[], help="a config override (repeatable)")
    p.add_argument("--label", default=None, help="what this run is, for the table (e.g. the code it ran)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run(args.config, args.seeds, args.steps, args.modes, args.out, args.overrides, args.label)


# The committed files that predate --label: what each ran.
LABELS = {
    "gpu_reweight_spread": "H200, before the step-0 rule (code of 947548e)",
    "gpu_reweight_spread_fixed": "H200, with the step-0 rule (solver.py's exact_first_gap)",
}
MODE_LABELS = {
    "fp32_repeat": "fp32 run again (the device's nondeterminism)",
    "bf16": "bf16, λ's losses from fp32 forwards (`auto` on a bf16 device)",
    "bf16_gap_compute": "bf16, λ's losses from the bf16 passes (before issue 18)",
}


def _cell(values: list) -> str:
    return " | ".join("–" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)) for v in values)


def table_lines(folder: Path) -> list[str]:
    """The spread table from every ``*reweight_spread*.json`` in ``folder`` (empty when there is none)."""
    files = sorted(folder.glob("*reweight_spread*.json"), key=lambda f: (len(f.stem), f.stem))
    if not files:
        return []
    records = [(f.stem, json.loads(f.read_text())) for f in files]
    seeds = sorted({s for _, r in records for s in r["results"]["runs"]}, key=int)
    first = records[0][1]["settings"]
    out = [f"| L1 between final weights after {first['steps']} reweighting steps (`{first['config']}`) | "
           + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]

    def label(stem: str, record: dict) -> str:
        return record["settings"].get("label") or LABELS.get(stem, stem)

    for stem, record in records:
        summary = record["results"]["summary"]
        for mode in [m for m in record["settings"]["modes"] if m != "fp32"]:
            cmp = [summary["per_seed"].get(s, {}).get(mode) for s in seeds]
            out.append(f"| {label(stem, record)}: {MODE_LABELS[mode]} vs fp32 | "
                       + _cell([c and c["final_l1"] for c in cmp]) + " |")
            out.append(f"| … the L1 already after step 0 | " + _cell([c and c["l1_per_step"][0] for c in cmp]) + " |")
        for pair, value in summary["between_seeds_fp32_l1"].items():
            a, b = pair.split("-")
            out.append(f"| {label(stem, record)}: fp32, seed {a} vs seed {b} | "
                       + _cell([value if s == seeds[0] else None for s in seeds]) + " |")
    base_stem, base = records[0]
    for stem, record in records[1:]:
        for mode in base["settings"]["modes"]:
            values = []
            for s in seeds:
                new, old = record["results"]["runs"].get(s, {}).get("fp32"), base["results"]["runs"].get(s, {}).get(mode)
                values.append(l1(new["final"], old["final"]) if new and old else None)
            out.append(f"| fp32, {label(stem, record)} vs {mode}, {label(base_stem, base)} | {_cell(values)} |")
    return out


if __name__ == "__main__":
    main()
