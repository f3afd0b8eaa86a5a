"""Print the README's table of measured numbers from results/bench/*.json (Markdown).

    python -m benchmarks.table --results results/bench
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text())


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
    out.append(f"| step time k=64 ÷ k=2 (Llama d={src['settings']['width']}) | "
               f"{1 + src['relative_difference']:.3f} | – | within 5%: {'met' if src['within_5_percent'] else 'MISSED'} |")
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="results/bench")
    parser.add_argument("--update", nargs="*", default=[], metavar="MARKDOWN",
                        help="replace the block between <!-- bench-table:start --> and <!-- bench-table:end --> in these files")
    args = parser.parse_args(argv)
    table = "\n".join(lines(Path(args.results))) + "\n"
    if not args.update:
        print(table, end="")  # noqa: T201 (a table for the terminal)
    for name in args.update:
        path = Path(name)
        text = path.read_text()
        if START not in text or END not in text:
            raise SystemExit(f"{path}: no {START} ... {END} block to update")
        head, rest = text.split(START, 1)
        path.write_text(f"{head}{START}\n{table}{END}{rest.split(END, 1)[1]}")


START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


if __name__ == "__main__":
    main()
