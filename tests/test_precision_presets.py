"""Every GPT-2 experiment preset pins its precision (and a reweighting preset its solver.conventions,
solver.gap_precision and solver.u_adam) to what its committed results ran, as their meta.json and config.yaml record, so the numbers
do not depend on the machine that reruns them (`auto` resolves by the CPU's bf16 units). The Llama-3 presets pin
bf16 with fp32 λ losses (issue 18)."""

import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
GPT2 = REPO / "experiments" / "gpt2"
TASKS = ("denoising", "instruction_following", "multilingual")


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _committed(task: str) -> list[tuple[dict, dict]]:
    """(meta.json, config.yaml) of every committed reweighting run of ``task``."""
    runs = sorted((REPO / "results" / "gpt2" / task).glob("*/reweight_seed*"))
    assert runs
    return [(json.loads((r / "meta.json").read_text()), _raw(r / "config.yaml")) for r in runs]


def _u_adam_ran(config: dict) -> str:
    """The u_adam policy a committed run's config.yaml ran: the field, or (a run from before it existed) what its
    convention did then."""
    from scalebio.conventions import legacy_u_adam

    solver = config["solver"]
    return solver.get("u_adam") or legacy_u_adam(solver.get("conventions", "scalebio"))  # before conventions: ours


@pytest.mark.parametrize("name, results", [("protocol_smollm2", "protocol"), ("offline_smollm2", "offline")])
def test_smollm2_presets_pin_the_u_adam_their_committed_runs_ran(name, results):
    preset = _raw(REPO / "experiments" / "llama3" / f"{name}.yaml")
    runs = sorted((REPO / "results" / "llama3" / results).glob("reweight_seed*/config.yaml"))
    assert runs
    for path in runs:
        assert preset["solver"]["u_adam"] == _u_adam_ran(_raw(path)), path


@pytest.mark.parametrize("task", TASKS)
def test_cpu_presets_pin_what_the_committed_runs_ran(task):
    preset = _raw(GPT2 / task / "cpu.yaml")
    for meta, config in _committed(task):
        ran = meta["precision"]["compute_dtype"]  # what `precision` resolved to on the machine that ran it
        assert preset["precision"] == ran
        assert preset["solver"]["conventions"] == config["solver"]["conventions"]
        # Before issue 18 a bf16 run took λ's gaps from its bf16 passes: gap_precision: compute reproduces that.
        assert preset["solver"]["gap_precision"] == ("compute" if ran == "bf16" else "fp32")
        assert preset["solver"]["u_adam"] == _u_adam_ran(config)
    assert _raw(GPT2 / task / "finetune_cpu.yaml")["precision"] == "bf16"  # the retrain runs: same machines, auto


@pytest.mark.parametrize("task", TASKS)
def test_paper_presets_pin_bf16_with_fp32_gaps(task):
    preset = _raw(GPT2 / task / "paper.yaml")
    assert preset["precision"] == "bf16" and preset["solver"]["conventions"] == "v1"
    assert preset["solver"]["gap_precision"] == "fp32"  # lr 1e-5 on pretrained GPT-2: gaps below bf16 rounding


def test_every_gpt2_run_preset_names_its_precision():
    presets = 0
    for path in GPT2.glob("*/*.yaml"):
        data = _raw(path)
        if "model" not in data:  # pipeline.yaml, compare.yaml: settings of the drivers, not run configs
            continue
        presets += 1
        assert "precision" in data, path
        if "solver" in data:
            assert {"conventions", "gap_precision"} <= set(data["solver"]), path
            assert data["solver"]["conventions"] != "scalebio" or "u_adam" in data["solver"], path
    assert presets == 9  # cpu, finetune_cpu and paper of each of the three tasks


@pytest.mark.parametrize("name", ["llama3_8b", "llama3_70b", "finetune_8b", "finetune_70b"])
def test_llama3_presets_pin_bf16_compute_with_fp32_master(name):
    data = _raw(REPO / "experiments" / "llama3" / f"{name}.yaml")
    assert data["precision"] == "bf16" and data["model"]["dtype"] == "bfloat16"  # the load dtype; trained in fp32
    if "solver" in data:
        assert data["solver"]["gap_precision"] == "fp32"


def test_every_llama3_run_preset_names_its_precision():
    """Every run preset of experiments/llama3 (reweighting and fine-tuning) pins ``precision``, and a reweighting
    preset its ``solver.conventions`` (and ``solver.gap_precision`` unless it runs fp32, where the gap has no other
    source): a later default cannot change what it runs."""
    presets = 0
    for path in sorted((REPO / "experiments" / "llama3").glob("*.yaml")):
        data = _raw(path)
        if not isinstance(data, dict) or not ({"model", "solver", "train"} & set(data)):
            continue  # accelerate launcher files
        presets += 1
        assert "precision" in data, path
        if "solver" in data:
            assert "conventions" in data["solver"], path
            assert data["solver"]["conventions"] != "scalebio" or "u_adam" in data["solver"], path
            assert data["precision"] == "fp32" or "gap_precision" in data["solver"], path
    assert presets == 8  # offline, protocol, 8B, 70B: reweighting and fine-tuning each
