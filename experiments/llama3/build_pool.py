"""Build the reweighting pool of the large-model experiment (method.md §6) from ../shared/data.

    python experiments/llama3/build_pool.py [--per-source 3000] [--seed 0] [--out data/llama3/pool]
        [--control 600] [--no-stand-ins]

Writes, into ``--out`` (atomically: a temporary folder renamed into place):

    sources/<name>.jsonl   up to --per-source records per source, decontaminated, in a seeded random order
                           (so a config's ``limit: N`` takes a random subset)
    val.jsonl              the authors' validation set (1,400, conversations format)
    test.jsonl             the authors' test set (280, conversations format)
    manifest.json          inputs with sha256, per-source counts, what decontamination dropped, output sha256

Sources: the five of the authors' ten that are here (their own 3,000-record samples, conversations format
``items/from/value``, kept as is) and three offline stand-ins (Alpaca text-davinci-003, Code Alpaca for
Magicoder, Chinese Alpaca). A training record is dropped when its normalised prompt (scalebio.data.prompt_key:
first user turn, or instruction + input; lowercased, whitespace collapsed) occurs in val, test, GSM8K test
(question) or MATH test (problem). Everything is a pure function of the input files and ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

from scalebio.data import detect_format, prompt_key, read_records
from scalebio.files import file_sha256

REPO = Path(__file__).resolve().parents[2]

log = logging.getLogger("llama3.build_pool")

MATH_DIR = "scalebio_math_exp_rlhflow_less_oss"
AUTHORS_SOURCES = ["GPT4-LLM-Cleaned", "GPTeacher-General-Instruct", "MathInstruct", "dart-math-uniform",
                   "orca-math-word-problems-200k"]
"""The five of the authors' ten math-experiment sources shipped in ../shared/data (their own samples)."""
MISSING_SOURCES = ["SlimOrca", "ShareGPT_V3_unfiltered_cleaned_split_no_imsorry", "UltraInteract_sft",
                   "WizardLM_evol_instruct_V2_196k", "Magicoder-Evol-Instruct-110K"]
"""The other five: Hugging Face datasets ``pxyyy/<name>`` upstream (data README §1), not reachable offline."""
STAND_INS = {
    "alpaca": "alpaca_52k_parts",           # Stanford Alpaca, text-davinci-003 answers (all 18 parts)
    "codealpaca": "codealpaca/new_codealpaca.json",  # code instructions: a stand-in for Magicoder, not Magicoder
    "alpaca_zh": "alpaca_zh_hikariming",    # Chinese Alpaca, translated and proof-read (4 files)
}
CONTROL_NAME = "control-dot-responses"
"""The control source of ``--control``: the word ``control`` marks it in its name and in the manifest."""
CONTROL_RESPONSE = "."
REASON_SUFFIX = "please reason step by step."
"""473 validation prompts end with this; their key is also taken without it, so the bare question matches."""


def _sha256(path: Path) -> str:
    return file_sha256(path)


def _alpaca(record: dict) -> dict:
    """instruction / input / output only, in that order (Code Alpaca's duplicate ``response`` is dropped; a few
    Chinese records lack ``input``)."""
    return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}


def _keys(records: list[dict]) -> set[str]:
    fmt = detect_format(records[0])
    keys = set()
    for r in records:
        key = prompt_key(r, fmt)
        keys.add(key)
        if key.endswith(REASON_SUFFIX):
            keys.add(key[: -len(REASON_SUFFIX)].strip())
    return keys


def _question_keys(path: Path, field: str) -> set[str]:
    return {prompt_key({"instruction": r[field], "input": "", "output": ""}, "alpaca") for r in read_records(path)}


def _corrupt(record: dict) -> dict:
    """The record with every assistant turn's text replaced by ``CONTROL_RESPONSE`` (conversations format)."""
    items = [dict(turn, value=CONTROL_RESPONSE) if turn["from"] == "gpt" else dict(turn) for turn in record["items"]]
    return {**record, "items": items}


def _source_files(shared: Path, stand_ins: bool = True) -> dict[str, list[Path]]:
    files = {name: [shared / MATH_DIR / f"train_{name}.json"] for name in AUTHORS_SOURCES}
    for name, rel in (STAND_INS.items() if stand_ins else ()):
        p = shared / rel
        files[name] = sorted(p.glob("*.json")) if p.is_dir() else [p]
    return files


def _write_jsonl(path: Path, records: list[dict]) -> str:
    """Write ``records`` as JSONL; returns the file's sha256. Callers write into the pool's temporary folder."""
    # inside a temporary folder that replaces the target whole
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return _sha256(path)


def build(shared_data: str | Path, out: str | Path, seed: int = 0, per_source: int = 3000, control: int = 0,
          stand_ins: bool = True) -> dict:
    """Write the pool into ``out`` (replacing it atomically) and return the manifest. ``control``: records taken
    from each authors' source into the control source (0: no control source)."""
    shared, out = Path(shared_data).resolve(), Path(out)
    if per_source < 1:
        raise ValueError(f"per_source: must be positive, got {per_source}")
    if control < 0:
        raise ValueError(f"control: must be 0 or positive, got {control}")
    inputs: dict[str, str] = {}

    def read(path: Path) -> list[dict]:
        inputs[str(path.relative_to(shared))] = _sha256(path)
        return read_records(path)

    val = read(shared / MATH_DIR / "val.json")
    test = read(shared / MATH_DIR / "test.json")
    held_out = {
        "val": _keys(val),
        "test": _keys(test),
        "gsm8k_test": _question_keys(shared / "gsm8k" / "test.jsonl", "question"),
        "math_test": _question_keys(shared / "math" / "test.jsonl", "problem"),
    }
    for rel in ("gsm8k/test.jsonl", "math/test.jsonl"):
        inputs[rel] = _sha256(shared / rel)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / "sources").mkdir()
        manifest_sources = {}
        control_records: list[tuple[str, dict]] = []  # (prompt key, corrupted record)
        control_from: dict[str, int] = {}
        written_keys: set[str] = set()
        for name, files in _source_files(shared, stand_ins).items():
            records = [r for f in files for r in read(f)]
            fmt = detect_format(records[0], f"{files[0]}: record 0")
            if fmt == "alpaca":
                records = [_alpaca(r) for r in records]
            dropped = {set_name: 0 for set_name in held_out}
            kept = []
            for r in records:
                key = prompt_key(r, fmt)
                hits = [set_name for set_name, keys in held_out.items() if key in keys]
                for set_name in hits:
                    dropped[set_name] += 1
                if not hits:
                    kept.append(r)
            # One generator per source, seeded by (seed, name): adding a source changes no other file.
            order = list(range(len(kept)))
            random.Random(f"{seed}:{name}").shuffle(order)
            if control and name in AUTHORS_SOURCES:
                if len(order) <= control:
                    raise ValueError(f"{files[0]}: {len(order)} records left after decontamination, not more than "
                                     f"--control {control}")
                control_records += [(prompt_key(kept[i], fmt), _corrupt(kept[i])) for i in order[-control:]]
                control_from[name] = control
                order = order[:-control]
            chosen = [kept[i] for i in order[:per_source]]
            written_keys |= {prompt_key(r, fmt) for r in chosen}
            digest = _write_jsonl(tmp / "sources" / f"{name}.jsonl", chosen)
            manifest_sources[name] = {
                "inputs": [str(f.relative_to(shared)) for f in files], "format": fmt, "records_in": len(records),
                "decontaminated": dropped, "decontaminated_total": len(records) - len(kept),
                "available": len(kept), "written": len(chosen), "sha256": digest,
            }
            log.info("%s: %d records, %d dropped as held-out prompts, %d written", name, len(records),
                     len(records) - len(kept), len(chosen))
        if control:
            # A prompt some source holds twice (or another source holds too) must not reach the control with a
            # real answer beside it: such records are dropped from the control.
            candidates = len(control_records)
            seen: set[str] = set()
            unique = []
            for key, record in control_records:
                if key not in written_keys and key not in seen:
                    seen.add(key)
                    unique.append(record)
            random.Random(f"{seed}:{CONTROL_NAME}").shuffle(unique)
            chosen = unique[:per_source]
            manifest_sources[CONTROL_NAME] = {
                "control": True, "corruption": f"every response replaced by {CONTROL_RESPONSE!r}",
                "drawn_from": control_from, "format": "conversations", "records_in": candidates,
                "decontaminated": "as its sources (drawn after their decontamination)",
                "dropped_prompt_in_another_source": candidates - len(unique), "decontaminated_total": 0,
                "available": len(unique), "written": len(chosen),
                "sha256": _write_jsonl(tmp / "sources" / f"{CONTROL_NAME}.jsonl", chosen),
            }
            log.info("%s: %d records (responses replaced by %r)", CONTROL_NAME, len(chosen), CONTROL_RESPONSE)
        manifest = {
            "format": "scalebio.llama3_pool/1",
            "seed": seed,
            "per_source": per_source,
            "control": {"source": CONTROL_NAME, "per_authors_source": control} if control else None,
            "sources": manifest_sources,
            "missing_sources": {n: f"pxyyy/{n}" for n in MISSING_SOURCES},
            "val": {"input": f"{MATH_DIR}/val.json", "records": len(val), "sha256": _write_jsonl(tmp / "val.jsonl", val)},
            "test": {"input": f"{MATH_DIR}/test.json", "records": len(test),
                     "sha256": _write_jsonl(tmp / "test.jsonl", test)},
            "decontaminated_against": {"val": f"{MATH_DIR}/val.json", "test": f"{MATH_DIR}/test.json",
                                       "gsm8k_test": "gsm8k/test.jsonl (question)",
                                       "math_test": "math/test.jsonl (problem)"},
            "inputs": dict(sorted(inputs.items())),
        }
        # inside a temporary folder that replaces the target whole
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"),
                        help="the shared data folder (default ../shared/data; relative paths start at the repo root)")
    parser.add_argument("--out", default=str(REPO / "data" / "llama3" / "pool"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-source", type=int, default=3000)
    parser.add_argument("--control", type=int, default=0, metavar="N",
                        help=f"add {CONTROL_NAME}: N records of each authors' source with responses replaced by '.'")
    parser.add_argument("--no-stand-ins", dest="stand_ins", action="store_false",
                        help="only the authors' sources (and the control): no Alpaca / Code Alpaca / Chinese Alpaca")
    args = parser.parse_args(argv)
    # Relative paths start at the repo root, wherever the command runs from.
    shared, out = (p if Path(p).is_absolute() else REPO / p for p in (args.shared_data, args.out))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    manifest = build(shared, out, args.seed, args.per_source, args.control, args.stand_ins)
    log.info("wrote %s: %s", out, {n: s["written"] for n, s in manifest["sources"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
