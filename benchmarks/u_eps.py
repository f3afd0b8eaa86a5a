"""u's Adam eps (issue 18, item 3): how much of the gap that moves λ is an artifact of u's eps.

u's Adam sees ∇L2 while w's sees ∇L1 + α∇L2 (method.md §3, α = 100 in the Table 1 protocol). Adam is scale-free but
for eps: Adam(α·g, eps) ≡ Adam(g, eps/α). So with one eps, u's steps are damped where its gradients are tiny and
w's are not. The released code steps u on α-scaled gradients (``conventions: acl`` / ``v1``); ``conventions: scalebio``
gave u plain eps until this measurement made ``solver.u_adam: alpha_scaled`` its default. Per seed, on the Table 1
protocol preset (``FULL`` in benchmarks/run.py: its batches cut to 12 examples, 2 per source), two runs of the same
steps with identical batches and LISA draws:
  eps             ``solver.u_adam: plain``: u's Adam eps = eps (the scalebio default when this was measured)
  eps_over_alpha  ``solver.u_adam: alpha_scaled``: u's eps = eps/α at every step (with τ = 1, as in the preset,
                  nothing else changes), i.e. Adam on α∇L2 with plain eps, the way w's Adam treats L2
                  (tests/test_bench_u_eps.py checks this)
Per step: the gap ℓ_i(w) − ℓ_i(u) that λ's step used (the solver's ``StepStats``: the per-source mean losses of
the step's gradient passes, in fp32) and p = softmax λ after the step. Compared per step:
r_t = ‖gap_A − gap_B‖₂ ÷ ‖gap_B‖₂ (A = eps, B = eps_over_alpha, the reference), the control's gap, max_i |p_A − p_B|.

Decision rule (fixed before the measurement): gap_B is the reference and gap_A − gap_B the eps artifact. If
r_t > 0.10 at some step in every seed (both, in ``FULL``), the recommended default for ``conventions: scalebio``
becomes u's eps = eps/α (Adam on α∇L2); otherwise keep plain eps.

    python -m benchmarks.u_eps --data-root PATH_TO_PROTOCOL_POOL --out results/bench   # ~13 min of one thread
    python -m benchmarks.u_eps --table                                                 # README table of the JSON
    python -m benchmarks.run --only u_eps --smoke --out /tmp/bench --figures ''         # toy size, seconds
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from scalebio.config import load_config

log = logging.getLogger("benchmarks")
REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("eps", "eps_over_alpha")
REFERENCE = "eps_over_alpha"
THRESHOLD = 0.10
RULE = ("gap_B (u's eps = eps/α, as w's Adam treats L2) is the reference and gap_A − gap_B the eps artifact: if "
        "r_t = ‖gap_A − gap_B‖₂ / ‖gap_B‖₂ > 0.10 at some step in every seed, the recommended default for "
        "`conventions: scalebio` becomes u's eps = eps/α (Adam on α∇L2); otherwise keep plain eps")


U_ADAM = {"eps": "plain", "eps_over_alpha": "alpha_scaled"}
"""Each variant's ``solver.u_adam`` (scalebio.conventions): with τ = 1, as here, alpha_scaled is exactly eps/α."""


def batches_digest(batches: list[dict]) -> str:
    """sha256 (16 hex) of the token ids, labels and sources of ``batches``: the two variants must see the same."""
    h = hashlib.sha256()
    for b in batches:
        for key in ("input_ids", "labels", "source"):
            if key in b:
                h.update(b[key].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def run_variant(cfg, variant: str, steps: int) -> dict:
    """``steps`` steps of the reweighting loop of ``cfg`` (Reweighting._loop's order: schedule and LISA, draw B and V,
    one solver step), u's eps as ``variant`` says; per step the gap λ used, p after the step and what the step saw."""
    from scalebio.reweight import Reweighting

    start = time.perf_counter()
    if cfg.solver.u_adam != U_ADAM[variant]:
        raise ValueError(f"{variant}: solver.u_adam is {cfg.solver.u_adam!r}, not {U_ADAM[variant]!r}")
    rw = Reweighting(cfg)
    solver = rw.solver
    torch.manual_seed(cfg.seed)  # as Reweighting._start does for a fresh run
    rows = []
    for step in tqdm(range(steps), desc=f"u_eps seed {cfg.seed} {variant}", leave=False):
        alpha = solver.schedule_step(step, rw.steps_per_outer)
        solver.update_lisa(step)
        train, val = rw._draw()
        stats = solver.step(train, val)
        rows.append({
            "step": step + 1,  # steps completed
            "alpha": alpha,
            "lr_u": solver.opt_u.param_groups[0]["lr"],
            "eps": {"u": solver.opt_u.param_groups[0]["eps"], "w": solver.opt_w.param_groups[0]["eps"],
                    "lambda": solver.opt_lam.param_groups[0]["eps"]},
            "gap": [w - u for w, u in zip(stats.source_loss_w, stats.source_loss_u)],
            "source_loss_u": stats.source_loss_u,
            "source_loss_w": stats.source_loss_w,
            "p": solver.weights().tolist(),
            "source_counts": stats.source_counts,
            "active_blocks": {"u": list(solver.lisa_u.active) if solver.lisa_u else None,
                              "w": list(solver.lisa_w.active) if solver.lisa_w else None},
            "batches_sha256": batches_digest([*train, *val]),
        })
    out = {"sources": list(rw.names), "steps": rows, "seconds": time.perf_counter() - start,
           "data_files": {key: entry.get("sha256") for key, entry in rw.recorder.files.items()}}
    del rw, solver
    gc.collect()
    return out


def compare(runs: dict[str, dict], control: int) -> list[dict]:
    """Per step: r_t = ‖gap_A − gap_B‖₂ / ‖gap_B‖₂, the control's gap in both, max_i |p_A − p_B|. Refuses variants
    that did not see the same batches and LISA blocks."""
    out = []
    for a, b in zip(runs["eps"]["steps"], runs[REFERENCE]["steps"]):
        for key in ("batches_sha256", "active_blocks", "source_counts", "alpha", "lr_u"):
            if a[key] != b[key]:
                raise RuntimeError(f"step {a['step']}: the variants differ in {key} ({a[key]} vs {b[key]})")
        gap_a, gap_b = torch.tensor(a["gap"], dtype=torch.float64), torch.tensor(b["gap"], dtype=torch.float64)
        ref = float(gap_b.norm())
        out.append({"step": a["step"],
                    "r": float((gap_a - gap_b).norm()) / ref if ref > 0 else None,
                    "gap_norm": {"eps": float(gap_a.norm()), "eps_over_alpha": ref},
                    "control_gap": {"eps": a["gap"][control], "eps_over_alpha": b["gap"][control]},
                    "max_abs_dp": max(abs(x - y) for x, y in zip(a["p"], b["p"]))})
    return out


def decide(per_seed: dict[str, list[dict]]) -> dict:
    """The decision rule, applied to the per-step comparisons of every seed."""
    max_r = {seed: max((row["r"] for row in rows if row["r"] is not None), default=None)
             for seed, rows in per_seed.items()}
    exceeding = [seed for seed, r in max_r.items() if r is not None and r > THRESHOLD]
    change = bool(per_seed) and len(exceeding) == len(per_seed)
    if change:
        text = (f"r_t > {THRESHOLD} at some step in every seed ({', '.join(exceeding)}): recommend u's eps = eps/α "
                f"(Adam on α∇L2) as the default of `conventions: scalebio`")
    else:
        below = [seed for seed in per_seed if seed not in exceeding]
        text = (f"r_t ≤ {THRESHOLD} at every step in seed(s) {', '.join(below)}: keep plain eps (the artifact stays "
                f"below {THRESHOLD:.0%} of the signal" + (")" if not exceeding else
                                                          f" there; it exceeds it in seed(s) {', '.join(exceeding)})"))
    return {"rule": RULE, "threshold": THRESHOLD, "max_r": max_r, "seeds_exceeding": exceeding,
            "recommended_u_eps": "eps/alpha" if change else "eps", "text": text}


def run(config: str | None, overrides: list[str], seeds: list[int], steps: int, threads: int, control: str,
        smoke: bool = False, data_root: str | None = None, keep: str | None = None) -> dict:
    """Both variants for every seed; ``control``: the name of the control source. ``data_root``: the preset's pool,
    when not where the config says (recorded only by the data files' sha256). ``smoke``: a tiny random Llama on
    generated data (gap_noise's smoke config). ``keep``: a folder where each finished (seed, variant) run is saved
    and from which a rerun with the same settings takes it (on a machine short of memory a run may be killed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    if not smoke:  # on a machine shared with long runs, this process is the one the OOM killer should pick
        try:
            Path("/proc/self/oom_score_adj").write_text("1000")
        except OSError:
            pass
    seeds_out, per_seed, kept = {}, {}, []
    if keep and not smoke:
        Path(keep).mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="scalebio-u-eps-") as tmp:
            if smoke:
                from .gap_noise import _smoke_setup

                config = _smoke_setup(Path(tmp))
            path = Path(config) if Path(config).is_absolute() else REPO / config
            extra = [f"data.root={data_root}"] if data_root else []
            for seed in seeds:
                runs = {}
                for variant in VARIANTS:
                    key = {"config": str(config), "overrides": overrides, "seed": seed, "steps": steps,
                           "threads": threads, "variant": variant}
                    saved = Path(keep) / f"seed{seed}_{variant}.json" if keep and not smoke else None
                    if saved is not None and saved.is_file() and json.loads(saved.read_text())["key"] == key:
                        log.info("u_eps: seed %d, %s: kept from %s", seed, variant, saved)
                        runs[variant] = json.loads(saved.read_text())["run"]
                        kept.append(f"seed {seed} {variant}")
                        continue
                    cfg = load_config(path, [*overrides, *extra, f"seed={seed}", f"threads={threads}",
                                             "precision=fp32", "resume=false", f"solver.u_adam={U_ADAM[variant]}",
                                             f"run_dir={Path(tmp) / f'seed{seed}_{variant}'}"])
                    log.info("u_eps: seed %d, %s", seed, variant)
                    runs[variant] = run_variant(cfg, variant, steps)
                    if saved is not None:
                        from scalebio.results import write_json

                        write_json(saved, {"key": key, "run": runs[variant]})
                names = runs["eps"]["sources"]
                if control not in names:
                    raise ValueError(f"control source {control!r} is not one of {names}")
                per_seed[str(seed)] = compare(runs, names.index(control))
                seeds_out[str(seed)] = {"variants": runs, "comparison": per_seed[str(seed)]}
    finally:
        torch.set_num_threads(before)
    first = next(iter(seeds_out.values()))["variants"]["eps"]
    return {
        "config": str(config) if not smoke else "smoke (tiny random Llama)",
        "overrides": overrides,
        "sources": first["sources"],
        "control": control,
        "data_files_sha256": first["data_files"],
        "variants": {"eps": "today's default: u's Adam eps = eps (A)",
                     "eps_over_alpha": "u's eps = eps/α after every set_schedule, as the acl branch (B, reference)"},
        "gap": "ℓ_i(w) − ℓ_i(u) on the step's batch, the per-source means λ's step used (StepStats, fp32)",
        "p": "softmax(λ) after the step",
        "seeds": seeds_out,
        "kept_from_an_earlier_process": kept,
        "verdict": decide(per_seed),
    }


def table_lines(folder: Path) -> list[str]:
    """The README table of OUT/u_eps.json: per seed and step, r_t, the control's gap under A and B, max_i |Δp|;
    then the verdict of the rule."""
    res = json.loads((Path(folder) / "u_eps.json").read_text())["results"]
    out = ["| seed | step | r_t = ‖gap_A − gap_B‖ / ‖gap_B‖ | ‖gap_B‖ | control gap, A (eps) | control gap, B (eps/α) "
           "| max_i \\|p_A − p_B\\| |", "|---|---|---|---|---|---|---|"]
    for seed, entry in res["seeds"].items():
        for row in entry["comparison"]:
            r = "–" if row["r"] is None else f"{row['r']:.3f}"
            out.append(f"| {seed} | {row['step']} | {r} | {row['gap_norm']['eps_over_alpha']:.2e} | "
                       f"{row['control_gap']['eps']:+.2e} | {row['control_gap']['eps_over_alpha']:+.2e} | "
                       f"{row['max_abs_dp']:.1e} |")
    out += ["", f"Verdict (rule fixed before the run): {res['verdict']['text']}."]
    return out


def main(argv: list[str] | None = None) -> Path:
    from scalebio.results import write_json

    from .common import machine_info
    from .run import FULL, SCHEMA

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--data-root", help="the preset's pool (build_pool.py --control 600 --no-stand-ins), when "
                                            "not at the config's data.root")
    parser.add_argument("--keep", help="save each finished (seed, variant) run here, and take it from here on a rerun")
    parser.add_argument("--table", action="store_true", help="print the README table of OUT/u_eps.json and stop")
    args = parser.parse_args(argv)
    path = Path(args.out) / "u_eps.json"
    if args.table:
        print("\n".join(table_lines(Path(args.out))))  # noqa: T201 (the command's output)
        return path
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = FULL["u_eps"]
    start = time.perf_counter()
    results = run(**settings, data_root=args.data_root, keep=args.keep)
    record = {"schema": SCHEMA, "benchmark": "u_eps", "mode": "full", "machine": machine_info(),
              "torch": torch.__version__, "threads": settings["threads"], "device": "cpu", "settings": settings,
              "results": results, "wall_seconds": time.perf_counter() - start}
    write_json(path, record)
    log.info("u_eps: %.1f s -> %s; %s", record["wall_seconds"], path, results["verdict"]["text"])
    return path


if __name__ == "__main__":
    main()
