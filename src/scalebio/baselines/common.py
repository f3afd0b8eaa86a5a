"""What the three baselines share: a tokenised pool that remembers which record each example came from,
per-example losses, a plain AdamW training loop, top-N selection, and the two outputs the pipeline takes
(a weights record for ``scalebio.weights.write_weights``, or a JSONL training file as ``scalebio.resample``
writes it).

Conventions: a *pool* is a list of ``scalebio.data.Example`` (``input_ids``, ``labels`` with −100 off the
response, ``source`` = index of its source); a selection is a list of indices into that list. Losses are the
project's: ``CausalLMObjective.per_example_loss`` (mean over an example's response tokens, method.md §3)
unless an objective is passed.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import data as data_mod
from ..results import git_revision, package_versions, write_text
from ..conventions import lr_shape
from ..files import file_sha256
from ..solver import CausalLMObjective
from ..weights import weights_record

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


@dataclass
class Pool:
    """Tokenised candidates: ``examples[j]`` came from record ``origin[j] = (source name, record index)``.
    ``names`` lists the sources in order (``examples[j].source`` indexes it). Records whose response was cut
    away by truncation are dropped, so ``origin`` is what maps a selection back to the records."""

    names: list[str]
    examples: list[data_mod.Example]
    origin: list[tuple[str, int]]


def tokenize_pool(sources: dict[str, list[dict]], tokenizer, max_length: int, prompt: str = "scalebio") -> Pool:
    """Every record of every source, format detected per record (as ``build_mixed_set`` does for a resampled
    file), tokenised with response-only labels; ``Example.source`` is the source's index in ``sources``."""
    names = list(sources)
    examples, origin, dropped = [], [], 0
    for s, name in enumerate(names):
        for i, record in enumerate(sources[name]):
            where = f"source {name}: record {i}"
            fmt = data_mod.detect_format(record, where)
            data_mod.check_record(record, fmt, where)
            ids, labels, _ = data_mod.tokenize_record(record, fmt, tokenizer, max_length, prompt)
            if not any(x != data_mod.IGNORE_INDEX for x in labels[1:]):
                dropped += 1
                continue
            examples.append(data_mod.Example(ids, labels, s))
            origin.append((name, i))
    if dropped:
        log.info("tokenize_pool: %d records lost their response to truncation (max_length %d)", dropped, max_length)
    return Pool(names, examples, origin)


def batches(examples: Sequence[data_mod.Example], batch_size: int, pad_id: int,
            device: torch.device | str | None = None) -> list[Batch]:
    """``examples`` in order, collated (right-padded) in batches of at most ``batch_size``."""
    return data_mod.micro_batches(list(examples), batch_size, pad_id, torch.device(device) if device else None)


def per_example_losses(model: nn.Module, examples: Sequence[data_mod.Example], pad_id: int, batch_size: int = 8,
                       objective=None, device: torch.device | str | None = None) -> torch.Tensor:
    """ℓ(model; z) for every example, in eval mode (no dropout) and without gradients: [N] float64 on CPU."""
    objective = objective or CausalLMObjective()
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for batch in batches(examples, batch_size, pad_id, device):
            out.append(objective.per_example_loss(model, batch).detach().double().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@dataclass
class TrainLog:
    """What ``train_steps`` did: the loss and learning rate of every step."""

    losses: list[float]
    lrs: list[float]


def dropout_seeded(fn: Callable) -> Callable:
    """Run the training function ``fn`` with the global RNG, which dropout draws from, seeded from its ``seed``
    argument, and give the caller back its own RNG state afterwards. Without it a baseline's selection depended
    on what the same process had run before (compare.py runs many units in one process, and skips finished ones):
    `make reproduce-gpt2` recomputed other RHO-LOSS, LESS and DoReMi selections than the committed ones."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def seeded(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(bound.arguments["seed"])
            return fn(*args, **kwargs)

    return seeded


@dropout_seeded
def train_steps(model: nn.Module, examples: Sequence[data_mod.Example], steps: int, batch_size: int, lr: float,
                pad_id: int, seed: int = 0, params: Sequence[torch.Tensor] | None = None,
                optimizer: torch.optim.Optimizer | None = None, weight_decay: float = 0.0,
                warmup_ratio: float = 0.0, schedule: str = "cosine", objective=None,
                device: torch.device | str | None = None,
                on_step: Callable[[int], None] | None = None, progress: bool = False) -> TrainLog:
    """Plain supervised training (finetune.py's step): minimise the mean per-example loss of batches drawn
    without replacement (one seeded permutation per epoch) with AdamW, lr ``lr × lr_shape``; dropout seeded from
    ``seed`` too (``dropout_seeded``).

    ``params``: what to train (default all of ``model``'s parameters); ``optimizer``: an existing AdamW over
    them (its state is kept). ``on_step(step)`` runs after each step; ``progress``: a progress bar.
    """
    objective = objective or CausalLMObjective()
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sampler = data_mod.BatchSampler([len(examples)], min(batch_size, len(examples)), "pooled", seed=seed)
    model.train()
    log_ = TrainLog([], [])
    for step in tqdm(range(steps), desc="train", disable=not progress, dynamic_ncols=True):
        rate = lr * lr_shape(step, steps, warmup_ratio, schedule)
        for group in opt.param_groups:
            group["lr"] = rate
        picks = [examples[i] for _, i in sampler.next_batch()]
        (batch,) = batches(picks, len(picks), pad_id, device)
        opt.zero_grad(set_to_none=True)
        loss = objective.per_example_loss(model, batch).mean()
        loss.backward()
        opt.step()
        log_.losses.append(float(loss.detach()))
        log_.lrs.append(rate)
        if on_step is not None:
            on_step(step)
    opt.zero_grad(set_to_none=True)
    return log_


def top_n(scores: torch.Tensor, n: int) -> list[int]:
    """Indices of the ``n`` largest scores, best first; ties to the lower index (a stable sort)."""
    if not 1 <= n <= scores.numel():
        raise ValueError(f"n: {n} is not between 1 and the pool size {scores.numel()}")
    order = torch.sort(scores.double().cpu(), descending=True, stable=True).indices
    return order[:n].tolist()


# ---------------------------------------------------------------------------------------------------------
# Outputs.


def provenance(method: str, paper: str, settings: dict[str, Any], seed: int) -> dict[str, Any]:
    """Provenance naming the method, its paper and every setting, as the ``weights.json`` / manifest field."""
    return {
        "method": method,
        "paper": paper,
        "settings": settings,
        "seed": seed,
        "git_revision": git_revision(),
        "scalebio_version": package_versions()["scalebio"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def source_weights_record(weights: dict[str, float], example_counts: dict[str, int], prov: dict[str, Any],
                          source_stats: dict[str, dict[str, int]] | None = None) -> dict:
    """A ``scalebio.weights`` record (format ``scalebio.weights/1``) for a probability vector that was not
    learned as logits: λ = log p, so ``softmax(λ) = p``. Write it with ``scalebio.weights.write_weights``."""
    names = list(weights)
    p = torch.tensor([weights[n] for n in names], dtype=torch.float64)
    if (p <= 0).any() or not math.isclose(float(p.sum()), 1.0, abs_tol=1e-9):
        raise ValueError(f"weights: not a positive probability vector: {weights}")
    return weights_record(names, torch.log(p), example_counts, prov, source_stats=source_stats)


def write_selection(out: str | Path, sources: dict[str, list[dict]], picks: Sequence[tuple[str, int]],
                    prov: dict[str, Any]) -> dict:
    """Write the selected records as ``scalebio.resample.resample`` writes a draw (JSONL, each record with a
    ``source`` field; ``finetune`` takes it unchanged) and ``out`` + ``.manifest.json`` with the method's
    provenance, per-source counts and the output's sha256. ``picks``: (source name, record index), in order."""
    out = Path(out)
    names = list(sources)
    lines = [json.dumps({**sources[s][i], "source": s}, ensure_ascii=False) + "\n" for s, i in picks]
    manifest_path = out.with_name(out.name + ".manifest.json")
    manifest_path.unlink(missing_ok=True)
    write_text(out, "".join(lines))
    counts = {s: 0 for s in names}
    for s, _ in picks:
        counts[s] += 1
    manifest = {"weights_file": None, "weights": prov["method"], "selection": prov, "n": len(picks),
                "counts": counts, "pool_sizes": {s: len(sources[s]) for s in names}, "output": out.name,
                "output_sha256": file_sha256(out)}
    write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest
