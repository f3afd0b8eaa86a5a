"""benchmarks/reweight_spread.py on a tiny random GPT-2 (CPU, seconds): every mode runs, a repeated fp32 run ends
bit-identical on a CPU, the comparisons read the right runs, and the table renders every committed file."""

import json
import sys
from pathlib import Path

from conftest import tiny_run_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import reweight_spread  # noqa: E402


def test_spread_runs_every_mode_and_compares_the_right_runs(tmp_path):
    cfg = tiny_run_config(tmp_path, noises=(0.0, 0.5, 0.9), solver={"global_batch": 4, "micro_batch": 4})
    out = tmp_path / "spread.json"
    record = reweight_spread.run(str(cfg), [0, 1], 3, list(reweight_spread.MODES), out, ["threads=1"], label="tiny")
    assert json.loads(out.read_text()) == json.loads(json.dumps(record)) and record["complete"]
    runs, summary = record["results"]["runs"], record["results"]["summary"]
    for seed in ("0", "1"):
        assert set(runs[seed]) == set(reweight_spread.MODES)
        for mode, r in runs[seed].items():
            assert len(r["weights"]) == len(r["counts"]) == 3 and abs(sum(r["final"]) - 1) < 1e-9
            assert r["weights"][-1] == r["final"]
        per = summary["per_seed"][seed]
        assert per["fp32_repeat"]["final_l1"] == 0.0 and per["fp32_repeat"]["first_step_with_other_draws"] is None
        assert set(per) == {"fp32_repeat", "bf16", "bf16_gap_compute"}
        for mode, c in per.items():  # each mode against its own seed's fp32 run, not another seed's
            assert c["final_l1"] == reweight_spread.l1(runs[seed][mode]["final"], runs[seed]["fp32"]["final"])
    between = summary["between_seeds_fp32_l1"]["0-1"]
    assert between == reweight_spread.l1(runs["0"]["fp32"]["final"], runs["1"]["fp32"]["final"]) and between > 0


def test_spread_table_renders_the_committed_files(tmp_path):
    lines = reweight_spread.table_lines(REPO / "results/bench")
    files = list((REPO / "results/bench").glob("*reweight_spread*.json"))
    assert bool(lines) == bool(files)
    assert reweight_spread.table_lines(tmp_path) == []
    for f in files:
        record = json.loads(f.read_text())
        label = record["settings"].get("label") or reweight_spread.LABELS[f.stem]
        assert any(label in line for line in lines), f.name
        for seed, modes in record["results"]["summary"]["per_seed"].items():
            for mode, c in modes.items():
                assert any(f"{c['final_l1']:.4f}" in line and reweight_spread.MODE_LABELS[mode] in line
                           for line in lines), (f.name, seed, mode)
