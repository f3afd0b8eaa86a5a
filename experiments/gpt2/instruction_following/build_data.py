"""Build the GPT-2 instruction-following sources: Alpaca (text-davinci-003) vs Alpaca-GPT4 vs Code Alpaca.

    python experiments/gpt2/instruction_following/build_data.py [--shared-data ../shared/data]
        [--out data/gpt2/instruction_following] [--seed 0] [--per-source 1000]
        [--source-sizes alpaca=8000,alpaca_gpt4=1000] [--gpt4-llm-cleaned] [--code-file code_alpaca_2k.json]

method.md §6: the authors' demo reweighted 9,000 Alpaca (text-davinci-003 answers) against 1,000
Alpaca-GPT4 examples, validated on 1,000 GPT-4-style answers, and reported the GPT-4 source winning. A third,
lower-quality source (Code Alpaca: code instructions, short answers) is added. Sources have equal size by
default. Validation and test are the authors' ``scalebio_data_tiny/val.json`` / ``test.json``; their
prompts are removed from every source (the authors' own ``train_alpaca.json`` contains ~325 of them).
"""

from __future__ import annotations

from pathlib import Path

if __name__ == "__main__" and not __package__:  # run by its path: run it as the module it is (scalebio.scripts)
    from scalebio.scripts import run_as_module
    run_as_module(__file__)

from experiments.gpt2 import common  # noqa: E402

TASK = "instruction_following"
VAL_FILE = "scalebio_data_tiny/val.json"
TEST_FILE = "scalebio_data_tiny/test.json"
ALPACA_FILE = "scalebio_data_tiny/train_alpaca.json"
ALPACA_GPT4_FILE = "scalebio_data_tiny/train_gpt4_alpaca.json"
GPT4_LLM_CLEANED_FILE = "scalebio_math_exp_rlhflow_less_oss/train_GPT4-LLM-Cleaned.json"
CODE_FILES = ("code_alpaca_2k.json", "new_codealpaca.json")
SOURCES = ("alpaca", "alpaca_gpt4", "code_alpaca")


def conversations_to_alpaca(records: list[dict], inputs: common.Inputs) -> tuple[list[dict], int]:
    """GPT4-LLM-Cleaned ``{"items": [human, gpt]}`` → Alpaca records.

    The human turn is Alpaca's instruction and input joined by "\\n". Splitting it at a guessed newline would
    be wrong for multi-line instructions, so the split is recovered by looking the turn up in Alpaca 52k;
    unmatched turns (edited by the cleaning) become an instruction with empty input. Either way the
    normalised prompt, and so decontamination, is the same. Returns the records and how many matched.
    """
    split = {}
    for part in common.ALPACA_PARTS:
        for r in inputs.json(part):
            joined = r["instruction"] + "\n" + r["input"] if r["input"] else r["instruction"]
            split.setdefault(joined, (r["instruction"], r["input"]))
    out, matched = [], 0
    for rec in records:
        human, gpt = rec["items"][0], rec["items"][1]
        if (human["from"], gpt["from"]) != ("human", "gpt"):
            raise ValueError(f"{GPT4_LLM_CLEANED_FILE}: expected a human then a gpt turn, got {rec['items']}")
        instruction, inp = split.get(human["value"], (human["value"], ""))
        matched += human["value"] in split
        out.append({"instruction": instruction, "input": inp, "output": gpt["value"]})
    return out, matched


def build(
    shared_data: Path,
    out: Path,
    seed: int = 0,
    per_source: int = 1000,
    source_sizes: dict[str, int] | None = None,
    gpt4_llm_cleaned: bool = False,
    code_file: str = "code_alpaca_2k.json",
    n_val: int | None = None,
    n_test: int | None = None,
) -> dict:
    """Write the instruction-following dataset into ``out`` and return its manifest.

    ``source_sizes`` overrides ``per_source`` for named sources. ``gpt4_llm_cleaned`` adds the 3,000
    GPT4-LLM-Cleaned records to the Alpaca-GPT4 pool (the data_tiny file alone has 1,000).
    """
    sizes = {name: per_source for name in SOURCES}
    for name, n in (source_sizes or {}).items():
        if name not in sizes:
            raise ValueError(f"unknown source {name!r}; sources are {SOURCES}")
        sizes[name] = int(n)
    if code_file not in CODE_FILES:
        raise ValueError(f"--code-file must be one of {CODE_FILES}")

    inputs = common.Inputs(shared_data)
    val, test, test_dropped, banned = common.val_test_alpaca(inputs, VAL_FILE, TEST_FILE, n_val, n_test, seed)

    gpt4_pool = [common.alpaca(r) for r in inputs.json(ALPACA_GPT4_FILE)]
    gpt4_inputs, matched = [ALPACA_GPT4_FILE], None
    if gpt4_llm_cleaned:
        converted, matched = conversations_to_alpaca(inputs.json(GPT4_LLM_CLEANED_FILE), inputs)
        gpt4_pool += converted
        gpt4_inputs.append(GPT4_LLM_CLEANED_FILE)
    pools = {
        "alpaca": ([common.alpaca(r) for r in inputs.json(ALPACA_FILE)], [ALPACA_FILE]),
        "alpaca_gpt4": (gpt4_pool, gpt4_inputs),
        "code_alpaca": ([common.alpaca(r) for r in inputs.json(f"codealpaca/{code_file}")],
                        [f"codealpaca/{code_file}"]),
    }

    files, sources = {}, []
    for name in SOURCES:
        pool, used_inputs = pools[name]
        # Sources may share instructions (Alpaca vs Alpaca-GPT4 answers to the same prompt are the point of
        # the comparison), so duplicates are removed within a source only.
        records, stats = common.take(pool, sizes[name], banned, common.named_rng(seed, "select", name), name)
        files[f"sources/{name}.jsonl"] = records
        sources.append({"name": name, "file": f"sources/{name}.jsonl", "inputs": used_inputs, **stats})
    files["val.jsonl"], files["test.jsonl"] = val, test

    manifest = {
        "task": TASK,
        "params": {"seed": seed, "per_source": per_source, "source_sizes": sizes,
                   "gpt4_llm_cleaned": gpt4_llm_cleaned, "code_file": code_file, "n_val": n_val, "n_test": n_test},
        "format": "alpaca",
        "sources": sources,
        "val": {"file": "val.jsonl", "input": VAL_FILE},
        "test": {"file": "test.jsonl", "input": TEST_FILE, "removed_overlap_with_val": test_dropped},
        "decontamination": {s["name"]: {k: s[k] for k in ("removed_val_test_overlap", "removed_empty_output",
                                                         "removed_duplicate")} for s in sources},
    }
    if matched is not None:
        manifest["gpt4_llm_cleaned_split_recovered_from_alpaca52k"] = matched
    return common.write_dataset(out, files, inputs, manifest)


def parse_sizes(text: str) -> dict[str, int]:
    pairs = [item.split("=") for item in text.split(",") if item]
    return {name.strip(): int(n) for name, n in pairs}


def parser():
    p = common.base_parser(__doc__.splitlines()[0], TASK)
    p.add_argument("--per-source", type=int, default=1000, help="examples per source (default: %(default)s)")
    p.add_argument("--source-sizes", type=parse_sizes, default=None,
                   help="per-source overrides, e.g. alpaca=8000,alpaca_gpt4=1000")
    p.add_argument("--gpt4-llm-cleaned", action="store_true",
                   help="add GPT4-LLM-Cleaned (3,000, converted from conversations) to the Alpaca-GPT4 pool")
    p.add_argument("--code-file", default="code_alpaca_2k.json", choices=CODE_FILES,
                   help="Code Alpaca file under codealpaca/ (default: %(default)s)")
    p.add_argument("--n-val", type=int, default=None, help="subsample validation (default: all 1000)")
    p.add_argument("--n-test", type=int, default=None, help="subsample test (default: all 1000)")
    return p


if __name__ == "__main__":
    common.main(build, parser())
