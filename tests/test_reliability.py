"""Issue 12: a run directory survives kills and edits of its inputs; every bad value is a clear error.

One test (or a few) per item of the issue, numbered as there. Tiny random GPT-2 runs of a few steps, or the
run-directory code alone. The kill-at-every-moment check is tests/test_kill_resume.py (slow).
"""

import json
import logging
import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import alpaca_records, tiny_run_config, write_jsonl
from scalebio.cli import build_parser, main, parse_args
from scalebio.config import ConfigError, load_config
from scalebio.data import DataError
from scalebio.models import build_model
from scalebio.resample import resample
from scalebio.results import RunDir, RunDirError, replace_dir
from scalebio.reweight import Reweighting, ResumeError, run_reweight
from scalebio.solver import NonFiniteLossError
from scalebio.weights import file_sha256, weights_record, write_weights


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
