"""Metric hooks and answer extraction: module-level functions that task configs and task YAMLs name
(``!function scalebio.evaluation.<name>``); the metrics are defined in ``scalebio.evaluation``'s docstring."""

from __future__ import annotations

import re
from typing import Iterable, Sequence

NUMBER_REGEX = r"-?\$?\d[\d,]*(?:\.\d+)?"
"""A number as written in answers: optional sign and "$", thousands separators, decimals."""

EXACT_MATCH_IGNORE = [",", r"\$", r"\.$"]
"""Removed from prediction and reference before comparing (lm-eval's ``regexes_to_ignore``)."""


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
