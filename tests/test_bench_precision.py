"""The precision benchmark's CPU-side parts: argument checks, output paths, the results schema of a --smoke run
(tiny random Llama, seconds), the table's met / MISSED logic, the full-shape branch with a real (tiny) reweighting
comparison, and gpu_check.sh refusing without CUDA. Numbers at this size mean nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_run_config
from scalebio import precision as library_precision

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import precision, run, table  # noqa: E402

KEYS = ("sft_step_bf16_over_fp32", "scalebio_step_bf16_over_fp32", "scalebio_over_sft_bf16_lisa",
        "fused_over_two_pass_w", "mfu_sft_bf16", "weights_l1_bf16_vs_fp32", "mfu_sft_fp32")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        run.main(["--smoke", "--only", "precision", "profile", "--out", str(out), "--figures", ""])
    finally:
        torch.set_num_threads(threads)
    return out


def test_output_paths():
    assert run.output_path(Path("r"), "precision", "cpu") == Path("r/precision.json")
    assert run.output_path(Path("r"), "precision", "cuda") == Path("r/gpu_precision.json")
    assert run.output_path(Path("r"), "profile", "cuda:0") == Path("r/gpu_profile.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("argv, message", [(["--device", "cuda"], "torch.cuda.is_available() is False"),
                                           (["--device", "tpu"], "expected cpu or cuda")])
def test_device_argument_refused(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run.main([*argv, "--only", "precision", "--out", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_smoke_schema(smoke):
    record = json.loads((smoke / "precision.json").read_text())
    assert record["benchmark"] == "precision" and record["mode"] == "smoke" and record["device"] == "cpu"
    assert "cpu_bf16_flags" in record["machine"] and record["machine"]["precision_auto_on_cpu"] in ("fp32", "bf16")
    res = record["results"]
    assert isinstance(res["bf16_units"], bool) and isinstance(res["cpu_bf16_flags"], list)
    assert res["precision_auto"] in ("fp32", "bf16")
    for key in KEYS:
        assert "median" in res[key], key
    assert set(res["threads"]) == {"1", "2"}
    for detail in res["threads"].values():
        assert detail["peaks"]["fp32"]["gflops"] > 0 and detail["peaks"]["bf16"]["gflops"] > 0
        sections = detail["sections"]
        assert sections["full"]["shape"] == [2, 16] and "scalebio_two_pass_fp32" in sections["full"]["variants"]
        # bf16 is timed at full shape with bf16 units, else on the reduced shape beside fp32 on that shape
        bf16_at = sections["full"] if res["bf16_units"] else sections["reduced"]
        assert {"sft_bf16", "sft_fp32", "scalebio_bf16", "eval_bf16"} <= set(bf16_at["variants"])
        assert detail["keys"]["sft_step_bf16_over_fp32"]["shape"] == bf16_at["shape"]
        for key in KEYS[:5]:
            assert detail["keys"][key]["median"] > 0, key
    first = res["threads"]["1"]["peaks"]
    assert res["bf16_units"] == (first["bf16"]["gflops"] > first["fp32"]["gflops"])
    full = res["threads"]["1"]["sections"]["full"]["variants"]
    fused = res["fused_over_two_pass_w"]
    assert fused["precision"] == ("bf16" if res["bf16_units"] else "fp32")
    p = fused["precision"]
    assert fused["ratios"] == [a / b for a, b in zip(full[f"scalebio_{p}"]["seconds"], full[f"scalebio_two_pass_{p}"]["seconds"])]
    mfu = res["mfu_sft_bf16"]
    assert mfu["median"] == pytest.approx(mfu["flops_per_step"] / mfu["step_s"] / (mfu["peak_gflops"] * 1e9))
    assert mfu["flops_per_step"] == 6 * res["model"]["parameters"] * mfu["tokens"]
    l1 = res["weights_l1_bf16_vs_fp32"]
    assert l1["median"] is None and l1["reason"] and l1["estimated_seconds"]["bf16"] > 0  # smoke: never run


def test_profile_schema(smoke):
    res = json.loads((smoke / "profile.json").read_text())["results"]
    assert res["configs"]["before"]["chunked_ce"] is False and res["configs"]["before"]["fused_w"] is False
    assert res["configs"]["after"]["chunked_ce"] is True and res["configs"]["after"]["fused_w"] is True
    for cfg in res["configs"].values():
        assert set(cfg["ms"]) == set(table_categories())
        assert sum(cfg["ms"].values()) == pytest.approx(cfg["profiled_ms"])
        assert sum(cfg["percent"].values()) == pytest.approx(100)
        assert cfg["ms"]["matmul"] > 0 and cfg["ms"]["optimizer"] > 0


def table_categories():
    from benchmarks.step_profile import CATEGORIES

    return CATEGORIES


def test_verdicts():
    assert table.verdict({"median": 0.39}, "<=", 0.40) == "met"
    assert table.verdict({"median": 0.41}, "<=", 0.40) == "MISSED"
    assert table.verdict({"median": 0.41}, ">=", 0.40) == "met"
    assert table.verdict({"median": 0.39}, ">=", 0.40) == "MISSED"
    assert table.verdict({"median": None, "reason": "no bf16 units"}, "<=", 0.02) == "not measured: no bf16 units"


def test_table_rows_follow_the_results(smoke, tmp_path):
    data = json.loads((smoke / "precision.json").read_text())
    res = data["results"]
    res["sft_step_bf16_over_fp32"]["median"] = 0.3   # met
    res["mfu_sft_bf16"]["median"] = 0.1              # MISSED (≥ 0.40)
    (tmp_path / "precision.json").write_text(json.dumps(data))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.precision_lines(tmp_path)}
    assert rows["SFT step, bf16 ÷ fp32"].endswith("≤ 0.4: met |")
    assert rows["MFU of the SFT step, bf16 (6·N·tokens ÷ time ÷ bf16 matmul peak)"].endswith("≥ 0.4: MISSED |")
    assert "not measured: " in rows["‖p_bf16 − p_fp32‖₁ after 30 reweighting steps, same seed (bf16 with λ's losses in fp32)"]
    assert len(rows["SFT step, bf16 ÷ fp32"].split(" | ")) == 4  # label, 1 thread, 2 threads, target
    # A GPU column says its bf16 units from the GPU's peaks, never from the host CPU's flags (also recorded).
    gpu = json.loads(json.dumps(data))
    gpu["results"].update(device="cuda", cpu_bf16_flags=["amx_bf16"], headline_threads=1)
    (tmp_path / "gpu_precision.json").write_text(json.dumps(gpu))
    units = next(line for line in table.precision_lines(tmp_path) if line.startswith("| bf16 matrix units"))
    assert units.split(" | ")[-2].startswith(("yes (cuda, measured peaks;", "no (cuda, measured peaks;"))
    # The profile runs in the precision `auto` gives (fp32 under the suite's SCALEBIO_CPU_AUTO; bf16 with AVX-512 BF16
    # or AMX otherwise): the heading follows what profile.json recorded, checked for both values so the verdict is
    # the same on every CPU.
    profile = json.loads((smoke / "profile.json").read_text())
    auto = library_precision.resolve("auto", torch.device("cpu"))
    assert profile["results"]["precision"] == ("bf16" if auto == torch.bfloat16 else "fp32")
    for recorded in ("fp32", "bf16"):
        profile["results"]["precision"] = recorded
        (tmp_path / "profile.json").write_text(json.dumps(profile))
        lines = table.profile_lines(tmp_path)
        assert lines[0].startswith(f"| CPU {recorded}, 2×16, 1 thread(s)")
        assert any(r.startswith("| log-softmax / CE |") for r in lines)


def test_full_shape_branch_runs_the_reweighting_comparison(tmp_path):
    config = tiny_run_config(tmp_path)  # a tiny random GPT-2 on two tiny sources
    settings = {**run.SMOKE["precision"], "threads": [1], "reps": [1], "reweight_config": str(config),
                "reweight_steps": 3}
    threads = torch.get_num_threads()
    try:
        res = precision.run(**settings, assume_bf16_units=True)
    finally:
        torch.set_num_threads(threads)
    sections = res["threads"]["1"]["sections"]
    assert set(sections) == {"full"} and "scalebio_two_pass_bf16" in sections["full"]["variants"]
    assert res["fused_over_two_pass_w"]["precision"] == "bf16"
    l1 = res["weights_l1_bf16_vs_fp32"]
    runs = l1["runs"]
    assert sum(runs["fp32"]["weights"]) == pytest.approx(1) and sum(runs["bf16"]["weights"]) == pytest.approx(1)
    assert runs["fp32"]["weights"] != [0.5, 0.5]  # three steps moved the weights
    assert l1["median"] == pytest.approx(sum(abs(a - b) for a, b in zip(runs["fp32"]["weights"], runs["bf16"]["weights"])))
    assert 0 < l1["median"] < 0.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_check_refuses_without_cuda(tmp_path):
    env = {**os.environ, "PY": sys.executable}
    done = subprocess.run(["bash", str(REPO / "benchmarks/gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()


def test_gap_noise_smoke(tmp_path):
    """benchmarks/gap_noise.py at tiny size (its own 3-step run stands in for a protocol checkpoint): registered
    in run.py, every mode measured at every point against fp64, the table built from the JSON."""
    from benchmarks import gap_noise

    assert "gap_noise" in run.EXPERIMENTS and run.SMOKE["gap_noise"]["smoke"] and "gap_noise" in run.FULL
    threads = torch.get_num_threads()
    try:
        res = run.run_experiment("gap_noise", {**run.SMOKE["gap_noise"], "batches": 2})
    finally:
        torch.set_num_threads(threads)
    assert set(res["points"]) == {"step 1", "step 3"} and res["batches"]["count"] == 2 and res["skipped"] == {}
    for point in res["points"].values():
        assert len(point["reference_gap"]) == 2 and len(point["reference_gap"][0]) == len(res["sources"]) == 3
        assert set(point["modes"]) == {"fp32", "bf16_autocast", "bf16"}
        assert point["modes"]["bf16"]["gap_error"] == point["modes"]["fp32"]["gap_error"]  # the same fp32 forwards
        for row in point["modes"].values():
            assert -1 <= row["lambda_grad_cosine"]["min"] <= 1 and row["gap_error"]["max"] >= 0
    assert res["summary"]["fp32"]["lambda_grad_cosine_min"] > 0.9  # fp32 against fp64, even at this size
    (tmp_path / "gap_noise.json").write_text(json.dumps({"results": res}))
    lines = gap_noise.table_lines(tmp_path)
    assert len(lines) == 5 and lines[0].startswith("| mode | step 1 (max ‖gap‖")
