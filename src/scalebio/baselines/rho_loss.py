"""RHO-LOSS: reducible holdout loss selection (Mindermann et al., "Prioritized Training on Points that are
Learnable, Worth Learning, and Not Yet Learnt", ICML 2022).

The paper's rule (§2, Algorithm 1): a point (x, y) is worth training on now when its reducible holdout loss

    RHO-LOSS(x, y) = L[y | x; D_t] − L[y | x; D_ho]

is large, where L[y | x; D_t] is its loss under the model being trained and L[y | x; D_ho] its loss under an
*irreducible loss model* (IL model) trained on a holdout set. Noise (unlearnable from the holdout) has a high
IL loss, so a low score; points already learnt have a low training loss, so a low score. §3's approximations,
kept here: the IL model is trained on the holdout alone (not on D_t ∪ D_ho), and the irreducible losses are
computed once, before selection (Algorithm 1 lines 1–2). Algorithm 1 then selects the top n_b of each large
batch of n_B (n_b / n_B = 0.1 in the paper's experiments) and takes a gradient step on them.

Scaled down / adapted for this project:

* The holdout is the run's validation set (the ScaleBiO paper's RHO-LOSS baseline does the same).
* Per-example loss: the project's response-token mean (``CausalLMObjective``), not a classification
  cross-entropy.
* ``select_rho_loss`` is the *offline* selection the data-selection comparison needs: one score per pool
  example with the model at its current state (the base model), top N of the whole pool, returned as indices
  for the fine-tuning step. ``train_with_rho_loss`` is the paper's online Algorithm 1 on a small model (kept
  for completeness: it trains the model in place and returns what it selected at each step).
* The IL model's training (``train_irreducible_loss_model``) is a few hundred plain AdamW steps on a small
  model; the paper trains it to convergence with early stopping on a split of the holdout.

API (plain functions; a stage runner calls them in order):

    il = build_model(...)                                  # a copy of the base architecture
    train_irreducible_loss_model(il, validation, steps=..., batch_size=..., lr=..., pad_id=...)
    il_losses = irreducible_losses(il, pool.examples, pad_id)
    sel = select_rho_loss(base_model, il_losses, pool.examples, n, pad_id)   # RhoLossSelection
    write_selection(out, sources, [pool.origin[j] for j in sel.indices], sel.provenance)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from tqdm.auto import tqdm

from .. import data as data_mod
from ..solver import CausalLMObjective
from .common import TrainLog, batches, dropout_seeded, per_example_losses, provenance, top_n, train_steps

PAPER = "Mindermann et al. 2022, Prioritized Training on Points that are Learnable, Worth Learning, and Not Yet Learnt"


def train_irreducible_loss_model(model: nn.Module, holdout: Sequence[data_mod.Example], steps: int, batch_size: int,
                                 lr: float, pad_id: int, seed: int = 0, weight_decay: float = 0.0,
                                 objective=None, device=None, progress: bool = False) -> TrainLog:
    """Train the IL model on the holdout set only (Algorithm 1, line 1; §3 approximation 2), in place."""
    return train_steps(model, holdout, steps, batch_size, lr, pad_id, seed=seed, weight_decay=weight_decay,
                       objective=objective, device=device, progress=progress)


def irreducible_losses(il_model: nn.Module, pool: Sequence[data_mod.Example], pad_id: int, batch_size: int = 8,
                       objective=None, device=None) -> torch.Tensor:
    """L[y | x; D_ho] for every pool example, computed once (Algorithm 1, line 2; §3 approximation 3): [N]."""
    return per_example_losses(il_model, pool, pad_id, batch_size, objective, device)


def rho_loss_scores(model: nn.Module, il_losses: torch.Tensor, pool: Sequence[data_mod.Example], pad_id: int,
                    batch_size: int = 8, objective=None, device=None) -> torch.Tensor:
    """RHO-LOSS = L[y | x; D_t] − L[y | x; D_ho] for every pool example (§2): training loss under ``model``
    minus the irreducible loss. il_losses [N] → [N] float64."""
    if il_losses.numel() != len(pool):
        raise ValueError(f"il_losses has {il_losses.numel()} entries for a pool of {len(pool)} examples")
    return per_example_losses(model, pool, pad_id, batch_size, objective, device) - il_losses.double().cpu()


@dataclass
class RhoLossSelection:
    """``indices``: the N selected pool indices, best first; ``scores`` [N_pool]: every example's RHO-LOSS;
    ``provenance``: for the selection's manifest."""

    indices: list[int]
    scores: torch.Tensor
    provenance: dict[str, Any] = field(default_factory=dict)


def select_rho_loss(model: nn.Module, il_losses: torch.Tensor, pool: Sequence[data_mod.Example], n: int, pad_id: int,
                    batch_size: int = 8, objective=None, device=None, settings: dict | None = None,
                    seed: int = 0) -> RhoLossSelection:
    """Offline RHO-LOSS: score the whole pool once with ``model`` (the base model) and keep the top ``n``."""
    scores = rho_loss_scores(model, il_losses, pool, pad_id, batch_size, objective, device)
    prov = provenance("rho_loss", PAPER, {"variant": "offline", "n": n, **(settings or {})}, seed)
    return RhoLossSelection(top_n(scores, n), scores, prov)


@dropout_seeded
def train_with_rho_loss(model: nn.Module, il_losses: torch.Tensor, pool: Sequence[data_mod.Example], steps: int,
                        large_batch: int, selected_batch: int, lr: float, pad_id: int, seed: int = 0,
                        weight_decay: float = 0.0, objective=None, device=None,
                        progress: bool = False) -> list[list[int]]:
    """Online RHO-LOSS (Algorithm 1): each step draws a large batch B_t of ``large_batch`` pool indices
    uniformly without replacement, scores them with the current model (eval mode, no gradients), keeps the
    ``selected_batch`` with the largest RHO-LOSS and takes one AdamW step on their mean loss. Trains ``model`` in
    place; returns the selected pool indices of every step."""
    objective = objective or CausalLMObjective()
    if not 1 <= selected_batch <= large_batch <= len(pool):
        raise ValueError(f"need 1 <= selected_batch ({selected_batch}) <= large_batch ({large_batch}) <= pool "
                         f"size ({len(pool)})")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    chosen: list[list[int]] = []
    for _ in tqdm(range(steps), desc="RHO-LOSS training", disable=not progress, dynamic_ncols=True):
        candidates = torch.randperm(len(pool), generator=generator)[:large_batch].tolist()
        subset = [pool[j] for j in candidates]
        scores = per_example_losses(model, subset, pad_id, large_batch, objective, device) - il_losses[candidates].double()
        picked = [candidates[j] for j in top_n(scores, selected_batch)]
        model.train()
        (batch,) = batches([pool[j] for j in picked], selected_batch, pad_id, device)
        opt.zero_grad(set_to_none=True)
        objective.per_example_loss(model, batch).mean().backward()
        opt.step()
        chosen.append(picked)
    opt.zero_grad(set_to_none=True)
    return chosen
