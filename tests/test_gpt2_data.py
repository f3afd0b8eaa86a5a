"""The GPT-2 data builders (experiments/gpt2/*/build_data.py) at tiny sizes: counts, determinism, no leakage."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_builder(task: str):
    path = REPO / "experiments" / "gpt2" / task / "build_data.py"
    spec = importlib.util.spec_from_file_location(f"gpt2_build_data_{task}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


denoising = load_builder("denoising")
multilingual = load_builder("multilingual")
instruction_following = load_builder("instruction_following")
common = denoising.common


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def file_hashes(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.jsonl"))}


def check_manifest(out: Path, manifest: dict) -> None:
    """Every data file is listed with its true record count and sha256, and nothing else was written."""
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert set(manifest["files"]) == set(file_hashes(out))
    for rel, entry in manifest["files"].items():
        assert len(read_jsonl(out / rel)) == entry["records"]
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == entry["sha256"]
    assert manifest["inputs"] and all(len(h) == 64 for h in manifest["inputs"].values())
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def check_no_leakage(out: Path, manifest: dict) -> None:
    held = [common.prompt_key(r) for name in ("val.jsonl", "test.jsonl") for r in read_jsonl(out / name)]
    assert len(held) == len(set(held)), "val and test overlap (or repeat)"
    for source in manifest["sources"]:
        train = {common.prompt_key(r) for r in read_jsonl(out / source["file"])}
        assert not train & set(held), source["name"]


def check_determinism(build, tmp_path: Path, shared_data: Path, **kwargs) -> dict:
    first = build(shared_data, tmp_path / "a", seed=0, **kwargs)
    build(shared_data, tmp_path / "b", seed=0, **kwargs)
    build(shared_data, tmp_path / "c", seed=1, **kwargs)
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert file_hashes(tmp_path / "a") != file_hashes(tmp_path / "c")
    check_manifest(tmp_path / "a", first)
    check_no_leakage(tmp_path / "a", first)
    return first


def test_denoising(tmp_path, shared_data):
    n = 30
    manifest = check_determinism(denoising.build, tmp_path, shared_data, per_source=n, num_sources=4,
                                 n_val=20, n_test=25)
    out = tmp_path / "a"
    names = ["noise_0.00", "noise_0.33", "noise_0.67", "noise_1.00"]
    assert [s["name"] for s in manifest["sources"]] == names
    assert len(read_jsonl(out / "val.jsonl")) == 20 and len(read_jsonl(out / "test.jsonl")) == 25
    # Decontamination is against the full authors' val/test, not only the subsample written out.
    full = {common.prompt_key(r) for f in ("val.json", "test.json")
            for r in json.loads((shared_data / "scalebio_data_tiny" / f).read_text())}
    for source, rate in zip(manifest["sources"], [0, 1 / 3, 2 / 3, 1]):
        records = read_jsonl(out / source["file"])
        assert len(records) == n and all(set(r) == {"instruction", "input", "output"} for r in records)
        assert sum(r["output"] == "." for r in records) == round(rate * n) == source["corrupted"]
        assert not {common.prompt_key(r) for r in records} & full
    # The clean source is untouched: every record is verbatim from its Alpaca part.
    part = json.loads((shared_data / manifest["sources"][0]["input"]).read_text())
    originals = {json.dumps(common.alpaca(r), sort_keys=True) for r in part}
    assert all(json.dumps(r, sort_keys=True) in originals for r in read_jsonl(out / "sources/noise_0.00.jsonl"))
    # Sources are disjoint in prompts.
    keys = [common.prompt_key(r) for s in manifest["sources"] for r in read_jsonl(out / s["file"])]
    assert len(keys) == len(set(keys))


def test_instruction_following(tmp_path, shared_data):
    manifest = check_determinism(instruction_following.build, tmp_path, shared_data, per_source=20,
                                 source_sizes={"alpaca": 25}, n_val=15, n_test=15)
    out = tmp_path / "a"
    counts = {s["name"]: len(read_jsonl(out / s["file"])) for s in manifest["sources"]}
    assert counts == {"alpaca": 25, "alpaca_gpt4": 20, "code_alpaca": 20}
    assert len(read_jsonl(out / "val.jsonl")) == 15
    # The authors' train_alpaca.json itself contains val/test prompts: they must have been removed.
    assert manifest["decontamination"]["alpaca"]["removed_val_test_overlap"] > 0


def test_instruction_following_conversations(tmp_path, shared_data):
    manifest = instruction_following.build(shared_data, tmp_path / "a", per_source=10, gpt4_llm_cleaned=True,
                                           source_sizes={"alpaca_gpt4": 1500}, n_val=5, n_test=5)
    records = read_jsonl(tmp_path / "a" / "sources/alpaca_gpt4.jsonl")
    assert len(records) == 1500 and all(set(r) == {"instruction", "input", "output"} for r in records)
    # Most converted human turns are found in Alpaca 52k, which recovers their instruction/input split.
    assert manifest["gpt4_llm_cleaned_split_recovered_from_alpaca52k"] > 2000
    check_manifest(tmp_path / "a", manifest)


def test_multilingual(tmp_path, shared_data):
    target = "ja"
    manifest = check_determinism(multilingual.build, tmp_path, shared_data, target=target, per_source=30,
                                 n_val=12, n_test=9)
    out = tmp_path / "a"
    assert [s["name"] for s in manifest["sources"]] == list(multilingual.LANGUAGES)
    sources = {}
    for source in manifest["sources"]:
        records = read_jsonl(out / source["file"])
        assert len(records) == 30 and all(set(r) == {"text"} and r["text"] for r in records)
        sources[source["name"]] = {r["text"] for r in records}
    val, test = read_jsonl(out / "val.jsonl"), read_jsonl(out / "test.jsonl")
    assert (len(val), len(test)) == (12, 9)
    held = {r["text"] for r in val + test}
    assert not held & sources[target]
    # No translation of a held-out sentence appears in any source: follow the NTREX line alignment and the
    # Tatoeba pair alignment (whose English sides repeat across pairs).
    lines = lambda rel: [line.strip() for line in (shared_data / rel).read_text(encoding="utf-8").splitlines()]
    aligned = [dict(zip(multilingual.NTREX, row)) for row in zip(*map(lines, multilingual.NTREX.values()))]
    for lang, pair in multilingual.TATOEBA_PAIR.items():
        aligned += [{"en": e, lang: o} for e, o in zip(lines(f"tatoeba_laser/tatoeba.{pair}-eng.eng"),
                                                       lines(f"tatoeba_laser/tatoeba.{pair}-eng.{pair}"))]
    held_units = [unit for unit in aligned if held & set(unit.values())]
    assert len(held_units) >= len(held)
    held_texts = {text for unit in held_units for text in unit.values()}
    for unit in aligned:
        if held_texts & set(unit.values()):
            assert not any(text in sources[lang] for lang, text in unit.items()), unit


def test_missing_input_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="scalebio_data_tiny/val.json"):
        denoising.build(tmp_path / "empty", tmp_path / "out", per_source=5)
    with pytest.raises(FileNotFoundError, match="ntrex128"):
        multilingual.build(tmp_path / "empty", tmp_path / "out", per_source=5)
    assert not (tmp_path / "out").exists()


def test_failed_build_keeps_previous_output(tmp_path, shared_data):
    out = tmp_path / "out"
    manifest = denoising.build(shared_data, out, per_source=5, num_sources=2, n_val=5, n_test=5)
    with pytest.raises(ValueError, match="only"):
        denoising.build(shared_data, out, per_source=10**6, num_sources=2)
    check_manifest(out, manifest)
