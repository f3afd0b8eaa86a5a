"""End-to-end `scalebio reweight` on a tiny random GPT-2: outputs, resume, bad input, denoising."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from conftest import alpaca_records, tiny_run_config, write_jsonl
from scalebio.cli import main
from scalebio.config import load_config
from scalebio.data import DataError
from scalebio.reweight import Reweighting, run_reweight
from scalebio.solver import NonFiniteLossError
from scalebio.weights import load_probabilities


def test_run_directory_contents(tmp_path):
    cfg = load_config(tiny_run_config(tmp_path))
    record = run_reweight(cfg, progress=False)
    run = Path(cfg.run_dir)
    for name in ("config.yaml", "meta.json", "data.json", "metrics.jsonl", "weights.jsonl", "weights.json"):
        assert (run / name).is_file(), name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]
    for key in ("val_loss", "train_loss_u", "train_loss_w", "train_loss_gap", "lr_u", "lr_w", "lr_lambda", "alpha", "active_blocks_u"):
        assert key in metrics[0]
    weights = json.loads((run / "weights.json").read_text())
    assert weights == record
    assert abs(sum(weights["weights"].values()) - 1) < 1e-12
    assert weights["provenance"]["data_files"]["noise_0.00"]["sha256"]
    assert load_probabilities(run / "weights.json") == pytest.approx(weights["probabilities"])
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["versions"]["torch"] and meta["wall_time_s"] > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["solver"]["steps"] == 4


def test_interleave_datasets_accepts_the_weights(tmp_path):
    import datasets

    cfg = load_config(tiny_run_config(tmp_path))
    run_reweight(cfg, progress=False)
    probs = load_probabilities(Path(cfg.run_dir) / "weights.json")
    parts = [datasets.Dataset.from_list([{"x": i}] * 10) for i in range(2)]
    mixed = datasets.interleave_datasets(parts, probabilities=probs, seed=0)
    assert len(mixed) > 0


@pytest.mark.parametrize("lisa", [False, True])
def test_resume_gives_identical_weights(tmp_path, lisa):
    """A run stopped after step 2 and resumed ends with the same weights as an uninterrupted run (bitwise λ
    and weights; only the provenance timestamp may differ)."""
    extra = {"lisa": {"enabled": True, "gamma": 1, "interval": 1}} if lisa else {}
    full_cfg = load_config(tiny_run_config(tmp_path / "a", **extra), [f"run_dir={tmp_path / 'a' / 'run'}"])
    full = run_reweight(full_cfg, progress=False)
    cut_cfg = load_config(tiny_run_config(tmp_path / "b", **extra), [f"run_dir={tmp_path / 'b' / 'run'}"])
    assert run_reweight(cut_cfg, stop_after=2, progress=False) is None
    assert not (Path(cut_cfg.run_dir) / "weights.json").exists()
    resumed = run_reweight(cut_cfg, progress=False)
    assert resumed["lambda"] == full["lambda"] and resumed["weights"] == full["weights"]
    lines = (Path(cut_cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2, 3]
    full_metrics = (Path(full_cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["val_loss"] for x in lines] == [json.loads(x)["val_loss"] for x in full_metrics]


def test_denoising_weights_fall_with_noise(tmp_path):
    """Tiny random GPT-2, four sources of rising noise: weights strictly decrease, the clean one ends above 1/k."""
    noises = (0.0, 0.33, 0.67, 1.0)
    path = tiny_run_config(tmp_path, noises=noises, n=64, n_val=32,
                           solver={"steps": 40, "global_batch": 16, "micro_batch": 16, "lr_u": 3e-3, "lr_w": 3e-3,
                                   "lr_lambda": 5e-2, "alpha": 10.0, "schedule": "constant", "weight_decay_lambda": 0.0},
                           checkpoint_every=100)
    record = run_reweight(load_config(path), progress=False)
    w = [record["weights"][f"noise_{n:.2f}"] for n in noises]
    assert all(a > b for a, b in zip(w, w[1:])), w
    assert w[0] > 1 / len(noises)


# -- bad input: a clear error naming the file and line/field, and no partial output --------------------


def _no_outputs(run_dir: Path):
    assert not (run_dir / "weights.json").exists()
    assert not list((run_dir / "checkpoints").glob("*")) if (run_dir / "checkpoints").exists() else True


def test_missing_source_file(tmp_path):
    cfg = load_config(tiny_run_config(tmp_path), ["data.sources.0.path=data/missing.jsonl"])
    with pytest.raises(DataError, match=r"missing.jsonl: file not found"):
        run_reweight(cfg, progress=False)
    _no_outputs(Path(cfg.run_dir))


def test_malformed_jsonl_line(tmp_path):
    path = tiny_run_config(tmp_path)
    src = tmp_path / "data" / "s1.jsonl"
    lines = src.read_text().splitlines()
    lines[4] = '{"instruction": "broken'
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"s1.jsonl:5: malformed JSON"):
        run_reweight(load_config(path), progress=False)


def test_record_missing_field(tmp_path):
    path = tiny_run_config(tmp_path)
    records = alpaca_records(8, 0)
    del records[3]["output"]
    write_jsonl(tmp_path / "data" / "s0.jsonl", records)
    with pytest.raises(DataError, match=r"s0.jsonl:4: missing field 'output'"):
        run_reweight(load_config(path), progress=False)


def test_empty_source(tmp_path):
    path = tiny_run_config(tmp_path)
    (tmp_path / "data" / "s1.jsonl").write_text("")
    with pytest.raises(DataError, match=r"s1.jsonl.*empty|noise_0.50.*empty"):
        run_reweight(load_config(path), progress=False)


def test_source_empty_after_decontamination(tmp_path):
    path = tiny_run_config(tmp_path)
    write_jsonl(tmp_path / "data" / "val.jsonl", alpaca_records(32, seed=1, prefix="s1"))  # = source s1's prompts
    with pytest.raises(DataError, match=r"noise_0.50.*decontamination"):
        run_reweight(load_config(path), progress=False)


def test_source_empty_after_truncation(tmp_path):
    path = tiny_run_config(tmp_path)
    recs = [{"instruction": "word " * 200, "input": "", "output": "answer"} for _ in range(4)]
    write_jsonl(tmp_path / "data" / "s1.jsonl", recs)
    with pytest.raises(DataError, match=r"noise_0.50.*truncat"):
        run_reweight(load_config(path), progress=False)


def test_empty_validation_set(tmp_path):
    path = tiny_run_config(tmp_path)
    (tmp_path / "data" / "val.jsonl").write_text("")
    with pytest.raises(DataError, match=r"val.jsonl.*empty|validation.*empty"):
        run_reweight(load_config(path), progress=False)


def test_gamma_not_smaller_than_blocks(tmp_path):
    cfg = load_config(tiny_run_config(tmp_path), ["lisa.enabled=true", "lisa.gamma=2"])
    with pytest.raises(ValueError, match=r"lisa.gamma: 2 must be .* smaller than the number of blocks \(2\)"):
        Reweighting(cfg)


def test_non_finite_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = load_config(tiny_run_config(tmp_path), ["solver.steps=6"])
    rw = Reweighting(cfg)
    original = rw.solver.objective.per_example_loss
    calls = {"n": 0}

    def poisoned(model, batch):
        out = original(model, batch)
        calls["n"] += 1
        if rw.solver.step_index == 3:
            out = out * float("nan")
        return out

    monkeypatch.setattr(rw.solver.objective, "per_example_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss under u \(nan\) at step 3"):
        rw.run_loop(progress=False)
    ckpts = sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").glob("*"))
    assert ckpts == ["step_0000002.pt"]
    assert not (Path(cfg.run_dir) / "weights.json").exists()


def test_cli_reweight_and_help(tmp_path, capsys):
    path = tiny_run_config(tmp_path)
    assert main(["reweight", str(path), "solver.steps=2", "--no-progress"]) == 0
    assert (tmp_path / "run" / "weights.json").is_file()
    with pytest.raises(SystemExit):
        main(["reweight", "--help"])
    out = capsys.readouterr().out
    assert "solver.alpha" in out and "lisa.interval" in out and "--stop-after" in out
    assert main(["reweight", str(tmp_path / "nope.yaml")]) == 1


def test_config_digest_ignores_where_the_run_and_config_are_named(tmp_path, monkeypatch):
    """The same computation named from another working directory (relative vs absolute config path, another
    run_dir) has the same digest, so a resume is not refused; a changed setting has another."""
    from scalebio.config import load_config
    from scalebio.config import config_digest

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    rel = load_config("experiments/llama3/protocol_smollm2.yaml", ["run_dir=runs/a"])
    absolute = load_config(str(repo / "experiments/llama3/protocol_smollm2.yaml"), [f"run_dir={tmp_path / 'b'}"])
    assert config_digest(rel) == config_digest(absolute)
    other = load_config("experiments/llama3/protocol_smollm2.yaml", ["solver.lr_lambda=0.1"])
    assert config_digest(other) != config_digest(rel)


def test_config_digest_counts_u_adam_as_what_it_resolves_to():
    """``solver.u_adam`` came after runs were made: where it keeps what the code did before (plain under scalebio,
    alpha_scaled under acl/v1) the digest is the one those runs recorded (the field left out of the hashed
    config), so their checkpoints still resume; where it changes the computation the digest changes; ``auto`` and
    the policy it resolves to are one computation."""
    import hashlib
    import json

    from scalebio.config import RunConfig, config_digest, to_dict

    def before_the_field(cfg):  # the digest as computed before solver.u_adam existed
        payload = to_dict(cfg)
        for key in ("resume", "run_dir", "source_file"):
            payload.pop(key, None)
        payload["solver"].pop("u_adam")
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def cfg(conventions, u_adam):
        c = RunConfig()
        c.solver.conventions, c.solver.u_adam = conventions, u_adam
        return c

    assert config_digest(cfg("scalebio", "plain")) == before_the_field(cfg("scalebio", "plain"))
    for conventions in ("acl", "v1"):
        for u_adam in ("auto", "alpha_scaled"):
            assert config_digest(cfg(conventions, u_adam)) == before_the_field(cfg(conventions, u_adam))
        assert config_digest(cfg(conventions, "plain")) != config_digest(cfg(conventions, "auto"))
    assert config_digest(cfg("scalebio", "auto")) == config_digest(cfg("scalebio", "alpha_scaled"))
    assert config_digest(cfg("scalebio", "auto")) != config_digest(cfg("scalebio", "plain"))


DIGESTED_FIELDS = {
    "seed", "model.name_or_path", "model.gguf_package", "model.gguf_file", "model.architecture", "model.dtype",
    "model.gradient_checkpointing", "tokenizer.kind", "tokenizer.name_or_path", "tokenizer.vocab_size",
    "tokenizer.chat_template", "data.root", "data.sources", "data.validation", "data.decontaminate_against",
    "data.decontaminate", "data.max_length", "data.sampling", "data.prompt", "solver.steps", "solver.global_batch",
    "solver.micro_batch", "solver.val_batch", "solver.lr_u", "solver.lr_w", "solver.lr_lambda", "solver.weight_decay_u",
    "solver.weight_decay_w", "solver.weight_decay_lambda", "solver.betas", "solver.eps", "solver.warmup_ratio",
    "solver.schedule", "solver.alpha", "solver.tau", "solver.outer_iterations", "solver.clip_grad_norm",
    "solver.fused_w", "solver.gap_precision", "solver.conventions", "lisa.enabled", "lisa.gamma", "lisa.interval",
    "lisa.shared", "lisa.keep_all_state", "checkpoint_every", "threads", "precision", "sharding"}
"""The fields the committed runs' digests (Table 1 campaign, GPT-2 experiments) hash: a field added or removed since
changes every digest, unless it is declared in config.LATER_FIELDS."""


def test_a_new_config_field_does_not_change_the_committed_digests():
    from scalebio.config import LATER_FIELDS, RunConfig, config_digest, to_dict

    def names(d, prefix=""):
        for k, v in d.items():
            yield from names(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]

    now = set(names(to_dict(RunConfig()))) - {"resume", "run_dir", "source_file"}
    assert DIGESTED_FIELDS - now == set(), "a field was removed: every committed run's digest changes"
    assert now - DIGESTED_FIELDS == set(LATER_FIELDS), (
        "a field added to RunConfig changes every committed digest: declare it in config.LATER_FIELDS with the value "
        "that does what the code did before it")
    # The digest hashes exactly those fields: one of them changed changes it; at their defaults LATER_FIELDS' are out.
    base = RunConfig()
    other = RunConfig()
    other.solver.eps = 1e-6
    assert config_digest(other) != config_digest(base)


def test_wall_time_survives_a_kill_and_counts_each_second_once(tmp_path):
    """meta.json's wall_time_s is written at every checkpoint: a run killed outright (no signal, so no last write)
    keeps the time up to its last checkpoint, which its resumed run adds to; and however often a process writes,
    its seconds count once (the total is at most the time the processes ran). Catches the time of a killed process
    lost from the sum (what a campaign's measured speeds read), and cumulative times added again at each write."""
    import subprocess
    import sys
    import time

    from conftest import REPO
    from scalebio.results import KILL_EXIT_CODE

    path = tiny_run_config(tmp_path, solver={"steps": 6}, checkpoint_every=1, threads=1)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", SCALEBIO_KILL_AT="step.end:4")
    code = f"from scalebio.cli import main; import sys; sys.exit(main(['reweight', {str(path)!r}, '--no-progress']))"
    start = time.time()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    killed_after = time.time() - start
    assert r.returncode == KILL_EXIT_CODE, r.stderr[-2000:]
    run = Path(load_config(path).run_dir)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "running" and 0 < meta["wall_time_s"] < killed_after
    start = time.time()
    run_reweight(load_config(path), progress=False)
    resumed_for = time.time() - start
    final = json.loads((run / "meta.json").read_text())
    assert final["status"] == "finished"
    assert meta["wall_time_s"] < final["wall_time_s"] <= meta["wall_time_s"] + resumed_for
    # One process writing at 10 s, 25 s and 30 s of its life adds 30 s, not 65 s.
    recorder = Reweighting(load_config(path)).recorder
    for wall in (10.0, 25.0, 30.0):
        recorder.write_meta("running", wall)
    assert json.loads((run / "meta.json").read_text())["wall_time_s"] == pytest.approx(final["wall_time_s"] + 30.0)
