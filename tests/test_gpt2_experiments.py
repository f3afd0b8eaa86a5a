"""GPT-2 experiments: both presets' configs load and validate; each pipeline runs end to end at toy size;
the committed results match their schema and `experiments/gpt2/report.py` rebuilds from them."""

import json
from pathlib import Path

import pytest

from conftest import REPO
from experiments.gpt2 import pipeline
from scalebio.config import RunConfig, load_config, validate_run_config
from scalebio.finetune import FinetuneConfig, validate_finetune_config

TASKS = ["denoising", "multilingual", "instruction_following"]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("preset", ["cpu", "paper"])
def test_presets_load_and_validate(task, preset):
    cfg = load_config(REPO / "experiments" / "gpt2" / task / f"{preset}.yaml")
    assert isinstance(cfg, RunConfig)
    validate_run_config(cfg)
    if preset == "paper":
        s = cfg.solver
        assert cfg.model.name_or_path == "openai-community/gpt2" and cfg.model.dtype == "bfloat16"
        assert (s.lr_u, s.lr_w, s.lr_lambda, s.alpha, s.global_batch, s.micro_batch) == (1e-5, 1e-5, 1e-2, 10.0, 64, 8)
        assert cfg.data.max_length == 512 and cfg.lisa.enabled and (cfg.lisa.gamma, cfg.lisa.interval) == (2, 20)
        assert s.steps is None  # one epoch
        # What the header claims: the authors' GPT-2 code draws batches from the pool, with its (v1) conventions.
        assert cfg.data.sampling == "pooled" and s.conventions == "v1"
    else:
        assert cfg.model.architecture == "gpt2" and cfg.tokenizer.kind == "train_bpe"
    ft = load_config(REPO / "experiments" / "gpt2" / task / "finetune_cpu.yaml", ["train.path=x.jsonl"], FinetuneConfig)
    validate_finetune_config(ft)


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_pipeline_smoke(task, tmp_path, shared_data):
    out = pipeline.run_task(task, "cpu", smoke=True, runs_root=tmp_path / "runs", results_root=tmp_path / "results")
    weights = list(out.glob("*/reweight_seed0/weights.json"))
    assert weights
    evals = sorted(p.parent.name for p in out.glob("*/retrain/*/eval.json"))
    assert evals == ["learned_seed0", "uniform_seed0"]
    ev = json.loads(next(out.glob("*/retrain/learned_seed0/eval.json")).read_text())
    (metrics,) = ev["tasks"].values()
    assert metrics["bits_per_byte"] > 0


@pytest.mark.slow
def test_pipeline_recomputes_over_committed_results(tmp_path, shared_data, monkeypatch):
    """A fresh checkout: results/ holds committed results, runs/ is empty. Every stage runs and its results
    replace the committed ones, and a committed result no longer produced is removed (catches the old skip "a
    result is committed, so the stage is done", under which a clone recomputed nothing). Run again with the
    uniform arm killed before its evaluation: only that arm is redone (runs/ holds the rest), results/ is
    rebuilt from runs/ byte for byte, and the redone arm gives the same bytes (seeded, one thread)."""
    import shutil

    results, runs = tmp_path / "results", tmp_path / "runs"
    committed = {"main/reweight_seed0/weights.json": {"weights": {"fake": 1.0}},
                 "main/retrain/learned_seed0/eval.json": {"tasks": {"t": {"bits_per_byte": 99.0}}},
                 "old_variant/reweight_seed0/weights.json": {"weights": {"fake": 1.0}}}
    for rel, value in committed.items():
        (results / rel).parent.mkdir(parents=True, exist_ok=True)
        (results / rel).write_text(json.dumps(value))
    pipeline.run_task("denoising", "cpu", smoke=True, runs_root=runs, results_root=results)
    weights = json.loads((results / "main/reweight_seed0/weights.json").read_text())
    assert set(weights["weights"]) == set(weights["sources"]) and "fake" not in weights["weights"]
    ev = json.loads((results / "main/retrain/learned_seed0/eval.json").read_text())
    assert ev["tasks"]["gpt2_denoising_test"]["bits_per_byte"] != 99.0
    assert not (results / "old_variant").exists()
    first = {p.relative_to(results): p.read_bytes() for p in results.rglob("*") if p.is_file()}

    calls = []
    monkeypatch.setattr(pipeline, "run_reweight", lambda *a, **k: calls.append("reweight"))
    real_arm = pipeline.retrain_arm
    monkeypatch.setattr(pipeline, "retrain_arm", lambda *a, **k: (calls.append(a[3]), real_arm(*a, **k))[1])
    (runs / "main/retrain/uniform_seed0/eval.json").unlink()
    shutil.rmtree(results)
    pipeline.run_task("denoising", "cpu", smoke=True, runs_root=runs, results_root=results)
    assert calls == ["uniform"]
    assert {p.relative_to(results): p.read_bytes() for p in results.rglob("*") if p.is_file()} == first


def check_results_schema(root: Path):
    for weights_file in root.glob("gpt2/*/*/reweight_seed*/weights.json"):
        run = weights_file.parent
        w = json.loads(weights_file.read_text())
        assert abs(sum(w["weights"].values()) - 1) < 1e-9 and set(w["weights"]) == set(w["sources"])
        assert w["provenance"]["data_files"]
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(len(metrics)))
        for key in ("val_loss", "train_loss_u", "train_loss_w", "alpha", "lr_lambda"):
            assert key in metrics[0]
    for eval_file in root.glob("gpt2/*/*/retrain/*/eval.json"):
        ev = json.loads(eval_file.read_text())
        (metrics,) = ev["tasks"].values()
        assert metrics["bits_per_byte"] > 0
        assert json.loads((eval_file.parent / "resample.json").read_text())["n"] > 0


def test_committed_results_schema():
    root = REPO / "results"
    if not list(root.glob("gpt2/*/*/reweight_seed*/weights.json")):
        pytest.skip("no committed GPT-2 results yet")
    check_results_schema(root)
    summary = json.loads((root / "gpt2" / "summary.json").read_text())
    assert set(summary) <= set(TASKS)
