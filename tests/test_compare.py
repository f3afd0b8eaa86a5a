"""The baselines' comparison (experiments/gpt2/compare.py, compare_report.py): settings, pass counting, and the
whole comparison of one experiment at toy size: every arm trains on exactly N examples, every cost is recorded, the
table has a row per method with an interval and a difference from uniform, and a second run recomputes nothing."""

import json

import pytest
import torch
import yaml

from conftest import REPO
from experiments.gpt2 import compare, compare_report, pipeline, selections

TASKS = ["denoising", "multilingual", "instruction_following"]


@pytest.mark.parametrize("task", TASKS)
def test_settings_name_the_pipelines_variants_and_every_baseline(task):
    plan, settings = compare.load_settings(task, "cpu", smoke=False)
    assert set(settings["variants"]) <= {v["name"] for v in plan["variants"]}
    assert settings["methods"] == list(compare.METHODS)
    assert len(plan["retrain"]["seeds"]) >= 3
    for method in ("rho_loss", "less", "doremi"):
        assert settings[method], method
    _, smoke = compare.load_settings(task, "cpu", smoke=True)
    assert smoke["less"]["epochs"] < settings["less"]["epochs"] or smoke["less"]["proj_dim"] < settings["less"]["proj_dim"]
    assert smoke["less"]["lora_rank"] == settings["less"]["lora_rank"]  # the smoke section overlays, keeps the rest


def test_pass_counter_tells_training_passes_from_forward_only_passes():
    """A forward with autograd on counts as forward+backward, one under no_grad as forward only, per part."""
    from scalebio.config import ModelConfig
    from scalebio.models import build_model

    model = build_model(ModelConfig(architecture="gpt2", config_overrides={"n_layer": 1, "n_embd": 16, "n_head": 2,
                                                                           "n_positions": 16}), vocab_size=40)
    counter = selections.PassCounter()
    counter.watch(model)
    ids = torch.randint(0, 40, (3, 8))
    with counter.counting("train"):
        model(input_ids=ids).logits.sum().backward()
        with torch.no_grad():
            model(input_ids=ids[:2])
    model.base_model(input_ids=ids[:1])  # the chunked objective calls the body directly
    counter.close()
    model(input_ids=ids)  # not counted after close
    assert counter.parts == {"train": {"fb": 3, "forward": 2}, "selection": {"fb": 1, "forward": 0}}
    assert counter.totals() == {"fb": 4, "forward": 2}
    cost = selections.cost_record("x", 1.0, 4, 3, 10)
    assert cost["fb_equivalent"] == pytest.approx(5.0) and cost["retrain_multiple"] == pytest.approx(0.5)


@pytest.mark.slow
def test_compare_smoke_every_arm_draws_n_costs_recorded_table_complete_and_resumes(tmp_path, shared_data, monkeypatch):
    task = "denoising"
    runs, results = tmp_path / "runs", tmp_path / "results" / "gpt2" / task
    out = compare.run_compare(task, "cpu", smoke=True, runs_root=runs, results_root=results)
    plan, settings = compare.load_settings(task, "cpu", smoke=True)
    n, seeds = plan["retrain"]["n"], plan["retrain"]["seeds"]

    for method in compare.METHODS:
        for s in seeds:
            arm = out / "main" / f"{method}_seed{s}"
            draw = json.loads((arm / ("selection.json" if method in compare.SELECTED else "resample.json")).read_text())
            assert draw["n"] == n and sum(draw["counts"].values()) == n, method
            cost = json.loads((arm / "cost.json").read_text())
            assert cost["retrain"]["forward_backward_examples"] > 0
            selection = cost["selection"]
            if method == "uniform":
                assert selection["fb_equivalent"] == 0
            else:
                assert selection["forward_backward_examples"] > 0 and selection["retrain_multiple"] > 0, method
                assert selection["wall_time_s"] > 0
            assert (arm / "eval_samples.jsonl").is_file()
    # The training files themselves hold N records: the selection file, DoReMi's and the pipeline's draws.
    for method in ("rho_loss", "less"):
        lines = (runs / "main" / "compare" / "selection" / f"{method}_seed0" / "selection.jsonl").read_text().splitlines()
        assert len(lines) == n
    assert len((runs / "main" / "compare" / "doremi_seed0" / "train.jsonl").read_text().splitlines()) == n
    assert len((runs / "main" / "retrain" / "uniform_seed0" / "train.jsonl").read_text().splitlines()) == n
    weights = json.loads((out / "main" / "selection" / "doremi_seed0" / "weights.json").read_text())
    assert weights["provenance"]["method"] == "doremi" and abs(sum(weights["weights"].values()) - 1) < 1e-9

    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- gpt2-compare:start -->\nnot yet run\n<!-- gpt2-compare:end -->\n")
    compare_report.main(["--results", str(tmp_path / "results" / "gpt2"), "--figures", str(tmp_path / "figures"),
                         "--readme", str(readme)])
    summary = json.loads((out / "summary.json").read_text())["variants"]["main"]
    assert list(summary) == list(compare.METHODS)
    for method, row in summary.items():
        assert row["lo"] <= row["mean"] <= row["hi"]
        if method != "uniform":
            d = row["vs_uniform"]
            assert d["lo"] <= d["hi"] and d["verdict"] in ("reproduced", "contradicted", "inconclusive")
    table = (out / "table.md").read_text()
    assert sum(line.startswith("| main |") for line in table.splitlines()) == len(compare.METHODS)
    assert "not yet run" not in readme.read_text() and "RHO-LOSS" in readme.read_text()
    assert (tmp_path / "figures" / f"gpt2_{task}_compare.png").is_file()

    # Second run: every unit is done under runs/, so nothing trains, selects or evaluates; results/ is rebuilt
    # from runs/ byte for byte.
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a finished unit")

    for module, name in [(compare, "run_selection"), (compare, "run_arm"), (pipeline, "finetune"),
                         (pipeline, "evaluate"), (pipeline, "run_reweight"), (pipeline, "retrain_arm"),
                         (pipeline, "build_data")]:
        monkeypatch.setattr(module, name, fail)
    import shutil

    shutil.rmtree(results)
    compare.run_compare(task, "cpu", smoke=True, runs_root=runs, results_root=results)
    compare_report.main(["--results", str(tmp_path / "results" / "gpt2"), "--figures", str(tmp_path / "figures"),
                         "--readme", str(readme)])
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == first


def test_compare_yaml_headers_give_the_command():
    for task in TASKS:
        text = (REPO / "experiments" / "gpt2" / task / "compare.yaml").read_text()
        assert text.startswith(f"# python experiments/gpt2/compare.py {task}")
        yaml.safe_load(text)
