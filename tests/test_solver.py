"""The λ update of method.md §3, checked three ways, and shown to catch deliberately broken solvers.

Checks (each a function below, used by the real tests and by ``test_broken_variants_are_caught``):
  (a) formula: after one step, λ.grad equals α (diag p − p pᵀ)(ℓ^w − ℓ^u) to 1e-6 relative, with the
      per-source mean losses ℓ recomputed independently from copies of u and w taken before the step;
  (b) the λ gradient's entries sum to 0 (softmax is shift-invariant);
  (c) from λ = 0 with u = w (no dropout), one step leaves λ exactly at 0.
Broken variants, each failing at least one check (shown by the last test):
  - wrong sign of the u term (α J (ℓ^w + ℓ^u)):        fails (a) and (c);
  - λ driven by the validation loss alone:              fails (a) (L1 reaches λ only through w, so this λ never moves);
  - u and w on different training batches:              fails (a) and (c);
  - softmax Jacobian missing (α (ℓ^w − ℓ^u) directly):  fails (a) and (b).
"""

import copy

import pytest
import torch

from conftest import LinearModel, SquaredLossObjective
from scalebio.config import SolverConfig
from scalebio.conventions import lr_shape
from scalebio.solver import ScaleBiO
from scalebio.mixture import lambda_gradient, mixture_loss, source_counts

K, D = 3, 4


def make_batch(seed, sizes=(5, 3, 4)):
    g = torch.Generator().manual_seed(seed)
    source = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    perm = torch.randperm(len(source), generator=g)
    source = source[perm]
    x = torch.randn(len(source), D, generator=g, dtype=torch.float64)
    y = torch.randn(len(source), generator=g, dtype=torch.float64) + source.double()
    return {"x": x, "y": y, "source": source}


def split(batch, parts):
    n = len(batch["y"])
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [{k: v[a:b] for k, v in batch.items()} for a, b in zip(edges, edges[1:])]


def make_solver(cls=ScaleBiO, objective=None, same=False, alpha=10.0, lam=None):
    torch.manual_seed(0)
    u, w = LinearModel(D), LinearModel(D)
    with torch.no_grad():
        u.weight.normal_()
        w.weight.copy_(u.weight if same else torch.randn(D, dtype=torch.float64))
    cfg = SolverConfig(alpha=alpha, lr_u=1e-2, lr_w=1e-2, lr_lambda=1e-2)
    solver = cls(u, w, objective or SquaredLossObjective(), K, cfg)
    if lam is not None:
        with torch.no_grad():
            solver.lam.copy_(torch.tensor(lam, dtype=torch.float64))
    return solver


def per_source_means(model, batch):
    losses = SquaredLossObjective().per_example_loss(model, batch).detach()
    return torch.stack([losses[batch["source"] == i].mean() for i in range(K)])


def formula_holds(solver_factory) -> bool:
    solver = solver_factory(lam=[0.3, -0.2, 0.5])
    train, val = make_batch(1), make_batch(2)
    u0, w0 = copy.deepcopy(solver.u), copy.deepcopy(solver.w)
    p = torch.softmax(solver.lam.detach(), 0)
    solver.step(split(train, 2), [val])
    expected = lambda_gradient(p, per_source_means(w0, train), per_source_means(u0, train), torch.ones(K, dtype=torch.bool), solver.alpha)
    got = solver.lam.grad
    return bool(torch.allclose(got, expected, rtol=1e-6, atol=1e-12 * expected.abs().max()))


def sums_to_zero(solver_factory) -> bool:
    solver = solver_factory(lam=[0.3, -0.2, 0.5])
    solver.step([make_batch(1)], [make_batch(2)])
    return abs(solver.lam.grad.sum().item()) <= 1e-12 * solver.lam.grad.abs().max().item()


def stays_uniform(solver_factory) -> bool:
    solver = solver_factory(same=True)
    solver.step([make_batch(1)], [make_batch(2)])
    return bool(torch.equal(solver.lam.detach(), torch.zeros(K, dtype=torch.float64)))


def test_lambda_gradient_matches_formula():
    assert formula_holds(make_solver)


def test_lambda_gradient_sums_to_zero():
    assert sums_to_zero(make_solver)


def test_lambda_stays_at_zero_when_u_equals_w():
    assert stays_uniform(make_solver)


def test_micro_batches_equal_one_batch():
    """Gradient accumulation with n_i counted over the global batch gives the same step as one batch."""
    train, val = make_batch(3), make_batch(4)
    a, b = make_solver(), make_solver()
    a.step([train], [val])
    b.step(split(train, 3), split(val, 2))
    for pa, pb in ((a.u.weight, b.u.weight), (a.w.weight, b.w.weight), (a.lam, b.lam)):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=1e-12, atol=1e-14)


def test_absent_source_contributes_nothing():
    """A source missing from B has no loss term, no division by zero, and a finite λ step."""
    train = make_batch(5, sizes=(4, 0, 4))
    counts = source_counts(train["source"], K)
    assert counts[1] == 0
    p = torch.full((K,), 1 / K, dtype=torch.float64)
    ell = torch.ones(8, dtype=torch.float64)
    assert mixture_loss(ell, train["source"], p, counts).item() == pytest.approx(2 / 3)
    solver = make_solver()
    stats = solver.step([train], [make_batch(6)])
    assert stats.source_counts[1] == 0 and stats.source_loss_u[1] == 0.0
    assert torch.isfinite(solver.lam).all() and torch.isfinite(solver.u.weight).all()


def test_cosine_schedule_with_warmup():
    shapes = [lr_shape(t, 100, 0.03, "cosine") for t in range(100)]
    assert shapes[0] == pytest.approx(1 / 3) and shapes[2] == 1.0
    assert all(a >= b for a, b in zip(shapes[2:], shapes[3:])) and shapes[-1] < 1e-3


# -- deliberately broken variants ------------------------------------------------------------------------


class WrongSign(ScaleBiO):
    def lambda_objective(self, mean_w, mean_u):
        return self.alpha * (torch.softmax(self.lam, 0) * (mean_w + mean_u).detach()).sum()


class ValidationOnly(ScaleBiO):
    """λ's objective is α L1(w; V) (the validation batch kept by ``step`` for it)."""

    def step(self, train, val):
        self.val_batches = val
        return super().step(train, val)

    def lambda_objective(self, mean_w, mean_u):
        losses = [self.objective.validation_loss(self.w, mb) for mb in self.val_batches]
        val_loss = sum(total for total, _ in losses) / sum(count for _, count in losses)
        return self.alpha * val_loss.detach() * torch.softmax(self.lam, 0).sum()


class NoJacobian(ScaleBiO):
    def lambda_objective(self, mean_w, mean_u):
        return self.alpha * (self.lam * (mean_w - mean_u).detach()).sum()


class ShiftedBatchForU(SquaredLossObjective):
    """Feeds u a different training batch than w (the examples rolled by one within each micro-batch)."""

    def __init__(self):
        self.u = None

    def per_example_loss(self, model, batch):
        if model is self.u:
            batch = {**batch, "x": batch["x"].roll(1, 0), "y": batch["y"].roll(1, 0)}
        return super().per_example_loss(model, batch)


def different_batches_factory(**kw):
    objective = ShiftedBatchForU()
    solver = make_solver(objective=objective, **kw)
    objective.u = solver.u
    return solver


@pytest.mark.parametrize("factory", [
    lambda **kw: make_solver(WrongSign, **kw),
    lambda **kw: make_solver(ValidationOnly, **kw),
    different_batches_factory,
    lambda **kw: make_solver(NoJacobian, **kw),
], ids=["wrong_sign", "validation_only", "different_batches", "no_jacobian"])
def test_broken_variants_are_caught(factory):
    results = {"formula": formula_holds(factory), "sum_zero": sums_to_zero(factory), "stays_uniform": stays_uniform(factory)}
    assert not all(results.values()), results


# -- step 0: the gap of two copies of one model is exactly 0 (solver module docstring) ----------------------------
class ShapeRounding(SquaredLossObjective):
    """w's per-example losses off by one part in 10^6, as a GPU's shape-dependent kernels round w's pass on V ∪ B
    differently from u's pass on B (fp32 on an H200: a few 1e-7); α·p·gap stays far above Adam's eps."""

    def __init__(self, w):
        self.w = w

    def per_example_loss(self, model, batch):
        ell = super().per_example_loss(model, batch)
        return ell * (1 + 1e-6) if model is self.w else ell


def _first_steps(u, w, steps=2):
    solver = ScaleBiO(u, w, ShapeRounding(w), K, SolverConfig(alpha=10.0, lr_u=1e-2, lr_w=1e-2, lr_lambda=0.1))
    lams, stats = [], []
    for i in range(steps):
        stats.append(solver.step([make_batch(10 + i)], [make_batch(20 + i, (1, 1, 1))]))
        lams.append(solver.lam.detach().clone())
    return solver, lams, stats


def _twins(dropout: float = 0.0):
    torch.manual_seed(0)
    u = LinearModel(D)
    with torch.no_grad():
        u.weight.normal_()
    if dropout:
        u.drop = torch.nn.Dropout(dropout)  # not in the forward: only what has_dropout sees
    return u, copy.deepcopy(u)


def test_first_step_gap_is_exact_for_two_copies():
    """u = w, no dropout: λ does not move at step 0 although w's computed losses differ from u's by rounding
    (AdamW's first step is ≈ lr·sign(g) when |g| ≫ eps: that rounding alone would move λ by a whole step); the logged losses are the
    computed ones, and from step 1 on the computed gap moves λ."""
    solver, lams, stats = _first_steps(*_twins())
    assert solver.exact_first_gap
    assert torch.equal(lams[0], torch.zeros(K, dtype=torch.float64))
    assert stats[0].source_loss_w != stats[0].source_loss_u
    assert lams[1].abs().max() > 1e-3


@pytest.mark.parametrize("case", ["w_differs", "dropout"])
def test_first_step_gap_is_computed_when_not_two_deterministic_copies(case):
    """w not a copy of u, or a model with dropout (each pass draws its own masks: the gap is a sample, kept as the
    released code keeps it): step 0's computed gap moves λ."""
    u, w = _twins(dropout=0.1 if case == "dropout" else 0.0)
    if case == "w_differs":
        with torch.no_grad():
            w.weight.add_(1e-3)
    solver, lams, _ = _first_steps(u, w, steps=1)
    assert not solver.exact_first_gap
    assert lams[0].abs().max() > 1e-3


def test_has_dropout_reads_modules_and_config():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from scalebio.solver import has_dropout

    small = dict(vocab_size=64)
    gpt2 = dict(n_layer=1, n_embd=16, n_head=2, n_positions=32, **small)
    llama = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, **small)
    assert has_dropout(GPT2LMHeadModel(GPT2Config(**gpt2)))
    assert not has_dropout(GPT2LMHeadModel(GPT2Config(**gpt2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                      summary_first_dropout=0.0)))
    assert not has_dropout(LlamaForCausalLM(LlamaConfig(**llama)))
    assert has_dropout(LlamaForCausalLM(LlamaConfig(**llama, attention_dropout=0.1)))  # no module: the config says it
