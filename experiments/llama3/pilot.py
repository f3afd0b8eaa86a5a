"""The pilot of Table 1's protocol: the first steps of two reweighting seeds of protocol_smollm2.yaml, summarised.

    python experiments/llama3/pilot.py run [--steps 30] [--seeds 0 1] [--tag T --set key=value ...]
    python experiments/llama3/pilot.py summarise [--steps 30] [--seeds 0 1] [--tag T]

``--tag T --set key=value ...`` runs a variant of the preset (e.g. ``--tag shared --set lisa.shared=true``) in
runs/llama3/protocol_pilot/T/ and summarises it into results/llama3/protocol/pilot_T/; without a tag, the preset as
it is, in runs/llama3/protocol_pilot/ and results/llama3/protocol/pilot/ (the first pilot).

``run`` runs one unit per seed (scalebio.stages), all at once, each in its own one-thread process (on 2 shared cores
two one-thread streams beat one two-thread stream), in runs/llama3/protocol_pilot/seed<s>: the first steps of the
protocol preset's runs, on the preset's learning-rate schedule. ``summarise`` writes
results/llama3/protocol/pilot/: each seed's trajectory and metrics up to ``--steps``, and summary.json with the
Spearman correlation of the two seeds' weights at every checkpointed step, the control source's weight against
1/k, and the measured seconds per step. What the pilot decided is in experiments/llama3/README.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

from scalebio.files import write_text

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

log = logging.getLogger("llama3.pilot")

RUNS = REPO / "runs" / "llama3" / "protocol_pilot"
OUT = REPO / "results" / "llama3" / "protocol" / "pilot"
CONTROL = "control-dot-responses"


def paths(tag: str | None) -> tuple[Path, Path]:
    """The runs folder and the results folder of the pilot named ``tag`` (None: the first pilot)."""
    return (RUNS / tag, OUT.with_name(f"pilot_{tag}")) if tag else (RUNS, OUT)


def campaign(seeds: list[int], steps: int, overrides: list[str] = (), runs: Path = RUNS, tag: str | None = None):
    """One unit per seed: the first ``steps`` of ``protocol_smollm2.yaml`` with ``seed=<s> threads=1`` in
    ``runs``/seed<s> (resumable from its checkpoints), run as one process per seed."""
    from scalebio.config import load_config
    from scalebio.reweight import run_reweight
    from scalebio.stages import Campaign, Unit

    def unit(seed: int) -> Unit:
        run_dir = runs / f"seed{seed}"
        cfg = load_config(HERE / "protocol_smollm2.yaml", [f"seed={seed}", f"run_dir={run_dir}",
                                                           f"data.root={REPO / 'data' / 'llama3' / 'protocol_pool'}",
                                                           "threads=1", *overrides])

        def logged() -> int:
            f = run_dir / "metrics.jsonl"
            return sum(1 for line in f.open() if line.strip()) if f.is_file() else 0

        return Unit(f"seed{seed}", run=lambda: run_reweight(cfg, stop_after=steps, progress=False),
                    done=lambda: logged() >= steps, kind="reweight", progress=lambda: (logged(), steps),
                    where=run_dir / "checkpoints")

    command = [sys.executable, str(Path(__file__).resolve()), "run", "--steps", str(steps), "--seeds",
               *map(str, seeds), *(["--tag", tag] if tag else []), *(["--set", *overrides] if overrides else [])]
    return Campaign("pilot", [unit(s) for s in seeds], command=command, logs=runs)


def run(seeds: list[int], steps: int, overrides: list[str] = (), runs: Path = RUNS, tag: str | None = None,
        only: list[str] | None = None) -> None:
    """All seeds at once, one thread each (on 2 shared cores two one-thread streams beat one two-thread stream);
    ``only``: just these units, in this process."""
    runs.mkdir(parents=True, exist_ok=True)
    pilot = campaign(seeds, steps, overrides, runs, tag)
    pilot.run(jobs=1 if only else len(seeds), only=only)


def summarise(seeds: list[int], steps: int, runs: Path = RUNS, out: Path = OUT, overrides: list[str] = ()) -> dict:
    from scipy.stats import spearmanr

    from scalebio.results import read_jsonl

    trajectories, per_seed = {}, {}
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        run_dir = runs / f"seed{seed}"
        traj = [r for r in read_jsonl(run_dir / "weights.jsonl") if r["step"] <= steps]
        metrics = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] < steps]
        if len(metrics) < steps:
            raise SystemExit(f"{run_dir}: {len(metrics)} steps logged, fewer than --steps {steps}")
        trajectories[seed] = {r["step"]: r["weights"] for r in traj}
        for name, rows in (("weights.jsonl", traj), ("metrics.jsonl", metrics)):
            write_text(out / f"seed{seed}_{name}", "".join(json.dumps(r) + "\n" for r in rows))
        meta = json.loads((run_dir / "meta.json").read_text())
        # A run killed and resumed (an out-of-memory kill, say) loses the killed part's wall time: then no rate.
        from datetime import datetime

        span = (datetime.fromisoformat(meta["updated"]) - datetime.fromisoformat(meta["started"])).total_seconds()
        uninterrupted = meta.get("wall_time_s") is not None and span <= 1.1 * meta["wall_time_s"]
        final = trajectories[seed][max(trajectories[seed])]
        k = len(final)
        per_seed[str(seed)] = {
            "final_step": max(trajectories[seed]),
            "weights": final,
            "control_weight": final[CONTROL],
            "control_below_uniform": final[CONTROL] < 1 / k,
            "wall_time_s": meta.get("wall_time_s"),
            "seconds_per_step": meta["wall_time_s"] / steps if uninterrupted else None,
            "timing": "one uninterrupted run, model load included" if uninterrupted else
                      f"killed and resumed: wall time of the last invocation only ({meta.get('wall_time_s', 0):.0f} s)",
        }
    common = sorted(set.intersection(*(set(t) for t in trajectories.values())))
    agreement = {}
    for a, b in itertools.combinations(seeds, 2):
        rows = []
        for step in common[1:]:  # step 0 is uniform for every seed: no ranking
            names = sorted(trajectories[a][step])
            rho = spearmanr([trajectories[a][step][n] for n in names], [trajectories[b][step][n] for n in names]).statistic
            rows.append({"step": step, "spearman": round(float(rho), 6)})
        agreement[f"{a}-{b}"] = rows
    summary = {"steps": steps, "seeds": seeds, "k": k, "uniform": 1 / k, "per_seed": per_seed,
               "spearman_between_seeds": agreement,
               "config": "experiments/llama3/protocol_smollm2.yaml (the first steps of the real runs)",
               **({"overrides": list(overrides)} if overrides else {})}
    write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "summarise"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tag", help="name of a variant pilot (its own runs and results folders)")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides of the variant (needs --tag)")
    parser.add_argument("--only", nargs="+", default=None, metavar="UNIT", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=None, help=argparse.SUPPRESS)  # set by the runner: one per seed
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser()
    args = parser.parse_args(argv)
    if args.overrides and not args.tag:
        parser.error("--set needs --tag: a variant must not overwrite the first pilot's results")
    runs, out = paths(args.tag)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.action == "run":
        run(args.seeds, args.steps, args.overrides, runs, args.tag, args.only)
        if args.only:
            return 0
    summary = summarise(args.seeds, args.steps, runs, out, args.overrides)
    for seed, s in summary["per_seed"].items():
        log.info("seed %s: control %.4f (1/k %.4f), %s", seed, s["control_weight"], summary["uniform"],
                 f"{s['seconds_per_step']:.0f} s/step" if s["seconds_per_step"] else s["timing"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
