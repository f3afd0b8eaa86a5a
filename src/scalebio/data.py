"""Training sources, record formats, tokenisation with response-only loss masks, and batching.

Record formats (``detect_format``):

* ``alpaca``: ``{"instruction", "input" (optional), "output"}``.
* ``conversations``: ``{"items": [{"from", "value"}, ...]}`` (the authors' files), ``{"conversations": [...]}``
  (ShareGPT) or ``{"messages": [{"role", "content"}, ...]}``. Roles human/user, gpt/assistant, system.
* ``text``: ``{"text"}``; every token carries loss.

Rendering. For instruction data the loss falls only on the response tokens (and the end-of-turn / eos that
closes each response). When the tokenizer has a chat template it is used: assistant turn *i* is the text that
``render(messages[:i+1])`` adds to ``render(messages[:i], add_generation_prompt=True)``. Templates for which
this prefix property fails fall back (with one warning) to the plain template::

    {system}\\n\\n                                  (only when there is a system turn)
    ### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}{eos}
    ### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}{eos}   (one block per turn, no separator)

and for an Alpaca record::

    ### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n{output}{eos}

(the Input block only when ``input`` is non-empty). ``{eos}`` is the tokenizer's eos token id.

The text is tokenised segment by segment (prompt / response) without special tokens and concatenated, so the
mask boundary is exact. A BOS id is prepended when the tokenizer has a bos token distinct from eos that the
rendered text does not already start with. Examples longer than ``max_length`` keep their left part; one whose
loss tokens were all cut is dropped and counted.

Batches: ``BatchSampler`` draws (source, index) pairs from a seeded ``torch.Generator``; ``collate`` right-pads.
"""

from __future__ import annotations

import bisect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .config import RunConfig, SourceConfig, prompt_style
from .files import file_sha256

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt tokens, padding); torch's cross-entropy ignores it."""

FORMATS = ("alpaca", "conversations", "text")
CONVERSATION_KEYS = ("items", "conversations", "messages")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A data problem; the message names the file and where in it: ``FILE:LINE:`` (1-based, as an editor counts)
    for a JSONL record and for text-level errors (malformed JSON, invalid UTF-8), ``FILE: record index I
    (0-based):`` for a record of a JSON list or a hub dataset; then the field."""


# ---------------------------------------------------------------------------------------------------------
# Reading records.


class Records(list):
    """The records of one file or hub split, remembering the line each came from (``lines``: 1-based, JSONL) or
    none (a JSON list, a hub split: records are then named by their 0-based index)."""

    def __init__(self, items: Iterable = (), lines: list[int] | None = None):
        super().__init__(items)
        self.lines = lines

    def head(self, n: int) -> "Records":
        return Records(self[:n], None if self.lines is None else self.lines[:n])


def locate(records: Sequence, i: int, label: str) -> str:
    """Where record ``i`` of ``records`` (read from ``label``) is, for an error message: ``label:LINE`` for a JSONL
    record, else ``label: record index i (0-based)``."""
    lines = getattr(records, "lines", None)
    if lines is not None:
        return f"{label}:{lines[i]}"
    return f"{label}: record index {i} (0-based)"


def _decode(data: bytes, path: Path) -> str:
    """UTF-8 text (a leading BOM dropped); invalid bytes are a DataError naming the line and column."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text: byte 0x{data[e.start]:02x} at byte {column} of the line "
                        f"({e.reason}); save the file as UTF-8") from None


def read_records(path: Path) -> Records:
    """Records of a ``.json`` file (a JSON list of objects) or a ``.jsonl`` file (one object per line)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .json or .jsonl file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise DataError(f"{path}: unsupported file type {suffix!r} (expected .json or .jsonl)")
    text = _decode(path.read_bytes(), path)
    if suffix == ".jsonl":
        records = _parse_jsonl(text, path)
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            # Some public sets (e.g. JGLUE) are JSON Lines named .json: "Extra data" on line 2 gives them away.
            if e.msg == "Extra data" and _first_line_is_object(text):
                log.info("%s: not a JSON list but JSON Lines; reading it line by line", path)
                records = _parse_jsonl(text, path)
            else:
                raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        records = records if isinstance(records, Records) else Records(records)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{locate(records, i, str(path))}: expected an object, got {type(rec).__name__}")
    return records


def _first_line_is_object(text: str) -> bool:
    first = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _parse_jsonl(text: str, path: Path) -> Records:
    # Lines end at "\n" only (an editor's lines): a record may hold U+2028 and other characters that
    # str.splitlines would also split at.
    records = Records(lines=[])
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        records.lines.append(lineno)
    return records


def load_source(src: SourceConfig, cfg: RunConfig) -> Records:
    """The records of one source: its local file (``path`` wins) or a hub dataset split, then ``limit``."""
    if src.path:
        records = read_records(cfg.resolve_path(src.path))
    elif src.hub_dataset:
        import datasets

        try:
            ds = datasets.load_dataset(src.hub_dataset, split=src.split)
        except Exception as e:  # the hub raises many types (connection, missing split, offline mode)
            raise DataError(f"{src.hub_dataset} (split {src.split}): could not load dataset: {e}") from e
        records = Records(dict(r) for r in ds)
    else:
        raise DataError(f"source {src.name or '(unnamed)'}: set path or hub_dataset")
    if src.limit is not None:
        records = records.head(src.limit)
    return records


def data_sources(cfg: RunConfig) -> list[tuple[str, SourceConfig]]:
    """(key, SourceConfig) of every input a run reads: the sources by name, ``validation``,
    ``decontaminate_against[j]``."""
    out = [(s.name, s) for s in cfg.data.sources]
    if cfg.data.validation is not None:
        out.append(("validation", cfg.data.validation))
    out += [(f"decontaminate_against[{j}]", s) for j, s in enumerate(cfg.data.decontaminate_against)]
    return out


def data_files(cfg: RunConfig) -> dict[str, dict]:
    """key → {"path", "sha256"} of each local input file (sha256 None when the file is missing: the data
    loader then reports it), or {"hub_dataset", "split"}: what a checkpoint and the weights file record, and a
    resume checks."""
    files = {}
    for key, src in data_sources(cfg):
        if src.path:
            path = cfg.resolve_path(src.path)
            files[key] = {"path": str(src.path), "sha256": file_sha256(path) if path.is_file() else None}
        else:
            files[key] = {"hub_dataset": src.hub_dataset, "split": src.split}
    return files


def _source_label(src: SourceConfig) -> str:
    """The file (or hub id) a source reads, for error messages."""
    return src.path if src.path else f"{src.hub_dataset} (split {src.split})"


# ---------------------------------------------------------------------------------------------------------
# Formats.


def _conversation_key(record: dict) -> str | None:
    for key in CONVERSATION_KEYS:
        if isinstance(record.get(key), list):
            return key
    return None


def detect_format(record: dict, where: str = "record index 0 (0-based)") -> str:
    """``alpaca``, ``conversations`` or ``text``, from the fields of one record."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if "instruction" in record and "output" in record:
        return "alpaca"
    if _conversation_key(record) is not None:
        return "conversations"
    if "text" in record:
        return "text"
    raise DataError(
        f"{where}: cannot detect the format from fields {sorted(record)} (expected instruction/output, "
        f"items/conversations/messages, or text; or set the source's format)"
    )


def _turn_role_content(turn: dict) -> tuple[Any, Any]:
    if "from" in turn or "value" in turn:
        return turn.get("from"), turn.get("value")
    return turn.get("role"), turn.get("content")


def check_record(record: Any, fmt: str, where: str) -> None:
    """Raise DataError ``"<where>: missing field 'output'"`` (etc.) unless ``record`` is a valid ``fmt`` record.
    ``where`` names the file and record, e.g. ``"data/s0.jsonl: record 3"``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if fmt == "alpaca":
        for name in ("instruction", "output"):
            if name not in record:
                raise DataError(f"{where}: missing field {name!r}")
            if not isinstance(record[name], str):
                raise DataError(f"{where}: field {name!r}: expected a string, got {type(record[name]).__name__}")
        if record.get("input") is not None and not isinstance(record["input"], str):
            raise DataError(f"{where}: field 'input': expected a string, got {type(record['input']).__name__}")
    elif fmt == "conversations":
        key = _conversation_key(record)
        if key is None:
            raise DataError(f"{where}: missing field 'items' (or 'conversations' / 'messages'): a list of turns")
        turns = record[key]
        if not turns:
            raise DataError(f"{where}: field {key!r}: no turns")
        has_assistant = False
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise DataError(f"{where}: field {key!r}[{j}]: expected an object, got {type(turn).__name__}")
            role, content = _turn_role_content(turn)
            if role not in ROLES:
                raise DataError(f"{where}: field {key!r}[{j}]: unknown role {role!r} (expected one of {sorted(ROLES)})")
            if not isinstance(content, str):
                raise DataError(f"{where}: field {key!r}[{j}]: missing or non-string content")
            has_assistant |= ROLES[role] == "assistant"
        if not has_assistant:
            # Without an assistant turn nothing carries loss; better said here than counted as a silent drop.
            raise DataError(f"{where}: field {key!r}: no assistant (gpt) turn")
    elif fmt == "text":
        if "text" not in record:
            raise DataError(f"{where}: missing field 'text'")
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: field 'text': expected a string, got {type(record['text']).__name__}")
    else:
        raise DataError(f"{where}: unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def prompt_key(record: dict, fmt: str) -> str:
    """The normalised prompt used for decontamination: lowercase, whitespace collapsed, stripped.
    Alpaca: instruction + "\\n" + input; conversations: the first user turn; text: the text."""
    if fmt == "alpaca":
        return _normalise(record["instruction"] + "\n" + (record.get("input") or ""))
    if fmt == "conversations":
        for m in to_messages(record, fmt):
            if m["role"] == "user":
                return _normalise(m["content"])
        return ""
    if fmt == "text":
        return _normalise(record["text"])
    raise DataError(f"unknown format {fmt!r}")


def to_messages(record: dict, fmt: str) -> list[dict]:
    """``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` for an alpaca or conversations record."""
    if fmt == "alpaca":
        user = record["instruction"]
        if record.get("input"):
            user = user + "\n\n" + record["input"]
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    if fmt == "conversations":
        key = _conversation_key(record)
        if key is None:
            raise DataError("to_messages: record has no 'items', 'conversations' or 'messages' list")
        out = []
        for turn in record[key]:
            role, content = _turn_role_content(turn)
            out.append({"role": ROLES[role], "content": content})
        return out
    raise DataError(f"to_messages: format {fmt!r} has no messages")


# ---------------------------------------------------------------------------------------------------------
# Rendering into (text or ids, carries-loss) segments.

Segment = tuple[str | list[int], bool]
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def _eos_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _plain_segments(record: dict, fmt: str, tokenizer) -> list[Segment]:
    """The documented plain template (module docstring); the eos id closes every response."""
    eos = _eos_ids(tokenizer)
    if fmt == "alpaca":
        prompt = f"### Instruction:\n{record['instruction']}\n\n"
        if record.get("input"):
            prompt += f"### Input:\n{record['input']}\n\n"
        prompt += "### Response:\n"
        return [(prompt, False), (record["output"], True), (eos, True)]
    segments: list[Segment] = []
    previous = None
    for m in to_messages(record, fmt):
        if m["role"] == "system":
            segments.append((f"{m['content']}\n\n", False))
        elif m["role"] == "user":
            segments.append((f"### Instruction:\n{m['content']}\n\n### Response:\n", False))
        else:
            if previous != "user":  # an assistant turn that answers no user turn still gets its header
                segments.append(("### Response:\n", False))
            segments.extend([(m["content"], True), (eos, True)])
        previous = m["role"]
    return segments


def _template_segments(messages: list[dict], tokenizer) -> list[Segment] | None:
    """Segments from the tokenizer's chat template, or None when the template lacks the prefix property."""
    render = tokenizer.apply_chat_template
    segments: list[Segment] = []
    done = ""  # text already split into segments
    try:
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:  # a reply to nothing: templates disagree on what precedes it
                return None
            prompt = render(messages[:i], tokenize=False, add_generation_prompt=True)
            full = render(messages[: i + 1], tokenize=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                return None
            reply = full[len(prompt):]
            # The trailing newline after the end-of-turn token is layout, not something the model must say.
            spoken = reply.rstrip()
            segments += [(prompt[len(done):], False), (spoken, True), (reply[len(spoken):], False)]
            done = full
        whole = render(messages, tokenize=False)
    except Exception as e:  # templates raise on role orders they reject (e.g. a leading assistant turn)
        log.debug("chat template failed: %s", e)
        return None
    if not whole.startswith(done):
        return None
    segments.append((whole[len(done):], False))
    return [s for s in segments if s[0]]


AUTHORS_PREAMBLE = {
    True: "Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n",
    False: "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n",
}
AUTHORS_ROLES = {"system": "###System: ", "user": "###Human: ", "assistant": "###Assistant: "}


def _authors_segments(record: dict, fmt: str, tokenizer) -> list[Segment]:
    """The released code's prompts (``data.prompt: authors``). Alpaca records: the Stanford Alpaca preamble
    (with or without the input), then the plain blocks; loss on the output and eos. Conversations: each turn
    prefixed by ``###System: `` / ``###Human: `` / ``###Assistant: `` with no separator, loss on the whole
    assistant turn (marker included, as the released code labels it) and the eos after it. Their tokenizer call
    also inserts a BOS before each assistant turn of a BOS-adding tokenizer; that quirk is not copied."""
    eos = _eos_ids(tokenizer)
    if fmt == "alpaca":
        has_input = bool(record.get("input"))
        prompt = AUTHORS_PREAMBLE[has_input] + f"### Instruction:\n{record['instruction']}\n\n"
        if has_input:
            prompt += f"### Input:\n{record['input']}\n\n"
        prompt += "### Response:\n"
        return [(prompt, False), (record["output"], True), (eos, True)]
    segments: list[Segment] = []
    for m in to_messages(record, fmt):
        text = AUTHORS_ROLES[m["role"]] + m["content"]
        segments.extend([(text, True), (eos, True)] if m["role"] == "assistant" else [(text, False)])
    return segments


def render_segments(record: dict, fmt: str, tokenizer, prompt: str = "scalebio") -> list[Segment]:
    """The record as ordered segments ``(text or token ids, carries_loss)``, with a leading BOS id if needed.
    ``prompt``: ``scalebio`` (the chat template, else the plain template of the module docstring) or
    ``authors`` (the released code's prompts, ``_authors_segments``)."""
    if fmt == "text":
        segments: list[Segment] = [(record["text"], True), (_eos_ids(tokenizer), True)]
    elif prompt == "authors":
        segments = _authors_segments(record, fmt, tokenizer)
    else:
        segments = None
        if getattr(tokenizer, "chat_template", None):
            segments = _template_segments(to_messages(record, fmt), tokenizer)
            if segments is None:
                _warn_once(f"prefix:{id(tokenizer)}",
                           "the chat template of %s does not render conversations prefix by prefix; "
                           "using the plain template for such records", getattr(tokenizer, "name_or_path", "tokenizer"))
        if segments is None:
            segments = _plain_segments(record, fmt, tokenizer)
    bos, eos = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None)
    first = segments[0][0] if segments else ""
    if bos and bos != eos and tokenizer.bos_token_id is not None and not (isinstance(first, str) and first.startswith(bos)):
        segments.insert(0, ([tokenizer.bos_token_id], False))
    return segments


def _tokenize_segments(batch: Sequence[list[Segment]], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record; all text segments of the batch go through the tokenizer in one call."""
    texts = [seg for segments in batch for seg, _ in segments if isinstance(seg, str)]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    out = []
    for segments in batch:
        ids: list[int] = []
        labels: list[int] = []
        for seg, loss in segments:
            piece = list(next(encoded)) if isinstance(seg, str) else list(seg)
            ids += piece
            labels += piece if loss else [IGNORE_INDEX] * len(piece)
        out.append((ids, labels))
    return out


def _truncate(ids: list[int], labels: list[int], max_length: int,
              keep_eos: int | None = None) -> tuple[list[int], list[int], bool]:
    """Keep the left ``max_length`` tokens. ``keep_eos`` (an eos id; the released code's rule): a truncated
    example still ends in eos, which carries loss when the token it replaces did."""
    if len(ids) <= max_length:
        return ids, labels, False
    if keep_eos is None:
        return ids[:max_length], labels[:max_length], True
    last = keep_eos if labels[max_length - 1] != IGNORE_INDEX else IGNORE_INDEX
    return ids[:max_length - 1] + [keep_eos], labels[:max_length - 1] + [last], True


def tokenize_record(record: dict, fmt: str, tokenizer, max_length: int,
                    prompt: str = "scalebio") -> tuple[list[int], list[int], bool]:
    """(input_ids [T], labels [T] with -100 off the response, truncated) with T <= max_length."""
    ((ids, labels),) = _tokenize_segments([render_segments(record, fmt, tokenizer, prompt)], tokenizer)
    return _truncate(ids, labels, max_length, _kept_eos(tokenizer, prompt))


def _kept_eos(tokenizer, prompt: str) -> int | None:
    return tokenizer.eos_token_id if prompt == "authors" else None


def _has_target(labels: list[int]) -> bool:
    # Position 0 is never predicted (the loss shifts labels left by one), so it does not count.
    return any(x != IGNORE_INDEX for x in labels[1:])


def source_texts(records: Iterable[dict], fmt: str) -> Iterator[str]:
    """Plain-template text of each valid record (no eos), for training a BPE tokenizer on the run's own data.
    Invalid records are skipped here; ``build_datasets`` raises on them with the file and record index."""

    class _NoSpecials:  # the tokenizer does not exist yet: render without eos/bos ids
        eos_token_id = None
        bos_token = None
        chat_template = None

    for i, rec in enumerate(records):
        try:
            check_record(rec, fmt, f"record {i}")
        except DataError:
            # build_datasets reports bad records with their file; a tokenizer can be trained without them.
            continue
        if fmt == "text":
            yield rec["text"]
        else:
            yield "".join(seg for seg, _ in _plain_segments(rec, fmt, _NoSpecials) if isinstance(seg, str))


# ---------------------------------------------------------------------------------------------------------
# Building the tokenised sets of a run.


@dataclass
class Example:
    """One tokenised example: ``input_ids`` [T] and ``labels`` [T] (-100 where no loss)."""

    input_ids: list[int]
    labels: list[int]
    source: int
    """Index of its source in ``cfg.data.sources`` (0 for the validation set)."""


@dataclass
class TokenizedSet:
    """A named set of examples with its counts: records, decontaminated, truncated, dropped_no_response, kept."""

    name: str
    examples: list[Example]
    stats: dict = field(default_factory=dict)


def load_with_format(src: SourceConfig, cfg: RunConfig) -> tuple[list[dict], str]:
    """Records of one source and their format (the configured one, else detected from the first record;
    ``text`` for an empty source). No per-record checks: ``build_datasets`` does those."""
    records = load_source(src, cfg)
    if src.format != "auto":
        return records, src.format
    return records, detect_format(records[0], locate(records, 0, _source_label(src))) if records else "text"


def _load_checked(src: SourceConfig, cfg: RunConfig, field_name: str) -> tuple[list[dict], str]:
    """Records of one source, every one checked against the source's (or detected) format."""
    label = _source_label(src)
    records = load_source(src, cfg)
    if not records:
        raise DataError(f"{field_name}: {label}: empty: no records")
    fmt = src.format if src.format != "auto" else detect_format(records[0], locate(records, 0, label))
    for i, rec in enumerate(records):
        check_record(rec, fmt, locate(records, i, label))
    return records, fmt


def _tokenize_set(records: list[dict], fmt: str, tokenizer, max_length: int, source: int,
                  chunk: int = 512, prompt: str = "scalebio") -> tuple[list[Example], int, int]:
    """(examples, truncated, dropped_no_response); examples whose loss tokens were all cut are dropped."""
    examples, truncated, dropped = [], 0, 0
    for start in range(0, len(records), chunk):
        batch = [render_segments(r, fmt, tokenizer, prompt) for r in records[start:start + chunk]]
        for ids, labels in _tokenize_segments(batch, tokenizer):
            ids, labels, cut = _truncate(ids, labels, max_length, _kept_eos(tokenizer, prompt))
            truncated += cut
            if not _has_target(labels):
                dropped += 1
                continue
            examples.append(Example(ids, labels, source))
    return examples, truncated, dropped


def build_datasets(cfg: RunConfig, tokenizer) -> tuple[list[TokenizedSet], TokenizedSet, dict]:
    """Training sets (config order), the validation set, and the report
    ``{"sources": {name: stats}, "validation": stats, "decontaminated_total": n}``."""
    d = cfg.data
    if d.validation is None:
        raise DataError("data.validation: required")
    max_length = d.max_length

    val_records, val_fmt = _load_checked(d.validation, cfg, "data.validation")
    blocked: set[str] = set()
    if d.decontaminate:
        blocked.update(prompt_key(r, val_fmt) for r in val_records)
        for j, against in enumerate(d.decontaminate_against):
            records, fmt = _load_checked(against, cfg, f"data.decontaminate_against[{j}]")
            blocked.update(prompt_key(r, fmt) for r in records)
        blocked.discard("")  # an empty prompt says nothing about overlap

    val_examples, val_cut, val_dropped = _tokenize_set(val_records, val_fmt, tokenizer, max_length, 0,
                                                       prompt=prompt_style(cfg))
    if not val_examples:
        raise DataError(f"data.validation: {_source_label(d.validation)}: empty after truncation: every example "
                        f"lost its response (data.max_length {max_length})")
    val_stats = {"records": len(val_records), "decontaminated": 0, "truncated": val_cut,
                 "dropped_no_response": val_dropped, "kept": len(val_examples)}
    validation = TokenizedSet(d.validation.name or "validation", val_examples, val_stats)

    sets = []
    for i, src in enumerate(d.sources):
        where = f"data.sources[{i}] ({src.name})"
        label = _source_label(src)
        records, fmt = _load_checked(src, cfg, where)
        kept = [r for r in records if prompt_key(r, fmt) not in blocked] if blocked else records
        if not kept:
            raise DataError(f"{where}: {label}: empty after decontamination: all {len(records)} prompts occur in "
                            f"data.validation or data.decontaminate_against")
        examples, cut, dropped = _tokenize_set(kept, fmt, tokenizer, max_length, i, prompt=prompt_style(cfg))
        if not examples:
            raise DataError(f"{where}: {label}: empty after truncation: every example lost its response "
                            f"(data.max_length {max_length})")
        stats = {"records": len(records), "decontaminated": len(records) - len(kept), "truncated": cut,
                 "dropped_no_response": dropped, "kept": len(examples)}
        log.info("source %s (%s): %s", src.name, fmt, stats)
        sets.append(TokenizedSet(src.name, examples, stats))
    log.info("validation (%s): %s", val_fmt, val_stats)

    report = {
        "sources": {s.name: s.stats for s in sets},
        "validation": val_stats,
        "decontaminated_total": sum(s.stats["decontaminated"] for s in sets),
    }
    return sets, validation, report


# ---------------------------------------------------------------------------------------------------------
# Batching.


def stratified_slots(sizes: Sequence[int], batch_size: int) -> list[int]:
    """Slots per source in a stratified batch: one each, the other ``batch_size - k`` in proportion to
    ``sizes`` by largest remainder (ties to the lower index). Integer arithmetic, so deterministic."""
    k = len(sizes)
    if batch_size < k:
        raise ValueError(f"batch_size {batch_size} < {k} sources: stratified batches need one slot per source")
    extra, total = batch_size - k, sum(sizes)
    slots = [1 + extra * n // total for n in sizes]
    remainders = [extra * n % total for n in sizes]
    for i in sorted(range(k), key=lambda i: (-remainders[i], i))[: batch_size - sum(slots)]:
        slots[i] += 1
    return slots


class BatchSampler:
    """Draws index batches over k sources from a seeded torch.Generator.

    ``stratified``: every batch holds ``stratified_slots(sizes, batch_size)[s]`` examples of source s, grouped
    by source in source order; each source walks its own random permutation without replacement and is
    reshuffled when exhausted. ``pooled`` (the authors' sampling): one random permutation of all pooled
    examples per epoch, walked in order, so a source may be absent from a batch. ``replacement`` (the later
    released code): every example drawn uniformly from the pool, with replacement.
    """

    def __init__(self, sizes: list[int], batch_size: int, mode: str = "stratified", seed: int = 0):
        if mode not in ("stratified", "pooled", "replacement"):
            raise ValueError(f"sampling mode {mode!r} is not stratified, pooled or replacement")
        if not sizes or any(n < 1 for n in sizes):
            raise ValueError(f"every source needs at least one example, got sizes {sizes}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.sizes = list(sizes)
        self.batch_size = batch_size
        self.mode = mode
        self.slots = stratified_slots(self.sizes, batch_size) if mode == "stratified" else None
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.generator = torch.Generator().manual_seed(seed)
        # One walk per source (stratified) or one over the pool (pooled); empty walks are drawn on first use.
        walks = len(self.sizes) if mode == "stratified" else 1
        self.perms: list[torch.Tensor] = [torch.empty(0, dtype=torch.long) for _ in range(walks)]
        self.cursors = [0] * walks

    def _draw(self, walk: int, n: int, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self.cursors[walk] >= len(self.perms[walk]):
                self.perms[walk] = torch.randperm(n, generator=self.generator)
                self.cursors[walk] = 0
            take = self.perms[walk][self.cursors[walk]: self.cursors[walk] + count - len(out)]
            out += take.tolist()
            self.cursors[walk] += len(take)
        return out

    def next_batch(self) -> list[tuple[int, int]]:
        """``batch_size`` pairs (source, index within source)."""
        if self.mode == "stratified":
            return [(s, i) for s, n in enumerate(self.sizes) for i in self._draw(s, n, self.slots[s])]
        if self.mode == "replacement":
            flat = torch.randint(self.offsets[-1], (self.batch_size,), generator=self.generator).tolist()
        else:
            flat = self._draw(0, self.offsets[-1], self.batch_size)
        out = []
        for j in flat:
            s = bisect.bisect_right(self.offsets, j) - 1
            out.append((s, j - self.offsets[s]))
        return out

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "sizes": list(self.sizes),
            "batch_size": self.batch_size,
            "generator": self.generator.get_state(),
            "perms": [p.clone() for p in self.perms],
            "cursors": list(self.cursors),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("mode", "sizes", "batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r}, this sampler {getattr(self, key)!r}")
        self.generator.set_state(state["generator"])
        self.perms = [torch.as_tensor(p, dtype=torch.long).clone() for p in state["perms"]]
        self.cursors = list(state["cursors"])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids`` [B,T], ``attention_mask`` [B,T], ``labels`` [B,T] (-100 on padding),
    ``source`` [B]; all long, T = the longest example."""
    if not examples:
        raise ValueError("collate: no examples")
    if pad_id is None:
        raise ValueError("collate: the tokenizer has no pad token id")
    width = max(len(e.input_ids) for e in examples)
    b = len(examples)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        t = len(e.input_ids)
        input_ids[row, :t] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[row, :t] = 1
        labels[row, :t] = torch.tensor(e.labels, dtype=torch.long)
    source = torch.tensor([e.source for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "source": source}


# ---------------------------------------------------------------------------------------------------------
# One training file whose records may mix formats (`scalebio finetune`), and a rank's micro-batches.


def build_mixed_set(src: SourceConfig, cfg: RunConfig, tokenizer, max_length: int, chunk: int = 512) -> TokenizedSet:
    """Every record of one source, checked and tokenised as ``build_datasets`` does a source, except that with
    ``format: auto`` the format is detected per record: a resampled file mixes sources of different formats
    (alpaca and conversations). Examples keep the file's order, with ``source`` 0; one whose loss tokens were all
    cut is dropped and counted. stats: records, truncated, dropped_no_response, kept. DataError (naming the file
    and the record) for an invalid record, an empty file, or one whose every example lost its response."""
    label = _source_label(src)
    records = load_source(src, cfg)
    if not records:
        raise DataError(f"{label}: empty: no records")
    segments = []
    for i, rec in enumerate(records):
        where = locate(records, i, label)
        fmt = src.format if src.format != "auto" else detect_format(rec, where)
        check_record(rec, fmt, where)
        segments.append(render_segments(rec, fmt, tokenizer))
    examples, truncated, dropped = [], 0, 0
    for start in range(0, len(segments), chunk):
        for ids, labels in _tokenize_segments(segments[start:start + chunk], tokenizer):
            ids, labels, cut = _truncate(ids, labels, max_length)
            truncated += cut
            if not _has_target(labels):
                dropped += 1
                continue
            examples.append(Example(ids, labels, 0))
    if not examples:
        raise DataError(f"{label}: empty after truncation: every example lost its response (max_length {max_length})")
    stats = {"records": len(records), "truncated": truncated, "dropped_no_response": dropped, "kept": len(examples)}
    log.info("%s: %s", label, stats)
    return TokenizedSet(src.name or "train", examples, stats)


def micro_batches(examples: list[Example], micro: int, pad_id: int,
                  device: torch.device | None = None) -> list[dict[str, torch.Tensor]]:
    """``examples`` (a rank's share of a global batch) collated in micro-batches of at most ``micro``, on
    ``device`` (a CUDA device: copied without blocking)."""
    out = [collate(examples[i:i + micro], pad_id) for i in range(0, len(examples), micro)]
    if device is not None and device.type != "cpu":
        out = [{k: v.to(device, non_blocking=True) for k, v in mb.items()} for mb in out]
    return out
