"""lm-eval task configs built from our data files: records rendered as training renders them into small JSONL
documents (``render_response_doc``, ``render_prompt``, ``plain_response_doc``), and the task dicts that score them
(``response_loglik_task``, ``exact_match_task``)."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

from ..data import DataError, check_record, detect_format, read_records, render_segments, to_messages
from .hooks import (EXACT_MATCH_IGNORE, NUMBER_REGEX, extract_answer, nll_per_token, process_response_loglik,
                    process_text_rolling)
from ..files import write_text


# ---------------------------------------------------------------------------------------------------------
# Rendering records into evaluation documents.


def _segment_text(segment, tokenizer) -> str:
    """A segment as text; id segments (bos, eos) become their token strings, which encode back to those ids."""
    if isinstance(segment, str):
        return segment
    return "".join(tokenizer.convert_ids_to_tokens(list(segment))) if segment else ""


def _n_tokens(segment, tokenizer) -> int:
    if isinstance(segment, str):
        return len(tokenizer(segment, add_special_tokens=False)["input_ids"])
    return len(segment)


def render_response_doc(record: dict, fmt: str, tokenizer, max_length: int | None = None) -> dict | None:
    """``{"context", "target", "n_target_tokens", "n_response_bytes"}`` for one alpaca/conversations record.

    The target is the last run of loss-carrying segments of ``render_segments`` (the last assistant reply and
    its eos / end-of-turn token); ``n_target_tokens`` counts its tokens tokenised segment by segment, as in
    training. Segments after it (layout such as a trailing newline) are dropped.
    """
    segments = render_segments(record, fmt, tokenizer)
    loss_at = [i for i, (_, loss) in enumerate(segments) if loss]
    if not loss_at:
        raise DataError("record has no response to score")
    end = loss_at[-1] + 1
    start = end
    while start > 0 and segments[start - 1][1]:
        start -= 1
    context = "".join(_segment_text(s, tokenizer) for s, _ in segments[:start])
    target = "".join(_segment_text(s, tokenizer) for s, _ in segments[start:end])
    n_target = sum(_n_tokens(s, tokenizer) for s, _ in segments[start:end])
    response = [m for m in to_messages(record, fmt) if m["role"] == "assistant"][-1]["content"]
    n_response_bytes = len(response.encode("utf-8"))
    if max_length is not None:
        # Score what training scores: the left max_length tokens. A target cut short is re-decoded from its
        # first tokens; a document whose prompt alone fills the window has nothing to score (training drops it).
        n_context = sum(_n_tokens(s, tokenizer) for s, _ in segments[:start])
        room = max_length - n_context
        if room <= 0:
            return None
        if n_target > room:
            ids = tokenizer(target, add_special_tokens=False)["input_ids"][:room]
            target = tokenizer.decode(ids)
            n_target = len(tokenizer(target, add_special_tokens=False)["input_ids"])
            n_response_bytes = len(target.encode("utf-8"))
    return {"context": context, "target": target, "n_target_tokens": n_target,
            "n_response_bytes": max(1, n_response_bytes)}


class _NoSpecialTokens:
    """A stand-in tokenizer for rendering a prompt without one: plain template, no bos/eos."""

    eos_token_id = None
    bos_token = None
    chat_template = None


def render_prompt(question: str, tokenizer=None) -> str:
    """The one-turn prompt for ``question`` as training renders it, up to where the response starts (plain
    template without bos when ``tokenizer`` is None)."""
    tok = tokenizer if tokenizer is not None else _NoSpecialTokens()
    segments = render_segments({"instruction": question, "input": "", "output": ""}, "alpaca", tok)
    first_loss = next((i for i, (_, loss) in enumerate(segments) if loss), len(segments))
    return "".join(_segment_text(s, tok) for s, _ in segments[:first_loss])


RESPONSE_BYTES = 64
"""Plain-template YAML tasks score the first this-many UTF-8 bytes of each response (module docstring). A
byte-level BPE gives at most one token per byte, so the response fits any scoring window of 64 tokens or more
(the CPU presets are trained at 64); the prompt is cut from the left when both do not fit."""


def cut_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, at a whole character, and back to the last space when
    that space lies in the second half (so a word is not split)."""
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    cut = raw[:max_bytes].decode("utf-8", errors="ignore")
    space = cut.rfind(" ")
    return cut[:space] if space > len(cut) // 2 else cut


def plain_response_doc(record: dict, max_bytes: int = RESPONSE_BYTES) -> dict:
    """``{"prompt", "response", "n_response_bytes"}``: the plain-template prompt up to the last assistant reply
    (as training renders it for a tokenizer without a chat template, no BOS) and that reply's first bytes."""
    record = {k: record[k] for k in record.keys()}  # datasets hands lazy rows to map/filter
    fmt = detect_format(record)
    check_record(record, fmt, "plain_response_doc")
    if fmt == "text":
        raise DataError("plain_response_doc: a text record has no response (use a loglikelihood_rolling task)")
    segments = render_segments(record, fmt, _NoSpecialTokens())
    loss_at = [i for i, (_, loss) in enumerate(segments) if loss]
    if not loss_at:
        raise DataError("record has no response to score")
    start = loss_at[-1]
    while start > 0 and segments[start - 1][1]:
        start -= 1
    prompt = "".join(seg for seg, _ in segments[:start] if isinstance(seg, str))
    response = cut_utf8([m for m in to_messages(record, fmt) if m["role"] == "assistant"][-1]["content"], max_bytes)
    return {"prompt": prompt, "response": response, "n_response_bytes": max(1, len(response.encode("utf-8")))}


def plain_response_docs(dataset):
    """lm-eval ``process_docs`` hook: a datasets.Dataset of alpaca / conversations records → plain_response_doc
    per record (records whose response is empty are dropped, as training drops them)."""
    dataset = dataset.filter(lambda rec: bool(plain_response_doc(rec)["response"].strip()))
    return dataset.map(plain_response_doc, remove_columns=dataset.column_names)


def _load_records(data_file: Path, fmt: str, limit: int | None) -> tuple[list[dict], str]:
    records = read_records(data_file)
    if not records:
        raise DataError(f"{data_file}: empty: no records")
    if limit is not None:
        records = records[:limit]
    if fmt == "auto":
        fmt = detect_format(records[0], f"{data_file}: record 0")
    for i, rec in enumerate(records):
        check_record(rec, fmt, f"{data_file}: record {i}")
    return records, fmt


def _write_docs(docs: list[dict], name: str, rendered_dir: Path | None, key: str) -> Path:
    """Write docs to ``<rendered_dir>/<name>-<hash>.jsonl`` (content-addressed, so reruns reuse the file)."""
    text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    digest = hashlib.sha256((key + "\0" + text).encode("utf-8")).hexdigest()[:12]
    folder = Path(rendered_dir) if rendered_dir else Path(tempfile.gettempdir()) / "scalebio-eval"
    folder.mkdir(parents=True, exist_ok=True)
    path = (folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{digest}.jsonl").resolve()
    if not path.is_file():
        write_text(path, text)
    return path


def _tokenizer_name(tokenizer) -> str | None:
    return getattr(tokenizer, "name_or_path", None) or (type(tokenizer).__name__ if tokenizer else None)


def _json_task_base(name: str, rendered: Path) -> dict:
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(rendered)}},
        "test_split": "test",
    }


# ---------------------------------------------------------------------------------------------------------
# Task configs.


def response_loglik_task(name: str, data_file: str | Path, fmt: str = "auto", tokenizer=None,
                         limit: int | None = None, rendered_dir: str | Path | None = None,
                         max_length: int | None = None) -> dict:
    """An lm-eval task config scoring the data's responses (or texts) under the model.

    Instruction records (alpaca / conversations; ``tokenizer`` required, since the chat template and eos come
    from it): ``loglikelihood`` of target given context, metrics ``nll_per_token``, ``token_perplexity``,
    ``bits_per_byte`` (module docstring). Text records: ``loglikelihood_rolling`` with word/byte perplexity,
    bits per byte and, with a tokenizer, ``nll_per_token``. The rendered documents go to ``rendered_dir``
    (default: a ``scalebio-eval`` folder in the system temp dir); ``limit`` keeps the first records;
    ``max_length`` scores only the first ``max_length`` tokens of each document, as training does.
    """
    data_file = Path(data_file).resolve()
    records, fmt = _load_records(data_file, fmt, limit)
    metadata = {"version": 1.0, "source_file": str(data_file), "format": fmt, "records": len(records),
                "tokenizer": _tokenizer_name(tokenizer)}
    if fmt == "text":
        docs = [{"text": r["text"]} for r in records]
        metrics = [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ]
        if tokenizer is not None:
            for d in docs:
                # What stock HFLM scores in loglikelihood_rolling: tokenizer(text) with its default specials.
                d["n_tokens"] = len(tokenizer(d["text"])["input_ids"])
            metrics.append({"metric": "nll_per_token", "aggregation": nll_per_token, "higher_is_better": False})
        rendered = _write_docs(docs, name, rendered_dir, f"text|{_tokenizer_name(tokenizer)}")
        return {
            **_json_task_base(name, rendered),
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "process_results": process_text_rolling,
            "metric_list": metrics,
            "metadata": metadata,
        }
    if tokenizer is None:
        raise ValueError(f"response_loglik_task {name!r}: {fmt} records need the tokenizer (its chat template "
                         f"and eos decide the rendered prompt and target)")
    docs = [d for d in (render_response_doc(r, fmt, tokenizer, max_length) for r in records) if d is not None]
    metadata["max_length"] = max_length
    metadata["scored_records"] = len(docs)
    metadata["template"] = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    rendered = _write_docs(docs, name, rendered_dir, f"{fmt}|{_tokenizer_name(tokenizer)}")
    return {
        **_json_task_base(name, rendered),
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{target}}",
        "target_delimiter": "",  # the rendered context already ends where training's response starts
        "process_results": process_response_loglik,
        "metric_list": [
            {"metric": "nll_per_token", "aggregation": nll_per_token, "higher_is_better": False},
            {"metric": "token_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
        "metadata": metadata,
    }


def exact_match_task(name: str, data_file: str | Path, question_field: str = "question",
                     answer_field: str = "answer", answer_regex: str = NUMBER_REGEX, limit: int | None = None,
                     tokenizer=None, max_gen_toks: int = 256, rendered_dir: str | Path | None = None) -> dict:
    """A generation task scored by exact match of the extracted final answer (GSM8K style).

    The prompt is ``question_field`` rendered as a one-turn training prompt (plain template without a
    tokenizer). The reference is the last ``answer_regex`` match in ``answer_field`` (GSM8K's "#### 72" gives
    "72"). The model's output goes through the filter ``extract`` (last regex match, then the first response)
    before ``exact_match`` (ignoring EXACT_MATCH_IGNORE); without it " 10" would not equal "10".
    """
    data_file = Path(data_file).resolve()
    records = read_records(data_file)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise DataError(f"{data_file}: empty: no records")
    docs = []
    for i, rec in enumerate(records):
        for field_name in (question_field, answer_field):
            if not isinstance(rec.get(field_name), (str, int, float)):
                raise DataError(f"{data_file}: record {i}: missing field {field_name!r}")
        answer = extract_answer(str(rec[answer_field]), answer_regex)
        if answer is None:
            raise DataError(f"{data_file}: record {i}: field {answer_field!r}: no match for {answer_regex!r}")
        docs.append({"context": render_prompt(str(rec[question_field]), tokenizer), "answer": answer})
    rendered = _write_docs(docs, name, rendered_dir, f"exact|{answer_regex}|{_tokenizer_name(tokenizer)}")
    return {
        **_json_task_base(name, rendered),
        "output_type": "generate_until",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{answer}}",
        # HFLM adds the eos string to `until`; the instruction header stops a model that runs on.
        "generation_kwargs": {"until": ["### Instruction:"], "do_sample": False, "max_gen_toks": max_gen_toks},
        "filter_list": [{"name": "extract", "filter": [
            {"function": "regex", "regex_pattern": answer_regex, "group_select": -1},
            {"function": "take_first"},
        ]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": False,
                         "regexes_to_ignore": list(EXACT_MATCH_IGNORE)}],
        "metadata": {"version": 1.0, "source_file": str(data_file), "records": len(docs),
                     "answer_regex": answer_regex, "tokenizer": _tokenizer_name(tokenizer)},
    }
