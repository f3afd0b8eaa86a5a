"""scalebio.sharding.resolve_mode: which launches shard u and w (the 2-rank runs are in test_distributed.py)."""

import json

import pytest
from conftest import REPO

from scalebio.config import ConfigError
from scalebio.sharding import resolve_mode

LAUNCH_VARS = ["ACCELERATE_USE_FSDP", "FSDP_OFFLOAD_PARAMS", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
               "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "ACCELERATE_DEEPSPEED_CONFIG_FILE"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)


def test_plain_launch_replicates():
    assert resolve_mode("auto", 8) == ("none", False)
    assert resolve_mode("fsdp", 1) == ("none", False)  # nothing to shard on one rank
    assert resolve_mode("fsdp", 2) == ("fsdp", False)


def test_accelerate_fsdp_config_shards(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert resolve_mode("auto", 8) == ("fsdp", False)
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    assert resolve_mode("auto", 8) == ("fsdp", True)
    assert resolve_mode("none", 8) == ("none", False)  # the config wins over the launcher


def test_deepspeed_zero3_file_of_this_repo_shards_with_offload(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "experiments" / "llama3" / "ds_zero3_offload.json"))
    assert resolve_mode("auto", 8) == ("fsdp", True)
    stage2 = tmp_path / "ds.json"
    stage2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(stage2))
    assert resolve_mode("auto", 8) == ("none", False)
    stage2.write_text("{not json")
    with pytest.raises(ConfigError, match="ds.json"):
        resolve_mode("auto", 8)


def test_unknown_mode_is_named():
    with pytest.raises(ConfigError, match="sharding: 'zero'"):
        resolve_mode("zero", 2)
