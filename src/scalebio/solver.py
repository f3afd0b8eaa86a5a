"""The ScaleBiO step (method.md §3), model-agnostic.

The solver needs two copies of a module (u and w) and an objective that gives a per-example training loss
and a validation loss; the causal-LM response-token loss is one such objective, a convex model in the
tests is another, and both run this very code.

    u ← u − η_u ∇u L2(λ, u; B)                                  (method.md §3, line 1)
    w ← w − η_w [ ∇w L1(w; V) + α ∇w L2(λ, w; B) ]              (method.md §3, line 2)
    λ ← λ − η_λ · α [ ∇λ L2(λ, w; B) − ∇λ L2(λ, u; B) ]         (method.md §3, line 3)

All gradients are taken at the same (u, w, λ) before any of the three optimizers steps.

Precision (scalebio.precision): u and w train as fp32 master weights whatever dtype they were loaded in; under
bf16 the gradient passes run in autocast and, by default (``solver.gap_precision: fp32``), the per-source losses
that move λ are recomputed by fp32 forwards without gradients, at the same (u, w) as the gradients.
"""

from __future__ import annotations

import math
from itertools import zip_longest
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import precision, sharding
from .distributed import all_reduce, all_reduce_grads, world_size
from .config import SolverConfig
from .lisa import Lisa
from .mixture import mixture_loss, source_counts, source_sums


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, which: str, value: float):
        super().__init__(f"non-finite {which} ({value}) at step {step}; stopped, the last good checkpoint is kept")
        self.step, self.which, self.value = step, which, value


Batch = dict[str, torch.Tensor]


class Objective(Protocol):
    def per_example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """ℓ(model; a_j) for each example of the batch: [b]."""

    def validation_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the validation losses in the batch, how many terms): scalars; L1 = total sum / total count."""

    def validation_terms(self, batch: Batch) -> int:
        """How many terms ``validation_loss`` sums over in this batch (known before any forward pass)."""


class CausalLMObjective:
    """Token cross-entropy of a causal LM on labelled tokens (labels −100 elsewhere).

    Training: each example's mean over its response tokens (method.md §3, "per-example loss").
    Validation: token-mean over all labelled tokens of the validation batch.

    The LM head and the cross-entropy run only on labelled positions, in chunks of ``chunk_tokens`` rows, each
    recomputed in the backward pass: the [tokens × vocab] logits are never materialised in fp32 (nor whole in
    any dtype). ``chunked=False`` takes the model's full logits instead (needed when the model is FSDP-sharded,
    whose root hooks must see the whole forward, and for heads that post-process logits, e.g. soft-capping).
    """

    def __init__(self, chunked: bool = True, chunk_tokens: int = 1024, per_example: str = "response"):
        if per_example not in ("response", "padded"):
            raise ValueError(f"per_example: {per_example!r} is not response or padded")
        self.chunked, self.chunk_tokens, self.per_example = chunked, chunk_tokens, per_example

    def _can_chunk(self, model: nn.Module) -> bool:
        if not self.chunked or sharding.is_sharded(model):
            return False
        config = getattr(model, "config", None)
        if config is None or getattr(config, "final_logit_softcapping", None):
            return False
        base = getattr(model, "base_model", None)
        return base is not None and base is not model and model.get_output_embeddings() is not None

    def token_losses(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token CE [b, T−1] in fp32 or wider (0 where unlabelled) and the mask [b, T−1]."""
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        if not self._can_chunk(model):
            logits = model(input_ids=batch["input_ids"], attention_mask=padding_mask(batch)).logits
            logits = _at_least_fp32(logits[:, :-1])
            ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                                 reduction="none")
            return ce.view(labels.shape) * mask, mask
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=padding_mask(batch)).last_hidden_state
        picked, targets = hidden[:, :-1][mask], labels[mask]          # [n, d], [n]: labelled positions only
        head = model.get_output_embeddings()
        parts = []
        for start in range(0, picked.size(0), self.chunk_tokens):
            h, y = picked[start:start + self.chunk_tokens], targets[start:start + self.chunk_tokens]
            parts.append(checkpoint(_head_cross_entropy, head, h, y, use_reentrant=False))
        flat = torch.cat(parts) if parts else _at_least_fp32(picked.new_zeros(0))
        ce = torch.zeros(labels.shape, dtype=flat.dtype, device=flat.device)
        ce = ce.index_put((mask.nonzero(as_tuple=True)), flat)
        return ce, mask

    def per_example_loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Each example's summed response-token loss over its response-token count, or (``per_example=
        "padded"``, the v1 code's quirk) over the micro-batch's padded length."""
        ce, mask = self.token_losses(model, batch)
        if self.per_example == "padded":
            return ce.sum(1) / mask.size(1)
        return ce.sum(1) / mask.sum(1).clamp(min=1)

    def validation_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        ce, mask = self.token_losses(model, batch)
        return ce.sum(), mask.sum()

    def validation_terms(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def joint_losses(self, model: nn.Module, val: Batch, train: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over a validation and a training micro-batch stacked (right-padded to one width):
        (the validation loss sum, the training per-example losses [b]). Causal attention with right padding
        leaves every real token's output unchanged, so this equals the two separate passes."""
        both = stack_batches(val, train)
        ce, mask = self.token_losses(model, both)
        n_val = val["input_ids"].size(0)
        per_example = ce[n_val:].sum(1) / mask[n_val:].sum(1).clamp(min=1)
        return ce[:n_val].sum(), per_example


def padding_mask(batch: Batch) -> torch.Tensor | None:
    """The attention mask the model needs for ``batch``: None when every row is right-padded (ones, then zeros)
    or unpadded. Under causal attention a real token never sees a pad to its right, so its output is the same
    with or without the mask, and without one the model takes its plain causal attention path
    (benchmarks/padding.py, SmolLM2 8×128 on one AVX2 core: 0.97 of the masked time, IQR 0.95–1.02). Any other
    mask (left padding, holes) is kept."""
    mask = batch.get("attention_mask")
    if mask is None or bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return None
    return mask


def _head_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE of ``head(hidden)`` against ``targets``, in fp32 or wider: hidden [n, d], targets [n] → [n]."""
    return F.cross_entropy(_at_least_fp32(head(hidden)), targets, reduction="none")


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 → fp32 for the softmax; fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def stack_batches(first: Batch, second: Batch) -> Batch:
    """Rows of ``first`` then ``second`` in one batch, right-padded to the wider one (labels −100, mask 0)."""
    width = max(first["input_ids"].size(1), second["input_ids"].size(1))
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    out = {}
    for key, value in fill.items():
        rows = [F.pad(b[key], (0, width - b[key].size(1)), value=value) for b in (first, second)]
        out[key] = torch.cat(rows)
    return out


def lr_shape(step: int, total: int, warmup_ratio: float, schedule: str, conventions: str = "scalebio") -> float:
    """Learning-rate multiplier at ``step`` (0-based) of ``total``: linear warmup, then cosine to 0 or constant.

    ``scalebio``: ceil(r·N) warmup steps with factor (t+1)/warmup, so step 0 already trains. ``acl`` / ``v1``
    (the released code's scheduler): int(r·N) warmup steps with factor t/warmup, so the lr is 0 at step 0.
    """
    if conventions == "scalebio":
        warmup = math.ceil(warmup_ratio * total)
        if step < warmup:
            return (step + 1) / warmup
    else:
        warmup = int(warmup_ratio * total)
        if step < warmup:
            return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def outer_schedule(step: int, steps_per_outer: int, outer_iterations: int, cfg: SolverConfig) -> tuple[float, float]:
    """(lr multiplier, α) at global step ``step``, outer iteration i = step // steps_per_outer.

    ``scalebio``: α·τ^i, and the lr shape restarts each outer iteration. ``acl`` / ``v1``: α·τ^(i+1), and
    τ^(−i) times one lr shape over all steps of all outer iterations.
    """
    outer, t = divmod(step, steps_per_outer)
    if cfg.conventions == "scalebio":
        return lr_shape(t, steps_per_outer, cfg.warmup_ratio, cfg.schedule), cfg.alpha * cfg.tau ** outer
    shape = lr_shape(step, steps_per_outer * outer_iterations, cfg.warmup_ratio, cfg.schedule, cfg.conventions)
    return shape * cfg.tau ** (-outer), cfg.alpha * cfg.tau ** (outer + 1)


@dataclass
class StepStats:
    val_loss: float
    train_loss_u: float
    train_loss_w: float
    source_loss_u: list[float]
    source_loss_w: list[float]
    source_counts: list[int]


class ScaleBiO:
    """Holds u, w, λ and their AdamW optimizers; ``step`` performs one update of method.md §3.

    ``lisa_u``/``lisa_w`` (optional) restrict training to the active blocks and keep optimizer state only
    for them. Learning rates and α are set per step by the caller (``set_schedule``).
    """

    def __init__(self, u: nn.Module, w: nn.Module, objective: Objective, num_sources: int, cfg: SolverConfig,
                 lisa_u: Lisa | None = None, lisa_w: Lisa | None = None,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.u, self.w, self.objective, self.k, self.cfg = u, w, objective, num_sources, cfg
        self.compute_dtype, self.device = compute_dtype, torch.device(device)
        self.lisa_u, self.lisa_w = lisa_u, lisa_w
        # fp32 master weights (scalebio.precision, rule 1): upcast before the optimizers see the parameters.
        for model in (u, w):
            precision.fp32_master(model)
            precision.check_fp32_master(model)
        # λ in float64: it has k entries, and the weights are the product.
        self.lam = nn.Parameter(torch.zeros(num_sources, dtype=torch.float64))
        adam = dict(betas=tuple(cfg.betas), eps=cfg.eps)
        self.opt_u = torch.optim.AdamW(list(u.parameters()), lr=cfg.lr_u, weight_decay=cfg.weight_decay_u, **adam)
        self.opt_w = torch.optim.AdamW(list(w.parameters()), lr=cfg.lr_w, weight_decay=cfg.weight_decay_w, **adam)
        self.opt_lam = torch.optim.AdamW([self.lam], lr=cfg.lr_lambda, weight_decay=cfg.weight_decay_lambda, **adam)
        self.alpha = cfg.alpha
        self.step_index = 0
        u.train()
        w.train()

    # -- schedule ------------------------------------------------------------------------------------------
    def set_schedule(self, shape: float, alpha: float) -> None:
        """Scale every optimizer's peak learning rate by the same shape (method.md §3) and set α."""
        for opt, peak in ((self.opt_u, self.cfg.lr_u), (self.opt_w, self.cfg.lr_w), (self.opt_lam, self.cfg.lr_lambda)):
            for group in opt.param_groups:
                group["lr"] = peak * shape
        self.alpha = alpha
        if self.cfg.conventions != "scalebio":
            # The released code steps u on the gradient of α·L2: Adam is scale-free but for eps, so this is
            # plain Adam on ∇L2 with eps/α.
            for group in self.opt_u.param_groups:
                group["eps"] = self.cfg.eps / alpha

    def begin_step(self, step: int, steps_per_outer: int) -> float:
        """Set learning rates, α (× τ per outer iteration) and LISA blocks for global step ``step``; returns α."""
        shape, alpha = outer_schedule(step, steps_per_outer, self.cfg.outer_iterations, self.cfg)
        self.set_schedule(shape, alpha)
        self.update_lisa(step)
        return alpha

    def update_lisa(self, step: int) -> bool:
        changed = False
        if self.lisa_u is not None:
            changed |= self.lisa_u.update(step, self.opt_u)
        if self.lisa_w is not None:
            changed |= self.lisa_w.update(step, self.opt_w)
        return changed

    def weights(self) -> torch.Tensor:
        """p = softmax(λ): [k]."""
        return torch.softmax(self.lam.detach(), dim=0)

    # -- one step ------------------------------------------------------------------------------------------
    def step(self, train: Sequence[Batch], val: Sequence[Batch]) -> StepStats:
        """One ScaleBiO update from a training batch B and a validation batch V, each given as this rank's
        micro-batches. Every training micro-batch carries ``source`` [b]; n_i is counted over the global
        batch (all micro-batches, all ranks)."""
        k, alpha, step = self.k, self.alpha, self.step_index
        p = self.weights()
        counts = all_reduce(sum(source_counts(mb["source"].cpu(), k) for mb in train))
        val_terms = torch.zeros((), dtype=torch.float64)
        for mb in val:
            val_terms += float(self.objective.validation_terms(mb))
        val_terms = all_reduce(val_terms)
        # v1 conventions: n_i per micro-batch and each micro-batch's term over G; L1 the mean of micro-batch means.
        v1 = self.cfg.conventions == "v1"
        micro_train, micro_val = len(train) * world_size(), len(val) * world_size()

        def source_term(ell: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
            """This micro-batch's share of the per-source sums or, under v1, of the per-source means [k]."""
            sums = source_sums(ell.detach().double(), source, k).cpu()
            if not v1:
                return sums
            here = source_counts(source.cpu(), k)
            return torch.where(here > 0, sums / here.clamp(min=1), torch.zeros_like(sums)) / micro_train

        def train_term(ell: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(this micro-batch's share of L2, its share of the per-source sums or means [k])."""
            if not v1:
                return mixture_loss(ell, source, p, counts), source_term(ell, source)
            here = source_counts(source.cpu(), k)
            return mixture_loss(ell, source, p, here) / micro_train, source_term(ell, source)

        def fp32_source_terms(model: nn.Module) -> torch.Tensor:
            """The per-source sums (or v1 means) of B under ``model`` from fp32 forwards without gradients: the
            losses λ's step uses under bf16 (scalebio.precision, rule 3). Called before ``model`` steps."""
            total = torch.zeros(k, dtype=torch.float64)
            with torch.no_grad(), precision.exact_fp32():
                for mb in train:
                    ell = self.objective.per_example_loss(model, mb)
                    self._check(ell, "fp32 training loss for λ", step)
                    total += source_term(ell, mb["source"])
            return total

        def val_term(total: torch.Tensor, mb: Batch) -> torch.Tensor:
            """This micro-batch's share of L1: its loss sum over all V terms, or (v1) its mean over G_V."""
            if not v1:
                return total / float(val_terms)
            return total / max(1, self.objective.validation_terms(mb)) / micro_val

        self.opt_u.zero_grad(set_to_none=True)
        self.opt_w.zero_grad(set_to_none=True)
        self.opt_lam.zero_grad(set_to_none=True)

        # u on B: ∇u L2(λ, u; B)                                              (method.md §3, line 1)
        sums_u = torch.zeros(k, dtype=torch.float64)
        for mb in train:
            with self._autocast():
                ell = self.objective.per_example_loss(self.u, mb)
            self._check(ell, "training loss under u", step)
            share, sums = train_term(ell, mb["source"])
            share.backward()
            sums_u += sums
        if self._gap_in_fp32():
            sums_u = fp32_source_terms(self.u)
        # u's step can be taken now: nothing below reads u (λ uses ℓ^u recorded above, at the old u), so
        # the updates stay simultaneous, and u's gradients are freed before w's passes need memory.
        self._finish(self.u, self.opt_u, clip=self.cfg.clip_grad_norm)

        # w on V and B: ∇w [L1(w; V) + α L2(λ, w; B)]                          (method.md §3, line 2)
        val_sum = torch.zeros((), dtype=torch.float64)
        sums_w = torch.zeros(k, dtype=torch.float64)
        for val_mb, train_mb in self._w_passes(val, train):
            with self._autocast():
                if val_mb is not None and train_mb is not None:   # one forward/backward over V and B together
                    total, ell = self.objective.joint_losses(self.w, val_mb, train_mb)
                elif val_mb is not None:
                    total, _ = self.objective.validation_loss(self.w, val_mb)
                    ell = None
                else:
                    total, ell = None, self.objective.per_example_loss(self.w, train_mb)
            loss = 0.0
            if total is not None:
                self._check(total, "validation loss under w", step)
                share = val_term(total, val_mb)
                loss = share
                val_sum += (share.detach().double().cpu() * val_terms) if v1 else total.detach().double().cpu()
            if ell is not None:
                self._check(ell, "training loss under w", step)
                share, sums = train_term(ell, train_mb["source"])
                loss = loss + alpha * share
                sums_w += sums
            loss.backward()
        if self._gap_in_fp32():
            sums_w = fp32_source_terms(self.w)

        sums_u, sums_w, val_sum = all_reduce(sums_u), all_reduce(sums_w), all_reduce(val_sum)
        present = counts > 0
        if v1:  # already per-source means (averaged over micro-batches)
            mean_u, mean_w = sums_u, sums_w
        else:
            mean_u = torch.where(present, sums_u / counts.clamp(min=1), torch.zeros_like(sums_u))
            mean_w = torch.where(present, sums_w / counts.clamp(min=1), torch.zeros_like(sums_w))

        # λ: α [∇λ L2(λ, w; B) − ∇λ L2(λ, u; B)]                              (method.md §3, line 3)
        self.lambda_objective(mean_w, mean_u, val_sum / val_terms.clamp(min=1)).backward()

        # Simultaneous updates: every gradient of this step was taken at the same (u, w, λ).
        # w's loss is L1 + α L2: clip at α·c, i.e. at c on ∇(L1/α + L2), as the released code (method.md §3).
        self._finish(self.w, self.opt_w, clip=self.cfg.clip_grad_norm and alpha * self.cfg.clip_grad_norm)
        self.opt_lam.step()
        self.step_index += 1

        return StepStats(
            val_loss=float(val_sum / val_terms.clamp(min=1)),
            train_loss_u=float((p * mean_u).sum()),
            train_loss_w=float((p * mean_w).sum()),
            source_loss_u=mean_u.tolist(),
            source_loss_w=mean_w.tolist(),
            source_counts=[int(c) for c in counts.tolist()],
        )

    def _finish(self, model: nn.Module, optimizer: torch.optim.Optimizer, clip: float | None) -> None:
        """Sum gradients over ranks, clip their norm at ``clip`` (None = off), step, and free the gradients."""
        params = [q for q in model.parameters() if q.requires_grad]
        if not sharding.is_sharded(model):  # FSDP has reduce-scattered (summed) them already
            all_reduce_grads(params)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _autocast(self):
        return precision.autocast(self.compute_dtype, self.device)

    def _gap_in_fp32(self) -> bool:
        """Whether λ's per-source losses need their own fp32 forwards: compute below fp32 and
        ``solver.gap_precision: fp32`` (the default)."""
        return self.compute_dtype in precision.LOW_PRECISION and self.cfg.gap_precision == "fp32"

    def _w_passes(self, val: Sequence[Batch], train: Sequence[Batch]):
        """(V micro-batch or None, B micro-batch or None) pairs for w's forward/backward passes: paired up for one
        pass each when ``solver.fused_w`` and the objective can (``joint_losses``), else V's then B's."""
        if self.cfg.conventions != "scalebio":  # the released code: L2 on B, then L1 on V (matters with dropout)
            return [(None, mb) for mb in train] + [(mb, None) for mb in val]
        if self.cfg.fused_w and hasattr(self.objective, "joint_losses"):
            return list(zip_longest(val, train))
        return [(mb, None) for mb in val] + [(None, mb) for mb in train]

    def lambda_objective(self, mean_w: torch.Tensor, mean_u: torch.Tensor, val_loss: torch.Tensor) -> torch.Tensor:
        """The scalar whose λ-gradient is α [∇λ L2(λ, w) − ∇λ L2(λ, u)] = α J (ℓ^w − ℓ^u), J = diag(p) − p pᵀ.

        mean_w, mean_u [k]: per-source mean losses on B (0 for a source absent from B, so it has no term).
        Only these means enter; autograd through softmax supplies J. ``val_loss`` is unused by the method
        (the upper level reaches λ only through w); it is passed so tests can build broken variants.
        """
        return self.alpha * (torch.softmax(self.lam, dim=0) * (mean_w - mean_u).detach()).sum()

    @staticmethod
    def _check(t: torch.Tensor, which: str, step: int) -> None:
        if not torch.isfinite(t).all():
            bad = t[~torch.isfinite(t)].flatten()[0].item() if t.dim() else t.item()
            raise NonFiniteLossError(step, which, bad)

    # -- checkpointing -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Full (unsharded) state. With FSDP-sharded u and w this is a collective that every rank calls; the
        models' tensors are then only on rank 0."""
        if sharding.is_sharded(self.u):
            model_state, opt_state = sharding.full_model_state, sharding.full_optimizer_state
        else:
            model_state = opt_state = lambda obj: obj.state_dict()
        return {
            "u": model_state(self.u),
            "w": model_state(self.w),
            "lam": self.lam.detach().clone(),
            "opt_u": opt_state(self.opt_u),
            "opt_w": opt_state(self.opt_w),
            "opt_lam": self.opt_lam.state_dict(),
            "alpha": self.alpha,
            "step_index": self.step_index,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``: the optimizers' parameter lists are first put back as they were when it
        was saved (the LISA blocks of the last completed step), so their state lines up."""
        sharded = sharding.is_sharded(self.u)
        for model, key in ((self.u, "u"), (self.w, "w")):
            if sharded:
                sharding.load_full_model_state(model, state[key])
            else:
                model.load_state_dict(state[key])
        with torch.no_grad():
            self.lam.copy_(state["lam"])
        self.step_index = state["step_index"]
        if self.step_index > 0:
            self.update_lisa(self.step_index - 1)
        self.opt_u.load_state_dict(state["opt_u"])
        self.opt_w.load_state_dict(state["opt_w"])
        if sharded:
            sharding.shard_optimizer_state(self.opt_u)
            sharding.shard_optimizer_state(self.opt_w)
        self.opt_lam.load_state_dict(state["opt_lam"])
        self.alpha = state["alpha"]
