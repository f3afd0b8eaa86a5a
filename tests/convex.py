"""Convex bilevel data-reweighting problems with a bilevel optimum p* known independently of the solver.

Each problem has k sources (X_i [n_i, d], y_i [n_i]) and a validation set (X_val, y_val); p lies on the
simplex (p = softmax(λ) in the solver).

- Lower level: w*(p) = argmin_w Σ_i p_i · mean_j ℓ(w; x_ij, y_ij)   (each source averaged on its own).
- Upper level: F(p) = L1(w*(p)), L1(w) = mean over validation examples of ℓ_val(w; x, y).

Families
- ``least_squares``: ℓ = ℓ_val = ½ (xᵀw − y)². Every source design has full column rank, so the lower level
  is strongly convex for every p in the simplex; w*(p) is solved in closed form.
- ``logistic``: y ∈ {−1, +1}; training ℓ = log(1 + exp(−y xᵀw)) + (μ/2)‖w‖² (the ridge sits inside every
  per-example loss; as Σ p_i = 1 it totals μ/2‖w‖²); validation ℓ_val = log(1 + exp(−y xᵀw)) WITHOUT ridge.
  w*(p) by damped Newton to ‖∇‖ ≤ 1e-12.

Generators: x ~ N(0, I_d); source i follows its own true parameter θ_i (orthogonal, equal norms); validation
follows a q-blend of them (least squares: θ_val = Σ q_i θ_i; logistic: a q-mixture of the source
distributions), q interior (every q_i ≥ 0.5/k), so p* sits near q, inside the simplex.

Everything here (closed form, Newton, implicit-function hypergradient, simplex grid, scipy refinement) is
independent of the ScaleBiO solver. For the solver: set weight decay 0 on u, w and λ (AdamW's decay would
change the lower level and pull λ to uniform), use full batches (``batches``) and the adapter ``objective``.
The penalty form at a finite α has its own optimum p*_α (``penalty_optimum``), O(1/α) from p*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit


def _log1pexp(z):
    """log(1 + exp(z)), stable, numpy."""
    return np.logaddexp(0.0, z)


def _sigmoid(z):
    return expit(z)


@dataclass
class ConvexProblem:
    kind: str  # 'least_squares' | 'logistic'
    X: list  # per source [n_i, d] float64 tensors
    y: list  # per source [n_i]
    X_val: torch.Tensor
    y_val: torch.Tensor
    ridge: float  # μ (0 for least squares)
    q: np.ndarray = field(default=None, repr=False)  # the validation blend used by the generator (≈ p*)

    def __post_init__(self):
        self._Xn = [x.numpy() for x in self.X]
        self._yn = [t.numpy() for t in self.y]
        self._Xv = self.X_val.numpy()
        self._yv = self.y_val.numpy()
        self.n = np.array([len(t) for t in self._yn])
        self._X_all = np.concatenate(self._Xn)
        self._y_all = np.concatenate(self._yn)
        self._src = np.repeat(np.arange(self.k), self.n)
        if self.kind == "least_squares":
            # Per-source mean normal equations and the validation quadratic.
            self._A = np.stack([x.T @ x / len(x) for x in self._Xn])  # [k, d, d]
            self._b = np.stack([x.T @ t / len(x) for x, t in zip(self._Xn, self._yn)])  # [k, d]
            self._S = self._Xv.T @ self._Xv / len(self._Xv)
            self._c = self._Xv.T @ self._yv / len(self._Xv)
            self._yy = 0.5 * float(self._yv @ self._yv) / len(self._yv)
        elif self.kind != "logistic":
            raise ValueError(f"unknown kind {self.kind!r}")

    @property
    def k(self) -> int:
        return len(self.X)

    @property
    def d(self) -> int:
        return self.X[0].shape[1]

    # -- losses (torch, differentiable in w) ----------------------------------------------------------------
    def per_example_loss(self, w: torch.Tensor, X, y) -> torch.Tensor:
        """The training ℓ for each example: [n] (ridge included for logistic)."""
        z = X @ w
        if self.kind == "least_squares":
            return 0.5 * (z - y) ** 2
        return torch.nn.functional.softplus(-y * z) + 0.5 * self.ridge * (w * w).sum()

    def validation_loss(self, w: torch.Tensor, X, y) -> torch.Tensor:
        """Mean of ℓ_val over the examples (no ridge): a scalar."""
        z = X @ w
        if self.kind == "least_squares":
            return (0.5 * (z - y) ** 2).mean()
        return torch.nn.functional.softplus(-y * z).mean()

    def lower_objective(self, w: torch.Tensor, p) -> torch.Tensor:
        """L2(p, w) = Σ_i p_i mean_j ℓ(w; x_ij, y_ij) (torch)."""
        p = torch.as_tensor(np.asarray(p, dtype=np.float64))
        return sum(p[i] * self.per_example_loss(w, self.X[i], self.y[i]).mean() for i in range(self.k))

    # -- numpy pieces ---------------------------------------------------------------------------------------
    def _source_means(self, w: np.ndarray) -> np.ndarray:
        """mean training loss of each source at w: [k]."""
        out = np.empty(self.k)
        for i, (x, t) in enumerate(zip(self._Xn, self._yn)):
            z = x @ w
            if self.kind == "least_squares":
                out[i] = 0.5 * np.mean((z - t) ** 2)
            else:
                out[i] = np.mean(_log1pexp(-t * z)) + 0.5 * self.ridge * w @ w
        return out

    def _source_grads(self, w: np.ndarray) -> np.ndarray:
        """∇w of each source's mean loss: [k, d]."""
        out = np.empty((self.k, self.d))
        for i, (x, t) in enumerate(zip(self._Xn, self._yn)):
            z = x @ w
            if self.kind == "least_squares":
                out[i] = x.T @ (z - t) / len(t)
            else:
                out[i] = x.T @ (-t * _sigmoid(-t * z)) / len(t) + self.ridge * w
        return out

    def _lower_hessian(self, w: np.ndarray, p: np.ndarray) -> np.ndarray:
        if self.kind == "least_squares":
            return np.einsum("k,kde->de", p, self._A)
        H = self.ridge * np.eye(self.d)
        for i, x in enumerate(self._Xn):
            s = _sigmoid(x @ w)
            H += p[i] * (x.T * (s * (1 - s))) @ x / len(x)
        return H

    def _val_value_grad_hess(self, w: np.ndarray):
        """L1(w), ∇L1, ∇²L1 (numpy)."""
        if self.kind == "least_squares":
            return 0.5 * w @ self._S @ w - self._c @ w + self._yy, self._S @ w - self._c, self._S
        x, t = self._Xv, self._yv
        z = x @ w
        s = _sigmoid(-t * z)
        val = float(np.mean(_log1pexp(-t * z)))
        g = x.T @ (-t * s) / len(t)
        H = (x.T * (s * (1 - s))) @ x / len(t)
        return val, g, H

    # -- lower and upper level ------------------------------------------------------------------------------
    def lower_solution(self, p: np.ndarray) -> np.ndarray:
        """w*(p): closed form (least squares) or damped Newton to ‖∇L2‖ ≤ 1e-12 (logistic)."""
        p = np.asarray(p, dtype=np.float64)
        if self.kind == "least_squares":
            return np.linalg.solve(np.einsum("k,kde->de", p, self._A), p @ self._b)
        return self._newton(lambda w: (p @ self._source_means(w), p @ self._source_grads(w),
                                       self._lower_hessian(w, p)), np.zeros(self.d))

    @staticmethod
    def _newton(fgh, w, tol=1e-12, max_iter=100):
        f, g, H = fgh(w)
        for _ in range(max_iter):
            step = np.linalg.solve(H, g)
            if np.linalg.norm(g) <= tol or g @ step <= 1e-30:  # gradient, or Newton decrement², at the floor
                return w
            t = 1.0
            while True:  # backtracking (Armijo) far from the solution; near it (tiny decrement) full steps
                w_new = w - t * step
                f_new, g_new, H_new = fgh(w_new)
                if g @ step < 1e-8 or f_new <= f - 1e-4 * t * (g @ step) or t < 1e-10:
                    break
                t *= 0.5
            w, f, g, H = w_new, f_new, g_new, H_new
        raise RuntimeError(f"Newton did not converge: |grad| = {np.linalg.norm(g):.3g}")

    def upper_value(self, p: np.ndarray) -> float:
        """F(p) = L1(w*(p))."""
        return float(self._val_value_grad_hess(self.lower_solution(p))[0])

    def hypergradient(self, p: np.ndarray) -> np.ndarray:
        """∂F/∂p_i by the implicit function theorem: −∇L1ᵀ H⁻¹ ∇w m_i(w*) ([k]; p treated as free in R^k)."""
        p = np.asarray(p, dtype=np.float64)
        w = self.lower_solution(p)
        g_val = self._val_value_grad_hess(w)[1]
        v = np.linalg.solve(self._lower_hessian(w, p), g_val)
        return -self._source_grads(w) @ v

    # -- vectorised over many p (the grid) ------------------------------------------------------------------
    def _upper_values_many(self, P: np.ndarray, chunk: int = 8192) -> np.ndarray:
        out = np.empty(len(P))
        for s in range(0, len(P), chunk):
            Pc = P[s:s + chunk]
            W = self._lower_many(Pc)
            if self.kind == "least_squares":
                out[s:s + chunk] = 0.5 * np.einsum("pd,de,pe->p", W, self._S, W) - W @ self._c + self._yy
            else:
                out[s:s + chunk] = _log1pexp(-(W @ self._Xv.T) * self._yv).mean(1)
        return out

    def _lower_many(self, P: np.ndarray) -> np.ndarray:
        if self.kind == "least_squares":
            A = np.einsum("pk,kde->pde", P, self._A)
            return np.linalg.solve(A, (P @ self._b)[..., None])[..., 0]
        # Batched Newton (undamped, from w = 0; checked, with a damped per-point fallback).
        d, X, y, mu = self.d, self._X_all, self._y_all, self.ridge
        a = P[:, self._src] / self.n[self._src]  # [P, N]: p_s(n) / n_s(n)
        XX = np.einsum("nd,ne->nde", X, X).reshape(len(X), d * d)
        W = np.zeros((len(P), d))
        eye = mu * np.eye(d)
        active = np.arange(len(P))
        for _ in range(30):
            Z = W[active] @ X.T
            s = _sigmoid(-y * Z)
            G = (a[active] * (-y * s)) @ X + mu * W[active]
            H = ((a[active] * (s * (1 - s))) @ XX).reshape(-1, d, d) + eye
            step = np.linalg.solve(H, G[..., None])[..., 0]
            W[active] -= step
            gn = np.linalg.norm(G, axis=1)
            active = active[gn > 1e-11]
            if len(active) == 0:
                break
        bad = ~np.isfinite(W).all(1)
        bad[active] = True
        for i in np.flatnonzero(bad):
            W[i] = self.lower_solution(P[i])
        return W

    # -- adapters for the ScaleBiO solver -------------------------------------------------------------------
    def batches(self):
        """(train, val) full batches in the solver's format: {"x" [N,d], "y" [N], "source" [N]} and {"x","y"}."""
        train = {"x": torch.cat(self.X), "y": torch.cat(self.y),
                 "source": torch.as_tensor(self._src, dtype=torch.long)}
        return train, {"x": self.X_val, "y": self.y_val}

    def objective(self):
        """An object with the solver's Objective protocol for a model holding the vector ``model.weight``."""
        return _Objective(self)


class _Objective:
    def __init__(self, problem: ConvexProblem):
        self.problem = problem

    def per_example_loss(self, model, batch):
        return self.problem.per_example_loss(model.weight, batch["x"], batch["y"])

    def validation_loss(self, model, batch):
        mean = self.problem.validation_loss(model.weight, batch["x"], batch["y"])
        n = batch["y"].numel()
        return mean * n, torch.tensor(n)

    def validation_terms(self, batch):
        return int(batch["y"].numel())


# -- generators -----------------------------------------------------------------------------------------------
def _blend(rng, k):
    """Validation blend q: interior, every q_i ≥ 0.5/k."""
    return 0.5 * rng.dirichlet(np.full(k, 4.0)) + 0.5 / k


def _thetas(rng, k, d, scale):
    """k true parameters of norm ``scale``, mutually orthogonal (well separated: ‖θ_i − θ_j‖ = scale·√2)."""
    Q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return scale * Q.T


def _mixture(rng, q, n):
    """Source index of each of n validation examples, drawn with probabilities q."""
    return rng.choice(len(q), size=n, p=q)


def least_squares_problem(k: int = 3, seed: int = 0, *, d: int = 6, scale: float = 4.0, sigma: float = 0.5,
                          n_range: tuple = (60, 120), n_val: int = 400) -> ConvexProblem:
    """k sources; x ~ N(0, I_d); source i: y = xᵀθ_i + N(0, σ²), n_i uniform in n_range; the θ_i orthogonal,
    ‖θ_i‖ = scale. Validation: n_val examples with y = xᵀθ_val + N(0, σ²), θ_val = Σ q_i θ_i; as
    w*(p) ≈ Σ p_i θ_i (isotropic designs), p* ≈ q up to sampling."""
    rng = np.random.default_rng([seed, k, 1])
    theta = _thetas(rng, k, d, scale)
    X, y = [], []
    for i in range(k):
        n = int(rng.integers(n_range[0], n_range[1] + 1))
        x = rng.standard_normal((n, d))  # full column rank (n ≫ d)
        X.append(x)
        y.append(x @ theta[i] + sigma * rng.standard_normal(n))
    q = _blend(rng, k)
    xv = rng.standard_normal((n_val, d))
    yv = xv @ (q @ theta) + sigma * rng.standard_normal(n_val)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)
    return ConvexProblem("least_squares", [t(a) for a in X], [t(a) for a in y], t(xv), t(yv), 0.0, q)


def logistic_problem(k: int = 3, seed: int = 0, *, d: int = 5, scale: float = 4.0, ridge: float = 0.01,
                     n_range: tuple = (60, 100), n_val: int = 600, validation: str = "mixture") -> ConvexProblem:
    """k sources; x ~ N(0, I_d); source i: P(y = +1 | x) = σ(xᵀθ_i), n_i uniform in n_range; the θ_i
    orthogonal, ‖θ_i‖ = scale; training ridge μ = ``ridge``. Validation (n_val examples): ``"mixture"`` — each
    example from source i with probability q_i, so w*(q) is (up to sampling and ridge) the population minimiser
    of the validation loss and p* ≈ q; ``"blend"`` — labels from θ_val = Σ q_i θ_i."""
    rng = np.random.default_rng([seed, k, 2])
    theta = _thetas(rng, k, d, scale)
    draw = lambda x, th: np.where(rng.random(len(x)) < _sigmoid(np.einsum("nd,nd->n", x, th)), 1.0, -1.0)
    X, y = [], []
    for i in range(k):
        n = int(rng.integers(n_range[0], n_range[1] + 1))
        x = rng.standard_normal((n, d))
        X.append(x)
        y.append(draw(x, np.broadcast_to(theta[i], x.shape)))
    q = _blend(rng, k)
    xv = rng.standard_normal((n_val, d))
    yv = draw(xv, theta[_mixture(rng, q, n_val)] if validation == "mixture" else np.broadcast_to(q @ theta, xv.shape))
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)
    return ConvexProblem("logistic", [t(a) for a in X], [t(a) for a in y], t(xv), t(yv), ridge, q)


# -- the bilevel optimum ----------------------------------------------------------------------------------------
def simplex_grid(k: int, step: float) -> np.ndarray:
    """All p with entries multiples of ``step`` (1/step rounded to an integer m) summing to 1: [C(m+k−1, k−1), k]."""
    m = int(round(1.0 / step))
    bars = np.array(list(combinations(range(m + k - 1), k - 1)), dtype=np.int64)  # stars and bars
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), m + k - 1)], axis=1)
    return (np.diff(edges, axis=1) - 1) / m


def _softmax(lam):
    e = np.exp(lam - lam.max())
    return e / e.sum()


def refine(problem: ConvexProblem, p0: np.ndarray) -> np.ndarray:
    """Local minimum of F near p0: L-BFGS on logits (λ_k = 0) with the implicit-function hypergradient."""
    k = problem.k
    lam0 = np.log(np.maximum(p0, 1e-6))
    lam0 = lam0[:-1] - lam0[-1]

    def fg(z):
        p = _softmax(np.append(z, 0.0))
        g = problem.hypergradient(p)
        J = np.diag(p) - np.outer(p, p)
        return problem.upper_value(p), (J @ g)[:-1]

    res = minimize(fg, lam0, jac=True, method="L-BFGS-B",
                   options=dict(gtol=1e-13, ftol=0.0, maxiter=500, maxcor=k + 5))
    return _softmax(np.append(res.x, 0.0))


def bilevel_optimum(problem: ConvexProblem, grid_step: float = 0.01, return_grid: bool = False,
                    max_points: int = 20000):
    """p* = argmin over the simplex of F: search over the simplex grid of step ``grid_step``, then refined by
    L-BFGS on the logits with the implicit-function hypergradient (to ~1e-7 in p). The grid search is
    exhaustive when the grid has ≤ ``max_points`` points or the lower level is closed-form; otherwise
    (logistic, k = 4 at 0.01) exhaustive on a coarse grid (step 5·grid_step) first, then exhaustive over the
    fine points within 1.5 coarse steps (max-norm) of the coarse best. ``return_grid``: also return the best
    grid point."""
    P = simplex_grid(problem.k, grid_step)
    if problem.kind != "least_squares" and len(P) > max_points:
        coarse = 5 * grid_step
        C = simplex_grid(problem.k, coarse)
        c_best = C[int(np.argmin(problem._upper_values_many(C)))]
        P = P[np.abs(P - c_best).max(1) <= 1.5 * coarse + 1e-12]
    p_grid = P[int(np.argmin(problem._upper_values_many(P)))]
    p_star = refine(problem, p_grid)
    return (p_star, p_grid) if return_grid else p_star


def penalty_optimum(problem: ConvexProblem, alpha: float, p0: np.ndarray | None = None) -> np.ndarray:
    """The optimum p*_α of the penalty form the solver runs at a fixed α (method.md §2):
    min_p φ_α(p), φ_α(p) = min_w [L1(w) + α L2(p, w)] − α min_u L2(p, u); ∂φ_α/∂p_i = α (m_i(w_α) − m_i(u*))
    (envelope theorem). Converges to p* as α → ∞; refined from p0 (default: p*)."""
    if p0 is None:
        p0 = bilevel_optimum(problem)

    def w_alpha(p):
        def fgh(w):
            v, g, H = problem._val_value_grad_hess(w)
            return (v + alpha * p @ problem._source_means(w), g + alpha * p @ problem._source_grads(w),
                    H + alpha * problem._lower_hessian(w, p))
        return problem._newton(fgh, problem.lower_solution(p))

    def fg(z):
        p = _softmax(np.append(z, 0.0))
        u, w = problem.lower_solution(p), w_alpha(p)
        mw, mu = problem._source_means(w), problem._source_means(u)
        val = problem._val_value_grad_hess(w)[0] + alpha * p @ (mw - mu)
        J = np.diag(p) - np.outer(p, p)
        return val, (J @ (alpha * (mw - mu)))[:-1]

    lam0 = np.log(np.maximum(p0, 1e-6))
    res = minimize(fg, lam0[:-1] - lam0[-1], jac=True, method="L-BFGS-B",
                   options=dict(gtol=1e-13, ftol=0.0, maxiter=500))
    return _softmax(np.append(res.x, 0.0))


def flatness(problem: ConvexProblem, p: np.ndarray, radius: float = 0.01, directions: int = 64, seed: int = 0):
    """(min, max) of F(p + δ) − F(p) over simplex-tangent δ with ‖δ‖₁ = radius (random directions plus the
    pairwise ±(e_i − e_j) ones)."""
    k = problem.k
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((directions, k))
    D -= D.mean(1, keepdims=True)
    pairs = [np.eye(k)[i] - np.eye(k)[j] for i in range(k) for j in range(k) if i != j]
    D = np.concatenate([D, np.array(pairs)])
    D *= radius / np.abs(D).sum(1, keepdims=True)
    f0 = problem.upper_value(p)
    inc = np.array([problem.upper_value(p + dlt) - f0 for dlt in D])
    return float(inc.min()), float(inc.max())
