"""DoReMi: domain reweighting with minimax optimisation (Xie, Pham, Dong, Du, Liu, Lu, Liang, Le, Ma, Yu,
"DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining", NeurIPS 2023).

The paper's three steps (§2), of which this module does the first two and returns the weights of the third:

1. Train a *reference* model on the reference domain weights (here uniform, the paper's choice for GLaM).
2. Train a *proxy* model with Group DRO over domains (§2, Algorithm 1). At step t, on a minibatch drawn from
   the uniform mixture P_u, with B_i its examples of domain i:

       λ_t[i] = (1 / Σ_{x∈B_i} |x|) Σ_{x∈B_i} Σ_j max(ℓ_{θ_{t−1}, j}(x) − ℓ_{ref, j}(x), 0)   (clipped per token)
       α'_t  = α_{t−1} ⊙ exp(η λ_t)                                   (exponentiated gradient ascent)
       α_t   = (1 − c) α'_t / Σ_i α'_t[i] + c u                        (renormalise, smooth toward uniform u)
       θ_t   = Adam step on L(θ, α_t) = Σ_i α_t[i] · (1 / Σ_{x∈B_i} |x|) Σ_{x∈B_i} Σ_j ℓ_{θ, j}(x)

   and the output is the *average* ᾱ = (1/T) Σ_{t=1}^T α_t, not the last α_T.
3. Train the large model on ᾱ (the pipeline's resample + fine-tune steps).

The paper's η = 1 and c = 1e-3 are the defaults. A domain absent from a minibatch keeps its previous λ (the
released code's rule; the paper's minibatches always hold every domain); α_0 = u and λ_0 = 0.

Scaled down / adapted: reference and proxy are small models trained for a few hundred steps (the paper: 280M
proxy and reference, 200k steps, batch 512 × 1024 tokens); domains are the project's sources; token losses
are the response tokens' (prompt tokens carry no loss in instruction data, so they are not in |x|); plain
AdamW for both models.

API (plain functions; a stage runner calls them in order):

    train_reference_model(reference, sources, steps=..., batch_size=..., lr=..., pad_id=...)
    result = run_doremi(proxy, reference, sources, names, steps=..., batch_size=..., lr=..., pad_id=...)
    record = source_weights_record(result.weights, counts, result.provenance); write_weights(path, record)

``sources``: one list of ``scalebio.data.Example`` per domain (``build_datasets`` gives them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import data as data_mod
from ..solver import CausalLMObjective
from .common import TrainLog, dropout_seeded, provenance

PAPER = "Xie et al. 2023, DoReMi: Optimizing Data Mixtures Speeds Up Language Model Pretraining"


def sample_mixture(sizes: Sequence[int], weights: torch.Tensor, batch_size: int,
                   generator: torch.Generator) -> list[tuple[int, int]]:
    """``batch_size`` (domain, index) pairs: each domain drawn from ``weights`` [k], then an example of it
    uniformly (with replacement across draws)."""
    domains = torch.multinomial(weights.double(), batch_size, replacement=True, generator=generator).tolist()
    return [(d, int(torch.randint(sizes[d], (1,), generator=generator))) for d in domains]


def _collate(sources: Sequence[Sequence[data_mod.Example]], picks, pad_id: int, device) -> dict[str, torch.Tensor]:
    batch = data_mod.collate([sources[d][i] for d, i in picks], pad_id)
    batch["source"] = torch.tensor([d for d, _ in picks], dtype=torch.long)  # the domain, whatever Example.source says
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def domain_token_means(token_values: torch.Tensor, mask: torch.Tensor, source: torch.Tensor,
                       k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ over domain i's labelled tokens of the values / their count, the count) per domain: [k], [k].
    token_values, mask [b, T], source [b]. A domain with no tokens gets mean 0 and count 0."""
    sums = torch.zeros(k, dtype=token_values.dtype, device=token_values.device)
    sums = sums.index_add(0, source.to(token_values.device), (token_values * mask).sum(1))
    counts = torch.zeros(k, dtype=token_values.dtype, device=token_values.device)
    counts = counts.index_add(0, source.to(token_values.device), mask.sum(1).to(token_values.dtype))
    return sums / counts.clamp(min=1), counts


def doremi_weight_update(weights: torch.Tensor, excess: torch.Tensor, counts: torch.Tensor, previous: torch.Tensor,
                         eta: float = 1.0, smoothing: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """One Group-DRO step of Algorithm 1. weights α_{t−1} [k]; excess [k], each domain's mean *clipped* excess
    token loss in the minibatch; counts [k] its token count (0: absent, keeps ``previous`` [k]).
    Returns (α_t, λ_t), both [k] float64."""
    weights, excess, previous = weights.double(), excess.double().cpu(), previous.double()
    lam = torch.where(counts.cpu() > 0, excess, previous)
    logits = torch.log(weights) + eta * lam
    updated = torch.softmax(logits, dim=0)                  # α'_t / Σ α'_t, computed in log space
    k = weights.numel()
    return (1 - smoothing) * updated + smoothing / k, lam


@dropout_seeded
def train_reference_model(model: nn.Module, sources: Sequence[Sequence[data_mod.Example]], steps: int,
                          batch_size: int, lr: float, pad_id: int, reference_weights: Sequence[float] | None = None,
                          seed: int = 0, weight_decay: float = 0.0, objective=None, device=None,
                          progress: bool = False) -> TrainLog:
    """Step 1: train ``model`` in place on the mixture ``reference_weights`` (default uniform) with AdamW on the
    token-mean loss of each minibatch."""
    objective = objective or CausalLMObjective()
    k = len(sources)
    mix = torch.tensor(reference_weights if reference_weights is not None else [1.0 / k] * k, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    model.train()
    out = TrainLog([], [])
    for _ in tqdm(range(steps), desc="DoReMi reference", disable=not progress, dynamic_ncols=True):
        batch = _collate(sources, sample_mixture([len(s) for s in sources], mix, batch_size, generator), pad_id, device)
        ce, mask = objective.token_losses(model, batch)
        loss = ce.sum() / mask.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.losses.append(float(loss.detach()))
        out.lrs.append(lr)
    opt.zero_grad(set_to_none=True)
    return out


@dataclass
class DoremiResult:
    """``weights``: ᾱ as name → probability (the product); ``trajectory`` [T, k]: α_1 … α_T; ``excess`` [T, k]:
    λ_1 … λ_T; ``provenance``: for the weights file."""

    weights: dict[str, float]
    trajectory: torch.Tensor
    excess: torch.Tensor
    provenance: dict[str, Any] = field(default_factory=dict)


@dropout_seeded
def run_doremi(proxy: nn.Module, reference: nn.Module, sources: Sequence[Sequence[data_mod.Example]],
               names: Sequence[str], steps: int, batch_size: int, lr: float, pad_id: int, eta: float = 1.0,
               smoothing: float = 1e-3, seed: int = 0, weight_decay: float = 0.0, objective=None,
               device=None, progress: bool = False) -> DoremiResult:
    """Step 2 (Algorithm 1): train ``proxy`` in place against the frozen ``reference``; return ᾱ."""
    objective = objective or CausalLMObjective()
    k = len(sources)
    if len(names) != k:
        raise ValueError(f"{len(names)} names for {k} sources")
    uniform = torch.full((k,), 1.0 / k, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in proxy.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    reference.eval()
    proxy.train()
    alpha, lam = uniform.clone(), torch.zeros(k, dtype=torch.float64)
    trajectory, excesses = [], []
    for _ in tqdm(range(steps), desc="DoReMi proxy", disable=not progress, dynamic_ncols=True):
        batch = _collate(sources, sample_mixture([len(s) for s in sources], uniform, batch_size, generator), pad_id,
                         device)
        with torch.no_grad():
            ref_ce, _ = objective.token_losses(reference, batch)
        ce, mask = objective.token_losses(proxy, batch)
        # λ_t: per-token excess loss clipped at 0, averaged over each domain's tokens (Algorithm 1).
        clipped = (ce.detach() - ref_ce).clamp(min=0)
        excess, counts = domain_token_means(clipped.double(), mask, batch["source"], k)
        alpha, lam = doremi_weight_update(alpha, excess, counts, lam, eta, smoothing)
        # θ_t: minimise Σ_i α_t[i] · (domain i's token-mean loss); absent domains have no term.
        means, _ = domain_token_means(ce, mask, batch["source"], k)
        loss = (alpha.to(means) * means).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trajectory.append(alpha)
        excesses.append(lam)
    opt.zero_grad(set_to_none=True)
    trajectory_t = torch.stack(trajectory)
    average = trajectory_t.mean(dim=0)                     # ᾱ = (1/T) Σ_t α_t, the returned weights
    average = average / average.sum()
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "eta": eta, "smoothing": smoothing,
                "reference_weights": "uniform"}
    return DoremiResult(dict(zip(names, average.tolist())), trajectory_t, torch.stack(excesses),
                        provenance("doremi", PAPER, settings, seed))
