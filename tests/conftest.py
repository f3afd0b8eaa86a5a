"""Shared test fixtures: offline environment, tiny models and tiny data written into tmp_path."""

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# `precision: auto` picks fp32 on every CPU here, whatever its bf16 units, so that no verdict depends on the machine
# (subprocesses inherit it). Tests of bf16 name it explicitly; tests of auto's detection unset it.
os.environ["SCALEBIO_CPU_AUTO"] = "fp32"

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

torch.set_num_threads(2)


class LinearModel(torch.nn.Module):
    """A weight vector w ∈ R^d: the convex problems' "model"."""

    def __init__(self, d: int, dtype=torch.float64):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(d, dtype=dtype))


class SquaredLossObjective:
    """ℓ(w; x, y) = ½ (xᵀw − y)²; validation = mean of the same loss. Batches: {"x" [b,d], "y" [b], "source" [b]}."""

    def per_example_loss(self, model, batch):
        return 0.5 * (batch["x"] @ model.weight - batch["y"]) ** 2

    def validation_loss(self, model, batch):
        losses = 0.5 * (batch["x"] @ model.weight - batch["y"]) ** 2
        return losses.sum(), torch.tensor(losses.numel())

    def validation_terms(self, batch):
        return int(batch["y"].numel())


def alpaca_records(n, seed, noise=0.0, prefix="q"):
    """Tiny Alpaca-format records; a fraction ``noise`` of responses replaced by "." (the denoising corruption)."""
    rng = random.Random(seed)
    words = "the cat sat on a mat while dogs ran in the park and birds sang songs about green trees".split()
    out = []
    for i in range(n):
        q = f"{prefix} {i}: describe " + " ".join(rng.choice(words) for _ in range(4))
        a = " ".join(rng.choice(words) for _ in range(12))
        out.append({"instruction": q, "input": "", "output": "." if rng.random() < noise else a})
    return out


def llama3_module(name: str):
    """A fresh copy of experiments/llama3/<name>.py, as module ``llama3_<name>``: a test may replace its functions
    (a stage that must not run again) without changing ``experiments.llama3.<name>`` for the tests after it."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"llama3_{name}", REPO / "experiments" / "llama3" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_run_config(tmp_path: Path, noises=(0.0, 0.5), n=32, n_val=16, arch="gpt2", **top) -> Path:
    """A complete YAML run config for a tiny random GPT-2 on tiny data; returns its path."""
    data = tmp_path / "data"
    sources = []
    for i, noise in enumerate(noises):
        write_jsonl(data / f"s{i}.jsonl", alpaca_records(n, seed=i, noise=noise, prefix=f"s{i}"))
        sources.append({"name": f"noise_{noise:.2f}", "path": f"data/s{i}.jsonl"})
    write_jsonl(data / "val.jsonl", alpaca_records(n_val, seed=99, prefix="val"))
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "model": {"architecture": arch, "config_overrides": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 128}},
        "tokenizer": {"kind": "train_bpe", "vocab_size": 300},
        "data": {"sources": sources, "validation": {"path": "data/val.jsonl"}, "max_length": 64},
        "solver": {"steps": 4, "global_batch": 8, "micro_batch": 4, "lr_u": 1e-3, "lr_w": 1e-3, "lr_lambda": 1e-2},
        "checkpoint_every": 2,
    }
    for key, value in top.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED_DATA
