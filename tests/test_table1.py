"""experiments/llama3/table1.py on a synthetic protocol folder with known answers: the verdict of each task, the
seed-to-seed Spearman, the control source against 1/k, byte-identical files on a re-run, and no protocol
section (nor figure) when the folder is absent. Also the MT-Bench reference task of tasks.py."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import llama3_module

REPO = Path(__file__).resolve().parents[1]
LLAMA3 = REPO / "experiments" / "llama3"
SHARED_DATA = REPO.parent / "shared" / "data"
SOURCES = ["MathInstruct", "GPT4-LLM-Cleaned", "SlimOrca", "alpaca", "codealpaca", "control-dot-responses"]
WEIGHTS = {0: [0.30, 0.25, 0.20, 0.15, 0.08, 0.02],   # control far below 1/6; order as the reported weights
           1: [0.28, 0.26, 0.18, 0.16, 0.10, 0.02],   # the same ranking as seed 0
           2: [0.02, 0.08, 0.15, 0.20, 0.25, 0.30]}   # reversed: the control source on top
N_DOCS = 40


_module = llama3_module


def _write_arm(d: Path, lines: list[dict]) -> None:
    """eval_samples.jsonl and the eval.json it aggregates to."""
    d.mkdir(parents=True)
    d.joinpath("eval_samples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    tasks: dict[str, dict] = {}
    for task in sorted({line["task"] for line in lines}):
        rows = [line for line in lines if line["task"] == task]
        if "exact_match" in rows[0]:
            tasks[task] = {"exact_match,extract": float(np.mean([r["exact_match"] for r in rows]))}
        else:
            tasks[task] = {"nll_per_token": sum(r["nll"] for r in rows) / sum(r["n_tokens"] for r in rows),
                           "bits_per_byte": 1.0}
    d.joinpath("eval.json").write_text(json.dumps({"tasks": tasks}))


def _fake_protocol(root: Path) -> None:
    """Three reweighting seeds and three fine-tuning seeds of three arms. Per seed: learned is 0.2 nats/token better
    than uniform on `nll_better`, equal on `nll_same`, differs by zero-mean noise on `nll_noise`, and solves 15 fewer
    of 40 questions on `em_worse`; uniform_real equals learned on `nll_better`."""
    for seed, values in WEIGHTS.items():
        d = root / f"reweight_seed{seed}"
        d.mkdir(parents=True)
        final = dict(zip(SOURCES, values))
        d.joinpath("weights.json").write_text(json.dumps({
            "format": "scalebio.weights/1", "sources": SOURCES, "weights": final,
            "provenance": {"model": {"name_or_path": "tiny-model"}, "seed": seed}}))
        start = {s: 1 / len(SOURCES) for s in SOURCES}
        trajectory = [{"step": t, "weights": {s: start[s] + t / 4 * (final[s] - start[s]) for s in SOURCES}}
                      for t in range(5)]
        d.joinpath("weights.jsonl").write_text("".join(json.dumps(line) + "\n" for line in trajectory))
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 50, size=N_DOCS)
    for i in range(3):
        per_token = 1.5 + 0.2 * rng.standard_normal(N_DOCS)
        noise = 0.2 * rng.standard_normal(N_DOCS)
        solved = rng.random(N_DOCS) < 0.2
        solved[:15] = True
        arms = {"uniform": (per_token, solved, per_token),
                "learned": (per_token - 0.2, np.r_[np.zeros(15, bool), solved[15:]], per_token + noise),
                "uniform_real": (per_token - 0.2, solved, per_token)}  # as good as learned on nll_better
        for arm, (nll, em, noisy) in arms.items():
            lines = [{"task": "em_worse", "doc_id": d, "filter": "extract", "exact_match": int(em[d])}
                     for d in range(N_DOCS)]
            lines += [{"task": task, "doc_id": d, "nll": float(x * tokens[d]), "n_tokens": int(tokens[d]),
                       "n_bytes": int(4 * tokens[d])}
                      for task, values in (("nll_better", nll), ("nll_same", per_token), ("nll_noise", noisy))
                      for d, x in enumerate(values)]
            _write_arm(root / f"{arm}_ft{i}", lines)
            drawn = {"learned": dict(zip(SOURCES, (600, 500, 400, 300, 160, 40))),
                     "uniform": {s: 200 for s in SOURCES}, "uniform_real": {s: 240 for s in SOURCES[:5]}}[arm]
            (root / f"{arm}_ft{i}" / "resample.json").write_text(json.dumps({"n": 1200, "counts": drawn}))
    (root / "base").mkdir()
    (root / "base" / "eval.json").write_text(json.dumps({"tasks": {"nll_better": {"nll_per_token": 2.0}}}))


def _small_run(root: Path) -> None:
    d = root / "offline" / "learned_seed0"
    d.mkdir(parents=True)
    d.joinpath("eval.json").write_text(json.dumps({"tasks": {"llama3_test": {"nll_per_token": 1.9655}}}))


def _line(text: str, start: str) -> str:
    (line,) = [row for row in text.splitlines() if row.startswith(start)]
    return line


def test_table1_protocol_verdicts_and_determinism(tmp_path):
    table1 = _module("table1")
    results = tmp_path / "results" / "llama3"
    _fake_protocol(results / "protocol")
    _small_run(results)
    figures = tmp_path / "figures"
    md, csv_path = table1.build_table(results, tmp_path / "out", figures=figures)
    first = (md.read_bytes(), csv_path.read_bytes(), (figures / "table1_weights.png").read_bytes())
    table1.build_table(results, tmp_path / "out", figures=figures)
    assert (md.read_bytes(), csv_path.read_bytes(), (figures / "table1_weights.png").read_bytes()) == first
    small = md.read_text().split("## Small runs:")[1]
    assert "## Protocol:" in md.read_text() and "1.9655" in small and "protocol" not in small  # not a small run
    text = md.read_text().split("## Small runs:")[0]  # the protocol section
    vs = "| learned − uniform |"
    assert re.fullmatch(r"\| learned − uniform \| nll_better \| nll_per_token \| lower \| -0\.2000 \| "
                        r"\[-0\.2000, -0\.2000\] \| 0 1 2 \| 40 \| \*\*reproduced\*\* \|", _line(text, vs + " nll_better |"))
    assert re.fullmatch(r"\| learned − uniform \| nll_same \| nll_per_token \| lower \| \+0\.0000 \| "
                        r"\[\+0\.0000, \+0\.0000\] .*\*\*inconclusive\*\* \|", _line(text, vs + " nll_same |"))
    assert _line(text, vs + " nll_noise |").endswith("| **inconclusive** |")
    assert re.fullmatch(r"\| learned − uniform \| em_worse \| exact_match,extract \| higher \| -0\.3750 \| "
                        r"\[-0\.\d+, -0\.\d+\] .*\*\*contradicted\*\* \|", _line(text, vs + " em_worse |"))
    # The third arm is its own comparison: as good as learned on nll_better, so no difference there.
    assert re.fullmatch(r"\| learned − uniform_real \| nll_better \| nll_per_token \| lower \| \+0\.0000 \| .*"
                        r"\*\*inconclusive\*\* \|", _line(text, "| learned − uniform_real | nll_better |"))
    assert _line(text, "| uniform_real | 0 1 2 |").count("±") == 4
    # Benchmarks: learned / uniform / base rows with mean ± std over the three fine-tuning seeds.
    assert _line(text, "| learned | 0 1 2 |").count("±") == 4 and _line(text, "| base | — |").count("2.0000") == 1
    # Each arm's draw: the examples per source, the control first with its share; none for the base model.
    assert _line(text, "| arm | seed | examples |") == ("| arm | seed | examples | control-dot-responses | alpaca | "
                                                        "codealpaca | GPT4-LLM-Cleaned | MathInstruct | SlimOrca |")
    assert _line(text, "| learned | 1 | 2000 |") == "| learned | 1 | 2000 | 40 (2.0%) | 300 | 160 | 500 | 600 | 400 |"
    assert _line(text, "| uniform_real | 2 | 1200 |") == "| uniform_real | 2 | 1200 | — | 240 | 240 | 240 | 240 | 240 |"
    assert _line(text, "| uniform | 0 | 1200 |").split(" | ")[3] == "200 (16.7%)"
    # Weights beside the reported ones; Spearman of every pair of seeds; the control source against 1/k.
    assert _line(text, "| MathInstruct |") == "| MathInstruct | 0.190 | 0.3000 | 0.2800 | 0.0200 |"
    assert _line(text, "| seed 0 vs seed 1 |") == "| seed 0 vs seed 1 | 6 | 1.0000 |"
    assert _line(text, "| seed 0 vs seed 2 |") == "| seed 0 vs seed 2 | 6 | -1.0000 |"
    assert _line(text, "| seed 0 vs reported |") == "| seed 0 vs reported | 3 | 1.0000 |"
    assert _line(text, "| 0 | control-dot-responses |") == \
        "| 0 | control-dot-responses | 0.0200 | 0.1667 | 0.1200 | yes |"
    assert _line(text, "| 2 | control-dot-responses |").endswith("| 0.3000 | 0.1667 | 1.8000 | no |")

    csv_lines = csv_path.read_text().splitlines()
    assert csv_lines[0].endswith(",ci_lo,ci_hi,verdict")
    assert [line for line in csv_lines if line.startswith("draw,") and ",uniform,control-dot-responses," in line
            and ",0 1 2," not in line][0].split(",")[6:10] == ["share", "0.166667", "", "200"]
    assert [line for line in csv_lines if line.startswith("difference,") and ",em_worse," in line][0].endswith(
        ",contradicted")


def test_table1_without_protocol(tmp_path):
    table1 = _module("table1")
    results = tmp_path / "results" / "llama3"
    _small_run(results)
    md, csv_path = table1.build_table(results, tmp_path / "out", figures=tmp_path / "figures")
    assert "## Protocol" not in md.read_text() and "1.9655" in md.read_text()
    assert not (tmp_path / "figures" / "table1_weights.png").exists()
    assert csv_path.read_text().splitlines()[0] == "kind,origin,preset,model,method,item,metric,mean,std,n,seeds"


@pytest.mark.skipif(not (SHARED_DATA / "mt_bench").is_dir(), reason="../shared/data not present")
def test_mt_bench_reference_task(tmp_path):
    from scalebio.models import gpt2_bpe_tokenizer

    tasks = _module("tasks")
    tok = gpt2_bpe_tokenizer()
    default = tasks.offline_tasks(tok, SHARED_DATA, tmp_path, loglik_limit=2, em_limit=1, test_limit=2)
    assert "mt_bench_reference_loglik" not in [t["task"] for t in default]
    built = tasks.offline_tasks(tok, SHARED_DATA, tmp_path, em_limit=1, test_limit=2, mt_bench=True)
    task = built[-1]
    assert task["task"] == "mt_bench_reference_loglik" and task["output_type"] == "loglikelihood"
    assert task["metadata"]["records"] == 30
    doc = json.loads(Path(task["dataset_kwargs"]["data_files"]["test"]).read_text().splitlines()[0])
    # question 101's first turn → prompt; the first turn of its GPT-4 reference answer → target.
    assert "overtaken the second person" in doc["context"] and "### Response:" in doc["context"]
    assert doc["target"].startswith("If you have just overtaken the second person, your current position is now "
                                    "second place.")
    assert "last person" not in doc["target"]  # the second turn is not scored
