"""Run the ScaleBiO benchmarks and write results/bench/*.json, then the figures.

    python -m benchmarks.run --out results/bench --figures figures           # full (~2 h on 2 cores)
    python -m benchmarks.run --out /tmp/bench --figures /tmp/fig --smoke     # toy sizes, seconds
    python -m benchmarks.run --out results/bench --only memory               # one experiment
    python -m benchmarks.run --out results/bench --only precision profile --device cuda   # gpu_*.json (gpu_check.sh)
    python -m benchmarks.run --out results/bench --only gap_noise   # λ's gradient per precision (~40 min CPU)
    python -m benchmarks.run --out results/bench --only u_eps       # u's eps vs eps/α (~13 min of an idle CPU thread; opt-in)

Every JSON holds machine info, the torch version, the settings, every timed repetition and the medians.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from pathlib import Path

import torch

from scalebio.results import write_json

from . import gap_noise, hypergradient, memory, padding, precision, sources, step_cost, step_profile, u_eps
from .common import BLOCKS, ModelSpec, machine_info

log = logging.getLogger("benchmarks")
SCHEMA = "scalebio.bench/1"
EXPERIMENTS = ("step_cost", "memory", "sources", "hypergradient", "precision", "profile", "padding", "gap_noise")
OPT_IN = ("u_eps",)  # run only when named in --only (`make bench` runs EXPERIMENTS)
ON_CUDA = ("precision", "profile")

FULL = {
    "step_cost": dict(widths=[64, 128, 256], headline=128, batch=8, seq_len=64, k=4, warmup=1, reps=5,
                      blocks=BLOCKS),
    "memory": dict(width=128, batch=8, seq_len=64, k=4, steps=6, blocks=BLOCKS),
    "sources": dict(arch="llama", width=32, blocks=8, batch=64, micro=16, seq_len=16, ks=[2, 64], warmup=2, reps=41,
                    work_reps=400),
    "hypergradient": dict(width=64, blocks=32, seq_len=32, batch=8, k=4, cg_iters=5, warmup=1, reps=5,
                          convex_steps=1500, alpha=100.0),
    # SmolLM2 at 8×128 on the 2 shared cores: one round of the full-shape variants takes ~2 min with 1 thread
    # and ~4.5 min with 2 (the other job's threads contend), so 2 threads get one repetition.
    "precision": dict(model="smollm2", batch=8, seq_len=128, k=8, gamma=4, threads=[1, 2], reps=[3, 1],
                      reduced_shape=[1, 32], reduced_reps=[2, 1], warmup_shape=[1, 8],
                      peak_shapes=[[1024, 576, 1536], [32, 576, 1536]], peak_reps=3, reweight_config="experiments/llama3/offline_smollm2.yaml", reweight_steps=30),
    "profile": dict(model="smollm2", batch=8, seq_len=128, k=8, gamma=4, threads=1, warmup_shape=[1, 8]),
    "padding": dict(model="smollm2", batch=8, seq_len=128, gamma=4, threads=1, warmup=1, reps=9),
    # The Table 1 protocol preset (its pool: experiments/llama3/build_pool.py --control 600 --no-stand-ins). A protocol
    # run keeps only its newest checkpoint: copy (or link) its step-10 and step-30 checkpoints to these paths first;
    # a missing one is skipped and reported. Step 1 is computed. ~25 min of one CPU thread at 5 batches.
    # Step 1 runs with gradient checkpointing and micro-batches of 8 (the same step, a third of the memory); the
    # measured batches hold 12 of the preset's training examples, 2 per source (fp64 forwards dominate the cost).
    "gap_noise": dict(config="experiments/llama3/protocol_smollm2.yaml", overrides=[], batches=5, threads=1,
                      checkpoints={"step 10": "runs/gap_noise/seed0_step_0000010.pt",
                                   "step 30": "runs/gap_noise/seed0_step_0000030.pt"},
                      step1_overrides=["model.gradient_checkpointing=true", "solver.micro_batch=8"], micro_batch=12),
    # u's Adam eps (issue 18, item 3): the protocol preset's first 5 steps (its 60-step schedule: 2 warmup steps) at
    # 12 examples per step (2 per source), everything else as the preset, seeds 0 and 1, each run twice (u's eps =
    # eps, = eps/α) on the same batches. ~13 min of one CPU thread, ~6 GB peak. The pool: --data-root
    # (benchmarks.u_eps).
    "u_eps": dict(config="experiments/llama3/protocol_smollm2.yaml",
                  overrides=["solver.global_batch=12", "solver.micro_batch=12"], seeds=[0, 1], steps=5, threads=1,
                  control="control-dot-responses"),
}
# On a CUDA device (gpu_check.sh): full shapes, more repetitions, a large square matmul for the peak too.
CUDA = {
    "precision": {**FULL["precision"], "threads": [1], "reps": [10], "reduced_reps": [1], "warmup_shape": [8, 128],
                  "peak_shapes": [[1024, 576, 1536], [8192, 8192, 8192]], "peak_reps": 5},
    "profile": {**FULL["profile"], "warmup_shape": [8, 128]},
}
SMOKE = {
    "step_cost": dict(widths=[16, 32], headline=16, batch=2, seq_len=8, k=2, warmup=1, reps=2,
                      blocks={"llama": 4, "gpt2": 3}),
    "memory": dict(width=16, batch=2, seq_len=8, k=2, steps=3, blocks={"llama": 4, "gpt2": 3}),
    "sources": dict(arch="llama", width=16, blocks=4, batch=64, micro=32, seq_len=4, ks=[2, 64], warmup=1, reps=3,
                    work_reps=5),
    "hypergradient": dict(width=16, blocks=2, seq_len=8, batch=2, k=2, cg_iters=3, warmup=1, reps=2,
                          convex_steps=100, alpha=100.0),
    "precision": dict(model="tiny_llama", batch=2, seq_len=16, k=2, gamma=2, threads=[1, 2], reps=[2, 1],
                      reduced_shape=[1, 8], reduced_reps=[1, 1], warmup_shape=[1, 4], peak_shapes=[[64, 32, 96]],
                      peak_reps=2, reweight_config=None, reweight_steps=3),
    "profile": dict(model="tiny_llama", batch=2, seq_len=16, k=2, gamma=2, threads=1, warmup_shape=[1, 4]),
    "padding": dict(model="tiny_llama", batch=2, seq_len=16, gamma=2, threads=1, warmup=1, reps=2),
    "gap_noise": dict(config=None, overrides=[], batches=5, threads=1, checkpoints={}, smoke=True),
    "u_eps": dict(config=None, overrides=[], seeds=[0], steps=3, threads=1, control="s2", smoke=True),
}


def run_experiment(name: str, s: dict, device: str = "cpu") -> dict:
    if name == "step_cost":
        return {arch: step_cost.run(arch, s["widths"], s["headline"], s["blocks"][arch], s["batch"], s["seq_len"],
                                    s["k"], s["warmup"], s["reps"]) for arch in ("llama", "gpt2")}
    if name == "memory":
        return {arch: memory.run(arch, s["width"], s["blocks"][arch], s["batch"], s["seq_len"], s["k"], s["steps"])
                for arch in ("llama", "gpt2")}
    if name == "sources":
        return sources.run(s["arch"], s["width"], s["blocks"], s["batch"], s["micro"], s["seq_len"], s["ks"],
                           s["warmup"], s["reps"], s["work_reps"])
    if name == "hypergradient":
        spec = ModelSpec("llama", s["width"], s["blocks"], s["seq_len"], attn="eager")
        return hypergradient.run(spec, s["batch"], s["k"], s["cg_iters"], s["warmup"], s["reps"],
                                 s["convex_steps"], s["alpha"])
    if name == "precision":
        return precision.run(**s, device=device)
    if name == "profile":
        return step_profile.run(**s, device=device)
    if name == "padding":
        return padding.run(**s, device=device)
    if name == "gap_noise":
        return gap_noise.run(**s)
    if name == "u_eps":
        return u_eps.run(**s)
    raise ValueError(name)


def output_path(out: Path, name: str, device: str) -> Path:
    """results/bench/<name>.json, or gpu_<name>.json for a run on a CUDA device."""
    return out / (f"gpu_{name}.json" if device.startswith("cuda") else f"{name}.json")


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench", help="folder for the JSON results")
    parser.add_argument("--figures", default="figures", help="folder for bench_*.png ('' to skip figures)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks the pipeline, numbers meaningless")
    parser.add_argument("--only", nargs="*", choices=EXPERIMENTS + OPT_IN, default=list(EXPERIMENTS))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the precision and profile experiments "
                        "(writes gpu_<name>.json)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on 2 cores shared with other work, 2 threads measured "
                             "3-10x slower and far noisier; see benchmarks/README.md)")
    args = parser.parse_args(argv)
    if args.device != "cpu":
        if not args.device.startswith("cuda"):
            parser.error(f"--device {args.device}: expected cpu or cuda")
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch.cuda.is_available() is False")
        if set(args.only) - set(ON_CUDA):
            parser.error(f"--device {args.device}: only {' and '.join(ON_CUDA)} run on a CUDA device; pass --only")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    # Module-level objects of torch/transformers never die: move them out of the collector's way, so the
    # collections the benchmarks run between measurements take milliseconds, not 0.1-0.3 s.
    for arch in ("llama", "gpt2"):  # transformers imports each architecture's modules on first use
        ModelSpec(arch, 8, 2, 8).build(0)
    gc.collect()
    gc.freeze()
    settings = SMOKE if args.smoke else (CUDA if args.device != "cpu" else FULL)
    out = Path(args.out)
    written = []
    for name in args.only:
        start = time.perf_counter()
        results = run_experiment(name, settings[name], args.device)
        record = {
            "schema": SCHEMA,
            "benchmark": name,
            "mode": "smoke" if args.smoke else "full",
            "machine": machine_info(),
            "torch": torch.__version__,
            "threads": args.threads,
            "device": args.device,
            "settings": settings[name],
            "results": results,
            "wall_seconds": time.perf_counter() - start,
        }
        path = output_path(out, name, args.device)
        write_json(path, record)
        written.append(path)
        log.info("%s: %.1f s -> %s", name, record["wall_seconds"], path)
    if args.figures and args.device == "cpu":
        from . import figures

        figures.main(["--results", str(out), "--out", args.figures])
    return written


if __name__ == "__main__":
    main()
