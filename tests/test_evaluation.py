"""scalebio.evaluation: lm-eval's per-token NLL equals a direct computation on the training rendering, training
lowers it, eval.json has its schema, text and YAML tasks run, exact match extracts the final number."""

import copy
import json
import re

import pytest
import torch
from conftest import alpaca_records, write_jsonl

from scalebio import evaluation as ev
from scalebio.data import IGNORE_INDEX, tokenize_record
from scalebio.models import gpt2_bpe_tokenizer

N_RECORDS = 8


@pytest.fixture(scope="module")
def tok():
    return gpt2_bpe_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tok):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _batch(records, tok):
    """Right-padded (input_ids, labels) of the records as training tokenises them."""
    rows = [tokenize_record(r, "alpaca", tok, max_length=1024)[:2] for r in records]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)] = torch.tensor(x), torch.tensor(y)
    return ids, labels


def _direct_nll_per_token(model, records, tok) -> float:
    """Σ response-token cross-entropy / count, the training loss definition, computed with the model."""
    ids, labels = _batch(records, tok)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    target = labels[:, 1:]
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), target.reshape(-1),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
    return (total / (target != IGNORE_INDEX).sum()).item()


def test_response_nll_matches_direct_and_drops_after_memorising(tmp_path, tok, tiny_model):
    records = alpaca_records(N_RECORDS, seed=0)
    data = write_jsonl(tmp_path / "val.jsonl", records)
    task = ev.response_loglik_task("val_resp", data, tokenizer=tok, rendered_dir=tmp_path / "rendered")
    assert task["output_type"] == "loglikelihood"
    assert str(tmp_path) in task["dataset_kwargs"]["data_files"]["test"]  # absolute path

    # The model directory path goes through HFLM(pretrained=dir); the in-memory model through HFLM(model).
    model_dir = tmp_path / "model"
    tiny_model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    before = ev.evaluate(model_dir, None, [task], tmp_path / "before" / "eval.json", batch_size=4)
    nll = before["tasks"]["val_resp"]["nll_per_token"]
    direct = _direct_nll_per_token(tiny_model, records, tok)
    assert nll == pytest.approx(direct, rel=1e-4)
    assert before["tasks"]["val_resp"]["token_perplexity"] == pytest.approx(torch.tensor(direct).exp().item(), rel=1e-3)

    # Schema of eval.json and of the full results beside it.
    saved = json.loads((tmp_path / "before" / "eval.json").read_text())
    assert saved == before
    assert set(saved) == {"tasks", "model", "limit", "lm_eval_version", "n_samples"}
    assert set(saved["tasks"]["val_resp"]) == {"nll_per_token", "token_perplexity", "bits_per_byte"}
    assert saved["n_samples"] == {"val_resp": N_RECORDS}
    assert saved["model"] == str(model_dir)
    full = json.loads((tmp_path / "before" / "eval.full.json").read_text())
    assert "results" in full and "configs" in full and "samples" not in full

    trained = copy.deepcopy(tiny_model).train()
    ids, labels = _batch(records, tok)
    opt = torch.optim.Adam(trained.parameters(), lr=3e-2)
    for _ in range(20):
        opt.zero_grad()
        trained(ids, labels=labels).loss.backward()
        opt.step()
    trained.eval()
    after = ev.evaluate(trained, tok, [task], tmp_path / "after" / "eval.json", limit=N_RECORDS)
    assert after["limit"] == N_RECORDS
    assert after["tasks"]["val_resp"]["nll_per_token"] < 0.8 * nll
    assert after["tasks"]["val_resp"]["nll_per_token"] == pytest.approx(
        _direct_nll_per_token(trained, records, tok), rel=1e-4)


def test_text_task_through_yaml(tmp_path, tok, tiny_model):
    texts = [{"text": " ".join(r["output"] for r in alpaca_records(2, seed=s))} for s in range(3)]
    data = write_jsonl(tmp_path / "text.jsonl", texts)
    task = ev.response_loglik_task("val_text", data, tokenizer=tok, limit=2, rendered_dir=tmp_path / "rendered")
    assert task["output_type"] == "loglikelihood_rolling"
    yaml_path = tmp_path / "tasks" / "val_text.yaml"
    ev.write_task_yaml(task, yaml_path)
    assert (yaml_path.parent / "scalebio_lm_eval.py").is_file()
    assert re.search(r"process_results: !function .?scalebio_lm_eval.process_text_rolling", yaml_path.read_text())

    result = ev.evaluate(tiny_model, tok, [yaml_path], tmp_path / "eval.json")
    row = result["tasks"]["val_text"]
    assert set(row) == {"word_perplexity", "byte_perplexity", "bits_per_byte", "nll_per_token"}
    assert result["n_samples"] == {"val_text": 2}

    # Rolling loglik scores every token of the text given the eos prefix token: check against the model.
    total, count = 0.0, 0
    with torch.no_grad():
        for rec in texts[:2]:
            ids = torch.tensor([[tok.eos_token_id] + tok(rec["text"])["input_ids"]])
            logits = tiny_model(ids).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    assert row["nll_per_token"] == pytest.approx(total / count, rel=1e-4)


def test_extract_answer_needs_the_filter():
    from lm_eval.filters.extraction import RegexFilter

    output = "She has 4 apples and buys 6 more, so she has 10."
    assert ev.extract_answer(output) == "10"
    assert ev.extract_answer("#### 1,234") == "1,234"
    assert ev.normalise_answer("$1,234.") == "1234"
    assert ev.extract_answer("no digits") is None
    # lm-eval's filter configured as exact_match_task configures it selects the same string.
    regex = RegexFilter(regex_pattern=ev.NUMBER_REGEX, group_select=-1)
    assert regex.apply([[output], [" 10"]], [{}, {}]) == [["10"], ["10"]]
    assert " 10" != "10"


def _scripted_lm(answer_for):
    """An lm-eval LM whose generations are scripted from the document (no model needed)."""
    from lm_eval.api.model import LM

    class Scripted(LM):
        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            return [f" Adding them up, the total is {answer_for(r.doc)}." for r in requests]

    return Scripted()


def test_exact_match_task_scores_extracted_number(tmp_path, tok):
    records = [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b:,}"}
               for a, b in [(4, 6), (1200, 34), (7, 8)]]
    data = write_jsonl(tmp_path / "gsm.jsonl", records)
    task = ev.exact_match_task("toy_gsm", data, "question", "answer", limit=3, tokenizer=tok,
                               rendered_dir=tmp_path / "rendered")
    doc = json.loads(open(task["dataset_kwargs"]["data_files"]["test"]).readline())
    assert doc == {"context": "### Instruction:\nWhat is 4 + 6?\n\n### Response:\n", "answer": "10"}

    right = ev.evaluate(_scripted_lm(lambda d: f"{int(d['answer'].replace(',', '')):,}"), None, [task],
                        tmp_path / "right.json")
    assert right["tasks"]["toy_gsm"]["exact_match,extract"] == 1.0
    wrong = ev.evaluate(_scripted_lm(lambda d: "3"), None, [task], tmp_path / "wrong.json")
    assert wrong["tasks"]["toy_gsm"]["exact_match,extract"] == 0.0


def test_instruction_task_needs_tokenizer(tmp_path):
    data = write_jsonl(tmp_path / "val.jsonl", alpaca_records(2, seed=0))
    with pytest.raises(ValueError, match="tokenizer"):
        ev.response_loglik_task("x", data)


def test_plain_response_doc_cuts_at_a_space_within_the_byte_budget():
    rec = {"instruction": "Say hi", "input": "twice", "output": "héllo " * 20}
    doc = ev.plain_response_doc(rec)
    assert doc["prompt"] == "### Instruction:\nSay hi\n\n### Input:\ntwice\n\n### Response:\n"
    assert doc["n_response_bytes"] == len(doc["response"].encode()) <= ev.RESPONSE_BYTES
    assert rec["output"].startswith(doc["response"]) and doc["response"].endswith("héllo")
    conv = {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                              {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}
    doc = ev.plain_response_doc(conv)
    assert doc["prompt"].endswith("Q2\n\n### Response:\n") and "A1" in doc["prompt"] and doc["response"] == "A2"
    assert ev.cut_utf8("日本語", 4) == "日"  # never half a character


@pytest.mark.parametrize("task", ["denoising", "instruction_following"])
def test_experiment_yaml_bits_per_byte_matches_direct(tmp_path, tok, tiny_model, task):
    """The GPT-2 experiment's own task YAML, run through lm-eval, gives Σ log p(response | prompt) / bytes / ln 2
    computed directly with the model, scoring the prompt and the response tokenised separately."""
    import math

    from conftest import REPO

    records = alpaca_records(N_RECORDS, seed=1)
    data = write_jsonl(tmp_path / "test.jsonl", records)
    yaml_path = REPO / "experiments" / "gpt2" / task / "lm_eval" / f"gpt2_{task}_test.yaml"
    cfg = ev.load_task_yaml(yaml_path, data)
    assert cfg["task"] == f"gpt2_{task}_test" and callable(cfg["process_docs"])
    result = ev.evaluate(tiny_model, tok, [cfg], tmp_path / "eval.json", max_length=64)
    got = result["tasks"][cfg["task"]]["bits_per_byte"]
    total_ll, total_bytes = 0.0, 0
    for rec in records:
        doc = ev.plain_response_doc(rec)
        ctx = tok(doc["prompt"], add_special_tokens=False)["input_ids"]
        tgt = tok(doc["response"], add_special_tokens=False)["input_ids"]
        ids = (ctx + tgt)[-65:]  # lm-eval's left cut to the window (+1 for the shift)
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
        positions = range(len(ids) - 1 - len(tgt), len(ids) - 1)
        total_ll += sum(logp[p, ids[p + 1]].item() for p in positions)
        total_bytes += doc["n_response_bytes"]
    assert got == pytest.approx(-total_ll / total_bytes / math.log(2), rel=1e-5)


def test_cli_evaluate_runs_an_experiment_yaml(tmp_path, tok, tiny_model):
    """`scalebio evaluate MODEL --tasks <experiment YAML> --data-file F` writes eval.json with bits per byte."""
    from conftest import REPO

    from scalebio.cli import main

    tiny_model.save_pretrained(str(tmp_path / "model"))
    tok.save_pretrained(str(tmp_path / "model"))
    data = write_jsonl(tmp_path / "test.jsonl", alpaca_records(4, seed=2))
    yaml_path = REPO / "experiments" / "gpt2" / "denoising" / "lm_eval" / "gpt2_denoising_test.yaml"
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(tmp_path / "model"), "--tasks", str(yaml_path), "--data-file", str(data),
                 "--out", str(out), "--max-length", "64"]) == 0
    metrics = json.loads(out.read_text())["tasks"]["gpt2_denoising_test"]
    assert metrics["bits_per_byte"] > 0 and metrics["byte_perplexity"] == pytest.approx(2 ** metrics["bits_per_byte"])


def test_samples_file_aggregates_to_eval_json(tmp_path, tok, tiny_model):
    """eval_samples.jsonl holds the per-document values lm-eval aggregated: Σ nll / Σ n_tokens over the file is
    eval.json's nll_per_token exactly, the mean exact match is its exact_match; eval.json is unchanged."""
    import math

    from scalebio.evaluation.record import read_samples

    records = alpaca_records(N_RECORDS, seed=3)
    task = ev.response_loglik_task("val_resp", write_jsonl(tmp_path / "val.jsonl", records), tokenizer=tok,
                                   rendered_dir=tmp_path / "rendered")
    without = ev.evaluate(tiny_model, tok, [task], tmp_path / "without" / "eval.json")
    out = tmp_path / "with" / "eval.json"
    result = ev.evaluate(tiny_model, tok, [task], out, samples_out=out.with_name("eval_samples.jsonl"))
    assert result == without
    text = out.with_name("eval_samples.jsonl").read_text()
    lines = read_samples(out.with_name("eval_samples.jsonl"))
    assert [line["doc_id"] for line in lines] == list(range(N_RECORDS))
    assert all(set(line) == {"task", "doc_id", "nll", "n_tokens", "n_bytes"} for line in lines)
    docs = [json.loads(d) for d in open(task["dataset_kwargs"]["data_files"]["test"])]
    assert [line["n_tokens"] for line in lines] == [d["n_target_tokens"] for d in docs]
    metrics = result["tasks"]["val_resp"]
    assert sum(line["nll"] for line in lines) / sum(line["n_tokens"] for line in lines) == metrics["nll_per_token"]
    assert sum(line["nll"] for line in lines) / sum(line["n_bytes"] for line in lines) / math.log(2) == \
        pytest.approx(metrics["bits_per_byte"], rel=1e-12)
    ev.evaluate(tiny_model, tok, [task], out, samples_out=out.with_name("eval_samples.jsonl"))
    assert out.with_name("eval_samples.jsonl").read_text() == text  # deterministic

    questions = [{"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"} for a, b in [(4, 6), (7, 8), (1, 2)]]
    em_task = ev.exact_match_task("toy_gsm", write_jsonl(tmp_path / "gsm.jsonl", questions), limit=3, tokenizer=tok,
                                  rendered_dir=tmp_path / "rendered")
    em_out = tmp_path / "em" / "eval.json"
    em = ev.evaluate(_scripted_lm(lambda d: d["answer"] if d["answer"] != "15" else "3"), None, [em_task], em_out,
                     samples_out=em_out.with_name("eval_samples.jsonl"))
    em_lines = read_samples(em_out.with_name("eval_samples.jsonl"))
    assert em_lines == [{"task": "toy_gsm", "doc_id": i, "filter": "extract", "exact_match": v}
                        for i, v in enumerate([1, 0, 1])]
    assert em["tasks"]["toy_gsm"]["exact_match,extract"] == pytest.approx(2 / 3)
