"""Gap noise (issue 18): how wrong λ's gradient is under each precision, on the protocol preset's own batches.

λ moves only by the per-source gap ℓ_i(w) − ℓ_i(u) (method.md §3: ∇λ = α J (ℓ^w − ℓ^u), J = diag p − p pᵀ). At
each point (u, w, λ): the reweighting run's state after step 1 (computed here: one fp32 step of the preset from the
pretrained model) and at saved checkpoints (e.g. steps 10 and 30 of a protocol run), the per-source mean losses of
u and of w are computed on the same ``batches`` training micro-batches of the preset (the batches its sampler
draws after step 0), in
  fp64                    the reference: u and w cast to float64
  fp32                    TF32 / reduced-precision matmuls off (scalebio.precision.exact_fp32)
  bf16_autocast           forwards under torch.autocast(bf16): what λ saw under ``precision: bf16`` before issue 18
                          (kept as ``solver.gap_precision: compute``)
  bf16                    ``precision: bf16`` since issue 18: gradient passes in bf16, λ's losses from fp32
                          forwards without gradients, which are the fp32 row's forwards (reported as such, not
                          recomputed; tests/test_precision.py checks the solver's path against fp64)
Per mode and point: each batch's gap error max_i |gap_i − gap_i^ref| ÷ max_i |gap_i^ref|, and the cosine of λ's
gradient α J gap with the reference's; their worst and median over batches. Forward times per mode are recorded
too (one thread, on whatever else the machine runs: see ``shared_machine``).

    python -m benchmarks.run --only gap_noise                    # settings in benchmarks/run.py (FULL)
    python -m benchmarks.gap_noise --checkpoint 'step 10=PATH' --checkpoint 'step 30=PATH' --out results/bench
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scalebio import precision
from scalebio.config import load_config
from scalebio.solver import CausalLMObjective

log = logging.getLogger("benchmarks")
REPO = Path(__file__).resolve().parents[1]
MODES = ("fp64", "fp32", "bf16_autocast")
ROWS = {"fp32": "fp32", "bf16_autocast": "bf16_autocast", "bf16": "fp32"}  # row → the forwards it uses
COSINE_TARGET = 0.99


def mode_context(mode: str):
    if mode == "bf16_autocast":
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return precision.exact_fp32()


def source_means(model: torch.nn.Module, batch: dict, k: int, objective: CausalLMObjective) -> torch.Tensor:
    """Per-source mean of the per-example losses [k] (0 where a source is absent), as the solver forms them."""
    with torch.no_grad():
        ell = objective.per_example_loss(model, batch).double()
    src = batch["source"]
    out = torch.zeros(k, dtype=torch.float64)
    for i in range(k):
        if (src == i).any():
            out[i] = ell[src == i].mean()
    return out


def lambda_gradient(gap: torch.Tensor, lam: torch.Tensor, alpha: float) -> torch.Tensor:
    """α J gap, J = diag(p) − p pᵀ, p = softmax(λ) [k]."""
    p = torch.softmax(lam.double(), dim=0)
    return alpha * (p * gap - p * (p @ gap))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-300))


def cast_(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters and floating buffers to ``dtype`` in place (a GGUF-loaded model refuses ``.float()``/``.double()``)."""
    with torch.no_grad():
        for sub in model.modules():
            for param in sub.parameters(recurse=False):
                param.data = param.data.to(dtype)
            for name, buf in sub.named_buffers(recurse=False):
                if buf is not None and buf.is_floating_point():
                    sub._buffers[name] = buf.to(dtype)
    return model


def measure_point(model: torch.nn.Module, state: dict, batches: list[dict], k: int) -> dict:
    """Gaps and λ gradients of every mode on ``batches`` at the point ``state`` (the solver's state dict). One
    model object holds u, then w (loaded in turn, cast to fp64 and back in place): one copy in memory at a time."""
    objective = CausalLMObjective()
    lam, alpha = state["lam"].double(), float(state["alpha"])
    means = {mode: {} for mode in MODES}
    seconds = {mode: [] for mode in MODES}
    model.train()
    for name in ("u", "w"):
        cast_(model, torch.float32).load_state_dict(state[name])
        for mode in MODES:
            if mode == "fp64":
                cast_(model, torch.float64)
            out = []
            for batch in batches:
                start = time.perf_counter()
                with mode_context(mode):
                    out.append(source_means(model, batch, k, objective))
                seconds[mode].append(time.perf_counter() - start)
            means[mode][name] = out
            cast_(model, torch.float32)
    gaps = {mode: [w - u for w, u in zip(means[mode]["w"], means[mode]["u"])] for mode in MODES}
    rows = {}
    for row, mode in ROWS.items():
        errors, cosines = [], []
        for gap, ref in zip(gaps[mode], gaps["fp64"]):
            errors.append(float((gap - ref).abs().max() / ref.abs().max().clamp(min=1e-300)))
            cosines.append(cosine(lambda_gradient(gap, lam, alpha), lambda_gradient(ref, lam, alpha)))
        rows[row] = {"forwards": mode, "gap_error": {"max": max(errors), "median": statistics.median(errors),
                                                     "per_batch": errors},
                     "lambda_grad_cosine": {"min": min(cosines), "median": statistics.median(cosines),
                                            "per_batch": cosines},
                     "meets_cosine_target": min(cosines) >= COSINE_TARGET}
    return {
        "alpha": alpha,
        "weights": torch.softmax(lam, 0).tolist(),
        "reference_gap": [g.tolist() for g in gaps["fp64"]],
        "reference_gap_abs_max": {"max": max(float(g.abs().max()) for g in gaps["fp64"]),
                                  "median": statistics.median(float(g.abs().max()) for g in gaps["fp64"])},
        "gaps": {mode: [g.tolist() for g in gaps[mode]] for mode in MODES},
        "modes": rows,
        "forward_seconds": {mode: statistics.median(s) for mode, s in seconds.items()},
    }


def draw_batches(rw, n: int, size: int) -> list[dict]:
    """``n`` batches of ``size`` training examples, from the global batches the run's sampler draws next (its
    seed, its state after step 0), regrouped so that each batch holds the sources in turn (a stratified global
    batch lists them source by source: cut as it is, a batch would hold one or a few sources only)."""
    from itertools import chain, zip_longest

    from scalebio import data as data_mod

    picks = []
    while len(picks) < n * size:
        drawn = rw.train_sampler.next_batch()
        rw.val_sampler.next_batch()  # V is drawn with every B in the run
        by_source = [[p for p in drawn if p[0] == s] for s in range(len(rw.sources))]
        picks += [p for p in chain.from_iterable(zip_longest(*by_source)) if p is not None]
    examples = [rw.sources[s].examples[i] for s, i in picks[:n * size]]
    return data_mod.micro_batches(examples, size, rw.pad_id, rw.device)


def batches_digest(batches: list[dict]) -> str:
    import hashlib

    h = hashlib.sha256()
    for b in batches:
        for key in ("input_ids", "labels", "source"):
            h.update(b[key].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def run(config: str | None, overrides: list[str], checkpoints: dict[str, str], batches: int, threads: int,
        smoke: bool = False, reuse: dict | None = None, step1_overrides: tuple[str, ...] = (),
        micro_batch: int | None = None, step1: bool = True) -> dict:
    """``checkpoints``: label → path of a reweighting checkpoint of this config (missing files are reported and
    skipped). ``smoke``: a tiny random Llama on generated data, its own 3-step run's checkpoint as the point.
    ``reuse``: the results of an earlier run on the same batches (checked by digest): its points are kept, not
    recomputed (a protocol run writes its step-30 checkpoint long after its step-10 one). ``step1_overrides``:
    config overrides of the step-1 run that change its memory, not its result (gradient checkpointing, smaller
    micro-batches); ``micro_batch``: the size of the measured batches (default: the config's). ``step1``: compute
    the step-1 point (one fp32 step of the preset: about as much CPU as two checkpoint points)."""
    from scalebio.reweight import Reweighting

    if not smoke:  # on a machine shared with long runs, this process is the one the OOM killer should pick
        try:
            Path("/proc/self/oom_score_adj").write_text("1000")
        except OSError:
            pass
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="scalebio-gap-noise-") as tmp:
            if smoke:
                config = _smoke_setup(Path(tmp))
            path = Path(config) if Path(config).is_absolute() else REPO / config
            if smoke:  # a 3-step run of the tiny config stands in for a protocol run's checkpoint
                ckpt_cfg = load_config(path, [f"run_dir={Path(tmp) / 'run'}", "resume=false", "precision=fp32",
                                              "solver.steps=3", "checkpoint_every=3"])
                Reweighting(ckpt_cfg).run_loop(progress=False)
                checkpoints = {"step 3": str(Path(tmp) / "run" / "checkpoints" / "step_0000003.pt")}
            cfg = load_config(path, [*overrides, *step1_overrides, f"run_dir={Path(tmp) / 'step1'}", "resume=false",
                                     "precision=fp32", f"threads={threads}"])
            kept = dict((reuse or {}).get("points", {}))
            start = time.perf_counter()
            rw = Reweighting(cfg)
            states, step1_seconds = {}, (reuse or {}).get("step1_fp32_seconds")
            if "step 1" in kept or not step1:
                rw._draw()  # step 0's B and V, as the run draws them
            else:
                rw.run_loop(stop_after=1, progress=False)  # the preset's first step, fp32, its seed
                step1_seconds = time.perf_counter() - start
                states["step 1"] = str(rw.run.latest_checkpoint())
            k, names = len(rw.names), rw.names
            eval_batches = draw_batches(rw, batches, micro_batch or rw.cfg.solver.micro_batch)
            digest = batches_digest(eval_batches)
            if kept and reuse["batches"].get("sha256") != digest:
                raise ValueError(f"reuse: its batches (sha256 {reuse['batches'].get('sha256')}) are not these ({digest})")
            model = rw.solver.w  # one model object for every point (measure_point loads u and w into it)
            del rw
            gc.collect()
            skipped = {} if step1 or "step 1" in kept else {"step 1": "not requested (--no-step1)"}
            for label, ckpt in checkpoints.items():
                if label in kept:
                    continue
                file = Path(ckpt).expanduser()
                if not file.is_file():
                    skipped[label] = f"{ckpt}: not found"
                    continue
                states[label] = str(file)
            points = dict(kept)
            for label, file in tqdm(states.items(), desc="gap noise", leave=False):
                log.info("gap noise: %s (%s)", label, file)
                # mmap: the optimizer moments in the checkpoint are never read into memory
                state = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
                points[label] = {"step": int(state["step"]), "config_digest": state.get("config_digest"),
                                 **measure_point(model, state["solver"], eval_batches, k)}
                del state
                gc.collect()
    finally:
        torch.set_num_threads(before)
    return {
        "config": str(config) if not smoke else "smoke (tiny random Llama)",
        "overrides": overrides,
        "sources": names,
        "batches": {"count": len(eval_batches), "examples": [int(b["input_ids"].size(0)) for b in eval_batches],
                    "tokens": [int(b["attention_mask"].sum()) for b in eval_batches],
                    "per_source": [[int((b["source"] == i).sum()) for i in range(k)] for b in eval_batches],
                    "sha256": digest,
                    "drawn": "the preset's training sampler after step 0 (its seed), sources in turn"},
        "points": dict(sorted(points.items(), key=lambda item: item[1]["step"])),
        "reused": sorted(kept),
        "skipped": skipped,
        "cosine_target": COSINE_TARGET,
        "step1_fp32_seconds": step1_seconds,
        "shared_machine": "timings are one thread of a 2-core machine that ran two other one-thread jobs; "
                          "ratios between modes are indicative only",
        "summary": summarize(points),
    }


def summarize(points: dict) -> dict:
    """Per row: the worst gap error and the lowest λ-gradient cosine over every point and batch."""
    out = {}
    for row in ROWS:
        errs = [p["modes"][row]["gap_error"]["max"] for p in points.values()]
        coss = [p["modes"][row]["lambda_grad_cosine"]["min"] for p in points.values()]
        out[row] = {"gap_error_max": max(errs), "lambda_grad_cosine_min": min(coss),
                    "meets_cosine_target_everywhere": min(coss) >= COSINE_TARGET}
    return out


LABELS = {"fp32": "fp32", "bf16_autocast": "bf16 autocast (before issue 18; `solver.gap_precision: compute`)",
          "bf16": "bf16 since issue 18 (λ's losses from fp32 forwards)"}


def table_lines(folder: Path) -> list[str]:
    """The README table of results/bench/gap_noise.json: per point, the reference gap's size and, per mode, the
    worst gap error (÷ the reference's largest entry) and the lowest λ-gradient cosine over the batches."""
    res = json.loads((Path(folder) / "gap_noise.json").read_text())["results"]
    points = res["points"]
    head = " | ".join(f"{label} (max ‖gap‖ {p['reference_gap_abs_max']['median']:.1e})" for label, p in points.items())
    out = [f"| mode | {head} |", "|---" * (len(points) + 1) + "|"]
    for row, label in LABELS.items():
        cells = [f"error {p['modes'][row]['gap_error']['max']:.3g}, cos ≥ {p['modes'][row]['lambda_grad_cosine']['min']:.5f}"
                 for p in points.values()]
        out.append(f"| {label} | {' | '.join(cells)} |")
    return out


def _smoke_setup(folder: Path) -> str:
    """A tiny reweighting config on generated Alpaca-style data (3 sources, one with '.' responses)."""
    import random

    import yaml

    words = "the cat sat on a mat while dogs ran in the park and birds sang songs about green trees".split()
    sources = []
    for i in range(3):
        rng = random.Random(i)
        lines = []
        for j in range(24):
            answer = "." if i == 2 else " ".join(rng.choice(words) for _ in range(10))
            lines.append(json.dumps({"instruction": f"s{i} {j}: " + " ".join(rng.choice(words) for _ in range(4)),
                                     "input": "", "output": answer}))
        (folder / f"s{i}.jsonl").write_text("\n".join(lines) + "\n")
        sources.append({"name": f"s{i}", "path": f"s{i}.jsonl"})
    rng = random.Random(99)
    (folder / "val.jsonl").write_text("".join(json.dumps({"instruction": f"v {j}: " + " ".join(rng.choice(words) for _ in range(4)),
                                                          "input": "", "output": " ".join(rng.choice(words) for _ in range(10))}) + "\n"
                                              for j in range(12)))
    cfg = {"seed": 0, "model": {"architecture": "llama", "config_overrides": {
               "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 2, "max_position_embeddings": 128}},
           "tokenizer": {"kind": "train_bpe", "vocab_size": 300},
           "data": {"root": ".", "sources": sources, "validation": {"path": "val.jsonl"}, "max_length": 48},
           "solver": {"steps": 3, "global_batch": 6, "micro_batch": 3, "lr_u": 2e-5, "lr_w": 2e-5, "alpha": 100},
           "checkpoint_every": 100}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def main(argv: list[str] | None = None) -> Path:
    from scalebio.results import write_json

    from .common import machine_info
    from .run import FULL, SCHEMA

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="LABEL=PATH",
                        help="a reweighting checkpoint of the preset to measure at (default: FULL's)")
    parser.add_argument("--batches", type=int, default=FULL["gap_noise"]["batches"])
    parser.add_argument("--table", action="store_true", help="print the README table of OUT/gap_noise.json and stop")
    parser.add_argument("--reuse", action="store_true", help="keep the points of OUT/gap_noise.json (same batches)")
    parser.add_argument("--no-step1", dest="step1", action="store_false", help="skip the computed step-1 point")
    args = parser.parse_args(argv)
    if args.table:
        print("\n".join(table_lines(Path(args.out))))  # noqa: T201 (the command's output)
        return Path(args.out) / "gap_noise.json"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = dict(FULL["gap_noise"], batches=args.batches, step1=args.step1)
    if args.checkpoint:
        settings["checkpoints"] = dict(item.split("=", 1) for item in args.checkpoint)
    path = Path(args.out) / "gap_noise.json"
    earlier = json.loads(path.read_text()) if args.reuse and path.is_file() else None
    start = time.perf_counter()
    results = run(**settings, reuse=earlier["results"] if earlier else None)
    record = {"schema": SCHEMA, "benchmark": "gap_noise", "mode": "full", "machine": machine_info(),
              "torch": torch.__version__, "threads": settings["threads"], "device": "cpu", "settings": settings,
              "results": results,
              "wall_seconds": time.perf_counter() - start + (earlier["wall_seconds"] if earlier else 0.0)}
    write_json(path, record)
    return path


if __name__ == "__main__":
    main()
