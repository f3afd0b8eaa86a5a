"""`scalebio finetune` on one process: its data path (scalebio.data.build_mixed_set, the solver's tokenisation on a
file whose records mix formats) and the checks that guard its DeepSpeed mode. The 2-rank runs (all-reduce,
FSDP, DeepSpeed ZeRO-2/3) are in test_distributed.py."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import alpaca_records, write_jsonl

from scalebio import data as data_mod
from scalebio.config import ConfigError, load_config
from scalebio.finetune import FinetuneConfig, finetune, finished_run
from scalebio.models import gpt2_bpe_tokenizer

CONVERSATION = {"conversations": [{"from": "human", "value": "two plus two?"}, {"from": "gpt", "value": "four"},
                                  {"from": "human", "value": "and three?"}, {"from": "gpt", "value": "five"}]}


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_bpe_tokenizer()


def _config(tmp_path, records, **top) -> FinetuneConfig:
    write_jsonl(tmp_path / "train.jsonl", records)
    cfg = {"output_dir": str(tmp_path / "out"), "threads": 1, "tokenizer": {"kind": "gpt2_bpe"},
           "model": {"architecture": "llama", "config_overrides": {
               "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 2}},
           "train": {"path": "train.jsonl"}, "max_length": 64, "steps": 2, "global_batch": 4, "micro_batch": 2,
           "precision": "fp32", **top}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(cfg))
    return load_config(str(tmp_path / "ft.yaml"), [], FinetuneConfig)


def test_mixed_file_is_tokenised_record_by_record_in_its_own_format(tmp_path, gpt2):
    """A resampled file mixes formats: each record gets the tokenisation of its own format, in file order."""
    records = [*alpaca_records(2, seed=1), CONVERSATION, {"text": "plain text carries loss everywhere"}]
    cfg = _config(tmp_path, records)
    built = data_mod.build_mixed_set(cfg.train, cfg, gpt2, cfg.max_length)
    assert built.stats == {"records": 4, "truncated": 0, "dropped_no_response": 0, "kept": 4}
    for rec, fmt, ex in zip(records, ["alpaca", "alpaca", "conversations", "text"], built.examples):
        ids, labels, _ = data_mod.tokenize_record(rec, fmt, gpt2, cfg.max_length)
        assert (ex.input_ids, ex.labels, ex.source) == (ids, labels, 0)
    assert gpt2.decode([t for t in built.examples[2].labels if t != -100]) == "four<|endoftext|>five<|endoftext|>"


def test_mixed_file_counts_truncation_and_names_bad_records(tmp_path, gpt2):
    long_prompt = {"instruction": "word " * 80, "input": "", "output": "answer"}
    cfg = _config(tmp_path, [*alpaca_records(3, seed=2), long_prompt])
    built = data_mod.build_mixed_set(cfg.train, cfg, gpt2, cfg.max_length)
    assert built.stats == {"records": 4, "truncated": 1, "dropped_no_response": 1, "kept": 3}
    cfg = _config(tmp_path, [long_prompt])
    with pytest.raises(data_mod.DataError, match=r"train.jsonl: empty after truncation: every example lost its response"):
        data_mod.build_mixed_set(cfg.train, cfg, gpt2, cfg.max_length)
    cfg = _config(tmp_path, [*alpaca_records(2, seed=3), {"instruction": "no output"}])
    with pytest.raises(data_mod.DataError, match=r"train.jsonl:3: cannot detect the format"):
        data_mod.build_mixed_set(cfg.train, cfg, gpt2, cfg.max_length)
    cfg = _config(tmp_path, [*alpaca_records(2, seed=3), {"instruction": "q", "output": 3}])
    with pytest.raises(data_mod.DataError, match=r"train.jsonl:3: field 'output': expected a string"):
        data_mod.build_mixed_set(cfg.train, cfg, gpt2, cfg.max_length)


def test_micro_batches_split_a_share_in_order(gpt2):
    examples = [data_mod.Example([1, 2, 3][: i + 1], [1, 2, 3][: i + 1], 0) for i in range(3)]
    batches = data_mod.micro_batches(examples, 2, gpt2.pad_token_id)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    assert batches[0]["input_ids"].tolist() == [[1, gpt2.pad_token_id], [1, 2]]


def test_finetune_trains_and_records_its_data(tmp_path):
    cfg = _config(tmp_path, alpaca_records(8, seed=4), save_model=False)
    finetune(cfg, progress=False)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["sharding"], meta["deepspeed"], meta["examples"]) == ("none", None, 8)
    assert meta["data"] == {"records": 8, "truncated": 0, "dropped_no_response": 0, "kept": 8}
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["train_loss"] > 0 and m["grad_norm"] > 0 for m in metrics)


def test_a_finished_run_is_recognised_only_for_its_config_and_training_file(tmp_path):
    """finished_run names the model of a finished run of exactly this config and training file (what a campaign
    unit stopped while evaluating asks before training again), and nothing for another config, another training
    file, an unsaved model or an unfinished run."""
    cfg = _config(tmp_path, alpaca_records(8, seed=4))
    assert finished_run(cfg) is None  # nothing ran yet
    folder = finetune(cfg, progress=False)
    assert finished_run(cfg) == folder and (folder / "config.json").is_file()
    other = _config(tmp_path, alpaca_records(8, seed=4), lr=1e-3)
    assert finished_run(other) is None
    write_jsonl(tmp_path / "train.jsonl", alpaca_records(8, seed=5))
    assert finished_run(cfg) is None  # the training file changed
    cfg = _config(tmp_path, alpaca_records(8, seed=4))  # the original file back
    assert finished_run(cfg) == folder
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    (tmp_path / "out" / "meta.json").write_text(json.dumps({**meta, "status": "interrupted"}))
    assert finished_run(cfg) is None


def test_deepspeed_mode_refuses_lisa_and_needs_a_json(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    cfg = _config(tmp_path, alpaca_records(4, seed=5), deepspeed="ds.json", lisa={"enabled": True, "gamma": 1})
    with pytest.raises(ConfigError, match="lisa.enabled: LISA changes the trainable blocks"):
        finetune(cfg, progress=False)
    cfg = _config(tmp_path, alpaca_records(4, seed=5), deepspeed="ds.json", sharding="fsdp")
    with pytest.raises(ConfigError, match="deepspeed: ds.json is set but sharding is 'fsdp'"):
        finetune(cfg, progress=False)
    cfg = _config(tmp_path, alpaca_records(4, seed=5), sharding="deepspeed")
    with pytest.raises(ConfigError, match="sharding: deepspeed needs a DeepSpeed JSON"):
        finetune(cfg, progress=False)
    cfg = _config(tmp_path, alpaca_records(4, seed=5), deepspeed="missing.json")
    with pytest.raises(ConfigError, match="deepspeed: missing.json: file not found"):
        finetune(cfg, progress=False)


@pytest.mark.slow
def test_one_rank_deepspeed_engine_matches_plain_training(tmp_path, monkeypatch):
    """`deepspeed: FILE.json` on one process (ZeRO offload on one GPU is a real use) runs a ZeRO-2 engine in a
    process group of one and gives the plain run's losses (float32: 1e-5)."""
    # In subprocesses: a DeepSpeed engine leaves process-group and accelerate state behind in its process, which
    # would leak into later in-process tests.
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": "auto"}))
    _config(tmp_path, alpaca_records(8, seed=6), save_model=False)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    for name, extra in (("plain", []), ("ds", ["deepspeed=ds.json"])):
        subprocess.run([sys.executable, "-m", "scalebio.cli", "finetune", str(tmp_path / "ft.yaml"), "--no-progress",
                        f"output_dir={tmp_path / name}", *extra], check=True, env={**env, "OMP_NUM_THREADS": "1"},
                       capture_output=True, timeout=300)
    runs = {}
    for name in ("plain", "ds"):
        meta = json.loads((tmp_path / name / "meta.json").read_text())
        metrics = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (meta, [m["train_loss"] for m in metrics], [m["grad_norm"] for m in metrics])
    assert runs["ds"][0]["sharding"] == "deepspeed"
    assert runs["ds"][0]["deepspeed"]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert runs["ds"][1] == pytest.approx(runs["plain"][1], abs=1e-5)
    assert runs["ds"][2] == pytest.approx(runs["plain"][2], rel=1e-3)  # AdamW hides a wrong gradient scale; the norm does not
