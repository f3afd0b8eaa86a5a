"""Two CPU processes over gloo (torchrun) against one process with the same global batch, replicated (DDP-style
all-reduce, ``sharding=none``) and sharded (torch FSDP, ``sharding=fsdp``).

Tolerance: λ agrees to 1e-6 absolute after 3 steps. Each rank sums its share of the global-batch loss and the
gradients are all-reduced or reduce-scattered (summed), so the runs differ only in floating-point summation
order (float32 models: observed differences ~1e-8).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, tiny_run_config

pytestmark = pytest.mark.slow

NO_DROPOUT = ["model.config_overrides.resid_pdrop=0.0", "model.config_overrides.embd_pdrop=0.0",
              "model.config_overrides.attn_pdrop=0.0", "solver.steps=3", "checkpoint_every=1",
              "lisa.enabled=true", "lisa.gamma=1", "lisa.interval=1"]


def launch(config, out, nproc, extra=(), env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    worker = str(REPO / "tests" / "distributed_worker.py")
    if nproc == 1:
        cmd = [sys.executable, worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29517", worker]
    subprocess.run([*cmd, str(config), str(out), *NO_DROPOUT, *extra], check=True, env=env, cwd=REPO,
                   capture_output=True, timeout=300)
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module", params=["none", "fsdp"])
def runs(request, tmp_path_factory):
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"dist_{mode}")
    config = tiny_run_config(tmp)
    single = launch(config, tmp / "one", 1, [f"run_dir={tmp / 'run1'}"])
    double = launch(config, tmp / "two", 2, [f"run_dir={tmp / 'run2'}", f"sharding={mode}"])
    return tmp, config, single, double, mode


def test_two_ranks_really_ran(runs):
    _, _, single, double, mode = runs
    assert single[0]["world_size"] == 1
    assert [r["world_size"] for r in double] == [2, 2]
    assert [r["sharding"] for r in double] == [mode, mode]
    for r in double:
        if mode == "fsdp":  # each rank holds about half of u and w (dim-0 shards)
            assert r["local_numel"] < 0.6 * r["numel"]
        else:
            assert r["local_numel"] == r["numel"]


def test_lambda_matches_one_process(runs):
    _, _, single, double, _ = runs
    for r in double:
        assert r["lambda"] == pytest.approx(single[0]["lambda"], abs=1e-6)
    assert double[0]["lambda"] == double[1]["lambda"]


def test_lisa_blocks_identical_on_every_rank(runs):
    _, _, single, double, _ = runs
    assert double[0]["lisa"] == double[1]["lisa"] == single[0]["lisa"]


def test_two_process_run_resumes(runs):
    tmp, config, _, double, mode = runs
    run_dir = tmp / "run3"
    launch(config, tmp / "three_a", 2, [f"run_dir={run_dir}", f"sharding={mode}"], env_extra={"STOP_AFTER": "1"})
    assert not (run_dir / "weights.json").exists()
    resumed = launch(config, tmp / "three_b", 2, [f"run_dir={run_dir}", f"sharding={mode}"])
    assert resumed[0]["lambda"] == pytest.approx(double[0]["lambda"], abs=1e-12)
    assert json.loads((run_dir / "weights.json").read_text())["lambda"] == pytest.approx(double[0]["lambda"], abs=1e-12)


@pytest.fixture(scope="module")
def finetune_config(tmp_path_factory):
    from conftest import alpaca_records, write_jsonl

    tmp = tmp_path_factory.mktemp("ft")
    write_jsonl(tmp / "train.jsonl", alpaca_records(32, seed=5))
    cfg = {"output_dir": str(tmp / "out"), "seed": 0, "threads": 1,
           "model": {"architecture": "llama", "config_overrides": {
               "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 2}},
           "tokenizer": {"kind": "gpt2_bpe"}, "train": {"path": str(tmp / "train.jsonl")},
           "max_length": 64, "steps": 3, "global_batch": 8, "micro_batch": 2, "lr": 1e-3,
           "lisa": {"enabled": True, "gamma": 1, "interval": 1}}
    import yaml

    (tmp / "ft.yaml").write_text(yaml.safe_dump(cfg))
    return tmp


def _finetune(tmp, name, nproc, sharding):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                      "--master_port", "29518"]
    cli = ["-m", "scalebio.cli", "finetune", str(tmp / "ft.yaml"), f"output_dir={tmp / name}", f"sharding={sharding}",
           "--no-progress"]
    subprocess.run([sys.executable, *launcher, *cli], check=True, env=env, cwd=REPO, capture_output=True, timeout=300)
    meta = json.loads((tmp / name / "meta.json").read_text())
    losses = [json.loads(x)["train_loss"] for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    return meta, losses, load_file(str(tmp / name / "model" / "model.safetensors"))


@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_finetune_two_ranks_match_one(finetune_config, sharding):
    """scalebio finetune on 2 ranks (all-reduce or FSDP) gives the 1-process losses and weights (float32: 1e-5)."""
    one_meta, one_losses, one_weights = _finetune(finetune_config, "one", 1, "none")
    meta, losses, weights = _finetune(finetune_config, f"two_{sharding}", 2, sharding)
    assert (one_meta["world_size"], meta["world_size"], meta["sharding"]) == (1, 2, sharding)
    assert losses == pytest.approx(one_losses, abs=1e-5)
    assert set(weights) == set(one_weights)
    for key, value in one_weights.items():
        assert (weights[key] - value).abs().max().item() < 1e-5, key


@pytest.mark.parametrize("launch_file, extra_flags, offload", [
    ("accelerate_fsdp.yaml", ["--mixed_precision", "no"], False),
    ("accelerate_deepspeed_zero3.yaml", [], True),  # ZeRO-3 + parameter offload → FSDP with CPU offload
])
def test_repo_accelerate_files_launch_sharded_runs(tmp_path, launch_file, extra_flags, offload):
    """`accelerate launch --config_file experiments/llama3/<file>` (2 CPU processes): the run really has 2 ranks,
    shards u and w with FSDP by itself (sharding: auto), and gives the 1-process λ."""
    config = tiny_run_config(tmp_path)
    single = launch(config, tmp_path / "one", 1, [f"run_dir={tmp_path / 'run1'}"])
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "experiments" / "llama3" / launch_file),
           "--num_processes", "2", "--main_process_port", "29521", *extra_flags,
           str(REPO / "tests" / "distributed_worker.py"), str(config), str(tmp_path / "two"), *NO_DROPOUT,
           f"run_dir={tmp_path / 'run2'}"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["sharding"] for r in ranks] == ["fsdp", "fsdp"]
    assert all(r["local_numel"] < 0.6 * r["numel"] for r in ranks)
    assert [r["offload"] for r in ranks] == [offload, offload]
    for r in ranks:
        assert r["lambda"] == pytest.approx(single[0]["lambda"], abs=1e-6)
