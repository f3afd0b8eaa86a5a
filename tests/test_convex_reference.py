"""The convex reference problems themselves (tests/convex.py): the lower level is solved, p* is an interior
local minimum of F(p) = L1(w*(p)), found consistently by the grid and the refinement."""

import functools
import time

import numpy as np
import pytest
import torch

from convex import (bilevel_optimum, least_squares_problem, logistic_problem, penalty_optimum, simplex_grid)

GENERATORS = {"least_squares": least_squares_problem, "logistic": logistic_problem}
CASES = [(kind, k) for kind in GENERATORS for k in (3, 4)]
# The problems recommended for solver tests: p* interior and away from uniform (the solver's start).
RECOMMENDED = {("least_squares", 3): 1, ("least_squares", 4): 2, ("logistic", 3): 2, ("logistic", 4): 0}
STEP = 0.01


@functools.lru_cache(maxsize=None)
def solved(kind, k):
    problem = GENERATORS[kind](k, RECOMMENDED[(kind, k)])
    start = time.perf_counter()
    p_star, p_grid = bilevel_optimum(problem, STEP, return_grid=True)
    return problem, p_star, p_grid, time.perf_counter() - start


def tangent_directions(k, rng, n):
    D = rng.standard_normal((n, k))
    D -= D.mean(1, keepdims=True)
    return D / np.abs(D).sum(1, keepdims=True)  # ‖δ‖₁ = 1, Σ δ = 0


def test_simplex_grid():
    P = simplex_grid(3, 0.25)
    assert P.shape == (15, 3)
    np.testing.assert_allclose(P.sum(1), 1.0)
    assert len({tuple(r) for r in np.round(P * 4).astype(int)}) == 15
    assert simplex_grid(4, 0.01).shape == (176851, 4)


@pytest.mark.parametrize("kind,k", CASES)
def test_lower_solution_first_order_condition(kind, k):
    problem = GENERATORS[kind](k, RECOMMENDED[(kind, k)])
    rng = np.random.default_rng(0)
    for p in [np.full(k, 1.0 / k), *rng.dirichlet(np.ones(k), size=3), np.eye(k)[0] * 0.97 + 0.01]:
        w = torch.tensor(problem.lower_solution(p), requires_grad=True)
        (g,) = torch.autograd.grad(problem.lower_objective(w, p), w)
        assert g.norm() < 1e-8, (p, g)
        # Strong convexity: the lower Hessian is positive definite (the minimum is unique).
        H = torch.autograd.functional.hessian(lambda v: problem.lower_objective(v, p), w.detach())
        assert torch.linalg.eigvalsh(H).min() > 1e-3


@pytest.mark.parametrize("kind,k", CASES)
def test_validation_loss_is_the_mean_and_ridge_free(kind, k):
    problem = GENERATORS[kind](k, 0)
    w = torch.randn(problem.d, dtype=torch.float64)
    val = problem.validation_loss(w, problem.X_val, problem.y_val)
    train_form = problem.per_example_loss(w, problem.X_val, problem.y_val).mean()
    ridge = 0.5 * problem.ridge * float(w @ w)
    assert float(train_form - val) == pytest.approx(ridge, abs=1e-12)
    p = np.full(k, 1.0 / k)
    w_star = torch.tensor(problem.lower_solution(p))
    assert problem.upper_value(p) == pytest.approx(float(problem.validation_loss(w_star, problem.X_val, problem.y_val)), rel=1e-12)


@pytest.mark.parametrize("kind,k", CASES)
def test_optimum_interior(kind, k):
    problem, p_star, _, _ = solved(kind, k)  # ~1 s on an idle core (no timed assertion: a busy machine fails it)
    assert p_star.shape == (k,)
    assert p_star.sum() == pytest.approx(1.0, abs=1e-12)
    assert p_star.min() >= 0.08
    assert np.abs(p_star - 1.0 / k).sum() >= 0.1  # not the solver's starting point


@pytest.mark.parametrize("kind,k", CASES)
def test_optimum_is_a_local_minimum(kind, k):
    problem, p_star, _, _ = solved(kind, k)
    f_star = problem.upper_value(p_star)
    rng = np.random.default_rng(1)
    for r in (1e-3, 1e-2, 5e-2):
        for delta in tangent_directions(k, rng, 8):
            assert problem.upper_value(p_star + r * delta) > f_star
    # Not flat: at L1 distance 0.01 every direction raises F by a clear amount.
    rises = [problem.upper_value(p_star + 0.01 * dlt) - f_star for dlt in tangent_directions(k, rng, 16)]
    assert min(rises) > 2e-6


@pytest.mark.parametrize("kind,k", CASES)
def test_projected_hypergradient_vanishes(kind, k):
    problem, p_star, _, _ = solved(kind, k)
    h = 1e-5
    fd = np.empty(k)
    for i in range(k):  # central differences along e_i − 1/k (the tangent projection of e_i)
        e = np.eye(k)[i] - 1.0 / k
        fd[i] = (problem.upper_value(p_star + h * e) - problem.upper_value(p_star - h * e)) / (2 * h)
    assert np.abs(fd).max() < 1e-7
    # The implicit-function hypergradient matches finite differences away from the optimum.
    p = 0.5 * p_star + 0.5 / k
    g = problem.hypergradient(p)
    for i in range(k):
        e = np.eye(k)[i] - 1.0 / k
        fd_i = (problem.upper_value(p + h * e) - problem.upper_value(p - h * e)) / (2 * h)
        assert g @ e == pytest.approx(fd_i, rel=1e-5, abs=1e-9)
    assert np.abs(g - g.mean()).max() > 1e-4  # and there it is not zero


@pytest.mark.parametrize("kind,k", CASES)
def test_grid_and_refinement_agree(kind, k):
    problem, p_star, p_grid, _ = solved(kind, k)
    assert np.abs(p_grid - p_star).max() <= STEP
    assert problem.upper_value(p_star) <= problem.upper_value(p_grid) + 1e-15
    # A different start of the refinement ends at the same point.
    from convex import refine
    np.testing.assert_allclose(refine(problem, np.full(k, 1.0 / k)), p_star, atol=1e-6)


@pytest.mark.parametrize("kind,k", [("least_squares", 3), ("logistic", 3)])
def test_penalty_optimum_approaches_p_star(kind, k):
    problem, p_star, _, _ = solved(kind, k)
    gaps = [np.abs(penalty_optimum(problem, alpha, p_star) - p_star).sum() for alpha in (10.0, 100.0)]
    assert gaps[1] < gaps[0] < 0.01
    assert gaps[1] < 0.2 * gaps[0]  # O(1/α)


def test_solver_adapters():
    problem = logistic_problem(3, 2)
    train, val = problem.batches()
    assert train["x"].shape == (int(problem.n.sum()), problem.d) and train["source"].max() == 2
    objective = problem.objective()
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.tensor(problem.lower_solution(np.full(3, 1 / 3))))
    total, count = objective.validation_loss(model, val)
    assert float((total / count).detach()) == pytest.approx(problem.upper_value(np.full(3, 1 / 3)), rel=1e-12)
    assert objective.per_example_loss(model, train).shape == (int(problem.n.sum()),)
