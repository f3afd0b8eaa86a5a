"""The benchmarks at toy size: ``python -m benchmarks.run --smoke`` writes every results JSON with the agreed
schema, and the figures rebuild from the JSON alone. Numbers at this size mean nothing; only shapes are
checked (plus the two invariants that hold at any size: our LISA policy keeps the state flat, the
released policy's grows)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("step_cost", "memory", "sources", "hypergradient", "precision", "profile", "padding")
FIGURES = ("step_cost", "memory", "sources", "hypergradient")  # precision, profile and padding are tables only


def _timing(entry, reps):
    assert len(entry["seconds"]) == reps and all(t > 0 for t in entry["seconds"])
    assert entry["median_s"] > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out / "results"),
                    "--figures", str(out / "figures")], cwd=REPO, env=env, check=True, timeout=600,
                   capture_output=True)
    return out


@pytest.mark.slow
def test_every_result_has_the_common_header(smoke):
    for name in EXPERIMENTS:
        data = json.loads((smoke / "results" / f"{name}.json").read_text())
        assert data["schema"] == "scalebio.bench/1" and data["benchmark"] == name and data["mode"] == "smoke"
        assert data["torch"] and data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"] == data["torch"]
        assert isinstance(data["settings"], dict) and data["wall_seconds"] > 0


@pytest.mark.slow
def test_step_cost_schema(smoke):
    data = json.loads((smoke / "results" / "step_cost.json").read_text())
    reps = data["settings"]["reps"]
    for arch in ("llama", "gpt2"):
        res = data["results"][arch]
        assert [e["model"]["width"] for e in res["widths"]] == data["settings"]["widths"]
        for entry in res["widths"]:
            for variant in ("sft", "scalebio", "scalebio_lisa"):
                _timing(entry["variants"][variant], reps)
                assert len(entry["variants"][variant]["ratio_to_sft"]) == reps
            assert entry["variants"]["sft"]["median_ratio"] == 1.0
        headline = next(e for e in res["widths"] if e["model"]["width"] == res["headline_width"])
        floor = headline["components"]["floor"]
        assert floor["scalebio_floor_ratio"] > 0 and floor["scalebio_lisa_floor_ratio"] > 0
        assert "scalebio_lisa_fused_w" in headline["variants"]


@pytest.mark.slow
def test_memory_schema_and_lisa_policies(smoke):
    data = json.loads((smoke / "results" / "memory.json").read_text())
    for arch in ("llama", "gpt2"):
        res = data["results"][arch]
        assert set(res["configs"]) == {"sft", "scalebio", "scalebio_lisa", "scalebio_lisa_keep_all_state"}
        assert res["peak_ratio_to_sft"]["sft"] == 1.0
        for cfg in res["configs"].values():
            assert cfg["peak_bytes"] > 0 and len(cfg["steps"]) == cfg["steps_run"]
            assert all(s["peak_bytes"] >= s["end_bytes"] > 0 for s in cfg["steps"])
        ours = [s["total_state"] for s in res["configs"]["scalebio_lisa"]["steps"]]
        keep = [s["total_state"] for s in res["configs"]["scalebio_lisa_keep_all_state"]["steps"]]
        assert len(set(ours)) == 1 and keep[-1] > keep[0]


@pytest.mark.slow
def test_sources_and_hypergradient_schema(smoke):
    src = json.loads((smoke / "results" / "sources.json").read_text())
    assert set(src["results"]["variants"]) == {"k=2", "k=64"}
    assert isinstance(src["results"]["within_5_percent"], bool)
    ratio = src["results"]["ratio"]
    assert ratio["min"] <= ratio["q1"] <= ratio["median"] <= ratio["q3"] <= ratio["max"]
    assert ratio["median"] == pytest.approx(src["results"]["relative_difference"] + 1)
    work = src["results"]["k_dependent_work_ratio"]
    assert work["min"] <= work["median"] <= work["max"] and src["results"]["ratio_from_k_dependent_work"] > 0
    hyp = json.loads((smoke / "results" / "hypergradient.json").read_text())["results"]
    assert math.isclose(sum(hyp["convex"]["p_star"]), 1.0, abs_tol=1e-9)
    for method in ("scalebio", "implicit_cg"):
        assert math.isclose(sum(hyp["convex"]["methods"][method]["p"]), 1.0, abs_tol=1e-9)
        assert hyp["language_model"]["memory"][method]["peak_bytes"] > 0
        _timing(hyp["language_model"]["time"][method], hyp["language_model"]["settings"]["reps"])


@pytest.mark.slow
def test_figures_rebuild_from_json_alone(smoke, tmp_path):
    sys.path.insert(0, str(REPO))
    from benchmarks import figures

    written = figures.main(["--results", str(smoke / "results"), "--out", str(tmp_path)])
    assert sorted(p.name for p in written) == sorted(f"bench_{n}.png" for n in FIGURES)
    assert all(p.stat().st_size > 0 for p in written)
    assert all((smoke / "figures" / p.name).is_file() for p in written)
