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


def test_finetune_picks_a_deepspeed_engine_under_a_deepspeed_launch(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "experiments" / "llama3" / "ds_zero3_offload.json"))
    assert resolve_mode("auto", 8, deepspeed_engine=True) == ("deepspeed", False)  # offload is the engine's
    assert resolve_mode("auto", 1, deepspeed_engine=True) == ("deepspeed", False)  # ZeRO offload on one GPU
    assert resolve_mode("fsdp", 8, deepspeed_engine=True) == ("fsdp", False)  # the config wins
    with pytest.raises(ConfigError, match="sharding: 'deepspeed' is not one of auto, none, fsdp"):
        resolve_mode("deepspeed", 8)  # scalebio reweight has no engine mode


def test_reweight_under_deepspeed_warns_and_maps_to_fsdp(monkeypatch, caplog):
    from scalebio.sharding import deepspeed_fsdp_mapping

    assert deepspeed_fsdp_mapping("none", False) is None  # not a DeepSpeed launch
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "experiments" / "llama3" / "ds_zero3_offload.json"))
    with caplog.at_level("WARNING", logger="scalebio.sharding"):
        mode, offload = resolve_mode("auto", 8)
    assert (mode, offload) == ("fsdp", True)
    assert "does not build DeepSpeed engines" in caplog.text and "sharding=fsdp" in caplog.text
    mapping = deepspeed_fsdp_mapping(mode, offload)
    assert mapping["deepspeed_config_file"].endswith("ds_zero3_offload.json")
    assert mapping["mapped"]["zero_optimization.stage"]["deepspeed"] == 3
    assert mapping["mapped"]["zero_optimization.stage"]["scalebio"] == "sharding: fsdp"
    assert mapping["mapped"]["zero_optimization.offload_param.device"] == {"deepspeed": "cpu", "scalebio": "FSDP CPU offload: True"}
    assert mapping["not_mapped"]["zero_optimization.offload_optimizer.device"].startswith("cpu")
    assert mapping["not_mapped"]["bf16 / fp16"].startswith("bf16")


def _ds(tmp_path, payload) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(payload))
    return str(path)


def _resolve(path, **kw):
    from scalebio.sharding import deepspeed_config

    args = dict(micro_batch=2, global_batch=16, world=2, clip_grad_norm=1.0, hidden_size=32, bf16=False)
    return deepspeed_config(path, **{**args, **kw})


def test_deepspeed_config_fills_auto_from_the_finetune_config():
    ds = _resolve(str(REPO / "experiments" / "llama3" / "ds_zero3_offload.json"), bf16=True)
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (2, 16, 4)
    assert ds["gradient_clipping"] == 1.0
    zero = ds["zero_optimization"]
    assert (zero["stage"], zero["offload_param"]["device"], zero["offload_optimizer"]["device"]) == (3, "cpu", "cpu")
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (1024, 921, 320)
    assert ds["bf16"]["enabled"] is True


def test_deepspeed_config_auto_precision_follows_the_model_dtype(tmp_path):
    path = _ds(tmp_path, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}})
    assert _resolve(path)["bf16"]["enabled"] is False
    assert _resolve(path, bf16=True)["bf16"]["enabled"] is True
    assert _resolve(path, clip_grad_norm=None)["gradient_clipping"] == 0.0


@pytest.mark.parametrize("payload, message", [
    ({"train_micro_batch_size_per_gpu": 4}, r"ds.json: train_micro_batch_size_per_gpu: 4 disagrees with the fine-tuning config's micro_batch \(2\)"),
    ({"gradient_clipping": 0.5}, r"ds.json: gradient_clipping: 0.5 disagrees .* clip_grad_norm \(1.0\)"),
    ({"optimizer": {"type": "Adam"}}, r"ds.json: optimizer: scalebio finetune builds AdamW"),
    ({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, r"ds.json: zero_optimization.sub_group_size: \"auto\" is not resolved"),
])
def test_deepspeed_config_errors_name_the_file_and_field(tmp_path, payload, message):
    with pytest.raises(ConfigError, match=message):
        _resolve(_ds(tmp_path, payload))


def test_deepspeed_config_needs_equal_micro_batches_on_every_rank(tmp_path):
    with pytest.raises(ConfigError, match=r"global_batch: 12 is not a multiple of micro_batch × ranks = 2 × 4"):
        _resolve(_ds(tmp_path, {}), global_batch=12, world=4)
    with pytest.raises(ConfigError, match=r"ds.json: cannot read"):
        _resolve(str(tmp_path / "ds.json").replace("ds.json", "missing/ds.json"))
