"""lm-eval tasks built from our own data files, and a wrapper around ``lm_eval.simple_evaluate`` that writes a
compact ``eval.json``.

Tasks are data (lm-eval task configs). ``response_loglik_task`` renders every record exactly as
``scalebio.data`` renders it for training (chat template when the tokenizer has a usable one, else the plain
template; BOS and eos as in training) into a small JSONL file ``{"context", "target", "n_target_tokens",
"n_response_bytes"}`` that the task reads, so the prompt a model is scored on is the prompt it was trained on,
whatever the tokenizer. ``write_task_yaml`` saves the same task for ``lm_eval --include_path``.

Metrics of a response task (``output_type: loglikelihood``; ``ll_i`` = log p(target_i | context_i) in nats,
``n_i`` = its number of target tokens, ``b_i`` = UTF-8 bytes of the response text without eos):

* ``nll_per_token`` = -Σ ll_i / Σ n_i: the mean cross-entropy per response token over the whole set, the same
  token-weighted average as the training loss on the validation set (response tokens and the eos / end-of-turn
  token that closes the response).
* ``token_perplexity`` = exp(nll_per_token).
* ``bits_per_byte`` = -Σ ll_i / Σ b_i / ln 2: tokenizer-independent, to compare models with different
  vocabularies.

lm-eval's own ``perplexity`` for loglikelihood tasks is exp(-mean_i ll_i), a per-document quantity that grows
with response length; it is not reported.

Text records (``{"text"}``) use ``output_type: loglikelihood_rolling`` (rolling windows, so texts longer than
the context window are scored in full): lm-eval's ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``
and, given a tokenizer, ``nll_per_token`` = -Σ ll_i / Σ n_i with n_i = len(tokenizer(text)) — every text token,
the first conditioned on the model's prefix token (eos/bos). This differs from the training loss on text, which
does not predict the first token and adds an eos.

Tokenisation of the response. Stock lm-eval encodes ``context + continuation`` as one string and moves the
trailing whitespace of the context into the continuation, so with our templates (which end in "\\n") the
newline token would be scored too. ``evaluate`` therefore wraps in-memory and local models in
``ScalebioHFLM``, which encodes the context and the target of our tasks separately, as training does (other
tasks, e.g. built-in benchmarks, keep lm-eval's encoding). A YAML task run with the stock ``--model hf``
reports an nll_per_token that includes log p("\\n" | prompt) while still dividing by the response token count.

Multi-turn conversations: the context is everything before the last assistant reply, and the target is that
reply (earlier replies are context, not scored).

Plain-template YAML tasks (``plain_response_docs`` / ``process_plain_response``, used by the task YAMLs kept in
``experiments/gpt2/<task>/lm_eval/``): tokenizer-free, so one YAML serves every model. Each alpaca /
conversations record becomes ``{"prompt", "response", "n_response_bytes"}``: the plain template up to the last
assistant reply (no BOS), and that reply cut to its first RESPONSE_BYTES (64) UTF-8 bytes (at a space when one
is in the second half), so that the scored response fits the short windows our small models are trained on
(lm-eval cuts the prompt from the left when prompt and response together do not fit). The
metric is ``bits_per_byte`` of that response (and ``byte_perplexity``); no eos is scored.

Generation tasks (``exact_match_task``): the question is rendered as a one-turn prompt with the same template,
the model generates greedily, a regex filter keeps the last number of its output and ``exact_match`` compares
it with the last number of the reference answer, ignoring "," "$" and a trailing ".".
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from .data import DataError, check_record, detect_format, read_records, render_segments, to_messages

log = logging.getLogger(__name__)

NUMBER_REGEX = r"-?\$?\d[\d,]*(?:\.\d+)?"
"""A number as written in answers: optional sign and "$", thousands separators, decimals."""

EXACT_MATCH_IGNORE = [",", r"\$", r"\.$"]
"""Removed from prediction and reference before comparing (lm-eval's ``regexes_to_ignore``)."""

YAML_HELPER_MODULE = "scalebio_lm_eval"
"""The Python file that ``write_task_yaml`` puts beside a YAML; its ``!function`` hooks import from here."""


# ---------------------------------------------------------------------------------------------------------
# Metric hooks (module-level so YAML tasks can name them with !function).


def process_response_loglik(doc: dict, results: Sequence[tuple[float, bool]]) -> dict:
    """Per-document items for the response metrics: (loglik, count) pairs aggregated as weighted means."""
    ll, _is_greedy = results[0]
    n_tokens, n_bytes = int(doc["n_target_tokens"]), int(doc["n_response_bytes"])
    return {"nll_per_token": (ll, n_tokens), "token_perplexity": (ll, n_tokens), "bits_per_byte": (ll, n_bytes)}


def process_text_rolling(doc: dict, results: Sequence[float]) -> dict:
    """lm-eval's rolling metrics (same word and byte counts) plus nll_per_token when the doc has n_tokens."""
    (ll,) = results
    text = doc["text"]
    n_words, n_bytes = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
    out = {"word_perplexity": (ll, n_words), "byte_perplexity": (ll, n_bytes), "bits_per_byte": (ll, n_bytes)}
    if "n_tokens" in doc:
        out["nll_per_token"] = (ll, int(doc["n_tokens"]))
    return out


def process_plain_response(doc: dict, results: Sequence[tuple[float, bool]]) -> dict:
    """Per-document items of a plain-template response task: (loglik, response bytes)."""
    ll, _is_greedy = results[0]
    n_bytes = int(doc["n_response_bytes"])
    return {"bits_per_byte": (ll, n_bytes), "byte_perplexity": (ll, n_bytes)}


def nll_per_token(items: Iterable[tuple[float, int]]) -> float:
    """-Σ loglik / Σ tokens over (loglik, n_tokens) items: the token-weighted mean NLL in nats."""
    items = list(items)
    return -sum(ll for ll, _ in items) / sum(n for _, n in items)


def extract_answer(text: str, answer_regex: str = NUMBER_REGEX) -> str | None:
    """The last match of ``answer_regex`` in ``text`` (first non-empty group if it has groups), stripped;
    None when nothing matches. The same selection as lm-eval's regex filter with ``group_select: -1``."""
    matches = re.findall(answer_regex, text)
    if not matches:
        return None
    match = matches[-1]
    if isinstance(match, tuple):
        match = next((m for m in match if m), "")
    return match.strip() or None


def normalise_answer(answer: str) -> str:
    """``answer`` with EXACT_MATCH_IGNORE removed, as lm-eval's exact_match compares it."""
    for pattern in EXACT_MATCH_IGNORE:
        answer = re.sub(pattern, "", answer)
    return answer.strip()


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
        _atomic_write(path, text)
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


# ---------------------------------------------------------------------------------------------------------
# YAML.


class _Function(str):
    """A hook written as ``!function scalebio_lm_eval.<name>``."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))


class _TaskLoader(yaml.SafeLoader):
    """Reads our task YAMLs without importing their hooks (for the task name)."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _to_yaml_value(value):
    if callable(value):
        if getattr(value, "__module__", None) != __name__:
            raise ValueError(f"write_task_yaml: cannot write the callable {value!r} (only scalebio.evaluation hooks)")
        return _Function(f"{YAML_HELPER_MODULE}.{value.__name__}")
    if isinstance(value, dict):
        return {k: _to_yaml_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_yaml_value(v) for v in value]
    return value


def write_task_yaml(task: dict, path: Path) -> None:
    """Save ``task`` as ``path`` for ``lm_eval --include_path <folder> --tasks <name>``.

    Beside it go the rendered documents (``<stem>.jsonl``, referenced by absolute path because lm-eval resolves
    relative ``data_files`` against the working directory) and ``scalebio_lm_eval.py``, which re-exports the
    metric hooks named with ``!function`` (lm-eval imports it from the YAML's folder; scalebio must be
    installed where lm_eval runs).
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    task = copy.deepcopy(task)
    source = Path(task["dataset_kwargs"]["data_files"]["test"])
    data_copy = path.with_suffix(".jsonl")
    if source.resolve() != data_copy:
        shutil.copyfile(source, data_copy)
    task["dataset_kwargs"]["data_files"]["test"] = str(data_copy)
    header = (f"# lm_eval --model hf --model_args pretrained=MODEL_DIR,dtype=float32 "
              f"--include_path {path.parent} --tasks {task['task']}\n"
              f"# Written by scalebio.evaluation.write_task_yaml; scalebio.evaluation's docstring defines the metrics.\n")
    _atomic_write(path, header + yaml.dump(_to_yaml_value(task), Dumper=_TaskDumper, sort_keys=False,
                                           allow_unicode=True))
    hooks = sorted({v.split(".", 1)[1] for v in _functions_in(_to_yaml_value(task))})
    helper = path.parent / f"{YAML_HELPER_MODULE}.py"
    existing = set(re.findall(r"^from scalebio\.evaluation import (\w+)", helper.read_text(), re.M)) \
        if helper.is_file() else set()
    names = sorted(existing | set(hooks))
    _atomic_write(helper, '"""lm-eval !function hooks of the task YAMLs in this folder (written by '
                          'scalebio.evaluation.write_task_yaml)."""\n'
                  + "".join(f"from scalebio.evaluation import {n}  # noqa: F401\n" for n in names))


def _functions_in(value) -> list[str]:
    if isinstance(value, _Function):
        return [str(value)]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _functions_in(v)]
    if isinstance(value, list):
        return [f for v in value for f in _functions_in(v)]
    return []


def load_task_yaml(path: str | Path, data_file: str | Path | None = None) -> dict:
    """A task YAML as lm-eval reads it (``include`` merged, ``!function`` hooks imported), as a task dict;
    ``data_file`` replaces its test file (the YAMLs name files relative to the repository root)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task YAML {path} not found")
    task = load_yaml(path)
    if "task" not in task:
        raise ValueError(f"{path}: not an lm-eval task YAML (no 'task' key)")
    if data_file is not None:
        data_file = Path(data_file).resolve()
        if not data_file.is_file():
            raise FileNotFoundError(f"{path}: test file {data_file} not found")
        task.setdefault("dataset_kwargs", {})["data_files"] = {task.get("test_split", "test"): str(data_file)}
    return task


def _yaml_task_name(path: Path) -> str:
    cfg = yaml.load(Path(path).read_text(), Loader=_TaskLoader)
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise ValueError(f"{path}: not an lm-eval task YAML (no 'task' key)")
    return cfg["task"]


# ---------------------------------------------------------------------------------------------------------
# Running.


def _scalebio_lm_class():
    from lm_eval.models.huggingface import HFLM

    class ScalebioHFLM(HFLM):
        """HFLM that encodes the context and target of our response tasks (docs with ``n_response_bytes``)
        separately, as training tokenises prompt and response (no whitespace moved across the boundary, no BOS
        added: the rendered context already has it when training does). Other tasks use lm-eval's encoding."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            new_reqs = []
            for req in requests:
                context, continuation = req.args
                doc = getattr(req, "doc", None)
                if isinstance(doc, dict) and "n_response_bytes" in doc and context:
                    context_enc = self.tok_encode(context, add_special_tokens=False)
                    continuation_enc = self.tok_encode(continuation, add_special_tokens=False)
                elif context:
                    context_enc, continuation_enc = self._encode_pair(context, continuation)
                else:  # lm-eval's empty-context rule: condition on the prefix token
                    continuation_enc = self.tok_encode(continuation, add_special_tokens=False)
                    if self.prefix_token_id != continuation_enc[0]:
                        context_enc = [self.prefix_token_id]
                    else:
                        context_enc, continuation_enc = continuation_enc[:1], continuation_enc[1:]
                if len(continuation_enc) > self.max_length:
                    raise ValueError(f"{getattr(req, 'task_name', 'task')}: a target of {len(continuation_enc)} tokens "
                                     f"does not fit the scoring window of {self.max_length} (evaluate's max_length)")
                new_reqs.append(((context, continuation), context_enc, continuation_enc))
            return self._loglikelihood_tokens(new_reqs, disable_tqdm=disable_tqdm)

    return ScalebioHFLM


def load_model(model: str, gguf_file: str | None = None, device: str | None = None):
    """(model, tokenizer) for evaluation from a directory or hub id (or a GGUF file inside it): bf16 on a GPU,
    fp32 on the CPU, in eval mode on ``device`` (default cuda when available); a missing pad token is eos."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **kwargs).to(device).eval()
    return lm, tokenizer


def _make_lm(model_dir_or_model, tokenizer, batch_size: int, device: str, max_length: int | None = None):
    import torch
    from lm_eval.api.model import LM

    if isinstance(model_dir_or_model, LM):
        return model_dir_or_model, type(model_dir_or_model).__name__
    cls = _scalebio_lm_class()
    if isinstance(model_dir_or_model, torch.nn.Module):
        # An in-memory model stays where it is (HFLM ignores `device` for it).
        name = getattr(model_dir_or_model, "name_or_path", None) or type(model_dir_or_model).__name__
        return cls(pretrained=model_dir_or_model, tokenizer=tokenizer, batch_size=batch_size,
                   max_length=max_length), str(name)
    model_dir = str(model_dir_or_model)
    return cls(pretrained=model_dir, tokenizer=tokenizer if tokenizer is not None else model_dir,
               batch_size=batch_size, device=device, dtype="float32", max_length=max_length), model_dir


def _task_manager(tasks: list[dict | str | Path]):
    """Built-in tasks are indexed only when a task is given by name (that costs seconds and needs a network
    to run them); YAML paths are found through include_path."""
    from lm_eval.tasks import TaskManager

    specs: list[Any] = []
    include: list[str] = []
    by_name = False
    for t in tasks:
        if isinstance(t, dict):
            specs.append(t)
        elif isinstance(t, Path) or (isinstance(t, str) and t.endswith((".yaml", ".yml"))):
            path = Path(t).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"task YAML {path} not found")
            include.append(str(path.parent))
            specs.append(_yaml_task_name(path))
        else:
            by_name = True
            specs.append(t)
    include = sorted(set(include))
    manager = TaskManager(include_path=include or None, include_defaults=by_name)
    return manager, specs


def _metric_key(key: str) -> str:
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else key


def compact_results(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results: ",none" filter suffixes dropped (other filters stay,
    e.g. ``exact_match,extract``), stderr kept only when numeric."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            # sample_len repeats n_samples; stderr is "N/A" for weighted aggregations.
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            row[_metric_key(key)] = float(value)
        out[task] = row
    return out


def evaluate(model_dir_or_model, tokenizer, tasks: list[dict | str | Path], out: Path, limit: int | None = None,
             batch_size: int = 8, device: str = "cpu", bootstrap_iters: int = 1000,
             max_length: int | None = None) -> dict:
    """Run ``lm_eval.simple_evaluate`` and write ``out`` (compact eval.json) and ``out.with_suffix(".full.json")``
    (lm-eval's results without per-sample logs). Returns the compact dict.

    ``model_dir_or_model``: a local model directory, an in-memory ``PreTrainedModel`` (with ``tokenizer``), or
    an ``lm_eval`` ``LM`` object. ``tasks``: task dicts from this module, task YAML paths, or built-in task
    names (mmlu, arc_challenge, hellaswag, truthfulqa_mc2, gsm8k; they download their data). ``limit``: at
    most this many documents per task. ``bootstrap_iters`` only matters for built-in metrics lm-eval
    bootstraps; the weighted metrics of our tasks have no stderr. ``max_length``: the model's context window for
    scoring (lm-eval's HFLM ``max_length``; default the model's own), e.g. the length a small model was trained at.
    """
    import lm_eval

    if not tasks:
        raise ValueError("evaluate: no tasks")
    lm, model_name = _make_lm(model_dir_or_model, tokenizer, batch_size, device, max_length)
    manager, specs = _task_manager(list(tasks))
    results = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit,
                                      log_samples=False, bootstrap_iters=bootstrap_iters)
    if results is None:  # not rank 0
        return {}
    results.pop("samples", None)
    n_samples = {task: counts.get("effective", counts.get("original"))
                 for task, counts in results.get("n-samples", {}).items()}
    compact = {
        "tasks": compact_results(results),
        "model": model_name,
        "limit": limit,
        "lm_eval_version": lm_eval.__version__,
        "n_samples": n_samples,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from lm_eval.utils import handle_non_serializable

    _atomic_write(out.with_suffix(".full.json"), json.dumps(results, indent=2, default=handle_non_serializable))
    _atomic_write(out, json.dumps(compact, indent=2))
    for task, row in compact["tasks"].items():
        log.info("%s: %s", task, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
    return compact


def _atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "NUMBER_REGEX", "compact_results", "evaluate", "exact_match_task", "extract_answer", "normalise_answer",
    "nll_per_token", "process_response_loglik", "process_text_rolling", "render_prompt", "render_response_doc",
    "response_loglik_task", "write_task_yaml",
]
