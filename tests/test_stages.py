"""scalebio.stages: the one runner of every experiment driver (order, skip what is done, publish, status, --jobs,
settings refused when they differ from the campaign's)."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import llama3_module
from scalebio.stages import ABSENT, Campaign, Unit, UnitFailed, counted, makespan_s, settings_diff


def _file_unit(root: Path, name: str, needs=(), estimate_s=3600.0, log=None) -> Unit:
    """A unit whose work is writing ``root/name``; it publishes a copy into ``root/published``."""
    out = root / name

    def run():
        if log is not None:
            log.append(name)
        out.write_text(name)

    def publish():
        (root / "published").mkdir(exist_ok=True)
        (root / "published" / name).write_text(out.read_text())

    return Unit(name, run=run, done=out.is_file, publish=publish, needs=tuple(needs), estimate_s=estimate_s)


def test_units_run_in_order_skip_what_is_done_and_publish(tmp_path):
    ran: list[str] = []
    units = [_file_unit(tmp_path, "a", log=ran), _file_unit(tmp_path, "b", ["a"], log=ran),
             _file_unit(tmp_path, "c", ["a"], log=ran)]
    (tmp_path / "b").write_text("b")  # finished earlier on this machine: not redone, but published
    Campaign("t", units).run()
    assert ran == ["a", "c"]
    assert sorted(p.name for p in (tmp_path / "published").iterdir()) == ["a", "b", "c"]
    Campaign("t", units).run()  # everything done: nothing runs
    assert ran == ["a", "c"]


def test_a_unit_that_does_not_finish_fails_and_order_is_checked(tmp_path):
    broken = Unit("x", run=lambda: None, done=lambda: False)
    with pytest.raises(UnitFailed, match="x"):
        Campaign("t", [broken]).run()
    with pytest.raises(ValueError, match="needs"):
        Campaign("t", [_file_unit(tmp_path, "b", ["a"]), _file_unit(tmp_path, "a")])
    with pytest.raises(RuntimeError, match="needs"):  # --only a unit whose needs are not done
        Campaign("t", [_file_unit(tmp_path, "a"), _file_unit(tmp_path, "b", ["a"])]).run(only=["b"])


def test_status_names_states_hours_left_and_the_command(tmp_path):
    units = [_file_unit(tmp_path, "a", estimate_s=1800), _file_unit(tmp_path, "b", ["a"], estimate_s=7200),
             _file_unit(tmp_path, "c", estimate_s=3600), _file_unit(tmp_path, "d", ["b"], estimate_s=3600)]
    (tmp_path / "a").write_text("a")
    units[1].progress = lambda: (15, 60)  # b is in flight: a quarter done
    units[1].where = tmp_path / "ckpt"
    text = Campaign("t", units, command=["python", "drive.py", "run"]).status(jobs=2, cores=2)
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| done |" in rows["a"] and "| to do |" in rows["c"]
    assert "| partial | step 15 of 60, no checkpoint in " + str(tmp_path / "ckpt") + " yet" in rows["b"]
    assert "| waiting | needs b |" in rows["d"]
    # left: b's 3/4 of 2 h, c 1 h, d 1 h = 3.5 stream-hours; d waits for b, so 1.5 + 1 = 2.5 h on two streams
    assert "Left: 3.5 stream-hours, about 2.5 h with 2 units at once on 2 cores" in text
    assert "python drive.py run --jobs 2" in text
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "step_0000015.pt").write_text("")
    text = Campaign("t", units, command=["python", "drive.py", "run"]).status(jobs=2)
    assert "| partial | step 15 of 60, checkpoint in " + str(tmp_path / "ckpt") + " |" in text


def test_hours_left_is_the_makespan_not_the_stream_hours_over_the_jobs():
    hour = 3600.0
    three = {"a": hour, "b": hour, "c": hour}
    assert makespan_s(three, {}, jobs=1, cores=2) == pytest.approx(3 * hour)
    assert makespan_s(three, {}, jobs=2, cores=2) == pytest.approx(2 * hour)  # a unit is not split: not 1.5 h
    assert makespan_s(three, {}, jobs=3, cores=2) == pytest.approx(1.5 * hour)  # three share two cores
    assert makespan_s(three, {}, jobs=3, cores=4) == pytest.approx(hour)  # one-thread units: a core each at most
    assert makespan_s(three, {"b": ("a",), "c": ("b",)}, jobs=3, cores=2) == pytest.approx(3 * hour)  # a chain
    # Two units in flight with 0.7 and 0.8 h left, then three of 1 h. Three at once on two cores, at 2/3 speed each:
    # p ends at 1.05 h, q at 1.2 h, x at 1.5 h; then y and z (0.7, 0.8 h left) run at full speed: 2.3 h, where two
    # at once take 2.7 h and the stream-hours over the cores would say 2.25 h.
    tail = {"p": 0.7 * hour, "q": 0.8 * hour, "x": hour, "y": hour, "z": hour}
    assert makespan_s(tail, {}, jobs=3, cores=2) == pytest.approx(2.3 * hour)
    assert makespan_s(tail, {}, jobs=2, cores=2) == pytest.approx(2.7 * hour)  # p, x, z on one stream; q, y on the other
    with pytest.raises(ValueError, match="wait for each other"):
        makespan_s({"a": hour, "b": hour}, {"a": ("b",), "b": ("a",)}, jobs=2, cores=2)


def test_settings_diff_names_each_setting():
    assert settings_diff({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 1, "c": 5}, "e": 4}) == [
        ("a.c", 2, 5), ("d", 3, ABSENT), ("e", ABSENT, 4)]


DRIVER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {src!r})
from scalebio.stages import Campaign, Unit

root = Path({root!r})

def unit(name, needs=()):
    def run():
        (root / (name + ".start")).write_text(repr(time.time()))
        time.sleep(1.5)
        (root / name).write_text(repr(time.time()))
    return Unit(name, run=run, done=(root / name).is_file, needs=needs)

campaign = Campaign("t", [unit("a"), unit("b"), unit("c", ("a", "b"))], command=[sys.executable, __file__, "run"],
                    logs=root / "logs")
args = sys.argv[1:]
only = args[args.index("--only") + 1:args.index("--jobs")] if "--only" in args else None
campaign.run(jobs=int(args[args.index("--jobs") + 1]), only=only)
"""


@pytest.mark.slow
def test_two_jobs_run_two_units_at_once_in_their_own_processes(tmp_path):
    import subprocess

    src = str(Path(__file__).resolve().parents[1] / "src")
    script = tmp_path / "drive.py"
    script.write_text(textwrap.dedent(DRIVER.format(src=src, root=str(tmp_path))))
    subprocess.run([sys.executable, str(script), "run", "--jobs", "2"], check=True, timeout=120)
    span = {n: (float((tmp_path / f"{n}.start").read_text()), float((tmp_path / n).read_text())) for n in "abc"}
    assert span["a"][0] < span["b"][1] and span["b"][0] < span["a"][1]  # a and b overlapped
    assert span["c"][0] >= max(span["a"][1], span["b"][1])  # c waited for both
    assert {p.name for p in (tmp_path / "logs").iterdir()} == {"a.log", "b.log", "c.log"}


def test_protocol_refuses_a_unit_with_other_settings(tmp_path, caplog):
    protocol = llama3_module("protocol")
    p = protocol.Protocol(smoke=True, runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    p.check_settings()  # the campaign starts: its settings are recorded
    record = json.loads((tmp_path / "results" / "campaign.json").read_text())
    assert record["settings"]["reweight"]["precision"] == "fp32" and record["settings"]["n"] == protocol.SMOKE["n"]
    assert "seed" not in record["settings"]["reweight"] and "threads" not in record["settings"]["finetune"]
    p.check_settings()  # the same settings: accepted
    # The thread count is not a campaign setting; another learning rate is.
    protocol.Protocol(smoke=True, runs_root=tmp_path / "runs", results_root=tmp_path / "results",
                      threads=2).check_settings()
    record["settings"]["reweight"]["solver"]["lr_lambda"] = 0.1
    record["settings"]["arms"].pop("uniform_real")
    (tmp_path / "results" / "campaign.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match=r"reweight\.solver\.lr_lambda: 0\.1 in the campaign, 0\.05 now") as e:
        p.check_settings()
    assert "arms.uniform_real" in str(e.value)
    # A field the campaign's record lacks (added to the code since) is named in a warning, not refused.
    record["settings"]["reweight"]["solver"]["lr_lambda"] = 0.05
    record["settings"]["arms"] = protocol.ARMS
    del record["settings"]["reweight"]["solver"]["tau"]
    (tmp_path / "results" / "campaign.json").write_text(json.dumps(record))
    p.check_settings()
    assert "reweight.solver.tau" in caplog.text


def test_protocol_units_and_status(tmp_path):
    protocol = llama3_module("protocol")
    p = protocol.Protocol(smoke=True, runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    campaign = p.campaign()
    names = [u.name for u in campaign.units]
    assert names[:5] == ["pool", "reweight_seed0", "reweight_seed1", "reweight_seed2", "base"]
    assert names[5:] == [f"{arm}_ft{i}" for i in range(3) for arm in ("learned", "uniform", "uniform_real")]
    assert campaign.unit("learned_ft1").needs == ("pool", "reweight_seed1")
    assert campaign.unit("uniform_real_ft1").needs == ("pool",)
    # A reweighting seed in flight: its logged steps against the preset's.
    run_dir = tmp_path / "runs" / "reweight_seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(2)))
    status = campaign.status()
    assert "| reweight_seed0 | partial | step 2 of 3, no checkpoint in " + str(run_dir / "checkpoints") in status
    assert "| learned_ft0 | waiting | needs pool, reweight_seed0 |" in status
    # An arm in flight: its fine-tuning steps logged against the fine-tuning preset's.
    ft_dir = tmp_path / "runs" / "uniform_ft1" / "finetune"
    ft_dir.mkdir(parents=True)
    (ft_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(2)))
    steps = p.finetune_config(tmp_path / "runs" / "uniform_ft1", 1).steps
    assert f"| uniform_ft1 | partial | step 2 of {steps}, no checkpoint in {ft_dir / 'checkpoints'}" in campaign.status()
    assert " run --runs " + str(tmp_path / "runs") in status and status.rstrip("`\n").endswith("--smoke --jobs 2")


def test_a_finished_reweighting_seed_stays_finished_when_its_pool_moves(tmp_path):
    """The campaign continues on another machine or folder: a seed whose config.yaml equals the preset but for the
    pool's path and the thread count is done; one with another learning rate is not."""
    import yaml

    from scalebio.config import to_dict

    protocol = llama3_module("protocol")
    p = protocol.Protocol(smoke=True, runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    cfg = p.reweight_config(0)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True)
    assert not p.reweight_done(run_dir, cfg)
    saved = to_dict(cfg)
    saved["data"]["root"], saved["threads"] = "/elsewhere/protocol_pool", 7
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    (run_dir / "weights.json").write_text("{}")
    assert p.reweight_done(run_dir, cfg)
    saved["solver"]["lr_lambda"] = 0.5
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert not p.reweight_done(run_dir, cfg)


def test_fingerprints_compare_within_the_cross_cpu_tolerance():
    protocol = llama3_module("protocol")
    a = {"weights": {"x": 0.5, "y": 0.5}, "finetune_losses": [2.0, 1.5], "sha256": {}}
    assert protocol.fingerprint_differs(a, a) == ""
    last_bits = {"weights": {"x": 0.5 * (1 + 1e-7), "y": 0.5}, "finetune_losses": [2.0, 1.5 * (1 - 1e-7)]}
    assert protocol.fingerprint_differs(a, last_bits) == ""
    moved = {"weights": {"x": 0.5001, "y": 0.4999}, "finetune_losses": [2.0, 1.5]}
    assert "weight of x" in protocol.fingerprint_differs(a, moved)
    assert "fine-tuning loss 1" in protocol.fingerprint_differs(a, {**a, "finetune_losses": [2.0, 1.49]})


@pytest.mark.slow
def test_the_fingerprint_catches_a_change_in_what_the_code_computes(tmp_path, monkeypatch):
    """A campaign refuses code whose numbers moved: the toy-size fingerprint of the protocol's code path is the same
    when run twice, and differs when the learning-rate schedule changes by 1%."""
    import scalebio.conventions as conventions

    protocol = llama3_module("protocol")
    pool = tmp_path / "pool"
    build_pool = llama3_module("build_pool")
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not shared.is_dir():
        pytest.skip("../shared/data not present")
    build_pool.build(shared, pool, per_source=24, control=8, stand_ins=False)
    first = protocol.fingerprint(pool)
    assert protocol.fingerprint_differs(first, protocol.fingerprint(pool)) == ""
    shape = conventions.lr_shape
    monkeypatch.setattr(conventions, "lr_shape", lambda *a, **k: 1.01 * shape(*a, **k))
    assert protocol.fingerprint_differs(first, protocol.fingerprint(pool))


STOP_DRIVER = """
import signal, sys, time
from pathlib import Path
sys.path.insert(0, {src!r})
from scalebio.stages import Campaign, CampaignStopped, Unit

root = Path({root!r})

def unit(name, needs=()):
    def run():
        def checkpoint(signum, frame):  # what a run's SignalWatch does: finish the step, checkpoint, exit
            (root / (name + ".ckpt")).write_text(signal.Signals(signum).name)
            sys.exit(128 + signum)
        signal.signal(signal.SIGUSR1, checkpoint)
        (root / (name + ".start")).write_text("")
        time.sleep(60)
        (root / name).write_text("")
    return Unit(name, run=run, done=(root / name).is_file, needs=needs,
                publish_partial=lambda: (root / (name + ".partial")).write_text(""))

campaign = Campaign("t", [unit("a"), unit("b"), unit("c")], command=[sys.executable, __file__, "run"],
                    logs=root / "logs")
args = sys.argv[1:]
only = args[args.index("--only") + 1:args.index("--jobs")] if "--only" in args else None
try:
    campaign.run(jobs=int(args[args.index("--jobs") + 1]), only=only)
except CampaignStopped as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
"""


@pytest.mark.slow
def test_a_signal_to_the_driver_reaches_the_units_in_flight_and_starts_nothing_new(tmp_path):
    """SIGUSR1 (a scheduler's warning) to a --jobs 2 driver: both units in flight get it and checkpoint, their
    trajectories are published, the third unit never starts, and the driver exits 128 + 10 saying how to continue.
    Catches a driver that dies and leaves its units running, or one that goes on to start the next unit."""
    import signal
    import subprocess
    import time

    src = str(Path(__file__).resolve().parents[1] / "src")
    script = tmp_path / "drive.py"
    script.write_text(textwrap.dedent(STOP_DRIVER.format(src=src, root=str(tmp_path))))
    proc = subprocess.Popen([sys.executable, str(script), "run", "--jobs", "2"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ((tmp_path / "a.start").is_file() and (tmp_path / "b.start").is_file()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGUSR1
    assert "stopped by SIGUSR1" in err and "run the same command again" in err
    for name in "ab":
        assert (tmp_path / f"{name}.ckpt").read_text() == "SIGUSR1"
        assert (tmp_path / f"{name}.partial").is_file()
    assert not (tmp_path / "c.start").exists()


def test_a_unit_resumed_across_processes_records_the_wall_time_of_all(tmp_path):
    """An arm stopped by a signal and continued later costs both processes: unit.json sums them (and the measured
    speeds, the hours left, read that)."""
    protocol = llama3_module("protocol")
    p = protocol.Protocol(smoke=True, runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    work = tmp_path / "runs" / "uniform_ft1"
    now = time.time()
    for spent in (600.0, 300.0):  # two processes stopped before the unit was done
        with pytest.raises(KeyboardInterrupt):
            with counted(work, now - spent):
                raise KeyboardInterrupt
    with counted(work, now - 60.0):  # the third finishes: nothing added to the earlier processes
        pass
    p._unit_file(work, "uniform_ft1", now - 60.0, {"arm": "uniform"})
    record = json.loads((work / "unit.json").read_text())
    assert record["processes"] == 3 and record["wall_time_s"] == pytest.approx(960.0, abs=5.0)
    assert record["started"] < record["finished"] and record["arm"] == "uniform"
    fresh = tmp_path / "runs" / "uniform_ft2"  # one process: its own time, no count of processes
    fresh.mkdir(parents=True)
    p._unit_file(fresh, "uniform_ft2", now - 60.0)
    record = json.loads((fresh / "unit.json").read_text())
    assert "processes" not in record and record["wall_time_s"] == pytest.approx(60.0, abs=5.0)
