"""LESS: low-rank gradient similarity search (Xia, Malladi, Gururangan, Arora, Chen, "LESS: Selecting
Influential Data for Targeted Instruction Tuning", ICML 2024).

The paper's pipeline (§4.1, Figure 1), kept step for step:

1. Warm-up (§4.1 step 1): train LoRA adapters of the selection model for N epochs on a random few percent of the
   pool, keeping a checkpoint θ_i and its Adam state after each epoch, with η̄_i the mean learning rate of epoch i.
2. Gradient datastore (§3.1, §4.1 step 2): for each pool example z and checkpoint i the Adam update direction
   its gradient would produce,

       Γ(z, θ_i) = m̂ / (√v̂ + ε),  m = β1 m_i + (1 − β1) ∇ℓ(z; θ_i),  v = β2 v_i + (1 − β2) (∇ℓ(z; θ_i))²,

   (m̂, v̂ bias-corrected with the checkpoint's step count + 1), of the LoRA parameters only; then a random
   projection to d dimensions (Rademacher or Gaussian, Johnson–Lindenstrauss), then normalised to unit length:
   §3.2's cosine instead of the inner product, because short sequences have large gradient norms.
3. Selection (§4.1 step 3): validation examples get *plain* gradients ∇ℓ(z'; θ_i), projected and normalised
   the same way; the score of z against a validation subtask D^(j) is

       Inf_Adam(z, D^(j)) = Σ_i η̄_i · mean_{z' ∈ D^(j)} cos(∇ℓ(z'; θ_i), Γ(z, θ_i)),

   and z's score is the max over subtasks j (the paper's rule for tasks with several subtasks; ``reduce="mean"``
   averages over subtasks instead). The top N (the paper: 5% of the pool) are selected. Checkpoint weights
   are normalised to sum to 1, as the released selection script does; that does not change the ranking.

Scaled down / adapted: LoRA rank 8 with α = 32 (the paper: rank 128, α = 512: the same α/r = 4) on the
attention projections (the paper: q, k, v, o; GPT-2: c_attn, attn.c_proj), no LoRA dropout; projection dimension
2048 (the paper: 8192); warm-up lr 1e-3 on tiny models (the paper: 2e-5, linear schedule with 3% warmup, batch
32, 4 epochs: the schedule shape, warm-up fraction and epoch count are kept as defaults); per-example
gradients one example at a time as the released code does; the projection matrix is generated block by block
from a seed (TRAK's projector does the same on GPU), so it is never held whole. ``params=`` uses a chosen
parameter subset instead of LoRA adapters (the brief's "small chosen parameter subset").

API (plain functions; ``select_less`` runs them in order):

    adapters = add_lora(model, rank=8, alpha=32)              # or a chosen parameter list
    ckpts = warmup(model, adapters.parameters, pool, pad_id)  # list[LessCheckpoint]
    projector = RandomProjector(dim_in, 2048, "rademacher", seed)
    train_i = gradient_features(model, params, pool, pad_id, projector, adam=ckpt)   # per checkpoint
    val_i = gradient_features(model, params, validation, pad_id, projector)          # plain gradients
    scores = less_scores([train_i...], [val_i...], [ckpt.lr ...], val_groups)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import data as data_mod
from ..solver import CausalLMObjective
from .common import batches, dropout_seeded, provenance, top_n

PAPER = "Xia et al. 2024, LESS: Selecting Influential Data for Targeted Instruction Tuning"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "attn.c_attn", "attn.c_proj")


# ---------------------------------------------------------------------------------------------------------
# LoRA adapters (Hu et al. 2021): h = W x + (α / r) B A x, A [r, in] random, B [out, r] zero.


class LoraAdapters:
    """LoRA adapters attached by forward hooks to the modules named in ``targets``; the model's own parameters
    are untouched (and frozen while the adapters exist). ``parameters``: A₁, B₁, A₂, B₂, … in module order."""

    def __init__(self, model: nn.Module, targets: Sequence[str] = LORA_TARGETS, rank: int = 8, alpha: float = 32.0,
                 seed: int = 0):
        self.scale = alpha / rank
        self.parameters: list[nn.Parameter] = []
        self.names: list[str] = []
        self._hooks = []
        self._frozen = [(p, p.requires_grad) for p in model.parameters()]
        generator = torch.Generator().manual_seed(seed)
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not any(name == t or name.endswith("." + t) for t in targets) or weight is None or weight.dim() != 2:
                continue
            # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
            d_in, d_out = (weight.shape[0], weight.shape[1]) if type(module).__name__ == "Conv1D" else \
                (weight.shape[1], weight.shape[0])
            a = torch.randn(rank, d_in, generator=generator, dtype=torch.float32) / math.sqrt(d_in)
            a = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
            b = nn.Parameter(torch.zeros(d_out, rank, device=weight.device, dtype=weight.dtype))
            self.parameters += [a, b]
            self.names.append(name)
            self._hooks.append(module.register_forward_hook(self._hook(a, b)))
        if not self.names:
            raise ValueError(f"add_lora: no 2-D weight module matches {list(targets)} in {type(model).__name__}")
        for p, _ in self._frozen:
            p.requires_grad_(False)

    def _hook(self, a: nn.Parameter, b: nn.Parameter):
        def add_low_rank(module, args, output):
            return output + self.scale * (args[0] @ a.t()) @ b.t()
        return add_low_rank

    def remove(self) -> None:
        """Detach the adapters and restore the model's requires_grad flags."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for p, flag in self._frozen:
            p.requires_grad_(flag)


def add_lora(model: nn.Module, targets: Sequence[str] = LORA_TARGETS, rank: int = 8, alpha: float = 32.0,
             seed: int = 0) -> LoraAdapters:
    return LoraAdapters(model, targets, rank, alpha, seed)


# ---------------------------------------------------------------------------------------------------------
# Step 1: warm-up.


@dataclass
class LessCheckpoint:
    """θ_i of the trained parameters after epoch i, their AdamW state (exp_avg m_i, exp_avg_sq v_i, step t_i)
    and η̄_i, the mean learning rate over the epoch."""

    params: list[torch.Tensor]
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    step: int
    lr: float


def linear_shape(step: int, total: int, warmup_ratio: float) -> float:
    """The released code's schedule: linear warmup over ceil(r·N) steps, then linear decay to 0."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@dropout_seeded
def warmup(model: nn.Module, params: Sequence[nn.Parameter], pool: Sequence[data_mod.Example], pad_id: int,
           fraction: float = 0.05, epochs: int = 4, batch_size: int = 32, lr: float = 1e-3,
           warmup_ratio: float = 0.03, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
           seed: int = 0, objective=None, device=None, progress: bool = False) -> list[LessCheckpoint]:
    """§4.1 step 1: AdamW on ``params`` only, over a random ``fraction`` of the pool (at least one example) for
    ``epochs`` epochs, one seeded permutation per epoch; a checkpoint after each epoch."""
    objective = objective or CausalLMObjective()
    generator = torch.Generator().manual_seed(seed)
    size = max(1, round(fraction * len(pool)))
    subset = [pool[j] for j in torch.randperm(len(pool), generator=generator)[:size].tolist()]
    per_epoch = math.ceil(len(subset) / batch_size)
    total = per_epoch * epochs
    opt = torch.optim.AdamW(list(params), lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    model.train()
    checkpoints, step = [], 0
    for _ in tqdm(range(epochs), desc="LESS warm-up", disable=not progress, dynamic_ncols=True):
        order = torch.randperm(len(subset), generator=generator).tolist()
        rates = []
        for start in range(0, len(order), batch_size):
            rate = lr * linear_shape(step, total, warmup_ratio)
            for group in opt.param_groups:
                group["lr"] = rate
            (batch,) = batches([subset[j] for j in order[start:start + batch_size]], batch_size, pad_id, device)
            loss = objective.per_example_loss(model, batch).mean()
            # Gradients of ``params`` only: the rest of the model is not trained and gets no .grad.
            for p, g in zip(params, torch.autograd.grad(loss, list(params))):
                p.grad = g
            opt.step()
            rates.append(rate)
            step += 1
        state = [opt.state[p] for p in params]
        checkpoints.append(LessCheckpoint(
            params=[p.detach().clone() for p in params],
            exp_avg=[s["exp_avg"].detach().clone() for s in state],
            exp_avg_sq=[s["exp_avg_sq"].detach().clone() for s in state],
            step=int(state[0]["step"]), lr=sum(rates) / len(rates)))
    for p in params:
        p.grad = None
    return checkpoints


# ---------------------------------------------------------------------------------------------------------
# Step 2: projected gradient features.


class RandomProjector:
    """x ↦ x R with R [dim_in, dim_out] of i.i.d. ±1/√d (Rademacher) or N(0, 1/d) (Gaussian) entries, d = dim_out,
    so E⟨xR, yR⟩ = ⟨x, y⟩. R is generated ``block`` rows at a time from (seed, block index): the same seed gives
    the same R for training and validation features, and R is never held whole."""

    def __init__(self, dim_in: int, dim_out: int, kind: str = "rademacher", seed: int = 0, block: int = 4096):
        if kind not in ("rademacher", "gaussian"):
            raise ValueError(f"projection kind {kind!r} is not rademacher or gaussian")
        self.dim_in, self.dim_out, self.kind, self.seed, self.block = dim_in, dim_out, kind, seed, block

    def _rows(self, b: int, rows: int, dtype, device) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
        if self.kind == "rademacher":
            r = torch.randint(0, 2, (rows, self.dim_out), generator=g).to(dtype) * 2 - 1
        else:
            r = torch.randn(rows, self.dim_out, generator=g, dtype=torch.float64).to(dtype)
        return (r / math.sqrt(self.dim_out)).to(device)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, dim_in] → [n, dim_out] (float32 or wider)."""
        if x.size(-1) != self.dim_in:
            raise ValueError(f"projector built for dimension {self.dim_in}, got {x.size(-1)}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dtype)
        out = torch.zeros(x.size(0), self.dim_out, dtype=dtype, device=x.device)
        for b, start in enumerate(range(0, self.dim_in, self.block)):
            stop = min(start + self.block, self.dim_in)
            out += x[:, start:stop] @ self._rows(b, stop - start, dtype, x.device)
        return out


def jl_epsilon(dim_out: int, num_vectors: int, delta: float = 1e-3) -> float:
    """ε such that, with probability ≥ 1 − δ, every inner product among ``num_vectors`` unit vectors moves by at
    most ε under the projection (and every squared norm by at most ε).

    For one vector, P(|‖Rx‖² − ‖x‖²| > ε‖x‖²) ≤ 2 exp(−d (ε²/2 − ε³/3) / 2) ≤ 2 exp(−d ε² / 6) for ε ≤ 1/2
    (Achlioptas 2003, Rademacher or Gaussian entries). ⟨Ru, Rv⟩ = (‖R(u+v)‖² − ‖R(u−v)‖²) / 4 with ‖u ± v‖² ≤ 4
    moves by at most ε when both norms hold; a union bound over the n² vectors u_i and u_i ± u_j gives
    ε = √(6 ln(2 n² / δ) / d). Raises when that ε exceeds 1/2 (the bound's range): use a larger d.
    """
    epsilon = math.sqrt(6 * math.log(2 * num_vectors ** 2 / delta) / dim_out)
    if epsilon > 0.5:
        raise ValueError(f"jl_epsilon: d = {dim_out} is too small for {num_vectors} vectors at δ = {delta} "
                         f"(ε = {epsilon:.2f} > 1/2)")
    return epsilon


def cosine_error_bound(epsilon: float) -> float:
    """|cos(Ru, Rv) − cos(u, v)| ≤ 2ε / (1 − ε) when inner products and squared norms of the unit vectors u, v
    are kept within ±ε (cos(Ru, Rv) = ⟨Ru, Rv⟩ / (‖Ru‖‖Rv‖) with ⟨Ru, Rv⟩ ∈ c ± ε and norms² ∈ 1 ± ε)."""
    return 2 * epsilon / (1 - epsilon)


def flat_gradient(model: nn.Module, params: Sequence[nn.Parameter], example: data_mod.Example, pad_id: int,
                  objective=None, device=None) -> torch.Tensor:
    """∇ℓ(z; θ) of one example's response-token mean loss, flattened over ``params``: [Σ numel]."""
    objective = objective or CausalLMObjective()
    (batch,) = batches([example], 1, pad_id, device)
    loss = objective.per_example_loss(model, batch)[0]
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def adam_direction(gradient: torch.Tensor, ckpt: LessCheckpoint, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8) -> torch.Tensor:
    """Γ(z, θ_i) of §3.1: the bias-corrected Adam step one more update with this gradient would take from the
    checkpoint's state. gradient [D] → [D]."""
    beta1, beta2 = betas
    m_prev = torch.cat([m.reshape(-1) for m in ckpt.exp_avg]).to(gradient)
    v_prev = torch.cat([v.reshape(-1) for v in ckpt.exp_avg_sq]).to(gradient)
    t = ckpt.step + 1
    m = (beta1 * m_prev + (1 - beta1) * gradient) / (1 - beta1 ** t)
    v = (beta2 * v_prev + (1 - beta2) * gradient ** 2) / (1 - beta2 ** t)
    return m / (v.sqrt() + eps)


def gradient_features(model: nn.Module, params: Sequence[nn.Parameter], examples: Sequence[data_mod.Example],
                      pad_id: int, projector: RandomProjector, adam: LessCheckpoint | None = None,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, chunk: int = 16,
                      objective=None, device=None, progress: bool = False) -> torch.Tensor:
    """Unit-normalised projected gradient features of ``examples`` at the parameters' current values, in eval
    mode: Γ(z, θ) (Adam, training examples) when ``adam`` is given, else the plain ∇ℓ(z; θ) (validation
    examples). [N, projector.dim_out] float32 (float64 for a float64 model)."""
    was_training = model.training
    model.eval()
    rows, out = [], []
    for example in tqdm(examples, desc="LESS gradient features", disable=not progress, dynamic_ncols=True):
        g = flat_gradient(model, params, example, pad_id, objective, device).detach()
        rows.append(adam_direction(g, adam, betas, eps) if adam is not None else g)
        if len(rows) == chunk:
            out.append(projector.project(torch.stack(rows)))
            rows = []
    if rows:
        out.append(projector.project(torch.stack(rows)))
    model.train(was_training)
    return torch.nn.functional.normalize(torch.cat(out), dim=1)


# ---------------------------------------------------------------------------------------------------------
# Step 3: scores and selection.


def less_scores(train_features: Sequence[torch.Tensor], val_features: Sequence[torch.Tensor],
                checkpoint_weights: Sequence[float], val_groups: Sequence[int] | None = None,
                reduce: str = "max") -> torch.Tensor:
    """Inf_Adam of every training example: Σ_i η̄_i ⟨Γ_i(z), g_i(z')⟩ (unit features, so a cosine), averaged over
    the validation examples of each subtask, then the max (or mean) over subtasks.

    train_features[i] [N, d], val_features[i] [M, d], checkpoint_weights [C] (normalised to sum 1 here),
    val_groups [M] subtask ids (None: one subtask) → [N] float64.
    """
    if not len(train_features) == len(val_features) == len(checkpoint_weights):
        raise ValueError("less_scores: one train and one validation feature matrix per checkpoint weight")
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce {reduce!r} is not max or mean")
    total = float(sum(checkpoint_weights))
    influence = sum((w / total) * (t.double() @ v.double().t())
                    for w, t, v in zip(checkpoint_weights, train_features, val_features))   # [N, M]
    m = influence.size(1)
    groups = torch.as_tensor(list(val_groups) if val_groups is not None else [0] * m, dtype=torch.long)
    if groups.numel() != m:
        raise ValueError(f"val_groups has {groups.numel()} entries for {m} validation examples")
    _, groups = torch.unique(groups, return_inverse=True)
    k = int(groups.max()) + 1
    sums = torch.zeros(influence.size(0), k, dtype=torch.float64).index_add_(1, groups, influence)
    per_subtask = sums / torch.bincount(groups, minlength=k).double()
    return per_subtask.max(dim=1).values if reduce == "max" else per_subtask.mean(dim=1)


@dataclass
class LessSelection:
    """``indices``: the N selected pool indices, best first; ``scores`` [N_pool]; ``checkpoint_lrs``: η̄_i;
    ``provenance``: for the selection's manifest."""

    indices: list[int]
    scores: torch.Tensor
    checkpoint_lrs: list[float]
    provenance: dict[str, Any] = field(default_factory=dict)


def select_less(model: nn.Module, pool: Sequence[data_mod.Example], validation: Sequence[data_mod.Example], n: int,
                pad_id: int, val_groups: Sequence[int] | None = None, reduce: str = "max",
                params: Sequence[nn.Parameter] | None = None, lora_rank: int = 8, lora_alpha: float = 32.0,
                lora_targets: Sequence[str] = LORA_TARGETS, fraction: float = 0.05, epochs: int = 4,
                batch_size: int = 32, lr: float = 1e-3, warmup_ratio: float = 0.03, proj_dim: int = 2048,
                proj_kind: str = "rademacher", seed: int = 0, chunk: int = 16, objective=None, device=None,
                progress: bool = False) -> LessSelection:
    """The whole LESS pipeline on ``model`` (the selection model); the model is left as it was (adapters removed,
    a chosen ``params`` subset restored after the warm-up).

    ``chunk``: per-example gradients held at once before they are projected (``gradient_features``): memory grows
    with chunk × the trained parameters, while each projection call regenerates the projection matrix, so a larger
    chunk is faster. The features agree to rounding for any chunk."""
    adapters = None
    if params is None:
        adapters = add_lora(model, lora_targets, lora_rank, lora_alpha, seed)
        params = adapters.parameters
        initial = None
    else:
        params = list(params)
        initial = [p.detach().clone() for p in params]
    try:
        ckpts = warmup(model, params, pool, pad_id, fraction, epochs, batch_size, lr, warmup_ratio, seed=seed,
                       objective=objective, device=device, progress=progress)
        projector = RandomProjector(sum(p.numel() for p in params), proj_dim, proj_kind, seed)
        train_features, val_features = [], []
        for ckpt in ckpts:
            with torch.no_grad():
                for p, value in zip(params, ckpt.params):
                    p.copy_(value)
            train_features.append(gradient_features(model, params, pool, pad_id, projector, adam=ckpt, chunk=chunk,
                                                    objective=objective, device=device, progress=progress))
            val_features.append(gradient_features(model, params, validation, pad_id, projector, chunk=chunk,
                                                  objective=objective, device=device, progress=progress))
    finally:
        if adapters is not None:
            adapters.remove()
        if initial is not None:
            with torch.no_grad():
                for p, value in zip(params, initial):
                    p.copy_(value)
    lrs = [c.lr for c in ckpts]
    scores = less_scores(train_features, val_features, lrs, val_groups, reduce)
    settings = {"n": n, "reduce": reduce, "adapters": "lora" if adapters is not None else "parameter subset",
                "lora_rank": lora_rank, "lora_alpha": lora_alpha, "warmup_fraction": fraction, "epochs": epochs,
                "batch_size": batch_size, "lr": lr, "proj_dim": proj_dim, "proj_kind": proj_kind, "chunk": chunk,
                "checkpoint_lrs": lrs}
    return LessSelection(top_n(scores, n), scores, lrs, provenance("less", PAPER, settings, seed))
