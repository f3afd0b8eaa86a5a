"""Step cost (issue items 1 and 4): a ScaleBiO step ÷ a plain SFT step on the same model and tokens, with and
without LISA, at several widths, with the components that set the floor.

Per width, in one process, interleaved repetition by repetition:
  sft              AdamW on one full copy, loss = mean per-example response-token loss, fwd+bwd+step
  scalebio         library ScaleBiO (u on B, w on V, w on B; AdamW for u, w, λ), no LISA
  scalebio_lisa    the same with LISA (γ active blocks per copy, our optimizer-state policy)
  *_fused_w        (headline width only) the FusedWScaleBiO prototype: w's two passes as one
The validation batch V has as many examples and tokens as the training batch B.

Components (every width): one fwd+bwd of the per-example loss with all parameters trainable
(``pass_full``) and with only LISA's active set trainable (``pass_lisa``), and one AdamW step over all
parameters (``adam_full``) and over the active set (``adam_lisa``). The floor of the ratio is
(3·pass + 2·adam) / (pass_full + adam_full).
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from scalebio.lisa import Lisa
from scalebio.solver import CausalLMObjective

from .common import SFT, ModelSpec, SolverRunner, interleaved_times, summarize, token_batch
from .prototypes import FusedWScaleBiO

log = logging.getLogger("benchmarks")


def components(spec: ModelSpec, batch: dict, warmup: int, reps: int) -> dict:
    objective = CausalLMObjective()
    full, sparse = spec.build(0), spec.build(0)
    opt_full = torch.optim.AdamW(full.parameters(), lr=1e-5, weight_decay=5e-4)
    opt_sparse = torch.optim.AdamW(sparse.parameters(), lr=1e-5, weight_decay=5e-4)
    Lisa(sparse, spec.gamma, 10**9, seed=0, stream=1).update(0, opt_sparse)

    def fwd_bwd(model):
        model.zero_grad(set_to_none=True)
        objective.per_example_loss(model, batch).mean().backward()

    # Order matters: each AdamW step follows the pass that left its gradients.
    times = interleaved_times({
        "pass_full": lambda: fwd_bwd(full),
        "adam_full": opt_full.step,
        "pass_lisa": lambda: fwd_bwd(sparse),
        "adam_lisa": opt_sparse.step,
    }, warmup, reps)
    out = summarize(times, None)
    med = {name: v["median_s"] for name, v in out.items()}
    sft = med["pass_full"] + med["adam_full"]
    out["floor"] = {
        "sft_from_components_s": sft,
        "scalebio_floor_ratio": (3 * med["pass_full"] + 2 * med["adam_full"]) / sft,
        "scalebio_lisa_floor_ratio": (3 * med["pass_lisa"] + 2 * med["adam_lisa"]) / sft,
        "three_passes_only_ratio": 3 * med["pass_full"] / sft,
        "lisa_pass_fraction_of_full": med["pass_lisa"] / med["pass_full"],
        "formula": "(3*pass + 2*adam) / (pass_full + adam_full)",
    }
    return out


def run(arch: str, widths: list[int], headline: int, blocks: int, batch: int, seq_len: int, k: int,
        warmup: int, reps: int) -> dict:
    results = []
    for width in tqdm(widths, desc=f"step cost {arch}", leave=False):
        spec = ModelSpec(arch, width, blocks, seq_len)
        train = [token_batch(spec.vocab, batch, seq_len, k, seed=1)]
        val = [token_batch(spec.vocab, batch, seq_len, k, seed=2)]
        sft = SFT(spec.build(0))
        variants = {
            "sft": lambda: sft.step(train),
        }
        runners = {
            "scalebio": SolverRunner(spec, k, lisa=False),
            "scalebio_lisa": SolverRunner(spec, k, lisa=True),
        }
        if width == headline:
            runners["scalebio_fused_w"] = SolverRunner(spec, k, lisa=False, solver_cls=FusedWScaleBiO)
            runners["scalebio_lisa_fused_w"] = SolverRunner(spec, k, lisa=True, solver_cls=FusedWScaleBiO)
        for name, runner in runners.items():
            variants[name] = (lambda r: lambda: r.step(train, val))(runner)
        log.info("step cost %s width %d: %d variants × %d reps", arch, width, len(variants), warmup + reps)
        entry = {
            "model": spec.describe(sft.model),
            "tokens_per_batch": int(train[0]["attention_mask"].sum()),
            "response_tokens_per_batch": int((train[0]["labels"] != -100).sum()),
            "variants": summarize(interleaved_times(variants, warmup, reps), "sft"),
        }
        del sft, runners, variants
        entry["components"] = components(spec, train[0], warmup, reps)
        results.append(entry)
    return {
        "arch": arch,
        "headline_width": headline,
        "settings": dict(widths=widths, blocks=blocks, batch=batch, val_batch=batch, seq_len=seq_len, k=k,
                         warmup=warmup, reps=reps, gamma=ModelSpec(arch, headline, blocks, seq_len).gamma,
                         lisa_interval=20),
        "widths": results,
    }
