"""LISA, layerwise importance sampling (method.md §4), with optimizer state only for what is active now.

Embeddings, final norm and LM head (everything outside the decoder blocks) are always trained. Of the N
blocks, γ are active at a time, redrawn every K steps. The draw for switch s is a pure function of
(seed, stream, s), so every rank, and a resumed run, activates the same blocks without sharing state.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


class LisaError(ValueError):
    pass


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of a causal LM, found by introspection: the ModuleList of identical modules holding
    the most parameters (GPT-2 ``transformer.h``, Llama/Qwen2/Gemma ``model.layers``, GPT-NeoX
    ``gpt_neox.layers`` alike; no branch per architecture)."""
    best, best_name, best_size = None, None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_name, best_size = module, name, size
    if best is None:
        raise LisaError(
            f"cannot find decoder blocks in {type(model).__name__}: no nn.ModuleList of identical modules with parameters"
        )
    return best_name, best


SHARED_STREAM = 0
"""The stream u and w both draw from under ``lisa.shared``: the two models train the same blocks."""
U_STREAM, W_STREAM = 1, 2
"""u's and w's own streams: independent draws, as the released code."""


FINETUNE_STREAM = U_STREAM
"""The fine-tuned model's stream (scalebio.finetune): u's, the stream every fine-tuning run has drawn from."""


def solver_streams(shared: bool) -> tuple[int, int]:
    """(u's stream, w's stream) for the solver's two models."""
    return (SHARED_STREAM, SHARED_STREAM) if shared else (U_STREAM, W_STREAM)


def draw_blocks(n_blocks: int, gamma: int, seed: int, stream: int, switch: int) -> list[int]:
    """γ distinct block indices for switch number ``switch``, uniform without replacement, sorted."""
    rng = np.random.default_rng([seed, stream, switch])
    return sorted(int(i) for i in rng.choice(n_blocks, size=gamma, replace=False))


class Lisa:
    """Freezes all but γ blocks of ``model`` and keeps ``optimizer`` holding state for active parameters only.

    The optimizer must have a single parameter group; on every switch its parameter list is replaced by
    the parameters trainable now and the moments of newly frozen parameters are deleted.
    """

    def __init__(self, model: nn.Module, gamma: int, interval: int, seed: int, stream: int, keep_all_state: bool = False):
        self.model = model
        self.blocks_path, self.blocks = find_blocks(model)
        n = len(self.blocks)
        if not 1 <= gamma < n:
            raise LisaError(f"lisa.gamma: {gamma} must be at least 1 and smaller than the number of blocks ({n}) in {self.blocks_path}")
        self.gamma, self.interval, self.seed, self.stream = gamma, interval, seed, stream
        self.keep_all_state = keep_all_state
        block_params = {id(p) for p in self.blocks.parameters()}
        self.always = [p for p in model.parameters() if id(p) not in block_params]
        self.active: list[int] = []
        self.switch_index: int | None = None

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.always)
        for i in self.active:
            params.extend(self.blocks[i].parameters())
        return params

    def update(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Activate the blocks for ``step`` (a redraw every ``interval`` steps). Returns whether they changed."""
        switch = step // self.interval
        if switch == self.switch_index:
            return False
        self.switch_index = switch
        self.active = draw_blocks(self.n_blocks, self.gamma, self.seed, self.stream, switch)
        active = set(self.active)
        for i, block in enumerate(self.blocks):
            block.requires_grad_(i in active)
        for p in self.always:
            p.requires_grad_(True)
        trainable = self.trainable_parameters()
        group = optimizer.param_groups[0]
        if self.keep_all_state:
            # The released code's policy: one optimizer over everything; frozen parameters get no gradient,
            # so Adam skips them, but their moments stay allocated forever.
            group["params"] = [p for p in self.model.parameters()]
        else:
            group["params"] = trainable
            keep = {id(p) for p in trainable}
            for p in list(optimizer.state.keys()):
                if id(p) not in keep:
                    del optimizer.state[p]
        for p in self.model.parameters():
            if not p.requires_grad:
                p.grad = None
        log.debug("LISA %s switch %d: active blocks %s", self.blocks_path, switch, self.active)
        return True


def optimizer_state_params(optimizer: torch.optim.Optimizer) -> set[int]:
    """ids of the parameters the optimizer holds state for."""
    return {id(p) for p, s in optimizer.state.items() if s}
