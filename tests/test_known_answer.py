"""Known answer: on convex problems whose bilevel optimum p* is computed independently (closed-form or Newton
lower level, exhaustive simplex grid refined by L-BFGS: tests/convex.py), the ScaleBiO solver, through the
same ScaleBiO.schedule_step/step the language-model runs use, ends near p*.

Settings follow what was measured on these problems: AdamW needs the model learning rates about 10× the λ
learning rate; weight decay 0 everywhere (decay changes the lower level and pulls λ to uniform); α constant.
"""

import numpy as np
import pytest
import torch

from conftest import LinearModel
from convex import bilevel_optimum, least_squares_problem, logistic_problem
from scalebio.config import SolverConfig
from scalebio.solver import ScaleBiO

PROBLEMS = {
    "least_squares_k3": lambda: least_squares_problem(3, seed=1),
    "least_squares_k4": lambda: least_squares_problem(4, seed=2),
    "logistic_k3": lambda: logistic_problem(3, seed=2),
    "logistic_k4": lambda: logistic_problem(4, seed=0),
}
STEPS = 3000


def solve(problem, alpha, batch=None, steps=STEPS, seed=0):
    """Final p = softmax(λ) after ``steps`` ScaleBiO steps (cosine schedule), full batches or minibatches."""
    u, w = LinearModel(problem.d), LinearModel(problem.d)
    cfg = SolverConfig(alpha=alpha, lr_u=1e-2, lr_w=1e-2, lr_lambda=1e-3,
                       weight_decay_u=0.0, weight_decay_w=0.0, weight_decay_lambda=0.0)
    solver = ScaleBiO(u, w, problem.objective(), problem.k, cfg)
    train, val = problem.batches()
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        solver.schedule_step(step, steps)
        if batch is None:
            solver.step([train], [val])
        else:
            ti = torch.randperm(len(train["y"]), generator=g)[:batch]
            vi = torch.randperm(len(val["y"]), generator=g)[:batch]
            solver.step([{k: v[ti] for k, v in train.items()}], [{k: v[vi] for k, v in val.items()}])
    return solver.weights().numpy()



@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_full_batch_alpha_100_within_0_01(name):
    problem = PROBLEMS[name]()
    p_star = bilevel_optimum(problem)
    p = solve(problem, alpha=100.0)
    assert np.abs(p - p_star).sum() < 0.01, (p, p_star)
    assert np.abs(p_star - 1 / problem.k).sum() > 0.1  # the answer is not the starting point


@pytest.mark.parametrize("name", ["least_squares_k3", "logistic_k3"])
def test_minibatch_alpha_1000_within_0_08(name):
    problem = PROBLEMS[name]()
    p_star = bilevel_optimum(problem)
    p = solve(problem, alpha=1000.0, batch=32)
    assert np.abs(p - p_star).sum() < 0.08, (p, p_star)


def test_larger_alpha_lands_closer():
    """The penalty form's bias shrinks with α (about 1/α on these problems)."""
    problem = PROBLEMS["least_squares_k3"]()
    p_star = bilevel_optimum(problem)
    gaps = [np.abs(solve(problem, alpha=a) - p_star).sum() for a in (3.0, 100.0)]
    assert gaps[1] < gaps[0], gaps
