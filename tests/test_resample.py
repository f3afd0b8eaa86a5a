"""`scalebio resample`: N examples by the learned weights, deterministic, without replacement while a source lasts."""

import json
from collections import Counter

import pytest

from conftest import tiny_run_config
from scalebio.cli import main
from scalebio.config import load_config
from scalebio.resample import draw_counts_and_order, resample
from scalebio.reweight import run_reweight
from scalebio.weights import weights_record, write_weights
import torch


def test_draws_follow_weights_and_do_not_repeat_while_a_source_lasts():
    picks = draw_counts_and_order([0.7, 0.2, 0.1], [5000, 5000, 5000], 3000, seed=0)
    counts = Counter(s for s, _ in picks)
    assert abs(counts[0] / 3000 - 0.7) < 0.03 and abs(counts[2] / 3000 - 0.1) < 0.02
    assert len(set(picks)) == len(picks)  # no repeats: every source still has unused examples
    assert picks == draw_counts_and_order([0.7, 0.2, 0.1], [5000, 5000, 5000], 3000, seed=0)
    assert picks != draw_counts_and_order([0.7, 0.2, 0.1], [5000, 5000, 5000], 3000, seed=1)


def test_exhausted_source_cycles_through_all_before_repeating():
    picks = draw_counts_and_order([1.0, 0.0], [10, 5], 25, seed=0)
    first = [i for _, i in picks[:10]]
    assert sorted(first) == list(range(10))  # a full pass before any example repeats


def test_resample_writes_output_and_manifest(tmp_path):
    path = tmp_path / "w.json"
    lam = torch.tensor([2.0, 0.0], dtype=torch.float64)
    write_weights(path, weights_record(["a", "b"], lam, {"a": 50, "b": 50}, {}))
    pool = {"a": [{"text": f"a{i}"} for i in range(50)], "b": [{"text": f"b{i}"} for i in range(50)]}
    manifest = resample(path, pool, 40, seed=3, out=tmp_path / "out.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and manifest["counts"]["a"] > manifest["counts"]["b"]
    assert all(r["text"].startswith(r["source"]) for r in rows)
    assert manifest["weights_file"] == str(path) and len(manifest["weights_sha256"]) == 64
    uniform = resample(None, pool, 40, seed=3, out=tmp_path / "u.jsonl")
    assert uniform["weights"] == "uniform"
    with pytest.raises(ValueError, match="source 'a' has a weight but no data"):
        resample(path, {"b": pool["b"]}, 5, 0, tmp_path / "x.jsonl")


def test_cli_resample_from_a_run(tmp_path):
    cfg = load_config(tiny_run_config(tmp_path), ["solver.steps=2"])
    run_reweight(cfg, progress=False)
    out = tmp_path / "sample.jsonl"
    assert main(["resample", cfg.run_dir, "--n", "20", "--seed", "1", "--out", str(out)]) == 0
    manifest = json.loads(out.with_name("sample.jsonl.manifest.json").read_text())
    assert sum(manifest["counts"].values()) == 20 and manifest["weights_file"].endswith("weights.json")
    assert set(manifest["counts"]) == {"noise_0.00", "noise_0.50"}
