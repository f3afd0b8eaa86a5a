"""``solver.conventions: scalebio | acl | v1``: whose conventions a run follows, one object per convention.

The released code: research4pan/scalebio ``math/dev_scalebio/python/`` (the later "ACL" code) and 2003pro/ScaleBiO
``python/`` (the preview "v1" code), read line by line against ours. Each field of ``Conventions`` is a row of
README.md's "Fidelity to the released code" table:

| row              | field           | scalebio                          | acl                            | v1                      |
|------------------|-----------------|-----------------------------------|--------------------------------|-------------------------|
| warmup, outer    | schedule        | ``restarted_schedule``            | ``released_schedule``          | as acl                  |
| per-example loss | per_example     | ``response``: ÷ response tokens   | as scalebio                    | ``padded``: ÷ T − 1     |
| n_i, scaling     | normalisation   | ``GlobalBatchMeans``              | as scalebio                    | ``MicroBatchMeans``     |
| sampling (auto)  | sampling        | ``stratified``                    | ``replacement``                | ``pooled``              |
| prompt (auto)    | prompt          | ``scalebio``                      | ``authors``                    | as acl                  |
| w's passes       | w_passes        | ``validation_with_training``      | ``training_then_validation``   | as acl                  |
| u's Adam         | u_adam          | ``AlphaScaledAdam``               | as scalebio                    | as scalebio             |

``resolve`` is the one place a convention's name is read; everything else reads the fields. u's Adam is also a
field of its own, ``solver.u_adam`` (``resolve_u_adam``): ``auto`` takes the convention's row, ``plain`` is what
``scalebio`` did before issue 18 measured it (README, "Precision"), and the presets of committed ``scalebio`` runs pin
it.

Not a convention: LISA's optimizer state. The released code builds one optimizer over all parameters, so a
re-activated block resumes the Adam moments it had; ours frees a block's moments when it is frozen, in every
convention, because that is LISA's memory saving (method.md §4; README, "What it costs"). Under ``acl`` or
``v1`` with LISA, u and w therefore depart from the released code from the first re-activation of a block on
(about 1e-4 in p over 2 × 20 steps); ``lisa.keep_all_state: true`` restores the released policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import zip_longest
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .mixture import GlobalBatchMeans, MicroBatchMeans

if TYPE_CHECKING:
    from .config import SolverConfig


# -- learning-rate shapes and the outer loop ------------------------------------------------------------------
def lr_shape(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``total``: ceil(r·N) warmup steps with factor (t+1)/W, so
    step 0 already trains, then cosine to 0 (or constant)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    return _after_warmup(step, total, warmup, schedule)


def released_lr_shape(step: int, total: int, warmup_ratio: float, schedule: str) -> float:
    """The released code's scheduler: int(r·N) warmup steps with factor t/W, so the lr is 0 at step 0, then cosine
    to 0 (or constant)."""
    warmup = int(warmup_ratio * total)
    if step < warmup:
        return step / max(1, warmup)
    return _after_warmup(step, total, warmup, schedule)


def _after_warmup(step: int, total: int, warmup: int, schedule: str) -> float:
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def restarted_schedule(step: int, steps_per_outer: int, cfg: "SolverConfig") -> tuple[float, float]:
    """(lr multiplier, α) at global step ``step`` of outer iteration i = step // steps_per_outer: α·τ^i, and the lr
    shape restarted every outer iteration."""
    outer, t = divmod(step, steps_per_outer)
    return lr_shape(t, steps_per_outer, cfg.warmup_ratio, cfg.schedule), cfg.alpha * cfg.tau ** outer


def released_schedule(step: int, steps_per_outer: int, cfg: "SolverConfig") -> tuple[float, float]:
    """(lr multiplier, α) as the released code's outer loop: α·τ^(i+1), and τ^(−i) times one lr shape over all
    steps of all outer iterations."""
    outer = step // steps_per_outer
    shape = released_lr_shape(step, steps_per_outer * cfg.outer_iterations, cfg.warmup_ratio, cfg.schedule)
    return shape * cfg.tau ** (-outer), cfg.alpha * cfg.tau ** (outer + 1)


# -- the order of w's forward/backward passes ---------------------------------------------------------------------
Pass = tuple  # (V micro-batch or None, B micro-batch or None)


def validation_with_training(val: Sequence, train: Sequence, fuse: bool) -> list[Pass]:
    """V's and B's micro-batches paired, one pass per pair, when ``fuse`` (``solver.fused_w`` and an objective
    with ``joint_losses``); else V's passes, then B's."""
    if fuse:
        return list(zip_longest(val, train))
    return [(mb, None) for mb in val] + [(None, mb) for mb in train]


def training_then_validation(val: Sequence, train: Sequence, fuse: bool) -> list[Pass]:
    """The released code: L2's passes on B, then L1's on V, never fused (the order matters with dropout)."""
    return [(None, mb) for mb in train] + [(mb, None) for mb in val]


# -- u's Adam -----------------------------------------------------------------------------------------------------
class PlainAdam:
    """u's AdamW steps on ∇L2 with the configured eps: where ∇L2 is tiny, eps damps u's steps and not w's, whose
    Adam sees ∇L1 + α∇L2 (``solver.u_adam: plain``)."""

    name = "plain"

    def set_alpha(self, optimizer: torch.optim.Optimizer, eps: float, old: float, new: float) -> None:
        pass


class AlphaScaledAdam:
    """The released code steps u on the gradient of α·L2 (its loss −α·L2 under ``maximize``). Adam is scale-free
    but for eps and for moments accumulated under another α, so u steps here on ∇L2 with eps/α, and when α changes
    (τ ≠ 1) its moments are brought to the new α's units: exp_avg × α_old/α_new, exp_avg_sq × (α_old/α_new)². Exact
    in real arithmetic; while α is constant nothing but eps is touched (``solver.u_adam: alpha_scaled``)."""

    name = "alpha_scaled"

    def set_alpha(self, optimizer: torch.optim.Optimizer, eps: float, old: float, new: float) -> None:
        for group in optimizer.param_groups:
            group["eps"] = eps / new
        if new == old:
            return
        ratio = old / new
        for state in optimizer.state.values():
            if "exp_avg" in state:
                state["exp_avg"].mul_(ratio)
                state["exp_avg_sq"].mul_(ratio * ratio)


# -- the three conventions ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conventions:
    """One convention: a value per row of README.md's "Fidelity to the released code" table."""

    name: str
    schedule: Callable[[int, int, "SolverConfig"], tuple[float, float]]
    """(step, steps per outer iteration, solver config) → (lr multiplier, α): warmup, cosine, the outer loop."""
    per_example: str
    """The per-example loss (scalebio.solver.CausalLMObjective): ``response`` (mean over response tokens) or
    ``padded`` (the summed response loss over the micro-batch's padded length)."""
    normalisation: GlobalBatchMeans | MicroBatchMeans
    """How n_i is counted and each micro-batch's term of L2 and L1 scaled."""
    sampling: str
    """``data.sampling: auto`` (scalebio.data.BatchSampler)."""
    prompt: str
    """``data.prompt: auto`` (scalebio.data)."""
    w_passes: Callable[[Sequence, Sequence, bool], list[Pass]]
    """(V's micro-batches, B's, whether V and B may share a pass) → w's passes, in order."""
    u_adam: PlainAdam | AlphaScaledAdam
    """What u's AdamW steps on by default (``solver.u_adam: auto``): α·∇L2, as w's Adam treats L2 and as the
    released code steps u, in every convention."""


SCALEBIO = Conventions("scalebio", restarted_schedule, "response", GlobalBatchMeans(), "stratified", "scalebio",
                       validation_with_training, AlphaScaledAdam())
ACL = Conventions("acl", released_schedule, "response", GlobalBatchMeans(), "replacement", "authors",
                  training_then_validation, AlphaScaledAdam())
V1 = Conventions("v1", released_schedule, "padded", MicroBatchMeans(), "pooled", "authors",
                 training_then_validation, AlphaScaledAdam())

BY_NAME = {c.name: c for c in (SCALEBIO, ACL, V1)}
NAMES = tuple(BY_NAME)


def resolve(name: str) -> Conventions:
    """The convention ``solver.conventions`` names."""
    if name not in BY_NAME:
        from .config import ConfigError

        raise ConfigError(f"solver.conventions: {name!r} is not one of {', '.join(NAMES)}")
    return BY_NAME[name]


U_ADAM = {policy.name: policy for policy in (PlainAdam(), AlphaScaledAdam())}


def resolve_u_adam(cfg: "SolverConfig") -> PlainAdam | AlphaScaledAdam:
    """``solver.u_adam``, with ``auto`` resolved by ``solver.conventions``."""
    if cfg.u_adam == "auto":
        return resolve(cfg.conventions).u_adam
    if cfg.u_adam not in U_ADAM:
        from .config import ConfigError

        raise ConfigError(f"solver.u_adam: {cfg.u_adam!r} is not one of auto, {', '.join(U_ADAM)}")
    return U_ADAM[cfg.u_adam]


def legacy_u_adam(conventions: str) -> str:
    """What u's Adam was under ``conventions`` before ``solver.u_adam`` existed (config_digest leaves the field out
    where it keeps that, so the checkpoints and weights of older runs still resume and count as finished)."""
    return "plain" if conventions == "scalebio" else "alpha_scaled"
