"""The paper's data-selection comparison on one GPT-2 experiment: uniform, ScaleBiO, RHO-LOSS, LESS and DoReMi, each
retrained on N examples it drew or selected and evaluated on the test set.

    python experiments/gpt2/compare.py denoising [--preset cpu] [--smoke]      # make compare-gpt2: all three

Settings: ``experiments/gpt2/<task>/compare.yaml`` (methods, variants, selection seeds, each baseline's settings);
the retrain side is the pipeline's (``pipeline.yaml`` ``retrain``: N, seeds, finetune config, lm-eval task YAML).

What is the same for every method
---------------------------------
N = ``retrain.n`` examples; a fresh model of the retrain config, the same steps, batch, lr and seeds
(``retrain.seeds``, ≥ 3); the same lm-eval task YAML on the same test file, with per-document values
(``eval_samples.jsonl``) so that each method is compared with uniform by ``scalebio.stats.paired_bootstrap`` (pairs =
retrain seeds, documents resampled jointly). uniform and ScaleBiO *are* the pipeline's retrain arms (the same units,
the same work folders ``runs/gpt2/<task>/<variant>/retrain/{uniform,learned}_seed<s>``: whichever of
``pipeline.py`` and this script runs first trains them, the other finds them done); this script evaluates their
models once more to get the per-document values. ScaleBiO's weights are the pipeline's reweighting runs (retrain
seed s uses reweighting seed ``seeds[s % len(seeds)]``).

How each baseline becomes N examples
------------------------------------
* RHO-LOSS and LESS rank the pool and keep the top K = min(N, ⌊``max_fraction`` · |pool|⌋); the training file is
  those K records repeated in rank order up to N lines (``scalebio.baselines.write_selection``). K < N only where
  N exceeds what a selection can sensibly keep: instruction following draws N = 4,800 from a pool of 3,000, so
  RHO-LOSS / LESS keep the top half (1,500) and see each ≈ 3.2 times, as ScaleBiO's draw sees its favoured source's
  records ≈ 2.5 times.
* DoReMi learns source weights ᾱ; they are written as a ``weights.json`` and drawn from exactly as ScaleBiO's weights
  are (``scalebio.resample``, with replacement, retrain seed = draw seed).

One selection per (variant, selection seed); retrain seed s uses selection seed ``selection_seeds[s % len]``. The
default is one selection seed (0) per variant: RHO-LOSS and LESS are deterministic top-K rankings given their
selection models, and the retrain seeds give the replicate spread, as for uniform. Settings: compare.yaml.

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

Budget (an ESTIMATE: nothing was run at full size). Per-example costs measured on this 2-core machine (CPU time, one
thread, fp32, the cpu preset's 2-block model, 64 tokens): forward+backward in a batch of 16 ≈ 5.8 ms, forward only
≈ 1.7 ms, one LESS gradient feature (batch-1 backward, Adam direction, projection) ≈ 11 ms; a retrain + lm-eval arm
16–42 s (experiments/gpt2/README.md). Pools ≈ 7,450 (denoising), 12,000 (multilingual, per target), 2,800
(instruction following) examples. With compare.yaml's settings:

    | experiment | RHO-LOSS | DoReMi | LESS | 9 new arms | 6 re-evaluations | total |
    | denoising | 50 s | 30 s | 3.0 min | 4.1 min | 1.0 min | ≈ 9.5 min |
    | multilingual (3 targets) | 3.3 min | 1.6 min | 14 min | 7.2 min | 1.8 min | ≈ 28 min |
    | instruction following | 35 s | 35 s | 1.3 min | 6.3 min | 1.2 min | ≈ 10 min |

``make compare-gpt2`` runs two streams (multilingual | denoising then instruction following): ≈ 28 min after
``make reproduce-gpt2`` has trained the shared units (≈ 18 min), so ≈ 47 min for both, inside the 60-minute budget
on a quiet machine; alone on a fresh clone (it then trains the pipeline's units too) ≈ 36 min. LESS's per-example
gradients over the multilingual pools are half of it: ``less.epochs: 1`` (one checkpoint) saves ≈ 9 min.

Results: ``results/gpt2/<task>/compare/<variant>/<method>_seed<s>/`` (eval.json, eval_samples.jsonl,
resample.json or selection.json, finetune_metrics.jsonl, cost.json) and
``results/gpt2/<task>/compare/<variant>/selection/<method>_seed<k>/`` (manifest or weights.json, cost.json); the
table, summary and figure come from ``experiments/gpt2/compare_report.py`` (``make figures``) from results/ alone.
Work happens under ``runs/gpt2/<task>/`` (a unit finished there is not redone); ``--smoke`` works under
``runs/gpt2/<task>/smoke/`` and leaves results/ alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline  # noqa: E402  (the experiment's own units: data, reweighting, the uniform / learned retrain arms)
from scalebio.config import load_config  # noqa: E402
from scalebio.evaluation import evaluate, load_task_yaml  # noqa: E402
from scalebio.finetune import FinetuneConfig, finetune  # noqa: E402
from scalebio.reproduce import arm_finished, prune, reweight_finished  # noqa: E402
from scalebio.results import write_json  # noqa: E402
from scalebio.stages import Campaign, Unit  # noqa: E402

log = logging.getLogger("gpt2.compare")

METHODS = ("uniform", "scalebio", "rho_loss", "less", "doremi")
SELECTED = ("rho_loss", "less")
"""Methods that rank the pool and keep the top K (the rest draw by source weights)."""
PIPELINE_ARM = {"uniform": "uniform", "scalebio": "learned"}
"""The pipeline's retrain arm each of these methods is."""
FORWARD_COST = 1 / 3
"""A forward-only pass as a fraction of a forward+backward (a backward ≈ 2 forwards)."""


# ------------------------------------------------------------------------------------------------- settings


def load_settings(task: str, preset: str, smoke: bool) -> tuple[dict, dict]:
    """(pipeline plan, compare settings) of one experiment; ``--smoke`` overlays both files' ``smoke`` sections."""
    plan = pipeline.load_plan(task, preset, smoke)
    settings = yaml.safe_load((plan["folder"] / "compare.yaml").read_text())
    if smoke:
        for key, value in settings.get("smoke", {}).items():
            settings[key] = {**settings[key], **value} if isinstance(value, dict) else value
    settings.pop("smoke", None)
    return plan, settings


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def retrain_passes(ft: FinetuneConfig, n: int) -> int:
    """Forward+backward examples of one retraining run (finetune.py's loop: steps × global batch)."""
    steps = ft.steps or max(1, int(ft.epochs * n) // ft.global_batch)
    return steps * ft.global_batch


def finetune_config(plan: dict, seed: int, work: Path, sample: Path, run_dir: Path) -> FinetuneConfig:
    """The pipeline's retrain config (pipeline.retrain_arm's overrides, the same for every method)."""
    r = plan["retrain"]
    return load_config(plan["folder"] / r["config"], [f"seed={seed}", f"output_dir={work / 'finetune'}",
                                                      f"train.path={sample}",
                                                      f"tokenizer.name_or_path={run_dir / 'tokenizer'}",
                                                      *r.get("overrides", [])], FinetuneConfig)


def evaluate_model(plan: dict, variant: dict, model_dir: Path, data_dir: Path, work: Path, max_length: int) -> None:
    """pipeline.retrain_arm's evaluation (the task YAML kept in the experiment folder, this variant's test file, the
    training window), also writing the per-document values ``eval_samples.jsonl`` the paired bootstrap needs."""
    from transformers import AutoTokenizer

    r = plan["retrain"]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    task_cfg = load_task_yaml(plan["folder"] / (variant.get("eval_task") or r["eval_task"]), data_dir / "test.jsonl")
    evaluate(str(model_dir), tok, [task_cfg], work / "eval.json", limit=r.get("eval_limit"), max_length=max_length,
             samples_out=work / "eval_samples.jsonl")


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
    tokenisation with the run's tokenizer, the validation examples and the retrain model config."""

    def __init__(self, plan: dict, run_dir: Path, data_dir: Path):
        import torch
        from transformers import AutoTokenizer

        from scalebio.baselines import tokenize_pool
        from scalebio.data import read_records
        from scalebio.resample import pool_from_run

        ft = finetune_config(plan, 0, run_dir, data_dir / "val.jsonl", run_dir)
        if ft.threads:  # the retrain config's thread count (1: two streams share 2 cores)
            torch.set_num_threads(ft.threads)
        self.ft = ft
        self.n = plan["retrain"]["n"]
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
    parts in ``select_less``'s order, with the projection applied to ``project_chunk`` gradients at a time (the
    projector regenerates its matrix on every call, which at select_less's 16 costs ≈ 6 ms per example here). The
    selection model is the retrain init warmed like RHO-LOSS's D_t (LESS selects with a model that knows the format)."""
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


def run_selection(plan: dict, settings: dict, method: str, seed: int, run_dir: Path, data_dir: Path,
                  work: Path) -> None:
    """One baseline's selection → ``work``/selection.jsonl (+ manifest) or ``work``/weights.json, and cost.json.
    The output file is written last: it is the unit's done-check."""
    from scalebio.baselines import write_selection
    from scalebio.weights import write_weights

    cfg = settings[method]
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    ctx = Context(plan, run_dir, data_dir)
    counter = PassCounter()
    if method == "doremi":
        record = learn_doremi(ctx, cfg, seed, counter)
        record["provenance"]["settings_digest"] = digest(cfg)
    else:
        ranked, prov = (rank_rho_loss if method == "rho_loss" else rank_less)(ctx, cfg, seed, counter)
        prov["settings"].update(keep=len(ranked), n=ctx.n, pool=len(ctx.pool.examples))
        prov["settings_digest"] = digest(cfg)
    counter.close()
    totals = counter.totals()
    cost = cost_record(method, time.time() - started, totals["fb"], totals["forward"], ctx.retrain_fb,
                       counter.parts, "forward pre-hook on every model this selection built (compare.py)")
    write_json(work / "cost.json", cost)
    if method == "doremi":
        write_weights(work / "weights.json", record)
    else:
        write_selection(work / "selection.jsonl", ctx.sources, repeated_picks(ctx, ranked, ctx.n), prov)


def selection_output(work: Path, method: str) -> Path:
    return work / ("weights.json" if method == "doremi" else "selection.jsonl.manifest.json")


def selection_finished(work: Path, method: str, cfg: dict) -> bool:
    out = selection_output(work, method)
    if not (out.is_file() and (work / "cost.json").is_file()):
        return False
    record = json.loads(out.read_text())
    prov = record["provenance"] if method == "doremi" else record["selection"]
    return prov.get("settings_digest") == digest(cfg)


def scalebio_cost(run_dir: Path, retrain_fb: int) -> dict:
    """The reweighting run as ScaleBiO's selection: steps × (2B + V) forward+backward examples, its wall time."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    meta = json.loads((run_dir / "meta.json").read_text())
    s = cfg["solver"]
    steps = meta.get("steps_total") or s["steps"]
    batch, val = s["global_batch"], s.get("val_batch") or s["global_batch"]
    fb = steps * (2 * batch + val)
    return cost_record("scalebio", meta["wall_time_s"], fb, 0, retrain_fb,
                       {"reweighting": {"fb": fb, "forward": 0}},
                       "reweighting run: steps × (u on B + w on B + w on V), method.md §3")


# ------------------------------------------------------------------------------------------------------ arms


def run_arm(plan: dict, variant: dict, seed: int, method: str, run_dir: Path, data_dir: Path, sel_work: Path | None,
            pipeline_work: Path | None, work: Path) -> None:
    """One compare arm in ``work``: uniform / ScaleBiO evaluate the pipeline's retrained model again (with
    per-document values); DoReMi draws N by its weights (as pipeline.retrain_arm draws by ScaleBiO's), RHO-LOSS /
    LESS take their selection file; then the pipeline's finetune config and evaluation."""
    from scalebio.resample import pool_from_run, resample
    from scalebio.files import file_sha256

    work.mkdir(parents=True, exist_ok=True)
    for name in ("eval.json", "eval_samples.jsonl"):
        (work / name).unlink(missing_ok=True)
    n = plan["retrain"]["n"]
    if method in PIPELINE_ARM:
        manifest = json.loads((pipeline_work / "train.jsonl.manifest.json").read_text())
        model_dir, ft = pipeline_work / "finetune" / "model", finetune_config(plan, seed, pipeline_work,
                                                                             pipeline_work / "train.jsonl", run_dir)
        source = {"pipeline_arm": str(pipeline_work)}
    else:
        if method == "doremi":
            sample = work / "train.jsonl"
            manifest = resample(sel_work / "weights.json", pool_from_run(run_dir), n, seed, sample, replace=True)
            source = {"selection_sha256": file_sha256(sel_work / "weights.json")}
        else:
            sample = sel_work / "selection.jsonl"
            manifest = json.loads((sel_work / "selection.jsonl.manifest.json").read_text())
            source = {"selection_sha256": manifest["output_sha256"]}
        ft = finetune_config(plan, seed, work, sample, run_dir)
        model_dir = finetune(ft, progress=sys.stderr.isatty())
    if sum(manifest["counts"].values()) != n:
        raise RuntimeError(f"{method} seed {seed}: the training file holds {sum(manifest['counts'].values())} "
                           f"examples, not N = {n}")
    write_json(work / "draw.json", {**{k: v for k, v in manifest.items() if k != "weights_file"}, **source})
    evaluate_model(plan, variant, model_dir, data_dir, work, ft.max_length)


def arm_cost(method: str, plan: dict, seed: int, run_dir: Path, sel_work: Path | None, train_dir: Path) -> dict:
    """The arm's cost.json: its selection's cost (uniform: none) and the retraining run's."""
    ft = finetune_config(plan, seed, train_dir, train_dir / "train.jsonl", run_dir)
    retrain_fb = retrain_passes(ft, plan["retrain"]["n"])
    if method == "uniform":
        selection = cost_record("uniform", 0.0, 0, 0, retrain_fb, {}, "no selection")
    elif method == "scalebio":
        selection = scalebio_cost(run_dir, retrain_fb)
    else:
        selection = json.loads((sel_work / "cost.json").read_text())
    meta = json.loads((train_dir / "finetune" / "meta.json").read_text())
    return {"method": method, "selection": selection,
            "retrain": {"forward_backward_examples": retrain_fb, "wall_time_s": round(meta["wall_time_s"], 2)},
            "total_retrain_multiple": 1 + (selection["retrain_multiple"] or 0.0)}


# ------------------------------------------------------------------------------------------------ campaign


def build_units(task: str, plan: dict, settings: dict, smoke: bool, runs_root: Path, compare_root: Path,
                written: set[Path]) -> list[Unit]:
    """The pipeline's units this comparison needs (data, reweighting, the uniform / learned retrain arms: same names,
    same folders, same done-checks as pipeline.run_task's), then a selection unit per baseline, variant and
    selection seed, then an arm per method, variant and retrain seed."""
    data_root = (runs_root / "data") if smoke else REPO / "data" / "gpt2"
    variants = [v for v in plan["variants"] if v["name"] in settings["variants"]]
    methods = settings["methods"]
    sel_seeds = settings["selection_seeds"]
    units: list[Unit] = []

    def data_dir_of(v):
        return data_root / v.get("data", task)

    for v in variants:
        d = data_dir_of(v)
        if not any(u.name == f"data {d.name}" for u in units):
            units.append(Unit(f"data {d.name}", run=lambda v=v, d=d: pipeline.build_data(plan, v, d, smoke),
                              done=(d / "manifest.json").is_file, kind="data"))
    rw_seeds = sorted({plan["seeds"][s % len(plan["seeds"])] for s in plan["retrain"]["seeds"]})
    for v in variants:
        for s in rw_seeds:
            run_dir = runs_root / v["name"] / f"reweight_seed{s}"
            cfg = load_config(plan["config"], [f"seed={s}", f"run_dir={run_dir}", f"data.root={data_dir_of(v)}",
                                               *v.get("overrides", []), *plan.get("overrides", [])])
            units.append(Unit(f"reweight {v['name']} seed {s}",
                              run=lambda cfg=cfg: pipeline.run_reweight(cfg, progress=sys.stderr.isatty()),
                              done=lambda run_dir=run_dir, cfg=cfg: reweight_finished(run_dir, cfg),
                              needs=(f"data {data_dir_of(v).name}",), kind="reweight", where=run_dir))

    def rw_seed(s: int) -> int:
        return plan["seeds"][s % len(plan["seeds"])]

    # The pipeline's retrain arms (pipeline.run_task's retrain_unit, without its publish: results/gpt2/<task>/<variant>/
    # retrain is the pipeline's to write).
    for v in variants:
        for s in plan["retrain"]["seeds"]:
            for m in sorted({PIPELINE_ARM[m] for m in methods if m in PIPELINE_ARM}):
                run_dir = runs_root / v["name"] / f"reweight_seed{rw_seed(s)}"
                work = runs_root / v["name"] / "retrain" / f"{m}_seed{s}"
                weights = run_dir / "weights.json"
                units.append(Unit(
                    f"retrain {v['name']} {m} seed {s}",
                    run=lambda v=v, s=s, m=m, run_dir=run_dir, work=work: pipeline.retrain_arm(
                        plan, v, s, m, run_dir, data_dir_of(v), work),
                    done=lambda m=m, work=work, weights=weights: arm_finished(
                        work, None if m == "uniform" else weights, run_weights=weights) is not None,
                    needs=(f"reweight {v['name']} seed {rw_seed(s)}",), kind="retrain", where=work))

    def sel_dir(v, method, k):
        return runs_root / v["name"] / "compare" / "selection" / f"{method}_seed{k}"

    for v in variants:
        for method in [m for m in methods if m not in PIPELINE_ARM]:
            for k in sel_seeds:
                # The pool and tokenizer are the reweighting run's (its decontaminated sources), seed 0's.
                run_dir = runs_root / v["name"] / f"reweight_seed{rw_seed(0)}"
                work = sel_dir(v, method, k)
                out = compare_root / v["name"] / "selection" / f"{method}_seed{k}"

                def publish(work=work, out=out, method=method):
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir(parents=True)
                    shutil.copy2(work / "cost.json", out / "cost.json")
                    shutil.copy2(selection_output(work, method), out / selection_output(work, method).name)
                    pipeline_relativize(out)
                    written.add(out)

                units.append(Unit(
                    f"select {v['name']} {method} seed {k}",
                    run=lambda v=v, method=method, k=k, run_dir=run_dir, work=work: run_selection(
                        plan, settings, method, k, run_dir, data_dir_of(v), work),
                    done=lambda work=work, method=method: selection_finished(work, method, settings[method]),
                    publish=publish, needs=(f"reweight {v['name']} seed {rw_seed(0)}",), kind="select", where=work))

    for v in variants:
        for s in plan["retrain"]["seeds"]:
            for method in methods:
                run_dir = runs_root / v["name"] / f"reweight_seed{rw_seed(s)}"
                work = runs_root / v["name"] / "compare" / f"{method}_seed{s}"
                out = compare_root / v["name"] / f"{method}_seed{s}"
                if method in PIPELINE_ARM:
                    pipe = runs_root / v["name"] / "retrain" / f"{PIPELINE_ARM[method]}_seed{s}"
                    sel, needs = None, (f"retrain {v['name']} {PIPELINE_ARM[method]} seed {s}",)
                    upstream = pipe / "eval.json"
                else:
                    k = sel_seeds[s % len(sel_seeds)]
                    pipe, sel = None, sel_dir(v, method, k)
                    needs = (f"select {v['name']} {method} seed {k}",)
                    upstream = selection_output(sel, method)
                train_dir = pipe or work

                def finished(work=work, upstream=upstream):
                    done = all((work / f).is_file() for f in ("eval.json", "eval_samples.jsonl", "draw.json"))
                    # Redone upstream (a new selection, a retrained pipeline arm) → this arm is stale.
                    return done and upstream.is_file() and upstream.stat().st_mtime <= (work / "eval.json").stat().st_mtime

                def publish(work=work, out=out, method=method, s=s, run_dir=run_dir, sel=sel, train_dir=train_dir):
                    shutil.rmtree(out, ignore_errors=True)
                    out.mkdir(parents=True)
                    for name in ("eval.json", "eval_samples.jsonl"):
                        shutil.copy2(work / name, out / name)
                    draw = json.loads((work / "draw.json").read_text())
                    name = "selection.json" if method in SELECTED else "resample.json"
                    (out / name).write_text(json.dumps(draw, indent=2) + "\n")
                    shutil.copy2(train_dir / "finetune" / "metrics.jsonl", out / "finetune_metrics.jsonl")
                    write_json(out / "cost.json", arm_cost(method, plan, s, run_dir, sel, train_dir))
                    pipeline_relativize(out)
                    written.add(out)

                units.append(Unit(
                    f"compare {v['name']} {method} seed {s}",
                    run=lambda v=v, s=s, method=method, run_dir=run_dir, sel=sel, pipe=pipe, work=work: run_arm(
                        plan, v, s, method, run_dir, data_dir_of(v), sel, pipe, work),
                    done=finished, publish=publish, needs=needs, kind="arm", where=work))
    return units


def pipeline_relativize(folder: Path) -> None:
    from scalebio.results import relativize

    relativize(folder, REPO)


def run_compare(task: str, preset: str = "cpu", smoke: bool = False, runs_root: Path | None = None,
                results_root: Path | None = None) -> Path:
    """Run (or continue) the comparison of one experiment; results under ``results_root``/compare (files there that
    this run did not produce are removed). Returns that folder."""
    plan, settings = load_settings(task, preset, smoke)
    runs_root = runs_root or REPO / "runs" / "gpt2" / task / ("smoke" if smoke else "")
    results_root = results_root or (runs_root / "results" if smoke else REPO / "results" / "gpt2" / task)
    compare_root = results_root / "compare"
    written: set[Path] = set()
    units = build_units(task, plan, settings, smoke, runs_root, compare_root, written)
    Campaign(f"compare {task}", units).run()
    write_json(compare_root / "settings.json", {"task": task, "preset": preset, "n": plan["retrain"]["n"],
                                                "retrain_seeds": plan["retrain"]["seeds"], **settings})
    # settings.json, and the report's summary.json and table.md (compare_report.py rebuilds them from results/).
    written.update(compare_root / name for name in ("settings.json", "summary.json", "table.md"))
    for path in prune(compare_root, written):
        log.info("removed %s: not produced by this run", path.relative_to(compare_root))
    return compare_root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["denoising", "multilingual", "instruction_following"])
    parser.add_argument("--preset", default=None, help="cpu (default without CUDA) or paper (GPU, hub)")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few dozen examples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch

    preset = args.preset or ("paper" if torch.cuda.is_available() else "cpu")
    out = run_compare(args.task, preset, args.smoke)
    log.info("wrote %s; table and figure: python experiments/gpt2/compare_report.py", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
