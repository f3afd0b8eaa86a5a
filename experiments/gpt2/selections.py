"""How each baseline of the GPT-2 comparison (compare.py) selects: the experiment's side of ``scalebio.baselines``.

A method of ``methods.yaml`` with ``select: NAME`` is run by compare.py as ``NAME(context, settings, seed, counter)``:
``context`` (``Context``) holds what a selection may use (the pool as the reweighting run trained on it, tokenised,
the validation examples, a model factory of the retrain config, the retrain budget), ``settings`` the method's
section of ``<task>/compare.yaml``, ``counter`` (``PassCounter``) counts the passes of every model the selection
builds. NAME returns pool indices, best first (``output: ranking``), or a source-weights record
(``output: weights``). A new method is its algorithm in ``src/scalebio/baselines/``, a function here, a line in
methods.yaml and its settings in each compare.yaml (README.md, "Adding a method").

Scaling of each baseline (what was kept from each paper, what was scaled; the modules' docstrings give the rest)
------------------------------------------------------------------------------------------------------------
* RHO-LOSS (Mindermann et al. 2022), ``scalebio.baselines.rho_loss``: kept: score = training loss − irreducible
  loss, IL model trained on the holdout only (§3 approximation), IL losses computed once. Adapted: the holdout is the
  run's validation set (as in the ScaleBiO paper's baseline); *offline* selection (one score per pool example, top K)
  instead of the online per-batch top-10 %; the "current model" D_t is the retrain model's initialisation trained
  ``base_steps`` steps on uniform batches of the pool (a random-init model would give every example the same
  training loss, leaving only the IL term); IL model = the retrain architecture, ``il_steps`` AdamW steps (the paper
  trains it to convergence with early stopping).
* LESS (Xia et al. 2024), ``scalebio.baselines.less``: kept: LoRA warm-up on a random ``fraction`` of the pool
  (paper 5 %) with a checkpoint per epoch, Adam-preconditioned per-example gradients of the pool, plain gradients of
  the validation set, Rademacher projection, cosine, checkpoints weighted by their mean lr, top-K. Scaled: LoRA rank 8,
  α = 32 (paper 128 / 512, same α/r) on c_attn and attn.c_proj of the 2-block model (12,288 LoRA parameters);
  projection ``proj_dim`` (paper 8,192); ``epochs`` warm-up epochs = checkpoints (paper 4); the validation gradients
  of the first ``val_examples`` validation records (LESS uses a few-shot validation set); warm-up lr 1e-3 (paper
  2e-5 on pretrained models). LESS starts from a pretrained model; here the selection model is the retrain init
  trained ``base_steps`` steps on uniform batches first (as RHO-LOSS's D_t), so that gradients carry the format.
* DoReMi (Xie et al. 2023), ``scalebio.baselines.doremi``: kept: a reference model on uniform weights, a proxy trained
  by Group DRO on the clipped per-token excess loss, η = 1, smoothing c = 1e-3, output the average ᾱ. Scaled:
  reference and proxy are the retrain architecture (paper 280M each), ``reference_steps`` / ``proxy_steps`` AdamW
  steps at the retrain batch (paper 200k steps × 512 × 1024 tokens); domains are the experiment's sources.
* ScaleBiO: the pipeline's reweighting runs as they are (cpu.yaml).

Cost accounting (``cost.json`` beside every selection and every arm)
--------------------------------------------------------------------
Wall time of the selection unit, and its passes counted where they happen: a forward pre-hook on the transformer
body of every model a selection builds counts the examples of each forward, as forward+backward when autograd is
on and as forward-only when it is off (eval, no_grad). ``fb_equivalent`` = fb + forward / 3 (a backward ≈ 2
forwards); ``retrain_multiple`` = fb_equivalent ÷ one retraining run's forward+backward examples (steps × global
batch). ScaleBiO's selection = its reweighting run: steps × (2 × global batch + validation batch) forward+backward
examples (u on B, w on B, w on V; method.md §3) and the run's wall time; uniform's is 0. Examples, not tokens: the
sequences are cut at 64 tokens in every method.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from scalebio.finetune import FinetuneConfig

FORWARD_COST = 1 / 3
"""A forward-only pass as a fraction of a forward+backward (a backward ≈ 2 forwards)."""


def retrain_passes(ft: FinetuneConfig, n: int) -> int:
    """Forward+backward examples of one retraining run (finetune.py's loop: steps × global batch)."""
    steps = ft.steps or max(1, int(ft.epochs * n) // ft.global_batch)
    return steps * ft.global_batch


# --------------------------------------------------------------------------------------------- pass counting


class PassCounter:
    """Examples through every forward of the models it watches: ``fb`` (autograd on: a backward follows) and
    ``forward`` (autograd off), per part of a selection (``part``)."""

    def __init__(self):
        self.parts: dict[str, dict[str, int]] = {}
        self.part = "selection"
        self._hooks = []

    def watch(self, model) -> None:
        body = getattr(model, "base_model", model)  # CausalLMObjective calls the body directly when it chunks

        def count(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                return
            import torch

            entry = self.parts.setdefault(self.part, {"fb": 0, "forward": 0})
            entry["fb" if torch.is_grad_enabled() else "forward"] += int(ids.shape[0])

        self._hooks.append(body.register_forward_pre_hook(count, with_kwargs=True))

    @contextmanager
    def counting(self, part: str):
        self.part = part
        yield
        self.part = "selection"

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

    def totals(self) -> dict[str, int]:
        return {k: sum(p[k] for p in self.parts.values()) for k in ("fb", "forward")}


def cost_record(method: str, wall_s: float, fb: float, forward: float, retrain_fb: int, parts: dict | None = None,
                how: str = "") -> dict:
    equivalent = fb + FORWARD_COST * forward
    return {"method": method, "wall_time_s": round(wall_s, 2), "forward_backward_examples": fb,
            "forward_examples": forward, "fb_equivalent": equivalent,
            "retrain_forward_backward_examples": retrain_fb,
            "retrain_multiple": equivalent / retrain_fb if retrain_fb else None,
            "parts": parts or {}, "how_counted": how}


# ------------------------------------------------------------------------------------------------ selections


class Context:
    """What a selection needs from the experiment: the pool (the reweighting run's decontaminated sources), its
    tokenisation with the run's tokenizer, the validation examples, the retrain config ``ft`` (model, batch,
    optimiser settings) and N, the examples every method's training file holds."""

    def __init__(self, ft: FinetuneConfig, n: int, run_dir: Path, data_dir: Path):
        import torch
        from transformers import AutoTokenizer

        from scalebio.baselines import tokenize_pool
        from scalebio.data import read_records
        from scalebio.resample import pool_from_run

        if ft.threads:  # the retrain config's thread count (1: two streams share 2 cores)
            torch.set_num_threads(ft.threads)
        self.ft = ft
        self.n = n
        self.retrain_fb = retrain_passes(ft, self.n)
        self.tokenizer = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
        self.pad_id = self.tokenizer.pad_token_id
        self.sources = pool_from_run(run_dir)
        self.pool = tokenize_pool(self.sources, self.tokenizer, ft.max_length)
        self.validation = tokenize_pool({"val": read_records(data_dir / "val.jsonl")}, self.tokenizer,
                                        ft.max_length).examples

    def model(self, seed: int):
        from scalebio.models import build_model, special_token_ids

        return build_model(self.ft.model, vocab_size=len(self.tokenizer), seed=seed,
                           token_ids=special_token_ids(self.tokenizer))

    def by_source(self) -> list[list]:
        groups = [[] for _ in self.pool.names]
        for ex in self.pool.examples:
            groups[ex.source].append(ex)
        return groups

    def uniform_examples(self, count: int, seed: int) -> list:
        """``count`` pool examples drawn uniformly over sources (the uniform arm's mixture), seeded."""
        import torch

        from scalebio.baselines.doremi import sample_mixture

        groups = self.by_source()
        k = len(groups)
        picks = sample_mixture([len(g) for g in groups], torch.full((k,), 1.0 / k), count,
                               torch.Generator().manual_seed(seed))
        return [groups[d][i] for d, i in picks]


def keep_count(ctx: Context, settings: dict) -> int:
    return min(ctx.n, int(settings["max_fraction"] * len(ctx.pool.examples)))


def repeated_picks(ctx: Context, ranked: list[int], n: int) -> list[tuple[str, int]]:
    """N (source, record) picks: the ranked pool indices repeated in rank order up to ``n``."""
    return [ctx.pool.origin[ranked[i % len(ranked)]] for i in range(n)]


def rank_rho_loss(ctx: Context, cfg: dict, seed: int, counter: PassCounter):
    """IL model on the validation set, D_t model = the retrain init trained on uniform batches, top K by
    RHO-LOSS. Returns (ranked pool indices, provenance)."""
    from scalebio.baselines import irreducible_losses, select_rho_loss, train_irreducible_loss_model, train_steps

    keep = keep_count(ctx, cfg)
    il, base = ctx.model(seed + 1000), ctx.model(seed)
    counter.watch(il)
    counter.watch(base)
    with counter.counting("il_model_training"):
        train_irreducible_loss_model(il, ctx.validation, cfg["il_steps"], ctx.ft.global_batch, cfg["lr"],
                                     ctx.pad_id, seed=seed, weight_decay=ctx.ft.weight_decay)
    with counter.counting("il_losses"):
        il_losses = irreducible_losses(il, ctx.pool.examples, ctx.pad_id, batch_size=cfg["score_batch"])
    with counter.counting("base_model_training"):
        warm = ctx.uniform_examples(cfg["base_steps"] * ctx.ft.global_batch, seed)
        train_steps(base, warm, cfg["base_steps"], ctx.ft.global_batch, cfg["lr"], ctx.pad_id, seed=seed,
                    weight_decay=ctx.ft.weight_decay, warmup_ratio=ctx.ft.warmup_ratio)
    with counter.counting("training_losses"):
        sel = select_rho_loss(base, il_losses, ctx.pool.examples, keep, ctx.pad_id, batch_size=cfg["score_batch"],
                              settings=dict(cfg), seed=seed)
    return sel.indices, sel.provenance


def rank_less(ctx: Context, cfg: dict, seed: int, counter: PassCounter):
    """LoRA warm-up, Adam-preconditioned projected gradients, top K by the LESS score: ``scalebio.baselines.less``'s
    parts in ``select_less``'s order (called one by one, so that the counter tells the warm-up's passes from the
    gradient features'), with the projection applied to ``project_chunk`` gradients at a time (select_less's
    ``chunk``: the projector regenerates its matrix on every call, which at the default 16 costs ≈ 6 ms per example
    here). The selection model is the retrain init warmed like RHO-LOSS's D_t (LESS selects with a model that knows
    the format)."""
    import torch

    from scalebio.baselines import less, top_n, train_steps
    from scalebio.baselines.common import provenance

    keep = keep_count(ctx, cfg)
    model = ctx.model(seed)
    counter.watch(model)
    with counter.counting("base_model_training"):
        warm = ctx.uniform_examples(cfg["base_steps"] * ctx.ft.global_batch, seed)
        train_steps(model, warm, cfg["base_steps"], ctx.ft.global_batch, cfg["lr"], ctx.pad_id, seed=seed,
                    weight_decay=ctx.ft.weight_decay, warmup_ratio=ctx.ft.warmup_ratio)
    validation = ctx.validation[:cfg["val_examples"]]
    adapters = less.add_lora(model, rank=cfg["lora_rank"], alpha=cfg["lora_alpha"], seed=seed)
    params = adapters.parameters
    try:
        with counter.counting("lora_warmup"):
            ckpts = less.warmup(model, params, ctx.pool.examples, ctx.pad_id, cfg["fraction"], cfg["epochs"],
                                ctx.ft.global_batch, cfg["lr"], ctx.ft.warmup_ratio, seed=seed)
        projector = less.RandomProjector(sum(p.numel() for p in params), cfg["proj_dim"], "rademacher", seed)
        train_features, val_features = [], []
        with counter.counting("gradient_features"):
            for ckpt in ckpts:
                with torch.no_grad():
                    for p, value in zip(params, ckpt.params):
                        p.copy_(value)
                train_features.append(less.gradient_features(model, params, ctx.pool.examples, ctx.pad_id, projector,
                                                             adam=ckpt, chunk=cfg["project_chunk"]))
                val_features.append(less.gradient_features(model, params, validation, ctx.pad_id, projector,
                                                           chunk=cfg["project_chunk"]))
    finally:
        adapters.remove()
    lrs = [c.lr for c in ckpts]
    scores = less.less_scores(train_features, val_features, lrs, None, "max")
    settings = {**cfg, "adapters": "lora", "lora_targets": list(less.LORA_TARGETS), "proj_kind": "rademacher",
                "batch_size": ctx.ft.global_batch, "checkpoint_lrs": lrs, "validation_examples": len(validation)}
    return top_n(scores, keep), provenance("less", less.PAPER, settings, seed)


def learn_doremi(ctx: Context, cfg: dict, seed: int, counter: PassCounter):
    """Reference on uniform weights, Group-DRO proxy → ᾱ. Returns the ``scalebio.weights`` record."""
    from scalebio.baselines import run_doremi, source_weights_record, train_reference_model

    groups = ctx.by_source()
    reference, proxy = ctx.model(seed + 1000), ctx.model(seed)
    counter.watch(reference)
    counter.watch(proxy)
    with counter.counting("reference_training"):
        train_reference_model(reference, groups, cfg["reference_steps"], ctx.ft.global_batch, cfg["lr"], ctx.pad_id,
                              seed=seed, weight_decay=ctx.ft.weight_decay)
    with counter.counting("proxy_group_dro"):
        result = run_doremi(proxy, reference, groups, ctx.pool.names, cfg["proxy_steps"], ctx.ft.global_batch,
                            cfg["lr"], ctx.pad_id, eta=cfg["eta"], smoothing=cfg["smoothing"], seed=seed,
                            weight_decay=ctx.ft.weight_decay)
    counts = {name: len(g) for name, g in zip(ctx.pool.names, groups)}
    return source_weights_record(result.weights, counts, result.provenance)
