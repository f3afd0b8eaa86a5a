"""A second-order baseline (issue item 5): implicit differentiation with conjugate-gradient inverse-Hessian-
vector products, against ScaleBiO's first-order penalty step.

The bilevel problem of method.md §1, F(λ) = L1(w*(λ)), w*(λ) = argmin_w L2(λ, w) with L2 = Σ_i p_i m_i(w),
p = softmax(λ), m_i the mean loss of source i's examples in the batch. The implicit function theorem gives

    ∇λ F = − J c,   c_i = ∇w m_i(w)ᵀ v,   v = [∇²w L2(λ, w)]⁻¹ ∇w L1(w),   J = diag(p) − p pᵀ,

evaluated at the current w in place of w*(λ). One weight update of ``ImplicitHypergradient``:
  1. g = ∇w L2(s, w; B) with the graph kept (s = p as a leaf, so L2 is linear in s);
  2. ∇w L1(w; V);
  3. v by ``cg_iters`` conjugate-gradient iterations on (∇²w L2 + δI) v = ∇w L1, each iteration one
     Hessian-vector product (a backward through g), warm-started from the previous v;
  4. c = ∂(gᵀv)/∂s, one more backward through g (∂g/∂s_i = ∇w m_i);
  5. λ ← AdamW step on −J c; w ← AdamW step on g (the lower-level step, at the same point).
Steps 1–4 are the cost of a second-order method: a double-backward graph held through cg_iters + 1
backward passes, against ScaleBiO's three plain passes over two copies.

The convex check runs both methods on a least-squares problem with 3 sources whose bilevel optimum p* is
known independently (tests/convex.py: closed-form lower level, simplex grid, L-BFGS refinement).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from scalebio.config import SolverConfig
from scalebio.conventions import lr_shape
from scalebio.solver import CausalLMObjective, ScaleBiO
from scalebio.mixture import mixture_loss, source_counts

from .common import AllocationTrace, ModelSpec, SolverRunner, interleaved_times, summarize, token_batch

log = logging.getLogger("benchmarks")
REPO = Path(__file__).resolve().parents[1]


class ImplicitHypergradient:
    """Implicit differentiation with CG for data weights λ; one model copy ``w``. Objective protocol as in
    ``scalebio.solver`` (per-example training loss, summed validation loss and its term count)."""

    def __init__(self, w: nn.Module, objective, num_sources: int, lr_w: float, lr_lambda: float,
                 cg_iters: int = 5, damping: float = 0.0, inner_steps: int = 0, weight_decay: float = 0.0):
        self.w, self.objective, self.k = w, objective, num_sources
        self.cg_iters, self.damping, self.inner_steps = cg_iters, damping, inner_steps
        self.lam = nn.Parameter(torch.zeros(num_sources, dtype=torch.float64))
        self.params = [q for q in w.parameters() if q.requires_grad]
        self.opt_w = torch.optim.AdamW(self.params, lr=lr_w, weight_decay=weight_decay)
        self.opt_lam = torch.optim.AdamW([self.lam], lr=lr_lambda, weight_decay=0.0)
        self.peak = {"w": lr_w, "lam": lr_lambda}
        self.v: list[torch.Tensor] | None = None
        w.train()

    def set_schedule(self, shape: float) -> None:
        for opt, key in ((self.opt_w, "w"), (self.opt_lam, "lam")):
            for group in opt.param_groups:
                group["lr"] = self.peak[key] * shape

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.lam.detach(), dim=0)

    def _lower_loss(self, train: list[dict], s: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return sum(mixture_loss(self.objective.per_example_loss(self.w, mb), mb["source"], s, counts) for mb in train)

    def _hvp(self, grads, vec):
        hv = torch.autograd.grad(grads, self.params, grad_outputs=vec, retain_graph=True)
        return [h + self.damping * x for h, x in zip(hv, vec)]

    def _cg(self, grads, rhs):
        """Approximately solve H x = rhs (lists of tensors shaped like the parameters)."""
        dot = lambda a, b: sum((x * y).sum() for x, y in zip(a, b))
        x = [t.clone() for t in self.v] if self.v is not None else [torch.zeros_like(t) for t in rhs]
        hx = self._hvp(grads, x) if self.v is not None else [torch.zeros_like(t) for t in rhs]
        r = [b - h for b, h in zip(rhs, hx)]
        d = [t.clone() for t in r]
        rr = dot(r, r)
        for _ in range(self.cg_iters):
            if rr <= 1e-30:
                break
            hd = self._hvp(grads, d)
            step = rr / dot(d, hd)
            x = [a + step * b for a, b in zip(x, d)]
            r = [a - step * b for a, b in zip(r, hd)]
            rr_new = dot(r, r)
            d = [a + (rr_new / rr) * b for a, b in zip(r, d)]
            rr = rr_new
        return x

    def step(self, train: list[dict], val: list[dict]) -> None:
        p = self.weights()
        counts = sum(source_counts(mb["source"], self.k) for mb in train)
        for _ in range(self.inner_steps):  # optional extra lower-level steps before the hypergradient
            self.opt_w.zero_grad(set_to_none=True)
            self._lower_loss(train, p, counts).backward()
            self.opt_w.step()

        # 1. ∇w L2 with its graph, L2 linear in the leaf s = p.
        s = p.clone().requires_grad_(True)
        grads = torch.autograd.grad(self._lower_loss(train, s, counts), self.params, create_graph=True)
        # 2. ∇w L1(w; V).
        val_terms = float(sum(self.objective.validation_terms(mb) for mb in val))
        val_loss = sum(self.objective.validation_loss(self.w, mb)[0] for mb in val) / val_terms
        g_val = torch.autograd.grad(val_loss, self.params)
        # 3. v ≈ (∇²w L2 + δI)⁻¹ ∇w L1.
        v = self._cg(grads, [g.detach() for g in g_val])
        self.v = [t.detach() for t in v]
        # 4. c_i = ∇w m_i · v, then ∇λ F = −J c.
        (c,) = torch.autograd.grad(grads, s, grad_outputs=self.v)
        jac = torch.diag(p) - torch.outer(p, p)
        self.lam.grad = -(jac @ c.double())
        # 5. Simultaneous updates at the same (w, λ).
        for q, g in zip(self.params, grads):
            q.grad = g.detach()
        del grads
        self.opt_w.step()
        self.opt_lam.step()


# -- the convex known-answer problem -------------------------------------------------------------------------
def load_convex():
    path = REPO / "tests" / "convex.py"
    spec = importlib.util.spec_from_file_location("scalebio_tests_convex", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class VectorModel(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d, dtype=torch.float64))


def convex_comparison(steps: int, alpha: float, seed: int = 0) -> dict:
    """Both methods on least squares with 3 sources, full batches, weight decay 0, cosine schedule; final p
    against the bilevel optimum p* and ScaleBiO's own penalty optimum p*_α."""
    convex = load_convex()
    problem = convex.least_squares_problem(k=3, seed=seed)
    p_star = convex.bilevel_optimum(problem)
    p_alpha = convex.penalty_optimum(problem, alpha, p_star)
    train, val = problem.batches()
    objective = problem.objective()
    lr_w, lr_lam = 3e-2, 1e-2

    u, w = VectorModel(problem.d), VectorModel(problem.d)
    cfg = SolverConfig(lr_u=lr_w, lr_w=lr_w, lr_lambda=lr_lam, alpha=alpha, weight_decay_u=0.0, weight_decay_w=0.0,
                       weight_decay_lambda=0.0)
    scalebio = ScaleBiO(u, w, objective, problem.k, cfg)
    aid = ImplicitHypergradient(VectorModel(problem.d), objective, problem.k, lr_w=lr_w, lr_lambda=lr_lam,
                                cg_iters=problem.d)
    seconds = {"scalebio": 0.0, "implicit_cg": 0.0}
    for t in range(steps):
        shape = lr_shape(t, steps, 0.0, "cosine")
        scalebio.set_schedule(shape, alpha)
        aid.set_schedule(shape)
        start = time.perf_counter()
        scalebio.step([train], [val])
        seconds["scalebio"] += time.perf_counter() - start
        start = time.perf_counter()
        aid.step([train], [val])
        seconds["implicit_cg"] += time.perf_counter() - start
    final = {"scalebio": scalebio.weights().numpy(), "implicit_cg": aid.weights().numpy()}
    out = {
        "problem": dict(kind="least_squares", k=problem.k, d=problem.d, n=[len(t) for t in problem.y],
                        seed=seed, source="tests/convex.py"),
        "settings": dict(steps=steps, alpha=alpha, lr_w=lr_w, lr_u=lr_w, lr_lambda=lr_lam, schedule="cosine",
                         weight_decay=0.0, cg_iters=problem.d, batches="full"),
        "p_star": p_star.tolist(),
        "p_star_alpha": p_alpha.tolist(),
        "upper_value_at_p_star": problem.upper_value(p_star),
        "methods": {},
    }
    for name, p in final.items():
        out["methods"][name] = {
            "p": p.tolist(),
            "l1_error_to_p_star": float(np.abs(p - p_star).sum()),
            "l1_error_to_p_star_alpha": float(np.abs(p - p_alpha).sum()),
            "upper_value_gap": problem.upper_value(p) - problem.upper_value(p_star),
            "seconds_per_update": seconds[name] / steps,
        }
    return out


# -- time and memory per weight update on a small language model ---------------------------------------------
def lm_comparison(spec: ModelSpec, batch: int, k: int, cg_iters: int, warmup: int, reps: int) -> dict:
    train = [token_batch(spec.vocab, batch, spec.seq_len, k, seed=1)]
    val = [token_batch(spec.vocab, batch, spec.seq_len, k, seed=2)]

    def build(name):
        if name == "scalebio":
            return SolverRunner(spec, k, lisa=False)
        return ImplicitHypergradient(spec.build(0), CausalLMObjective(), k, lr_w=1e-5, lr_lambda=1e-2,
                                     cg_iters=cg_iters, damping=1.0, weight_decay=5e-4)

    methods = {name: build(name) for name in ("scalebio", "implicit_cg")}
    times = interleaved_times({name: (lambda m: lambda: m.step(train, val))(m) for name, m in methods.items()},
                              warmup, reps)
    del methods
    memory = {}
    for name in ("scalebio", "implicit_cg"):
        with AllocationTrace() as trace:
            method = build(name)
            for i in range(2):
                with trace.mark(f"step{i}"):
                    method.step(train, val)
        del method
        result = trace.analyse()
        memory[name] = {"peak_bytes": result["peak_bytes"],
                        "step_peaks": [result["phases"][f"step{i}"]["peak_bytes"] for i in range(2)]}
    return {
        "model": spec.describe(),
        "settings": dict(batch=batch, val_batch=batch, k=k, cg_iters=cg_iters, damping=1.0, warmup=warmup, reps=reps,
                         attention="eager (double backward)", scalebio_lisa=False),
        "time": summarize(times, "scalebio"),
        "memory": memory,
        "peak_ratio_implicit_to_scalebio": memory["implicit_cg"]["peak_bytes"] / memory["scalebio"]["peak_bytes"],
    }


def run(lm_spec: ModelSpec, batch: int, k: int, cg_iters: int, warmup: int, reps: int, convex_steps: int,
        alpha: float) -> dict:
    log.info("hypergradient: convex problem, %d steps", convex_steps)
    convex = convex_comparison(convex_steps, alpha)
    log.info("hypergradient: language model, CG %d iterations", cg_iters)
    return {"convex": convex, "language_model": lm_comparison(lm_spec, batch, k, cg_iters, warmup, reps)}
