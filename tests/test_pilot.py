"""experiments/llama3/pilot.py: the protocol pilot's summary (seed agreement, control against 1/k, timing)."""

import json

import pytest

from conftest import llama3_module, write_jsonl

pilot = llama3_module("pilot")
SOURCES = ["a", "b", "c", pilot.CONTROL]


def fake_run(run_dir, trajectory, wall_time_s=100.0, span_s=100.0):
    """A reweighting run folder as `scalebio reweight` leaves it: weights.jsonl, metrics.jsonl, meta.json."""
    run_dir.mkdir(parents=True)
    write_jsonl(run_dir / "weights.jsonl", [{"step": s, "weights": w} for s, w in sorted(trajectory.items())])
    write_jsonl(run_dir / "metrics.jsonl", [{"step": s, "val_loss": 1.0} for s in range(max(trajectory) + 1)])
    (run_dir / "meta.json").write_text(json.dumps({
        "started": "2026-12-03T07:00:00+00:00", "updated": f"2026-12-03T07:{int(span_s // 60):02d}:{int(span_s % 60):02d}+00:00",
        "wall_time_s": wall_time_s}))


def weights(values):
    return dict(zip(SOURCES, values))


def test_summary_agreement_control_and_timing(tmp_path):
    uniform = weights([0.25] * 4)
    runs = tmp_path / "runs"
    # seed 0 and seed 1 rank the sources the same way at step 3; seed 2 reverses them
    fake_run(runs / "seed0", {0: uniform, 3: weights([0.4, 0.3, 0.2, 0.1])})
    fake_run(runs / "seed1", {0: uniform, 3: weights([0.35, 0.3, 0.25, 0.1])}, wall_time_s=60.0, span_s=300.0)
    fake_run(runs / "seed2", {0: uniform, 3: weights([0.1, 0.2, 0.3, 0.4])})
    out = tmp_path / "out"
    summary = pilot.summarise([0, 1, 2], 3, runs, out, ["lisa.shared=true"])
    rho = {pair: rows[-1]["spearman"] for pair, rows in summary["spearman_between_seeds"].items()}
    assert rho == {"0-1": 1.0, "0-2": -1.0, "1-2": -1.0}
    assert [r["step"] for r in summary["spearman_between_seeds"]["0-1"]] == [3]  # step 0 (uniform) is not ranked
    assert summary["per_seed"]["0"]["control_weight"] == 0.1 and summary["per_seed"]["0"]["control_below_uniform"]
    assert not summary["per_seed"]["2"]["control_below_uniform"]
    assert summary["per_seed"]["0"]["seconds_per_step"] == pytest.approx(100 / 3)
    assert summary["per_seed"]["1"]["seconds_per_step"] is None  # resumed: its wall time is the last part only
    assert summary["overrides"] == ["lisa.shared=true"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert len((out / "seed1_metrics.jsonl").read_text().splitlines()) == 3


def test_summary_refuses_a_short_run(tmp_path):
    fake_run(tmp_path / "seed0", {0: weights([0.25] * 4), 1: weights([0.3, 0.3, 0.2, 0.2])})
    with pytest.raises(SystemExit, match="fewer than --steps 5"):
        pilot.summarise([0], 5, tmp_path, tmp_path / "out")


def test_variants_keep_their_own_folders(capsys):
    assert pilot.paths(None) == (pilot.RUNS, pilot.OUT)
    runs, out = pilot.paths("shared")
    assert runs == pilot.RUNS / "shared" and out == pilot.OUT.parent / "pilot_shared"
    with pytest.raises(SystemExit):
        pilot.main(["summarise", "--set", "lisa.shared=true"])
    assert "--set needs --tag" in capsys.readouterr().err


def test_pilot_runs_one_unit_per_seed_and_its_processes_get_the_variant(tmp_path):
    """pilot.py run is a campaign of one reweighting unit per seed; the command each unit's process gets carries
    the variant's overrides (the runner appends --only/--jobs after them)."""
    pilot = llama3_module("pilot")
    c = pilot.campaign([0, 1], 3, ["lisa.shared=true", "solver.global_batch=48"], tmp_path, "shared8")
    assert [u.name for u in c.units] == ["seed0", "seed1"]
    args = pilot.arg_parser().parse_args(c.command[2:] + ["--only", "seed1", "--jobs", "1"])
    assert (args.action, args.steps, args.seeds, args.tag) == ("run", 3, [0, 1], "shared8")
    assert args.overrides == ["lisa.shared=true", "solver.global_batch=48"] and args.only == ["seed1"]
    assert not c.unit("seed0").done() and c.unit("seed0").progress() == (0, 3)
