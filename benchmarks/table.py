"""Print the README's table of measured numbers from results/bench/*.json (Markdown).

    python -m benchmarks.table --results results/bench
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text())


def _maybe(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text())["results"] if path.is_file() else None


# Issue 10's targets for results/bench/precision.json: key → (label, comparison, target).
PRECISION_TARGETS = {
    "sft_step_bf16_over_fp32": ("SFT step, bf16 ÷ fp32", "<=", 0.40),
    "scalebio_step_bf16_over_fp32": ("ScaleBiO step (LISA), bf16 (λ's losses in fp32) ÷ fp32", "<=", 0.40),
    "scalebio_bf16_fp32_gap_over_bf16_gap": ("ScaleBiO step (LISA), bf16: λ's losses in fp32 ÷ from the bf16 passes "
                                             "(the price of the 2 fp32 forwards)", None, None),
    "scalebio_over_sft_bf16_lisa": ("ScaleBiO step (LISA) ÷ SFT step, bf16", "<=", 2.3),
    "fused_over_two_pass_w": ("ScaleBiO step (LISA), one w pass ÷ two", "<=", 0.90),
    "mfu_sft_bf16": ("MFU of the SFT step, bf16 (6·N·tokens ÷ time ÷ bf16 matmul peak)", ">=", 0.40),
    "weights_l1_bf16_vs_fp32": ("‖p_bf16 − p_fp32‖₁ after 30 reweighting steps, same seed (bf16 with λ's losses in "
                                "fp32)", "<=", 0.02),
    "mfu_sft_fp32": ("MFU of the SFT step, fp32 (÷ fp32 matmul peak)", None, None),
    "scalebio_over_sft_fp32_lisa": ("ScaleBiO step (LISA) ÷ SFT step, fp32", None, None),
    "eval_bf16_over_fp32": ("evaluation forward, bf16 ÷ fp32", None, None),
}


def verdict(entry: dict, op: str | None, target: float | None) -> str:
    """met / MISSED against the target, or why the quantity was not measured."""
    if entry.get("median") is None:
        return f"not measured: {entry.get('reason', 'no value')}"
    if op is None:
        return "–"
    ok = entry["median"] <= target if op == "<=" else entry["median"] >= target
    return "met" if ok else "MISSED"


def _value(entry: dict, full_shape: list[int]) -> str:
    if entry.get("median") is None:
        return "–"
    text = f"{entry['median']:.3g}"
    if "q1" in entry and entry["q1"] != entry["q3"]:
        text += f" [{entry['q1']:.3g}–{entry['q3']:.3g}]"
    if entry.get("shape") and entry["shape"] != full_shape:
        text += f" at {entry['shape'][0]}×{entry['shape'][1]}"
    if len(entry.get("ratios", [])) == 1:
        text += " (1 rep)"
    return text


def _units_evidence(res: dict) -> str:
    """What says a device has bf16 units: the CPU's flags, or for a GPU its measured peaks (the host CPU's flags,
    also recorded, say nothing about the GPU)."""
    if res.get("device", "cpu") == "cpu":
        return ", ".join(res["cpu_bf16_flags"]) or "none"
    return f"{res['device']}, measured peaks"


def precision_lines(folder: Path) -> list[str]:
    """The precision table: one column per CPU thread count (and the GPU run when there is one); the verdicts
    judge each device's headline thread count."""
    runs = []  # (column label, results, thread count)
    cpu, gpu = _maybe(folder, "precision"), _maybe(folder, "gpu_precision")
    if cpu:
        runs += [(f"CPU, {t} thread{'s' * (t != '1')}", cpu, t) for t in cpu["threads"]]
    if gpu:
        runs.append(("GPU", gpu, str(gpu["headline_threads"])))
    if not runs:
        return []
    judged = [(label.split(",")[0], res) for label, res, t in runs if t == str(res["headline_threads"])]
    detail = [res["threads"][t] for _, res, t in runs]
    out = [f"| precision: SmolLM2-135M, B = V = 8×128 unless noted, LISA γ = 4 (median [IQR]) | "
           f"{' | '.join(label for label, _, _ in runs)} | target: {' / '.join(d for d, _ in judged)} |",
           "|---|" + "---|" * len(runs) + "---|"]
    out.append("| bf16 matrix units (CPU flags, or the GPU's measured peaks; `auto` →) | " + " | ".join(
        f"{'yes' if res['bf16_units'] else 'no'} ({_units_evidence(res)}; {res['precision_auto']})"
        for _, res, _ in runs) + " | – |")
    out.append("| matmul peak GFLOP/s, fp32 / bf16 | " + " | ".join(
        f"{d['peaks']['fp32']['gflops']:.0f} / {d['peaks']['bf16']['gflops']:.1f}" for d in detail) + " | – |")
    for key, (label, op, target) in PRECISION_TARGETS.items():
        cells = [_value(res[key] if key == "weights_l1_bf16_vs_fp32" else d["keys"][key],
                        d["sections"]["full"]["shape"]) for (_, res, _), d in zip(runs, detail)]
        goal = "–" if op is None else f"{'≤' if op == '<=' else '≥'} {target}: " + " / ".join(
            verdict(res[key], op, target) for _, res in judged)
        out.append(f"| {label} | {' | '.join(cells)} | {goal} |")
    out.append("| evaluation tokens/s, fp32 / bf16 | " + " | ".join(
        f"{d['keys']['eval_tokens_per_s']['fp32']['median']:.0f} / {d['keys']['eval_tokens_per_s']['bf16']['median']:.0f}"
        for d in detail) + " | – |")
    return out


def profile_lines(folder: Path) -> list[str]:
    """Before/after profile of one ScaleBiO step per device that has a profile.json."""
    out = []
    for name in ("profile", "gpu_profile"):
        res = _maybe(folder, name)
        if res is None:
            continue
        st, b, a = res["settings"], res["configs"]["before"], res["configs"]["after"]
        out += [f"| {res['device'].upper()} {res['precision']}, {st['batch']}×{st['seq_len']}, {st['threads']} thread(s), "
                f"{res['time_basis']} | before: ms | % | after: ms | % |", "|---|---|---|---|---|"]
        for cat in b["ms"]:
            out.append(f"| {cat} | {b['ms'][cat]:.0f} | {b['percent'][cat]:.1f} | {a['ms'][cat]:.0f} | "
                       f"{a['percent'][cat]:.1f} |")
        out.append(f"| total profiled | {b['profiled_ms']:.0f} | 100 | {a['profiled_ms']:.0f} | 100 |")
        out.append(f"| wall time of the profiled step, s | {b['wall_s']:.1f} | – | {a['wall_s']:.1f} | "
                   f"{100 * res['after_over_before_wall']:.0f}% of before |")
        out.append("")
    return out[:-1]


def _ok(value: float, target: float) -> str:
    return "met" if value <= target else "MISSED"


def lines(folder: Path) -> list[str]:
    out = ["| quantity | Llama proportions | GPT-2 proportions | target (Llama) |", "|---|---|---|---|"]
    step = _load(folder, "step_cost")["results"]
    head = {arch: next(e for e in r["widths"] if e["model"]["width"] == r["headline_width"]) for arch, r in step.items()}
    width = step["llama"]["headline_width"]
    for variant, label, target in (("scalebio", "step ÷ SFT, no LISA", 3.3), ("scalebio_lisa", "step ÷ SFT, LISA", 2.4),
                                   ("scalebio_fused_w", "step ÷ SFT, no LISA, fused w (prototype)", None),
                                   ("scalebio_lisa_fused_w", "step ÷ SFT, LISA, fused w (prototype)", None)):
        v = {a: head[a]["variants"][variant]["median_ratio"] for a in head}
        tgt = f"≤ {target}: {_ok(v['llama'], target)}" if target else "–"
        out.append(f"| {label} (d={width}) | {v['llama']:.2f} | {v['gpt2']:.2f} | {tgt} |")
    for key, label in (("scalebio_floor_ratio", "floor from components, no LISA"),
                       ("scalebio_lisa_floor_ratio", "floor from components, LISA")):
        v = {a: head[a]["components"]["floor"][key] for a in head}
        out.append(f"| {label} | {v['llama']:.2f} | {v['gpt2']:.2f} | – |")
    for variant, label in (("scalebio", "no LISA"), ("scalebio_lisa", "LISA")):
        cells = {a: " / ".join(f"{e['variants'][variant]['median_ratio']:.2f}" for e in r["widths"]) for a, r in step.items()}
        widths = "/".join(str(e["model"]["width"]) for e in step["llama"]["widths"])
        out.append(f"| step ÷ SFT, {label}, widths {widths} | {cells['llama']} | {cells['gpt2']} | – |")
    for key, label in (("scalebio_floor_ratio", "no LISA"), ("scalebio_lisa_floor_ratio", "LISA")):
        cells = {a: " / ".join(f"{e['components']['floor'][key]:.2f}" for e in r["widths"] if "components" in e)
                 for a, r in step.items()}
        out.append(f"| floor from components, {label}, same widths | {cells['llama']} | {cells['gpt2']} | – |")
    cells = {a: " / ".join(f"{e['components']['floor']['lisa_pass_fraction_of_full']:.2f}" for e in r["widths"]
                           if "components" in e) for a, r in step.items()}
    out.append(f"| LISA fwd+bwd ÷ full fwd+bwd, same widths | {cells['llama']} | {cells['gpt2']} | – |")
    mem = _load(folder, "memory")["results"]
    for cfg, label, target in (("scalebio_lisa", "peak ÷ SFT peak, ScaleBiO + LISA", 1.0),
                               ("scalebio", "peak ÷ SFT peak, ScaleBiO no LISA", None),
                               ("scalebio_lisa_keep_all_state", "peak ÷ SFT peak, LISA keep_all_state", None)):
        v = {a: mem[a]["peak_ratio_to_sft"][cfg] for a in mem}
        tgt = f"≤ {target}: {_ok(v['llama'], target)}" if target else "–"
        out.append(f"| {label} | {v['llama']:.2f} | {v['gpt2']:.2f} | {tgt} |")
    state = {a: mem[a]["configs"]["scalebio_lisa"]["steps"][-1]["total_state"] / mem[a]["configs"]["sft"]["steps"][-1]["total_state"]
             for a in mem}
    out.append(f"| params+grads+moments ÷ SFT's, ScaleBiO + LISA (no activations) | {state['llama']:.2f} | "
               f"{state['gpt2']:.2f} | – |")
    for key, label in (("ours_peak_first_last", "step peak MiB, first → last switch, ours"),
                       ("keep_all_peak_first_last", "step peak MiB, first → last switch, keep_all_state")):
        v = {a: mem[a]["lisa_state_growth"][key] for a in mem}
        cells = {a: f"{x[0] / 2**20:.1f} → {x[1] / 2**20:.1f}" for a, x in v.items()}
        out.append(f"| {label} | {cells['llama']} | {cells['gpt2']} | flat / grows |")
    src = _load(folder, "sources")["results"]
    r, st = src["ratio"], src["settings"]
    out.append(f"| step time k=64 ÷ k=2 (Llama d={st['width']}, {st['blocks']} blocks; median of {st['reps']} "
               f"interleaved reps [IQR; range]) | {r['median']:.3f} [{r['q1']:.3f}–{r['q3']:.3f}; "
               f"{r['min']:.2f}–{r['max']:.2f}] | – | within 5%: {'met' if src['within_5_percent'] else 'MISSED'} |")
    w = src["k_dependent_work_ratio"]
    implied = src["ratio_from_k_dependent_work"]
    out.append(f"| k-dependent work alone, k=64 ÷ k=2 ({st['work_reps']} reps [IQR]); step ratio it implies | "
               f"{w['median']:.2f} [{w['q1']:.2f}–{w['q3']:.2f}]; {implied:.4f} | – | "
               f"within 5%: {'met' if abs(implied - 1) <= 0.05 else 'MISSED'} |")
    hyp = _load(folder, "hypergradient")["results"]
    lm = hyp["language_model"]
    out.append(f"| implicit-CG ÷ ScaleBiO, time per update (Llama d={lm['model']['width']}, "
               f"CG {lm['settings']['cg_iters']}) | {lm['time']['implicit_cg']['median_ratio']:.2f} | – | – |")
    out.append(f"| implicit-CG ÷ ScaleBiO, peak memory | {lm['peak_ratio_implicit_to_scalebio']:.2f} | – | – |")
    cx = hyp["convex"]
    for m in ("scalebio", "implicit_cg"):
        p = ", ".join(f"{x:.3f}" for x in cx["methods"][m]["p"])
        out.append(f"| convex LS, final p ({m}); ‖p − p*‖₁ | ({p}); {cx['methods'][m]['l1_error_to_p_star']:.4f} | – | – |")
    out.append(f"| convex LS, p* | ({', '.join(f'{x:.3f}' for x in cx['p_star'])}) | – | – |")
    return out


def u_eps_lines(folder: Path) -> list[str]:
    """benchmarks/u_eps.py's table (u's Adam eps vs eps/α), when results/bench/u_eps.json exists."""
    if not (folder / "u_eps.json").is_file():
        return []
    from .u_eps import table_lines

    return table_lines(folder)


def spread_lines(folder: Path) -> list[str]:
    """benchmarks/reweight_spread.py's table, when a results/bench/*reweight_spread*.json exists."""
    from .reweight_spread import table_lines

    return table_lines(folder)


BLOCKS = {"bench-table": lambda folder: lines(folder) + ([""] + precision_lines(folder) if precision_lines(folder) else []),
          "bench-profile": profile_lines, "bench-u-eps": u_eps_lines, "bench-spread": spread_lines}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/bench")
    parser.add_argument("--update", nargs="*", default=[], metavar="MARKDOWN",
                        help="replace the blocks between <!-- bench-table:start --> and <!-- bench-table:end --> "
                             "(and bench-profile, bench-u-eps, bench-spread, where a file has them) in these files")
    args = parser.parse_args(argv)
    tables = {name: "\n".join(make(Path(args.results))) + "\n" for name, make in BLOCKS.items()}
    if not args.update:
        print("\n".join(tables.values()), end="")  # noqa: T201 (tables for the terminal)
    for name in args.update:
        path = Path(name)
        text = path.read_text()
        if "<!-- bench-table:start -->" not in text:
            raise SystemExit(f"{path}: no <!-- bench-table:start --> ... <!-- bench-table:end --> block to update")
        for block, table in tables.items():
            start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
            if start in text and end in text:
                head, rest = text.split(start, 1)
                text = f"{head}{start}\n{table}{end}{rest.split(end, 1)[1]}"
        path.write_text(text)


if __name__ == "__main__":
    main()
