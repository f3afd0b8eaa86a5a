"""Issue 12: a run directory survives kills and edits of its inputs; every bad value is a clear error. Issue 22:
signals end a run with a checkpoint, one process per run directory, weights files checked wherever read, data
errors name the line, and what the method promises (shared LISA blocks, one batch for u and w, resampling by
the weights) is tested.

One test (or a few) per item of each issue, numbered as there. Tiny random GPT-2 runs of a few steps, or the
run-directory code alone. The kill-at-every-moment check is tests/test_kill_resume.py (slow); the 2-rank signal
paths are the slow tests at the end.
"""

import errno
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, alpaca_records, tiny_run_config, write_jsonl
from scalebio.cli import build_parser, main, parse_args
from scalebio.config import ConfigError, load_config, to_dict
from scalebio.data import DataError, read_records
from scalebio.finetune import FinetuneConfig, finetune
from scalebio.models import build_model
from scalebio.resample import draw_counts_and_order, pool_from_run, resample
from scalebio.results import (STALE_AFTER_S, ResumeError, RunDir, RunDirError, RunInterrupted, RunLock,
                              RunLockedError, SignalWatch, replace_dir)
from scalebio.reweight import Reweighting, run_reweight
from scalebio.solver import NonFiniteLossError
from scalebio.files import file_sha256
from scalebio.weights import (WeightsFileError, load_probabilities, load_weights, weights_record,
                              write_weights)


def _cfg(tmp_path, *overrides, **top):
    return load_config(tiny_run_config(tmp_path, **top), list(overrides))


def _metrics_steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


# -- 1. a kill while the tokenizer is saved ------------------------------------------------------------------


@pytest.mark.parametrize("leftover", ["empty", "partial"])
def test_1_partial_tokenizer_folder_is_rebuilt(tmp_path, leftover):
    """A tokenizer folder left empty or half-written (the old, non-atomic save killed midway) is detected and
    rebuilt; the run ends as a fresh run does."""
    cfg = _cfg(tmp_path / "a", "solver.steps=2")
    fresh = run_reweight(cfg, progress=False)
    bad = tmp_path / "b"
    cfg_b = _cfg(bad, "solver.steps=2")
    tok = Path(cfg_b.run_dir) / "tokenizer"
    tok.mkdir(parents=True)
    if leftover == "partial":  # what save_pretrained writes first, without the tokenizer itself
        (tok / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    record = run_reweight(cfg_b, progress=False)
    assert record["lambda"] == fresh["lambda"]
    assert (tok / "tokenizer.json").is_file() and (tok / "scalebio_tokenizer.json").is_file()


def test_1_folder_replacement_is_atomic(tmp_path):
    """replace_dir: a failure while filling leaves the old folder untouched and no temporary behind."""
    final = tmp_path / "tokenizer"
    replace_dir(final, lambda d: (d / "a.txt").write_text("old"), "tokenizer")

    def broken(d):
        (d / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_dir(final, broken, "tokenizer")
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]
    replace_dir(final, lambda d: (d / "b.txt").write_text("new"), "tokenizer")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]


# -- 2. a stale tokenizer -------------------------------------------------------------------------------------


def test_2_tokenizer_trained_on_other_data_is_retrained(tmp_path):
    """The data change after the tokenizer was trained (no checkpoint yet): the run trains a new one, equal to
    the one a fresh run directory gets."""
    cfg = _cfg(tmp_path / "a")
    Reweighting(cfg)  # trains and saves the tokenizer; no step, no checkpoint
    new = alpaca_records(32, seed=7, prefix="changed")
    write_jsonl(tmp_path / "a" / "data" / "s0.jsonl", new)
    again = Reweighting(load_config(tmp_path / "a" / "config.yaml"))
    cfg_c = _cfg(tmp_path / "c")
    write_jsonl(tmp_path / "c" / "data" / "s0.jsonl", new)
    fresh = Reweighting(cfg_c)
    assert again.tokenizer.get_vocab() == fresh.tokenizer.get_vocab()


# -- 3. resume checks contents --------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [32, 20])
def test_3_resume_refuses_a_changed_data_file(tmp_path, count):
    cfg = _cfg(tmp_path)
    run_reweight(cfg, stop_after=2, progress=False)
    src = tmp_path / "data" / "s1.jsonl"
    old = file_sha256(src)
    write_jsonl(src, alpaca_records(count, seed=5, noise=0.5, prefix="other"))
    new = file_sha256(src)
    with pytest.raises(ResumeError, match=rf"s1\.jsonl: sha256 {old} \(checkpoint\) vs {new} \(now\)"):
        run_reweight(load_config(tmp_path / "config.yaml"), progress=False)
    assert not (Path(cfg.run_dir) / "weights.json").exists()


def test_3_weights_record_the_digest_of_the_data_read(tmp_path):
    cfg = _cfg(tmp_path, "solver.steps=1")
    record = run_reweight(cfg, progress=False)
    files = record["provenance"]["data_files"]
    assert files["noise_0.50"]["sha256"] == file_sha256(tmp_path / "data" / "s1.jsonl")
    assert files["validation"]["sha256"] == file_sha256(tmp_path / "data" / "val.jsonl")


# -- 4. resume=false ------------------------------------------------------------------------------------------


def test_4_resume_false_clears_the_old_run(tmp_path):
    """An earlier run (another seed) stopped at step 4; a resume=false run of seed 1 stops at step 2; a plain
    rerun of seed 1 resumes the new run, not the old one, and ends where an uninterrupted seed-1 run ends."""
    path = tiny_run_config(tmp_path, solver={"steps": 6})
    run_reweight(load_config(path, ["seed=0"]), stop_after=4, progress=False)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step_0000004.pt").is_file()
    run_reweight(load_config(path, ["seed=1", "resume=false"]), stop_after=2, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002.pt"]
    assert _metrics_steps(run) == [0, 1]
    resumed = run_reweight(load_config(path, ["seed=1"]), progress=False)
    assert _metrics_steps(run) == list(range(6))
    other = tiny_run_config(tmp_path / "ref", solver={"steps": 6})
    ref = run_reweight(load_config(other, ["seed=1"]), progress=False)
    assert resumed["lambda"] == ref["lambda"]


# -- 5. steps and learning rates ------------------------------------------------------------------------------


@pytest.mark.parametrize("override, field", [
    ("solver.steps=0", "solver.steps"), ("solver.steps=-3", "solver.steps"),
    ("solver.lr_w=0", "solver.lr_w"), ("solver.lr_u=-1e-3", "solver.lr_u"), ("solver.lr_lambda=0", "solver.lr_lambda"),
    ("solver.lr_lambda=.inf", "solver.lr_lambda"), ("solver.weight_decay_w=-0.1", "solver.weight_decay_w"),
    ("solver.weight_decay_lambda=-1", "solver.weight_decay_lambda"),
])
def test_5_bad_steps_and_learning_rates_name_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError, match=rf"config.yaml: {field}: "):
        load_config(tiny_run_config(tmp_path), [override])


def test_5_null_steps_is_one_epoch(tmp_path):
    rw = Reweighting(_cfg(tmp_path, "solver.steps=null"))
    assert rw.total_steps == (32 + 32) // 8
    load_config(tiny_run_config(tmp_path), ["solver.weight_decay_u=0", "solver.steps=1"])  # zero decay is fine


# -- 6. nothing non-finite is written -------------------------------------------------------------------------


def test_6_non_finite_lambda_stops_before_anything_is_written(tmp_path):
    """A huge lr_lambda makes λ non-finite at the second step (AdamW's decay of a ±1e300 λ); the run stops
    there: no weights.json, no log line with NaN, every checkpoint finite, meta.json failed."""
    cfg = _cfg(tmp_path, "solver.lr_lambda=1e300", "solver.steps=4", "checkpoint_every=1")
    with pytest.raises(NonFiniteLossError, match=r"non-finite λ .* at step \d"):
        run_reweight(cfg, progress=False)
    run = Path(cfg.run_dir)
    assert not (run / "weights.json").exists()
    assert _metrics_steps(run) == [0]
    for line in (run / "weights.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-finite {c} in weights.jsonl"))
    for ckpt in (run / "checkpoints").glob("step_*.pt"):
        assert torch.isfinite(torch.load(ckpt, weights_only=False)["solver"]["lam"]).all()
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "failed" and "non-finite λ" in meta["error"]


def test_6_non_finite_parameters_are_never_checkpointed(tmp_path):
    rw = Reweighting(_cfg(tmp_path))
    rw._start()
    with torch.no_grad():
        next(rw.solver.w.parameters()).view(-1)[3] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"parameters of w"):
        rw._checkpoint(1)
    assert not list((Path(rw.cfg.run_dir) / "checkpoints").glob("*"))


def test_6_non_finite_lambda_is_never_a_weights_file(tmp_path):
    rw = Reweighting(_cfg(tmp_path))
    rw._start()
    with torch.no_grad():
        rw.solver.lam[1] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"λ"):
        rw._write_weights(4)
    assert not (Path(rw.cfg.run_dir) / "weights.json").exists()


# -- 7. checkpoint temporaries --------------------------------------------------------------------------------


def test_7_temporaries_of_a_killed_save_are_removed_on_start(tmp_path):
    cfg = _cfg(tmp_path)
    run = Path(cfg.run_dir)
    (run / "checkpoints").mkdir(parents=True)
    left = [run / "checkpoints" / ".step_abc123.tmp", run / ".meta.json.x1.tmp", run / ".weights.json.x2.tmp"]
    for p in left:
        p.write_bytes(b"partial")
    (run / ".tokenizer.x3.tmp").mkdir()
    keep = run / "notes.txt"
    keep.write_text("mine")
    Reweighting(cfg)
    assert not any(p.exists() for p in left) and not (run / ".tokenizer.x3.tmp").exists()
    assert keep.read_text() == "mine"


def test_7_another_ranks_cleanup_cannot_take_the_write_probe(tmp_path, monkeypatch):
    """On two ranks, rank 0 clears ``.*.tmp`` while rank 1 probes the folder's writability (CI saw rank 1 fail
    with "not writable (No such file or directory)"). The cleanup is made to run inside the probe."""
    folder = tmp_path / "out"
    rank0 = RunDir(folder)
    real = tempfile.mkstemp

    def probe_then_cleanup(*a, **k):
        made = real(*a, **k)
        rank0.remove_temporaries()
        return made

    monkeypatch.setattr(tempfile, "mkstemp", probe_then_cleanup)
    RunDir(folder)  # rank 1: must not fail
    monkeypatch.undo()
    assert not list(folder.glob(".write_probe.*"))
    # rank 0's clear() removes checkpoints/ between rank 1's look at it and its probe there
    (folder / "checkpoints").mkdir()

    def clear_then_probe(*a, **k):
        if Path(k["dir"]).name == "checkpoints":
            rank0.clear()
        return real(*a, **k)

    monkeypatch.setattr(tempfile, "mkstemp", clear_then_probe)
    RunDir(folder)


# -- 8. meta.json after a failure -----------------------------------------------------------------------------


def test_8_meta_says_failed_after_an_error(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    rw = Reweighting(cfg)

    def boom(*a, **k):
        raise RuntimeError("device lost")

    monkeypatch.setattr(rw.solver, "step", boom)
    with pytest.raises(RuntimeError):
        rw.run_loop(progress=False)
    meta = json.loads((Path(cfg.run_dir) / "meta.json").read_text())
    assert meta["status"] == "failed" and meta["error"] == "RuntimeError: device lost"


def test_8_meta_says_failed_when_a_restart_is_refused(tmp_path):
    """The error comes before the loop (here: a data file changed under a stopped run)."""
    cfg = _cfg(tmp_path)
    run_reweight(cfg, stop_after=1, progress=False)
    assert json.loads((Path(cfg.run_dir) / "meta.json").read_text())["status"] == "stopped"
    write_jsonl(tmp_path / "data" / "val.jsonl", alpaca_records(16, seed=3, prefix="val"))
    with pytest.raises(ResumeError):
        run_reweight(load_config(tmp_path / "config.yaml"), progress=False)
    meta = json.loads((Path(cfg.run_dir) / "meta.json").read_text())
    assert meta["status"] == "failed" and "val.jsonl" in meta["error"]


# -- 9. messages, not tracebacks ------------------------------------------------------------------------------


def test_9_run_dir_that_is_a_file(tmp_path, caplog):
    path = tiny_run_config(tmp_path)
    (tmp_path / "afile").write_text("x")
    with caplog.at_level(logging.ERROR, logger="scalebio"):
        assert main(["reweight", str(path), f"run_dir={tmp_path / 'afile'}", "--no-progress"]) == 1
    assert "afile: run directory exists and is not a directory" in caplog.text


@pytest.mark.parametrize("which", ["run", "checkpoints"])
def test_9_read_only_run_directory(which):
    """A run directory (or its checkpoints/) without write permission: RunDirError naming it. Run as root, the
    check is made with the effective uid of nobody (root ignores permissions)."""
    base = Path(tempfile.mkdtemp(prefix="scalebio-ro-"))
    try:
        os.chmod(base, 0o755)
        run = base / "run"
        (run / "checkpoints").mkdir(parents=True)
        target = run if which == "run" else run / "checkpoints"
        os.chmod(run, 0o777)  # writable by anyone, unless it is the target
        os.chmod(run / "checkpoints", 0o777)
        os.chmod(target, 0o555)
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(65534)
        try:
            with pytest.raises(RunDirError, match=rf"{target}: not writable"):
                RunDir(run)
        finally:
            if as_root:
                os.seteuid(0)
    finally:
        for p in (run / "checkpoints", run):
            os.chmod(p, 0o755)
        import shutil

        shutil.rmtree(base)


def test_9_heads_must_divide_the_width(tmp_path):
    with pytest.raises(ConfigError, match=r"model.config_overrides.n_embd: 30 is not divisible"):
        load_config(tiny_run_config(tmp_path), ["model.config_overrides.n_embd=30", "model.config_overrides.n_head=4"])
    cfg = load_config(tiny_run_config(tmp_path), ["model.config_overrides.n_embd=30", "model.config_overrides.n_head=null"])
    cfg.model.config_overrides.pop("n_head")  # the architecture's default (12 heads) does not divide 30 either
    with pytest.raises(ConfigError, match=r"model.config_overrides.n_embd: 30 is not divisible .*\(12\)"):
        build_model(cfg.model, vocab_size=300)


def test_9_directory_as_source_path(tmp_path):
    (tmp_path / "data" / "adir").mkdir(parents=True)
    cfg = _cfg(tmp_path, "data.sources.0.path=data/adir")
    with pytest.raises(DataError, match=r"adir: is a directory, expected a \.json or \.jsonl file"):
        run_reweight(cfg, progress=False)


def test_9_max_length_beyond_the_models_positions_is_checked_up_front(tmp_path):
    cfg = _cfg(tmp_path, "data.max_length=256")  # the tiny model has n_positions 128
    with pytest.raises(ConfigError, match=r"data.max_length: 256 is larger than the model's 128 positions"):
        Reweighting(cfg)
    assert not (Path(cfg.run_dir) / "tokenizer").exists()  # before any work


# -- 10. resample ---------------------------------------------------------------------------------------------


def _weights(tmp_path, names):
    path = tmp_path / "w.json"
    write_weights(path, weights_record(names, torch.zeros(len(names), dtype=torch.float64), {}, {}))
    return path


POOL = {"a": [{"text": f"a{i}"} for i in range(10)], "b": [{"text": f"b{i}"} for i in range(10)],
        "c": [{"text": f"c{i}"} for i in range(10)]}


def test_10_weights_must_cover_every_pool_source(tmp_path):
    with pytest.raises(ValueError, match=r"no weight for pool source\(s\) 'c'"):
        resample(_weights(tmp_path, ["a", "b"]), POOL, 5, 0, tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match=r"sources 'x', 'y' have a weight but no data"):
        resample(_weights(tmp_path, ["a", "b", "c", "x", "y"]), POOL, 5, 0, tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_10_n_larger_than_the_pool_needs_replace(tmp_path):
    with pytest.raises(ValueError, match=r"--n: 31 is larger than the pool \(30 examples.*--replace"):
        resample(None, POOL, 31, 0, tmp_path / "o.jsonl")
    manifest = resample(None, POOL, 45, 0, tmp_path / "o.jsonl", replace=True)
    assert manifest["replace"] is True and sum(manifest["repeated"].values()) >= 15
    assert sum(1 for _ in (tmp_path / "o.jsonl").open()) == 45


@pytest.mark.parametrize("n", [0, -5])
def test_10_n_must_be_positive(tmp_path, n):
    with pytest.raises(ValueError, match=rf"--n: {n}: .* >= 1"):
        resample(None, POOL, n, 0, tmp_path / "o.jsonl")


def test_10_out_that_is_a_directory(tmp_path):
    with pytest.raises(ValueError, match=r"--out: .* is a directory"):
        resample(None, POOL, 3, 0, tmp_path)


def test_10_resample_from_another_directory(tmp_path, monkeypatch):
    """The run was started from the config's folder with a relative config path; resample runs elsewhere."""
    tiny_run_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("config.yaml", ["solver.steps=1"])
    run_reweight(cfg, progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["resample", str(tmp_path / "run"), "--n", "10", "--out", "s.jsonl"]) == 0
    assert sum(1 for _ in (elsewhere / "s.jsonl").open()) == 10
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert Path(saved["source_file"]).is_absolute()


def test_10_cli_replace_flag(tmp_path):
    cfg = _cfg(tmp_path, "solver.steps=1")
    run_reweight(cfg, progress=False)
    out = tmp_path / "big.jsonl"
    assert main(["resample", cfg.run_dir, "--n", "500", "--out", str(out)]) == 1
    assert main(["resample", cfg.run_dir, "--n", "500", "--out", str(out), "--replace"]) == 0
    manifest = json.loads(out.with_name("big.jsonl.manifest.json").read_text())
    assert manifest["replace"] and sum(manifest["repeated"].values()) > 0


# -- 11. overrides after options ------------------------------------------------------------------------------


def test_11_options_and_overrides_mix_in_any_order():
    parser = build_parser()
    args = parse_args(parser, ["reweight", "c.yaml", "solver.steps=3", "--no-progress", "solver.steps=5", "seed=1"])
    assert args.no_progress and args.overrides == ["solver.steps=3", "solver.steps=5", "seed=1"]
    args = parse_args(parser, ["reweight", "--stop-after", "2", "c.yaml", "--no-progress", "a=1"])
    assert args.stop_after == 2 and args.overrides == ["a=1"] and args.config == "c.yaml"
    with pytest.raises(SystemExit):
        parse_args(parser, ["reweight", "c.yaml", "--no-progress", "--bogus"])
    with pytest.raises(SystemExit):
        parse_args(parser, ["resample", "run", "--n", "3", "--out", "o.jsonl", "a=1"])  # resample takes no overrides


def test_11_cli_run_with_an_override_after_a_flag(tmp_path):
    path = tiny_run_config(tmp_path)
    assert main(["reweight", str(path), "--no-progress", "solver.steps=1"]) == 0
    assert _metrics_steps(tmp_path / "run") == [0]


# -- 12. a truncated log line ---------------------------------------------------------------------------------


def test_12_partial_last_log_line_is_dropped_on_resume(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    full = run_reweight(_cfg(tmp_path / "ref"), progress=False)
    run_reweight(cfg, stop_after=2, progress=False)
    run = Path(cfg.run_dir)
    for name in ("metrics.jsonl", "weights.jsonl"):
        with open(run / name, "a") as f:
            f.write('{"step": 2, "val_lo')  # a kill in the middle of a write
    with caplog.at_level(logging.WARNING):
        resumed = run_reweight(load_config(tmp_path / "config.yaml"), progress=False)
    assert "dropped a partial last line" in caplog.text
    assert resumed["lambda"] == full["lambda"]
    assert (run / "weights.jsonl").read_bytes() == (tmp_path / "ref" / "run" / "weights.jsonl").read_bytes()


def test_12_other_malformed_log_lines_are_errors(tmp_path):
    run = RunDir(tmp_path / "run")
    (run.path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1\n{"step": 2}\n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2: malformed JSON line"):
        run.truncate_logs(2)
    (run.path / "metrics.jsonl").write_text('{"step": 0}\n{"nostep": 1}\n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl:2: expected an object with an integer 'step'"):
        run.truncate_logs(2)
    (run.path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"st')
    run.truncate_logs(2)
    assert (run.path / "metrics.jsonl").read_text() == '{"step": 0}\n{"step": 1}\n'


# =============================================================================================================
# Issue 22: signals, one process per run directory, weights files checked where read, error locations, and
# tests for what the method promises. Numbered as the issue's items.

SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT, "SIGUSR1": signal.SIGUSR1}


@pytest.fixture(autouse=True)
def _restore_threads():
    """The runs below set one torch thread (threads=1: fast on a busy machine); later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _final_state(run: Path) -> dict:
    return torch.load(sorted((run / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 5-step run (checkpoints every 4 steps) that nothing interrupts."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = load_config(tiny_run_config(tmp, solver={"steps": 5}, checkpoint_every=4, threads=1))
    threads = torch.get_num_threads()
    yield run_reweight(cfg, progress=False), Path(cfg.run_dir)
    torch.set_num_threads(threads)


# -- 22.1 signals ---------------------------------------------------------------------------------------------


def test_22_1_sigterm_checkpoints_then_resumes_bit_identically(tmp_path, monkeypatch, caplog, uninterrupted):
    """SIGTERM during step 2 (the hook sends it at the end of the second step's work): the step completes, a
    checkpoint of 2 steps is written (checkpoint_every is 4), meta.json says interrupted by SIGTERM, and the CLI
    exits 143 with one line naming the command that resumes. Started again, the run ends with the λ, u, w and
    logs of the uninterrupted run, bit for bit."""
    ref, ref_run = uninterrupted
    path = tiny_run_config(tmp_path, solver={"steps": 5}, checkpoint_every=4, threads=1)
    monkeypatch.setenv("SCALEBIO_SIGNAL_AT", "step.end:2:SIGTERM")
    with caplog.at_level(logging.ERROR, logger="scalebio"):
        assert main(["reweight", str(path), "--no-progress"]) == 128 + signal.SIGTERM
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "interrupted by SIGTERM after step 2 of 5" in errors[0]
    assert errors[0].endswith(f"run the same command again: scalebio reweight {path} --no-progress")
    run = tmp_path / "run"
    meta = json.loads((run / "meta.json").read_text())
    assert (meta["status"], meta["signal"], meta["steps_completed"]) == ("interrupted", "SIGTERM", 2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002.pt"]
    assert _metrics_steps(run) == [0, 1]
    assert not (run / "run.lock").exists()  # released
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    monkeypatch.delenv("SCALEBIO_SIGNAL_AT")
    assert main(["reweight", str(path), "--no-progress"]) == 0
    resumed = json.loads((run / "weights.json").read_text())
    assert resumed["lambda"] == ref["lambda"]
    for name in ("metrics.jsonl", "weights.jsonl"):
        assert (run / name).read_bytes() == (ref_run / name).read_bytes(), name
    a, b = _final_state(run)["solver"], _final_state(ref_run)["solver"]
    for key in ("u", "w"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key]), key
    assert json.loads((run / "meta.json").read_text())["status"] == "finished"


def test_22_1_signal_before_the_first_step_stops_at_once(tmp_path, monkeypatch):
    """A signal while the run is set up (here: as the tokenizer is saved) ends it at once, with nothing to save;
    the half-built tokenizer folder is removed and the next start runs normally."""
    cfg = _cfg(tmp_path, "solver.steps=1", "threads=1")
    monkeypatch.setenv("SCALEBIO_SIGNAL_AT", "tokenizer.written:1:SIGINT")
    with pytest.raises(RunInterrupted, match="interrupted by SIGINT before its first step") as info:
        run_reweight(cfg, progress=False)
    assert info.value.exit_code == 130
    run = Path(cfg.run_dir)
    assert not (run / "tokenizer").exists() and not list(run.glob(".*.tmp")) and not (run / "run.lock").exists()
    monkeypatch.delenv("SCALEBIO_SIGNAL_AT")
    assert run_reweight(cfg, progress=False) is not None


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_22_1_signal_watch_catches_each_signal(name):
    """Outside a step a signal raises at once; inside (deferred) it is only recorded, and the loop asks."""
    sig = SIGNALS[name]
    before = signal.getsignal(sig)
    with pytest.raises(RunInterrupted) as info:
        with SignalWatch("runs/x"):
            os.kill(os.getpid(), sig)
            time.sleep(1)  # the handler runs here
    assert info.value.signal_name == name and info.value.exit_code == 128 + sig
    with SignalWatch("runs/x") as watch:
        watch.defer()
        assert watch.pending() is None
        os.kill(os.getpid(), sig)
        time.sleep(0.05)
        assert watch.pending() == name
    assert signal.getsignal(sig) == before


def _finetune_yaml(tmp_path: Path, steps: int = 4) -> Path:
    write_jsonl(tmp_path / "train.jsonl", alpaca_records(16, seed=4))
    cfg = {"output_dir": str(tmp_path / "out"), "threads": 1, "tokenizer": {"kind": "gpt2_bpe"},
           "model": {"architecture": "llama", "config_overrides": {
               "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 2}},
           "train": {"path": "train.jsonl"}, "max_length": 64, "steps": steps, "global_batch": 4, "micro_batch": 2,
           "lr": 1e-3, "lisa": {"enabled": True, "gamma": 1, "interval": 1}, "precision": "fp32"}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "ft.yaml"


def test_22_1_finetune_sigusr1_checkpoints_then_resumes_bit_identically(tmp_path, monkeypatch, caplog):
    """`scalebio finetune` (LISA on, so the optimizer's parameter list changes every step): SIGUSR1 during step
    2 gives a checkpoint of 2 steps, meta.json interrupted, exit 138; the same command then ends with the model
    and metrics.jsonl of an uninterrupted run, bit for bit, and removes the spent checkpoint."""
    from safetensors.torch import load_file

    ref = _finetune_yaml(tmp_path / "ref")
    assert main(["finetune", str(ref), "--no-progress"]) == 0
    path = _finetune_yaml(tmp_path / "a")
    monkeypatch.setenv("SCALEBIO_SIGNAL_AT", "step.end:2:SIGUSR1")
    with caplog.at_level(logging.ERROR, logger="scalebio"):
        assert main(["finetune", str(path), "--no-progress"]) == 128 + signal.SIGUSR1
    out = tmp_path / "a" / "out"
    assert "interrupted by SIGUSR1 after step 2 of 4" in caplog.text and "scalebio finetune" in caplog.text
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["status"], meta["signal"], meta["steps_completed"]) == ("interrupted", "SIGUSR1", 2)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002.pt"]
    monkeypatch.delenv("SCALEBIO_SIGNAL_AT")
    assert main(["finetune", str(path), "--no-progress"]) == 0
    assert (out / "metrics.jsonl").read_bytes() == (tmp_path / "ref" / "out" / "metrics.jsonl").read_bytes()
    mine, theirs = load_file(str(out / "model" / "model.safetensors")), load_file(
        str(tmp_path / "ref" / "out" / "model" / "model.safetensors"))
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert not (out / "checkpoints").exists() and json.loads((out / "meta.json").read_text())["status"] == "finished"


def test_22_1_finetune_refuses_a_checkpoint_of_another_config(tmp_path, monkeypatch):
    path = _finetune_yaml(tmp_path)
    monkeypatch.setenv("SCALEBIO_SIGNAL_AT", "step.end:1:SIGTERM")
    with pytest.raises(RunInterrupted):
        finetune(load_config(str(path), [], FinetuneConfig), progress=False)
    monkeypatch.delenv("SCALEBIO_SIGNAL_AT")
    with pytest.raises(ResumeError, match=r"step_0000001.pt: checkpoint of an interrupted run of a different config"):
        finetune(load_config(str(path), ["lr=0.01"], FinetuneConfig), progress=False)
    write_jsonl(tmp_path / "train.jsonl", alpaca_records(16, seed=5))
    with pytest.raises(ResumeError, match=r"train.jsonl: sha256 \w+ \(checkpoint\) vs \w+ \(now\)"):
        finetune(load_config(str(path), [], FinetuneConfig), progress=False)


# -- 22.2 one process per run directory ---------------------------------------------------------------------


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_22_2_a_run_directory_in_use_is_refused_and_left_unchanged(tmp_path, caplog):
    """Another live owner (a lock held on an open file of its own, as another process holds it): `scalebio
    reweight` and `finetune` refuse at once, naming the directory, the owner's pid and host, and change nothing."""
    path = tiny_run_config(tmp_path, solver={"steps": 3}, threads=1)
    run_reweight(load_config(path), stop_after=1, progress=False)
    run = tmp_path / "run"
    owner = RunLock(run).acquire()
    try:
        before = _snapshot(run)
        with caplog.at_level(logging.ERROR, logger="scalebio"):
            assert main(["reweight", str(path), "--no-progress"]) == 1
        assert f"{run}: run directory in use by another scalebio process (pid {os.getpid()} on host " \
               f"{socket.gethostname()}" in caplog.text
        with pytest.raises(RunLockedError):
            run_reweight(load_config(path, ["resume=false"]), progress=False)  # not even a fresh start clears it
        assert _snapshot(run) == before
        ft = _finetune_yaml(tmp_path / "ft")
        (tmp_path / "ft" / "out").mkdir()
        ft_owner = RunLock(tmp_path / "ft" / "out").acquire()
        try:
            with pytest.raises(RunLockedError, match=r"ft/out: run directory in use"):
                finetune(load_config(str(ft), [], FinetuneConfig), progress=False)
            assert sorted(p.name for p in (tmp_path / "ft" / "out").iterdir()) == ["run.lock"]
        finally:
            ft_owner.release()
    finally:
        owner.release()
    assert run_reweight(load_config(path), progress=False) is not None  # free again: the run resumes


def test_22_2_a_killed_owner_does_not_block_the_next_start(tmp_path):
    """A process that holds the lock is refused while alive; after `kill -9` (no cleanup: its run.lock stays
    behind, naming it) the lock is taken at once."""
    run = tmp_path / "run"
    run.mkdir()
    code = ("import sys, time; from scalebio.results import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid} on host"):
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((run / "run.lock").read_text())["pid"] == holder.pid  # left behind
    lock = RunLock(run).acquire()
    assert json.loads((run / "run.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / "run.lock").exists()


def test_22_2_without_flock_the_record_decides(tmp_path, monkeypatch):
    """On a file system without flock: a live pid on this host owns the directory, a dead one does not; another
    host's lock counts until its heartbeat (mtime) is STALE_AFTER_S old."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run = tmp_path / "run"
    run.mkdir()
    lock_file = run / "run.lock"
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = socket.gethostname()
    cases = [({"pid": os.getppid(), "host": here}, 0, True), ({"pid": dead.pid, "host": here}, 0, False),
             ({"pid": 1, "host": "other-node"}, 0, True), ({"pid": 1, "host": "other-node"}, 2 * STALE_AFTER_S, False)]
    for holder, age, refused in cases:
        lock_file.write_text(json.dumps(holder))
        os.utime(lock_file, (time.time() - age, time.time() - age))
        if refused:
            with pytest.raises(RunLockedError, match=rf"pid {holder['pid']} on host {holder['host']}"):
                RunLock(run).acquire()
            assert json.loads(lock_file.read_text()) == holder
        else:
            lock = RunLock(run).acquire()
            assert json.loads(lock_file.read_text())["pid"] == os.getpid()
            lock.release()


# -- 22.3 weights files are checked wherever they are read --------------------------------------------------


def _good_weights() -> dict:
    return weights_record(["a", "b", "c"], torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64), {}, {})


def _no_probabilities(d):
    d.pop("probabilities")
    return d


BAD_WEIGHTS = [  # (edit of a valid record, the message's field and complaint)
    (lambda d: {**d, "weights": {**d["weights"], "a": float("nan")}}, r"field 'weights.a': nan is not finite"),
    (lambda d: {**d, "weights": {**d["weights"], "b": float("inf")}}, r"field 'weights.b': inf is not finite"),
    (lambda d: _no_probabilities({**d, "weights": {"a": 1.2, "b": -0.1, "c": -0.1}}), r"field 'weights.b': -0.1 is negative"),
    (lambda d: _no_probabilities({**d, "weights": {"a": 0.5, "b": 0.5, "c": 0.5}}),
     r"field 'weights': the weights sum to 1.5, not 1 \(tolerance 1e-06\)"),
    (lambda d: {**d, "weights": {"a": 0.5, "b": 0.5}}, r"field 'weights': no weight for source 'c'"),
    (lambda d: {**d, "weights": {**d["weights"], "z": 0.0}}, r"field 'weights': a weight for 'z'"),
    (lambda d: {**d, "weights": {**d["weights"], "a": "0.3"}}, r"field 'weights.a': '0.3' is not a number"),
    (lambda d: {**d, "sources": ["a", "b", "b"]}, r"field 'sources': source 'b' is listed twice"),
    (lambda d: {**d, "probabilities": [1.0, 0.0, 0.0]}, r"field 'probabilities': differs from field 'weights'"),
]


@pytest.mark.parametrize("edit, message", BAD_WEIGHTS, ids=["nan", "inf", "negative", "sum", "missing", "extra",
                                                             "string", "repeated", "probabilities"])
def test_22_3_bad_weights_file_is_refused_by_every_reader(tmp_path, caplog, edit, message):
    """load_weights, load_probabilities, resample and export all refuse the file with the same message (file and
    field), and resample and export write nothing."""
    path = tmp_path / "weights.json"
    path.write_text(json.dumps(edit(_good_weights())))  # json writes NaN / Infinity as a hand-edited file would
    pattern = re.escape(f"{path}: ") + message
    with pytest.raises(WeightsFileError, match=pattern):
        load_weights(path)
    with pytest.raises(WeightsFileError, match=pattern):
        load_probabilities(path)
    pool = {n: [{"text": f"{n}{i}"} for i in range(5)] for n in "abc"}
    with pytest.raises(WeightsFileError, match=pattern):
        resample(path, pool, 5, 0, tmp_path / "o.jsonl")
    with caplog.at_level(logging.ERROR, logger="scalebio"):
        assert main(["export", str(path), "--to", "hf", "--out", str(tmp_path / "mix.py")]) == 1
    assert re.search(pattern, caplog.text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.json"]


def test_22_3_valid_file_and_expected_sources(tmp_path):
    path = tmp_path / "weights.json"
    record = _good_weights()
    record["weights"] = {k: v + 4e-7 for k, v in record["weights"].items()}  # 1.2e-6 off: refused
    record.pop("probabilities")
    path.write_text(json.dumps(record))
    with pytest.raises(WeightsFileError, match=r"sum to 1.0000012"):
        load_weights(path)
    write_weights(path, _good_weights())
    assert load_probabilities(path, ["c", "a", "b"]) == pytest.approx([_good_weights()["weights"][n] for n in "cab"])
    with pytest.raises(WeightsFileError, match=r"field 'sources': no weight for 'd'; a weight for 'c', which is not "
                                               r"expected \(expected exactly: a, b, d\)"):
        load_probabilities(path, ["a", "b", "d"])


# -- 22.4 error locations -----------------------------------------------------------------------------------


def test_22_4_jsonl_errors_name_the_line(tmp_path):
    """Blank lines count: the record on line 4 is named by line 4, as an editor shows it."""
    cfg = _cfg(tmp_path, "threads=1")
    records = alpaca_records(6, seed=0)
    del records[2]["output"]
    lines = [json.dumps(r) for r in records]
    (tmp_path / "data" / "s0.jsonl").write_text("\n".join([lines[0], "", *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=r"data/s0.jsonl:4: missing field 'output'"):
        run_reweight(cfg, progress=False)


def test_22_4_json_list_errors_name_the_record_index(tmp_path):
    cfg = _cfg(tmp_path, "data.sources.0.path=data/s0.json", "threads=1")
    records = alpaca_records(6, seed=0)
    records[3]["output"] = 7
    (tmp_path / "data" / "s0.json").write_text(json.dumps(records, indent=1))
    with pytest.raises(DataError, match=r"data/s0.json: record index 3 \(0-based\): field 'output': expected a string"):
        run_reweight(cfg, progress=False)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_22_4_invalid_utf8_names_the_line(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    body = b'[\n{"text": "ok"},\n{"text": "caf\xe9"}\n]\n' if suffix == ".json" else b'{"text": "ok"}\n\n{"text": "caf\xe9"}\n'
    path.write_bytes(body)
    with pytest.raises(DataError, match=rf"bad{suffix}:3: not UTF-8 text: byte 0xe9 at byte 14 of the line"):
        read_records(path)


def test_22_4_finetune_and_resample_name_the_line(tmp_path):
    """`scalebio finetune`'s file and the pool `scalebio resample` reads name lines too."""
    path = _finetune_yaml(tmp_path)
    records = alpaca_records(4, seed=1)
    records[1] = {"instruction": "q", "output": 3}
    write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(DataError, match=r"train.jsonl:2: field 'output': expected a string"):
        finetune(load_config(str(path), [], FinetuneConfig), progress=False)
    cfg = _cfg(tmp_path / "r", "solver.steps=1", "threads=1")
    run_reweight(cfg, progress=False)
    records = alpaca_records(8, seed=2)
    del records[5]["instruction"]
    write_jsonl(tmp_path / "r" / "data" / "s1.jsonl", records)
    with pytest.raises(DataError, match=r"data/s1.jsonl:6: missing field 'instruction'"):
        resample(None, pool_from_run(cfg.run_dir), 3, 0, tmp_path / "o.jsonl")


# -- 22.5 what the method promises ---------------------------------------------------------------------------

NO_DROPOUT = ["model.config_overrides.resid_pdrop=0.0", "model.config_overrides.embd_pdrop=0.0",
              "model.config_overrides.attn_pdrop=0.0"]


def _trainable_blocks(lisa) -> list[int]:
    return [i for i, block in enumerate(lisa.blocks) if all(p.requires_grad for p in block.parameters())]


def _blocks_per_step(tmp_path, shared: bool) -> list[tuple[list[int], list[int]]]:
    """The blocks of u and of w that really train (requires_grad) in each step of a 6-step LISA run."""
    rw = Reweighting(_cfg(tmp_path, "solver.steps=6", "lisa.enabled=true", "lisa.gamma=1", "lisa.interval=1",
                          f"lisa.shared={str(shared).lower()}", "model.config_overrides.n_layer=4", "threads=1"))
    seen, step = [], rw.solver.step

    def recording(train, val):
        seen.append((_trainable_blocks(rw.solver.lisa_u), _trainable_blocks(rw.solver.lisa_w)))
        return step(train, val)

    rw.solver.step = recording
    rw.run_loop(progress=False)
    logged = [(m["active_blocks_u"], m["active_blocks_w"]) for m in
              map(json.loads, (Path(rw.cfg.run_dir) / "metrics.jsonl").read_text().splitlines())]
    assert [tuple(x) for x in logged] == seen  # the log says what trained
    return seen


def test_22_5_shared_lisa_trains_the_same_blocks_of_u_and_w_at_every_step(tmp_path):
    shared = _blocks_per_step(tmp_path / "shared", shared=True)
    assert len(shared) == 6 and all(u == w and len(u) == 1 for u, w in shared)
    assert len({tuple(u) for u, _ in shared}) > 1  # the blocks do change between steps
    independent = _blocks_per_step(tmp_path / "independent", shared=False)
    assert any(u != w for u, w in independent)  # without sharing they differ (so the check above can fail)


def _rows(batch) -> list[tuple[int, ...]]:
    """The examples of a micro-batch: each row's tokens without its padding."""
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def test_22_5_u_and_w_see_the_same_training_micro_batches(tmp_path):
    """In every step the gradient passes of u and of w run on the same training examples (recorded at the
    objective), and at step 0, where u = w, with dropout off and fp32 compute, the logged losses are those of one
    model on one batch: the gap is exactly 0 and every source's loss agrees bit for bit (fused or separate w
    passes)."""
    for fused in ("true", "false"):
        rw = Reweighting(_cfg(tmp_path / fused, "solver.steps=3", f"solver.fused_w={fused}", "precision=fp32",
                              "threads=1", *NO_DROPOUT))
        solver, objective = rw.solver, rw.solver.objective
        seen: dict[str, list] = {"u": [], "w": []}
        per_example, joint = objective.per_example_loss, objective.joint_losses

        def record(model, batch):
            if torch.is_grad_enabled():  # a gradient pass (not a no-grad evaluation)
                seen["u" if model is solver.u else "w"].append(_rows(batch))

        def per_example_recorded(model, batch):
            record(model, batch)
            return per_example(model, batch)

        def joint_recorded(model, val, train):
            record(model, train)
            return joint(model, val, train)

        objective.per_example_loss, objective.joint_losses = per_example_recorded, joint_recorded
        step = solver.step

        def checked_step(train, val):
            seen["u"].clear(), seen["w"].clear()
            stats = step(train, val)
            assert sorted(sum(seen["u"], [])) == sorted(sum(seen["w"], [])) == sorted(sum(map(_rows, train), []))
            return stats

        solver.step = checked_step
        rw.run_loop(progress=False)
        first = json.loads((Path(rw.cfg.run_dir) / "metrics.jsonl").read_text().splitlines()[0])
        assert first["train_loss_gap"] == 0.0
        assert first["source_loss_u"] == first["source_loss_w"]
        assert all(c > 0 for c in first["source_counts"].values())


def test_22_5_resample_draws_by_the_weights_it_is_given(tmp_path, monkeypatch):
    """`scalebio resample` with skewed weights (0.80, 0.15, 0.05) and N = 20000: each source's count lies within
    5 binomial standard deviations of N p (uniform draws miss by > 100), and the records are exactly the
    picks of the drawing function."""
    path = tiny_run_config(tmp_path, noises=(0.0, 0.5, 0.9))
    cfg = load_config(path)
    run = tmp_path / "run"
    run.mkdir()
    cfg.source_file = str(path)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    names = [s.name for s in cfg.data.sources]
    probs = [0.80, 0.15, 0.05]
    write_weights(tmp_path / "skewed.json", weights_record(names, torch.tensor(probs, dtype=torch.float64).log(), {}, {}))
    n, out = 20000, tmp_path / "drawn.jsonl"
    assert main(["resample", str(run), "--weights", str(tmp_path / "skewed.json"), "--n", str(n), "--replace",
                 "--seed", "3", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    counts = {name: sum(r["source"] == name for r in rows) for name in names}
    for name, p in zip(names, probs):
        assert abs(counts[name] - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (name, counts[name], n * p)
    pool = pool_from_run(run)
    picks = draw_counts_and_order(probs, [len(pool[s]) for s in names], n, seed=3)
    assert [(r["source"], r["instruction"]) for r in rows] == [(names[c], pool[names[c]][i]["instruction"])
                                                               for c, i in picks]


# -- 22.1 and 22.2 on 2 ranks (slow: torchrun, 2 gloo CPU processes) -----------------------------------------


def _torchrun(port: int, args: list[str], env_extra: dict | None = None, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "SCALEBIO_SIGNAL_AT"}
    env.update({"OMP_NUM_THREADS": "1", **(env_extra or {})})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "scalebio.cli", *args, "--no-progress"]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_22_1_two_ranks_stop_together_and_resume_bit_identically(tmp_path):
    """`scalebio reweight` on 2 ranks, SIGTERM to rank 1 only (the hook, at the end of step 2): both ranks stop
    after that step, as they agree through a collective; rank 0 writes the checkpoint and meta.json; the launcher
    exits non-zero with rank 0's one line. Resumed on 2 ranks, λ and the logs equal an uninterrupted 2-rank run's,
    bit for bit. Rank 0's run.lock makes the two ranks one owner, and is gone after the run."""
    over = dict(solver={"steps": 5}, checkpoint_every=4, threads=1)
    ref = tiny_run_config(tmp_path / "ref", **over)
    done = _torchrun(29531, ["reweight", str(ref)])
    assert done.returncode == 0, done.stderr[-3000:]
    path = tiny_run_config(tmp_path / "a", **over)
    stopped = _torchrun(29532, ["reweight", str(path)], {"SCALEBIO_SIGNAL_AT": "step.end:2:SIGTERM@1"})
    assert stopped.returncode != 0
    assert stopped.stderr.count("interrupted by SIGTERM after step 2 of 5") == 1, stopped.stderr[-3000:]
    run = tmp_path / "a" / "run"
    meta = json.loads((run / "meta.json").read_text())
    assert (meta["status"], meta["signal"], meta["steps_completed"], meta["world_size"]) == ("interrupted", "SIGTERM", 2, 2)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002.pt"]
    assert not (run / "run.lock").exists()
    done = _torchrun(29533, ["reweight", str(path)])
    assert done.returncode == 0, done.stderr[-3000:]
    ref_run = tmp_path / "ref" / "run"
    assert json.loads((run / "weights.json").read_text())["lambda"] == json.loads((ref_run / "weights.json").read_text())["lambda"]
    for name in ("metrics.jsonl", "weights.jsonl"):
        assert (run / name).read_bytes() == (ref_run / name).read_bytes(), name


@pytest.mark.slow
def test_22_1_launcher_forwards_sigusr1_as_launch_slurm_sets_it_up(tmp_path):
    """The launch_slurm.sbatch recipe: with PET_SIGNALS_TO_HANDLE naming SIGUSR1 (torchrun's --signals-to-handle)
    and a PET_SHUTDOWN_TIMEOUT grace, SIGUSR1 to the launcher alone reaches both ranks, which finish their step,
    checkpoint and mark the run interrupted by SIGUSR1 (without the setting, SIGUSR1 would kill the launcher)."""
    path = tiny_run_config(tmp_path, solver={"steps": 200}, checkpoint_every=1000, threads=1)
    launcher = _torchrun(29534, ["reweight", str(path)], {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGUSR1",
                                                          "PET_SHUTDOWN_TIMEOUT": "300"}, wait=False)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert launcher.poll() is None and time.time() < deadline, launcher.stdout.read()[-3000:]
            time.sleep(0.2)
        launcher.send_signal(signal.SIGUSR1)
        output, _ = launcher.communicate(timeout=300)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert (meta["status"], meta["signal"]) == ("interrupted", "SIGUSR1"), output[-3000:]
    completed = meta["steps_completed"]
    assert 2 <= completed < 200 and _metrics_steps(tmp_path / "run") == list(range(completed))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [f"step_{completed:07d}.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("mode, port", [("none", 29535), ("fsdp", 29538)])
def test_22_1_finetune_two_ranks_resume_bit_identically(tmp_path, mode, port):
    """`scalebio finetune` on 2 ranks (all-reduce or FSDP), SIGUSR1 to both at the end of step 2: a checkpoint of
    2 steps (gathered from the shards under FSDP), then the resumed run's model and metrics equal an
    uninterrupted 2-rank run's, bit for bit."""
    from safetensors.torch import load_file

    for name in ("ref", "a"):
        _finetune_yaml(tmp_path / name)
    ref = _torchrun(port, ["finetune", str(tmp_path / "ref" / "ft.yaml"), f"sharding={mode}"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    args = ["finetune", str(tmp_path / "a" / "ft.yaml"), f"sharding={mode}"]
    stopped = _torchrun(port + 1, args, {"SCALEBIO_SIGNAL_AT": "step.end:2:SIGUSR1"})
    assert stopped.returncode != 0 and "interrupted by SIGUSR1 after step 2 of 4" in stopped.stderr, stopped.stderr[-3000:]
    out = tmp_path / "a" / "out"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002.pt"]
    done = _torchrun(port + 2, args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "metrics.jsonl").read_bytes() == (tmp_path / "ref" / "out" / "metrics.jsonl").read_bytes()
    mine, theirs = (load_file(str(d / "model" / "model.safetensors")) for d in (out, tmp_path / "ref" / "out"))
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_an_atomic_write_gets_the_usual_file_mode(tmp_path):
    """files.write_text goes through a private temporary file (mkstemp: 0600); the file it leaves is readable as any
    file written under the process's umask would be, not owner-only."""
    from scalebio.files import write_text

    umask = os.umask(0o022)
    try:
        path = write_text(tmp_path / "out" / "summary.json", "{}\n")
    finally:
        os.umask(umask)
    assert path.read_text() == "{}\n" and (path.stat().st_mode & 0o777) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]  # no temporary file left
