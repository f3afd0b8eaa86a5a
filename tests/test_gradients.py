"""The gradients the solver steps with, on a tiny GPT-2 in float64, checked against independent computations.

(a) w's gradient equals ∇w L1(w; V) + α ∇w L2(λ, w; B), and u's equals ∇u L2(λ, u; B), each recomputed here
    from the model's full logits with plain cross-entropy (L1: token mean over V; L2: Σ_i p_i × the mean over
    source i's examples in B of each example's mean response-token loss). Catches: α on L1 instead of L2; the
    validation loss as the mean of per-example means; the per-example loss divided by the padded length; u and
    w fed different training batches (the real loop's draw is checked in test_reweight_loop_feeds_u_and_w_one_batch).
(b) One w pass over V and B together (solver.fused_w, the default) gives the two-pass gradient and λ to 1e-10
    relative, with and without LISA. Catches a fused pass that drops or double-counts a term, or pads wrongly.
(c) The chunked, labelled-positions-only cross-entropy equals the full-logits one (values and gradients).
(d) Clipping (method.md §3): u's gradient of L2 is clipped at c, w's gradient of L1 + α L2 at α·c. Catches
    clipping switched off, and w clipped at c (the bug this project shipped before).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from scalebio.config import SolverConfig
from scalebio.lisa import Lisa
from scalebio.solver import CausalLMObjective, ScaleBiO

VOCAB, K = 50, 3


def tiny_gpt2(seed=0, layers=3):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_layer=layers, n_embd=16, n_head=2, n_positions=40,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).double()


def make_batch(seed, b, sources=True, lengths=None):
    """Right-padded rows of different lengths; the first tokens of each row are prompt (label −100)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [int(x) for x in torch.randint(6, 20, (b,), generator=g)]
    width = max(lengths)
    ids = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    labels = torch.full((b, width), -100)
    for r, n in enumerate(lengths):
        row = torch.randint(1, VOCAB, (n,), generator=g)
        prompt = int(torch.randint(1, n - 2, (1,), generator=g))
        ids[r, :n], mask[r, :n] = row, 1
        labels[r, prompt:n] = row[prompt:]
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if sources:
        out["source"] = torch.tensor([r % K for r in range(b)])
    return out


def reference_losses(model, batch):
    """Per-token CE from the full logits [b, T−1] and the label mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="none")
    return ce.view(labels.shape), labels != -100


def reference_l1(model, val_mbs):
    total = sum(reference_losses(model, mb)[0].sum() for mb in val_mbs)
    count = sum(reference_losses(model, mb)[1].sum() for mb in val_mbs)
    return total / count


def reference_l2(model, train_mbs, p):
    per_example = torch.cat([(ce * m).sum(1) / m.sum(1) for ce, m in (reference_losses(model, mb) for mb in train_mbs)])
    source = torch.cat([mb["source"] for mb in train_mbs])
    return sum(p[i] * per_example[source == i].mean() for i in range(K) if (source == i).any())


class Recording(ScaleBiO):
    """Records each model's gradients (after clipping) just before its optimizer steps."""

    def _finish(self, model, optimizer, clip):
        self.norm_before = getattr(self, "norm_before", {})
        params = [q for q in model.parameters() if q.requires_grad]
        name = "u" if model is self.u else "w"
        self.norm_before[name] = torch.linalg.vector_norm(torch.stack([q.grad.norm() for q in params])).item()
        super_step = optimizer.step
        recorded = {}

        def step_and_record(*a, **kw):
            recorded.update({n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None})
            return super_step(*a, **kw)

        optimizer.step = step_and_record
        try:
            super()._finish(model, optimizer, clip)
        finally:
            optimizer.step = super_step
        setattr(self, f"grads_{name}", recorded)


def build(fused=True, lisa=False, clip=None, alpha=7.0, lam=(0.3, -0.2, 0.1), objective=None):
    u = tiny_gpt2(0)
    w = tiny_gpt2(1)  # w differs from u, so the λ gradient is not zero
    cfg = SolverConfig(alpha=alpha, lr_u=1e-3, lr_w=1e-3, lr_lambda=1e-2, fused_w=fused, clip_grad_norm=clip)
    lisa_u = Lisa(u, 1, 5, seed=0, stream=1) if lisa else None
    lisa_w = Lisa(w, 1, 5, seed=0, stream=2) if lisa else None
    solver = Recording(u, w, objective or CausalLMObjective(), K, cfg, lisa_u, lisa_w)
    with torch.no_grad():
        solver.lam.copy_(torch.tensor(lam, dtype=torch.float64))
    solver.update_lisa(0)
    return solver


def batches():
    train = [make_batch(1, 4), make_batch(2, 4)]
    val = [make_batch(3, 3, sources=False), make_batch(4, 2, sources=False)]
    return train, val


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


@pytest.mark.parametrize("fused", [True, False])
def test_gradients_match_independent_formulas(fused):
    train, val = batches()
    solver = build(fused=fused)
    u0, w0 = copy.deepcopy(solver.u), copy.deepcopy(solver.w)
    p = torch.softmax(solver.lam.detach(), 0)
    solver.step(train, val)
    alpha = solver.cfg.alpha
    w_loss = reference_l1(w0, val) + alpha * reference_l2(w0, train, p)
    w_grads = dict(zip([n for n, _ in w0.named_parameters()], torch.autograd.grad(w_loss, list(w0.parameters()))))
    u_loss = reference_l2(u0, train, p)
    u_grads = dict(zip([n for n, _ in u0.named_parameters()], torch.autograd.grad(u_loss, list(u0.parameters()))))
    for name, g in w_grads.items():
        assert rel(solver.grads_w[name], g) < 1e-9, f"w {name}"
    for name, g in u_grads.items():
        assert rel(solver.grads_u[name], g) < 1e-9, f"u {name}"


@pytest.mark.parametrize("lisa", [False, True])
def test_fused_w_pass_equals_two_passes(lisa):
    train, val = batches()
    val = val + [make_batch(5, 2, sources=False)]  # more V micro-batches than B's: unpaired passes too
    fused, two = build(fused=True, lisa=lisa), build(fused=False, lisa=lisa)
    fused.step(train, val)
    two.step(train, val)
    assert fused.grads_w.keys() == two.grads_w.keys() and fused.grads_w
    for name in two.grads_w:
        assert rel(fused.grads_w[name], two.grads_w[name]) < 1e-10, name
    assert rel(fused.lam.grad, two.lam.grad) < 1e-10
    assert torch.allclose(fused.lam, two.lam, rtol=1e-10, atol=0)
    for a, b in zip(fused.w.parameters(), two.w.parameters()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_chunked_cross_entropy_equals_full_logits():
    model = tiny_gpt2(0)
    batch = make_batch(7, 5)
    chunked, full = CausalLMObjective(chunked=True, chunk_tokens=7), CausalLMObjective(chunked=False)
    assert chunked._can_chunk(model)
    a = chunked.per_example_loss(model, batch)
    ga = torch.autograd.grad(a.sum(), list(model.parameters()))
    b = full.per_example_loss(model, batch)
    gb = torch.autograd.grad(b.sum(), list(model.parameters()))
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)


def test_clipping_follows_the_rule():
    """With c far below both gradient norms, u's clipped gradient has norm c and w's has norm α·c."""
    train, val = batches()
    c, alpha = 1e-4, 7.0
    solver = build(clip=c, alpha=alpha)
    solver.step(train, val)
    norm = lambda grads: float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))
    assert solver.norm_before["u"] > 10 * c and solver.norm_before["w"] > 10 * alpha * c
    assert norm(solver.grads_u) == pytest.approx(c, rel=1e-6)
    assert norm(solver.grads_w) == pytest.approx(alpha * c, rel=1e-6)
    # a c above both norms leaves the gradients as they are
    loose = build(clip=1e6, alpha=alpha)
    loose.step(train, val)
    assert norm(loose.grads_w) == pytest.approx(loose.norm_before["w"], rel=1e-12)


def test_padding_mask_dropped_only_where_it_changes_nothing():
    """Right padding: the objective runs without the mask (plain causal attention) and still equals the masked
    forward; left padding keeps the mask, without which the losses would differ."""
    from scalebio.solver import padding_mask

    model = tiny_gpt2(0)
    right = make_batch(3, 4)
    assert padding_mask(right) is None
    assert padding_mask({**right, "attention_mask": torch.ones_like(right["attention_mask"])}) is None
    ce, m = reference_losses(model, right)
    expected = (ce * m).sum(1) / m.sum(1)
    for chunked in (True, False):
        got = CausalLMObjective(chunked=chunked).per_example_loss(model, right)
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)

    # the same rows left-padded (positions shift too, so pass them as the masked reference does)
    left = {key: torch.stack([torch.roll(row, int((mrow == 0).sum())) for row, mrow in
                              zip(right[key], right["attention_mask"])]) for key in ("input_ids", "attention_mask",
                                                                                      "labels")}
    assert padding_mask(left) is left["attention_mask"]
    ce, m = reference_losses(model, left)
    masked = (ce * m).sum(1) / m.sum(1)
    got = CausalLMObjective(chunked=False).per_example_loss(model, left)
    assert torch.allclose(got, masked, rtol=1e-12, atol=1e-12)
    unmasked = CausalLMObjective(chunked=False).per_example_loss(model, {**left, "attention_mask": None})
    assert not torch.allclose(unmasked, masked, rtol=1e-6, atol=0)
