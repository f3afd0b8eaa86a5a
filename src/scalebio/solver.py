"""The ScaleBiO step (method.md §3), model-agnostic.

The solver needs two copies of a module (u and w) and an objective that gives a per-example training loss
and a validation loss; the causal-LM response-token loss is one such objective, a convex model in the
tests is another, and both run this very code.

    u ← u − η_u ∇u L2(λ, u; B)                                  (method.md §3, line 1)
    w ← w − η_w [ ∇w L1(w; V) + α ∇w L2(λ, w; B) ]              (method.md §3, line 2)
    λ ← λ − η_λ · α [ ∇λ L2(λ, w; B) − ∇λ L2(λ, u; B) ]         (method.md §3, line 3)

All three gradients are taken at the same (u, w, λ). u steps as soon as its gradient is taken, before w's passes:
nothing after it reads u (λ's step uses the losses ℓ^u recorded at the old u), so the updates are still
simultaneous, and u's gradients are freed before w's passes need the memory. w and λ step last.

What differs between ``solver.conventions`` (the schedule, the per-source reductions, the order of w's passes,
what u's Adam steps on) is one object chosen once (scalebio.conventions); ``step`` reads its fields.

Precision (scalebio.precision): u and w train as fp32 master weights whatever dtype they were loaded in; under
bf16 the gradient passes run in autocast and, by default (``solver.gap_precision: fp32``), the per-source losses
that move λ are recomputed by fp32 forwards without gradients, at the same (u, w) as the gradients.

The first step of a run whose u and w start as one model (a copy, checked bit for bit) and whose forward is
deterministic (no dropout) gives λ the gap's exact value, 0, not the difference of two passes: u's pass on B and w's
pass on V ∪ B (or on B again) then compute the same function, but on a GPU the kernels, and so the rounding, depend
on the batch's shape, and AdamW's first step is ≈ η_λ·sign(g) whenever |g| ≫ eps, so a gap of 1e-7 rounding would
move λ by a full step (measured on an H200: ``results/bench/gpu_reweight_spread.json``). The logged losses stay the
computed ones. With dropout the two passes draw different masks: their difference is a real sample of a quantity
with mean 0, and is kept, as in the released code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import precision, sharding
from .distributed import all_reduce, all_reduce_grads, world_size
from .config import SolverConfig
from .conventions import resolve as resolve_conventions, resolve_u_adam
from .lisa import Lisa
from .mixture import BatchTotals, source_counts


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


def w_pass_losses(objective: Objective, model: nn.Module, val: Batch | None,
                  train: Batch | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The losses of one of w's forward passes, over a V micro-batch, a B micro-batch, or both (then one forward over
    the two stacked, ``joint_losses``): (V's loss sum, or None; B's per-example losses [b], or None)."""
    if val is not None and train is not None:
        return objective.joint_losses(model, val, train)
    val_sum = objective.validation_loss(model, val)[0] if val is not None else None
    per_example = objective.per_example_loss(model, train) if train is not None else None
    return val_sum, per_example


def has_dropout(model: nn.Module) -> bool:
    """Whether the model's training forward is random: a dropout module with p > 0, or a config field named
    ``*dropout*`` / ``*pdrop*`` above 0 (attention dropout inside Hugging Face attention functions has no module)."""
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    fields = config.to_dict() if hasattr(config, "to_dict") else {}
    return any(("dropout" in key or "pdrop" in key) and isinstance(value, (int, float)) and not isinstance(value, bool)
               and value > 0 for key, value in fields.items())


def same_parameters(u: nn.Module, w: nn.Module) -> bool:
    """Whether u and w hold bit-identical parameters, on every rank (each compares its own shards)."""
    local = lambda t: t.to_local() if precision._is_dtensor(t) else t  # noqa: E731
    ps, qs = list(u.parameters()), list(w.parameters())
    same = len(ps) == len(qs) and all(
        a.shape == b.shape and torch.equal(local(a.detach()), local(b.detach())) for a, b in zip(ps, qs))
    return bool(all_reduce(torch.tensor(float(same))).item() == world_size())


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
    for them; the caller redraws them (``update_lisa``) and sets learning rates and α (``schedule_step``) before
    each step.
    """

    def __init__(self, u: nn.Module, w: nn.Module, objective: Objective, num_sources: int, cfg: SolverConfig,
                 lisa_u: Lisa | None = None, lisa_w: Lisa | None = None,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.u, self.w, self.objective, self.k, self.cfg = u, w, objective, num_sources, cfg
        self.conventions = resolve_conventions(cfg.conventions)
        self.u_adam = resolve_u_adam(cfg)
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
        # Whether step 0's gap is exactly 0 (module docstring): u and w equal on every rank, no dropout.
        self.exact_first_gap = same_parameters(u, w) and not has_dropout(u)

    # -- schedule and LISA -----------------------------------------------------------------------------------
    def set_schedule(self, shape: float, alpha: float) -> None:
        """Scale every optimizer's peak learning rate by the same shape (method.md §3) and set α (and u's Adam
        for it: eps/α under ``solver.u_adam: alpha_scaled``)."""
        for opt, peak in ((self.opt_u, self.cfg.lr_u), (self.opt_w, self.cfg.lr_w), (self.opt_lam, self.cfg.lr_lambda)):
            for group in opt.param_groups:
                group["lr"] = peak * shape
        self.u_adam.set_alpha(self.opt_u, self.cfg.eps, self.alpha, alpha)
        self.alpha = alpha

    def schedule_step(self, step: int, steps_per_outer: int) -> float:
        """Set the learning rates and α of global step ``step`` (warmup, cosine, α × τ per outer iteration, as the
        conventions say); returns α."""
        shape, alpha = self.conventions.schedule(step, steps_per_outer, self.cfg)
        self.set_schedule(shape, alpha)
        return alpha

    def update_lisa(self, step: int) -> bool:
        """Activate u's and w's LISA blocks for ``step`` (a redraw every K steps, method.md §4); returns whether
        they changed."""
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
        micro-batches. Every training micro-batch carries ``source`` [b]. How n_i is counted and each micro-batch's
        term scaled is the conventions' ``normalisation`` (scalebio.mixture)."""
        alpha, step = self.alpha, self.step_index
        norm = self.conventions.normalisation
        totals = self._batch_totals(train, val)
        c = self.cfg.clip_grad_norm or None  # the clipping constant; None: no clipping
        for opt in (self.opt_u, self.opt_w, self.opt_lam):
            opt.zero_grad(set_to_none=True)

        # u on B: ∇u L2(λ, u; B)                                              (method.md §3, line 1)
        sums_u = torch.zeros(self.k, dtype=torch.float64)
        for mb in train:
            with self._autocast():
                ell = self.objective.per_example_loss(self.u, mb)
            self._check(ell, "training loss under u", step)
            norm.training_share(ell, mb["source"], totals).backward()
            sums_u += norm.source_term(ell, mb["source"], totals)
        if self._gap_in_fp32():
            sums_u = self._fp32_source_terms(self.u, train, totals)
        # u steps now (module docstring): u's gradient of L2 clipped at c.
        self._finish(self.u, self.opt_u, clip=c)

        # w on V and B: ∇w [L1(w; V) + α L2(λ, w; B)]                          (method.md §3, line 2)
        val_sum = torch.zeros((), dtype=torch.float64)
        sums_w = torch.zeros(self.k, dtype=torch.float64)
        for val_mb, train_mb in self.conventions.w_passes(val, train, self._can_fuse_w()):
            with self._autocast():
                val_loss_sum, ell = w_pass_losses(self.objective, self.w, val_mb, train_mb)
            loss = 0.0
            if val_mb is not None:
                self._check(val_loss_sum, "validation loss under w", step)
                share = norm.validation_share(val_loss_sum, self.objective.validation_terms(val_mb), totals)
                loss = share
                val_sum += norm.validation_record(share, val_loss_sum, totals)
            if train_mb is not None:
                self._check(ell, "training loss under w", step)
                loss = loss + alpha * norm.training_share(ell, train_mb["source"], totals)
                sums_w += norm.source_term(ell, train_mb["source"], totals)
            loss.backward()
        if self._gap_in_fp32():
            sums_w = self._fp32_source_terms(self.w, train, totals)

        sums_u, sums_w, val_sum = all_reduce(sums_u), all_reduce(sums_w), all_reduce(val_sum)
        mean_u, mean_w = norm.source_means(sums_u, totals), norm.source_means(sums_w, totals)

        # λ: α [∇λ L2(λ, w; B) − ∇λ L2(λ, u; B)]                              (method.md §3, line 3)
        # At step 0 of a run that starts with u = w and no dropout the gap is exactly 0 (module docstring).
        first_exact = step == 0 and self.exact_first_gap
        self.lambda_objective(mean_u if first_exact else mean_w, mean_u).backward()

        # w and λ step on gradients taken at the same (u, w, λ) as u's. w's loss is L1 + α L2: its gradient is
        # clipped at α·c, i.e. at c on ∇(L1/α + L2), as the released code (method.md §3).
        self._finish(self.w, self.opt_w, clip=alpha * c if c else None)
        self.opt_lam.step()
        self.step_index += 1

        val_loss = val_sum / totals.val_terms.clamp(min=1)
        p = totals.p
        return StepStats(
            val_loss=float(val_loss),
            train_loss_u=float((p * mean_u).sum()),
            train_loss_w=float((p * mean_w).sum()),
            source_loss_u=mean_u.tolist(),
            source_loss_w=mean_w.tolist(),
            source_counts=[int(n) for n in totals.counts.tolist()],
        )

    def lambda_objective(self, mean_w: torch.Tensor, mean_u: torch.Tensor) -> torch.Tensor:
        """The scalar whose λ-gradient is α [∇λ L2(λ, w) − ∇λ L2(λ, u)] = α J (ℓ^w − ℓ^u), J = diag(p) − p pᵀ.

        mean_w, mean_u [k]: per-source mean losses on B (0 for a source absent from B, so it has no term).
        Only these means enter (the upper level reaches λ only through w); autograd through softmax supplies J.
        """
        return self.alpha * (torch.softmax(self.lam, dim=0) * (mean_w - mean_u).detach()).sum()

    def _batch_totals(self, train: Sequence[Batch], val: Sequence[Batch]) -> BatchTotals:
        """p, and B's per-source counts, V's term count and the micro-batch counts over all ranks."""
        counts = all_reduce(sum(source_counts(mb["source"].cpu(), self.k) for mb in train))
        val_terms = torch.zeros((), dtype=torch.float64)
        for mb in val:
            val_terms += float(self.objective.validation_terms(mb))
        return BatchTotals(p=self.weights(), counts=counts, val_terms=all_reduce(val_terms),
                           train_micro_batches=len(train) * world_size(), val_micro_batches=len(val) * world_size())

    def _fp32_source_terms(self, model: nn.Module, train: Sequence[Batch], totals: BatchTotals) -> torch.Tensor:
        """The source terms of B under ``model`` from fp32 forwards without gradients: the losses λ's step uses
        under bf16 (scalebio.precision, rule 3). Called before ``model`` steps."""
        norm = self.conventions.normalisation
        total = torch.zeros(self.k, dtype=torch.float64)
        with torch.no_grad(), precision.exact_fp32():
            for mb in train:
                ell = self.objective.per_example_loss(model, mb)
                self._check(ell, "fp32 training loss for λ", self.step_index)
                total += norm.source_term(ell, mb["source"], totals)
        return total

    def _finish(self, model: nn.Module, optimizer: torch.optim.Optimizer, clip: float | None) -> None:
        """Sum gradients over ranks, clip their norm at ``clip`` (None = off), step, and free the gradients."""
        params = [q for q in model.parameters() if q.requires_grad]
        if not sharding.is_sharded(model):  # FSDP has reduce-scattered (summed) them already
            all_reduce_grads(params)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _autocast(self):
        return precision.autocast(self.compute_dtype, self.device)

    def _gap_in_fp32(self) -> bool:
        """Whether λ's per-source losses need their own fp32 forwards: compute below fp32 and
        ``solver.gap_precision: fp32`` (the default)."""
        return self.compute_dtype in precision.LOW_PRECISION and self.cfg.gap_precision == "fp32"

    def _can_fuse_w(self) -> bool:
        """Whether w's V and B micro-batches may share a forward/backward pass (where the conventions pair them):
        ``solver.fused_w`` and an objective that can (``joint_losses``)."""
        return self.cfg.fused_w and hasattr(self.objective, "joint_losses")

    @staticmethod
    def _check(t: torch.Tensor, which: str, step: int) -> None:
        if not torch.isfinite(t).all():
            bad = t[~torch.isfinite(t)].flatten()[0].item() if t.dim() else t.item()
            raise NonFiniteLossError(step, which, bad)

    # -- nothing non-finite is written -----------------------------------------------------------------------
    def check_weights(self, step: int) -> None:
        """λ and p = softmax(λ) must be finite (the run checks after every step, before its log lines)."""
        lam = self.lam.detach()
        for which, t in (("λ (source weight logits)", lam), ("p = softmax(λ)", torch.softmax(lam, dim=0))):
            if not torch.isfinite(t).all():
                raise NonFiniteLossError(step, which, t[~torch.isfinite(t)][0].item())

    def check_parameters(self, step: int) -> None:
        """Cheap finiteness check of u and w: one float64 sum per parameter tensor (a NaN or inf anywhere makes
        the sum non-finite), summed over ranks when sharded. Every rank calls it."""
        for name, model in (("u", self.u), ("w", self.w)):
            total = torch.zeros((), dtype=torch.float64)
            for q in model.parameters():
                local = q.to_local() if hasattr(q, "to_local") else q  # an FSDP shard
                total += local.detach().sum(dtype=torch.float64).cpu()
            if sharding.is_sharded(model):
                total = all_reduce(total)
            if not torch.isfinite(total):
                raise NonFiniteLossError(step, f"parameters of {name} (their sum)", total.item())

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
