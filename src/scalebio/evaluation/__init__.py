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

Layout: ``tasks`` (rendering records and building task configs), ``hooks`` (the metric and answer functions
those configs and the YAMLs name), ``task_yaml`` (writing and reading task YAMLs), ``models`` (loading a model
and the lm-eval wrapper), ``run`` (``evaluate``), ``record`` (the compact ``eval.json``). Every public name is
importable from ``scalebio.evaluation`` itself, which is also where YAML ``!function`` hooks point.
"""

from .hooks import (EXACT_MATCH_IGNORE, NUMBER_REGEX, extract_answer, nll_per_token, normalise_answer,
                    process_plain_response, process_response_loglik, process_text_rolling)
from .models import load_model
from .record import LOWER_IS_BETTER, PRIMARY_METRICS, compact_results, primary_metric, write_record
from .run import evaluate
from .task_yaml import YAML_HELPER_MODULE, load_task_yaml, write_task_yaml
from .tasks import (RESPONSE_BYTES, cut_utf8, exact_match_task, plain_response_doc, plain_response_docs,
                    render_prompt, render_response_doc, response_loglik_task)

__all__ = [
    "EXACT_MATCH_IGNORE", "LOWER_IS_BETTER", "NUMBER_REGEX", "PRIMARY_METRICS", "RESPONSE_BYTES",
    "YAML_HELPER_MODULE", "compact_results", "cut_utf8", "evaluate", "exact_match_task", "extract_answer",
    "load_model", "load_task_yaml", "nll_per_token", "normalise_answer", "plain_response_doc", "plain_response_docs",
    "primary_metric", "process_plain_response", "process_response_loglik", "process_text_rolling", "render_prompt",
    "render_response_doc", "response_loglik_task", "write_record", "write_task_yaml",
]
