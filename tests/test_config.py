"""Config loading: YAML + key=value overrides, typed, with errors naming the file and the field."""

import pytest
import yaml

from conftest import tiny_run_config
from scalebio.config import ConfigError, RunConfig, apply_overrides, describe, load_config


def test_overrides_and_types(tmp_path):
    path = tiny_run_config(tmp_path)
    cfg = load_config(path, ["solver.alpha=100", "lisa.enabled=true", "solver.lr_u=2e-6", "seed=3"])
    assert cfg.solver.alpha == 100.0 and cfg.lisa.enabled and cfg.solver.lr_u == 2e-6 and cfg.seed == 3
    assert cfg.resolve_path("data/s0.jsonl") == tmp_path / "data" / "s0.jsonl"


@pytest.mark.parametrize("override, message", [
    (["solver.alpah=3"], r"config.yaml: solver.alpah: unknown field"),
    (["solver.global_batch=abc"], r"solver.global_batch: expected an integer"),
    (["solver.global_batch=10", "solver.micro_batch=4"], r"global_batch: 10 is not a multiple of micro_batch 4"),
    (["data.sources.1.name=noise_0.00"], r"data.sources\[1\].name: duplicate source name 'noise_0.00'"),
    (["model.architecture=null"], r"model: set exactly one of"),
    (["data.validation=null"], r"data.validation: required"),
    (["solver.u_adam=alpha"], r"solver.u_adam: 'alpha' is not one of auto, plain, alpha_scaled"),
])
def test_bad_config_names_the_field(tmp_path, override, message):
    path = tiny_run_config(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_config(path, override)


def test_fewer_than_two_sources(tmp_path):
    path = tiny_run_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["data"]["sources"] = data["data"]["sources"][:1]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"config.yaml: data.sources: need at least two sources, got 1"):
        load_config(path)


def test_missing_and_malformed_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("solver:\n  alpha: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_describe_documents_every_field():
    lines = "\n".join(describe(RunConfig))
    for key in ("solver.alpha", "solver.tau", "lisa.gamma", "lisa.keep_all_state", "data.sampling", "model.gguf_package"):
        assert key in lines
    assert "Penalty α" in lines


def test_apply_overrides_creates_nested():
    assert apply_overrides({}, ["a.b=1", "a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}
