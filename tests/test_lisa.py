"""LISA on tiny GPT-2, Llama, Qwen2, Gemma and GPT-NeoX: found by introspection, exactly γ blocks trainable,
frozen parameters bit-identical across a step, optimizer state for exactly the active parameters."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from scalebio.config import SolverConfig
from scalebio.lisa import Lisa, LisaError, draw_blocks, find_blocks, optimizer_state_params
from scalebio.solver import CausalLMObjective, ScaleBiO

VOCAB = 64
TINY = {
    "gpt2": dict(n_layer=4, n_embd=16, n_head=2, n_positions=32),
    "llama": dict(num_hidden_layers=4, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1),
    "qwen2": dict(num_hidden_layers=4, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1),
    "gemma": dict(num_hidden_layers=4, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=8),
    "gpt_neox": dict(num_hidden_layers=4, hidden_size=16, intermediate_size=32, num_attention_heads=2),
}
EXPECTED_PATH = {"gpt2": "transformer.h", "llama": "model.layers", "qwen2": "model.layers", "gemma": "model.layers", "gpt_neox": "gpt_neox.layers"}


def tiny_model(arch, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=VOCAB, **TINY[arch]), dtype=torch.float32)


def batch(seed, k=2, b=4, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "source": torch.arange(b) % k}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_lisa_invariants(arch):
    gamma, interval = 2, 2
    u, w = tiny_model(arch), tiny_model(arch)
    w.load_state_dict(u.state_dict())
    lisa_u, lisa_w = Lisa(u, gamma, interval, seed=0, stream=1), Lisa(w, gamma, interval, seed=0, stream=2)
    assert lisa_u.blocks_path == EXPECTED_PATH[arch] and lisa_u.n_blocks == 4
    solver = ScaleBiO(u, w, CausalLMObjective(), 2, SolverConfig(lr_u=1e-2, lr_w=1e-2), lisa_u, lisa_w)
    schedule = []
    for step in range(6):
        solver.update_lisa(step)
        for lisa, opt, model in ((lisa_u, solver.opt_u, u), (lisa_w, solver.opt_w, w)):
            trainable_blocks = [i for i, blk in enumerate(lisa.blocks) if any(p.requires_grad for p in blk.parameters())]
            assert trainable_blocks == lisa.active and len(lisa.active) == gamma
            assert all(p.requires_grad for p in lisa.always)
            active_ids = {id(p) for p in lisa.trainable_parameters()}
            assert {id(p) for p in opt.param_groups[0]["params"]} == active_ids
            if step > 0:
                # state exists only for parameters active now (none left over from earlier blocks)
                assert optimizer_state_params(opt) <= active_ids
        frozen_before = {n: p.detach().clone() for n, p in u.named_parameters() if not p.requires_grad}
        assert frozen_before
        solver.step([batch(step)], [batch(100 + step)])
        for n, p in u.named_parameters():
            if n in frozen_before:
                assert torch.equal(p.detach(), frozen_before[n]), f"{arch}: frozen {n} changed"
        for lisa, opt in ((lisa_u, solver.opt_u), (lisa_w, solver.opt_w)):
            assert optimizer_state_params(opt) == {id(p) for p in lisa.trainable_parameters()}
        schedule.append((tuple(lisa_u.active), tuple(lisa_w.active)))
    # independent draws for u and w by default; the same seed gives the same schedule
    assert any(a != b for a, b in schedule)
    assert schedule == [(tuple(draw_blocks(4, gamma, 0, 1, s // interval)), tuple(draw_blocks(4, gamma, 0, 2, s // interval))) for s in range(6)]


def test_keep_all_state_grows_and_active_only_does_not():
    """The released code's policy keeps moments of every block ever active; ours frees them."""
    sizes = {}
    for keep in (False, True):
        u, w = tiny_model("llama"), tiny_model("llama")
        lu, lw = Lisa(u, 1, 1, 0, 1, keep_all_state=keep), Lisa(w, 1, 1, 0, 2, keep_all_state=keep)
        solver = ScaleBiO(u, w, CausalLMObjective(), 2, SolverConfig(), lu, lw)
        counts = []
        for step in range(6):
            solver.update_lisa(step)
            solver.step([batch(step)], [batch(50 + step)])
            counts.append(len(optimizer_state_params(solver.opt_u)))
        sizes[keep] = counts
    assert len(set(sizes[False])) == 1
    assert sizes[True][-1] > sizes[True][0]


def test_same_seed_same_schedule_different_seed_differs():
    a = [draw_blocks(32, 4, 7, 1, s) for s in range(20)]
    assert a == [draw_blocks(32, 4, 7, 1, s) for s in range(20)]
    assert a != [draw_blocks(32, 4, 8, 1, s) for s in range(20)]
    assert all(len(set(x)) == 4 for x in a)


def test_gamma_must_be_smaller_than_block_count():
    with pytest.raises(LisaError, match=r"lisa.gamma: 4 .*number of blocks \(4\)"):
        Lisa(tiny_model("gpt2"), 4, 2, 0, 1)


def test_model_without_blocks_is_rejected():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(LisaError, match="cannot find decoder blocks in Sequential"):
        find_blocks(model)
