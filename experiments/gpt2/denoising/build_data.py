"""Build the GPT-2 data-denoising sources: clean Alpaca slices with responses replaced by "." at rising rates.

    python experiments/gpt2/denoising/build_data.py [--shared-data ../shared/data] [--out data/gpt2/denoising]
        [--seed 0] [--per-source 1000] [--num-sources 8] [--rates 0,0.2,...] [--n-val N] [--n-test N]

method.md §6: the authors split clean Alpaca into 10 partitions and replaced the response of an example in
partition i with "." at rate 2i/10. Here source i comes from the i-th file of ``alpaca_52k_parts/`` (disjoint
records of Stanford Alpaca 52k), and exactly round(r_i · n) of its n responses, chosen by the seed, become ".".
The default rates i/(k-1) run from 0.0 (clean) to 1.0 (every response "."), so the expected learned weight
falls monotonically with the rate. Validation and test are the authors' ``scalebio_data_tiny/val.json`` and
``test.json`` (Alpaca instructions, GPT-4-style answers); their prompts are removed from every source.
"""

from __future__ import annotations

from pathlib import Path

if __name__ == "__main__" and not __package__:  # run by its path: run it as the module it is (scalebio.scripts)
    from scalebio.scripts import run_as_module
    run_as_module(__file__)

from experiments.gpt2 import common  # noqa: E402

TASK = "denoising"
CORRUPTED_OUTPUT = "."
VAL_FILE = "scalebio_data_tiny/val.json"
TEST_FILE = "scalebio_data_tiny/test.json"



def default_rates(num_sources: int) -> list[float]:
    """i/(k-1), i = 0..k-1: evenly spaced from 0.0 to 1.0 inclusive."""
    if num_sources < 2:
        raise ValueError("need at least 2 sources to span noise rates 0.0 to 1.0")
    return [i / (num_sources - 1) for i in range(num_sources)]


def source_name(rate: float) -> str:
    return f"noise_{rate:.2f}"


def build(
    shared_data: Path,
    out: Path,
    seed: int = 0,
    per_source: int = 1000,
    num_sources: int = 8,
    rates: list[float] | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
) -> dict:
    """Write the denoising dataset into ``out`` and return its manifest.

    ``rates`` (one per source, in [0, 1]) overrides the default i/(num_sources-1) spacing and sets the number
    of sources. ``n_val`` / ``n_test``: subsample the authors' 1,000-record val/test (None = all).
    """
    rates = default_rates(num_sources) if rates is None else [float(r) for r in rates]
    if not all(0.0 <= r <= 1.0 for r in rates):
        raise ValueError(f"noise rates must lie in [0, 1]: {rates}")
    names = [source_name(r) for r in rates]
    if len(set(names)) != len(names):
        raise ValueError(f"noise rates give duplicate source names: {names}")
    if len(rates) > len(common.ALPACA_PARTS):
        raise ValueError(f"at most {len(common.ALPACA_PARTS)} sources (one per Alpaca part file), "
                         f"asked for {len(rates)}")

    inputs = common.Inputs(shared_data)
    val, test, test_dropped, banned = common.val_test_alpaca(inputs, VAL_FILE, TEST_FILE, n_val, n_test, seed)

    files, sources, used = {}, [], set()
    for part, rate, name in zip(common.ALPACA_PARTS, rates, names):
        pool = [common.alpaca(r) for r in inputs.json(part)]
        records, stats = common.take(pool, per_source, banned, common.named_rng(seed, "select", name), name, used)
        used.update(common.prompt_key(r) for r in records)
        n_corrupt = round(rate * len(records))
        for i in common.named_rng(seed, "corrupt", name).sample(range(len(records)), n_corrupt):
            records[i] = {**records[i], "output": CORRUPTED_OUTPUT}
        files[f"sources/{name}.jsonl"] = records
        sources.append({"name": name, "file": f"sources/{name}.jsonl", "input": part, "noise_rate": rate,
                        "corrupted": n_corrupt, **stats})
    files["val.jsonl"], files["test.jsonl"] = val, test

    manifest = {
        "task": TASK,
        "params": {"seed": seed, "per_source": per_source, "num_sources": len(rates), "noise_rates": rates,
                   "corrupted_output": CORRUPTED_OUTPUT, "n_val": n_val, "n_test": n_test},
        "format": "alpaca",
        "sources": sources,
        "val": {"file": "val.jsonl", "input": VAL_FILE},
        "test": {"file": "test.jsonl", "input": TEST_FILE, "removed_overlap_with_val": test_dropped},
        "decontamination": {s["name"]: {k: s[k] for k in ("removed_val_test_overlap", "removed_empty_output",
                                                         "removed_duplicate")} for s in sources},
    }
    return common.write_dataset(out, files, inputs, manifest)


def parser():
    p = common.base_parser(__doc__.splitlines()[0], TASK)
    p.add_argument("--per-source", type=int, default=1000, help="examples per source (default: %(default)s)")
    p.add_argument("--num-sources", type=int, default=8, help="sources, rates i/(k-1) (default: %(default)s)")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=None,
                   help="comma-separated noise rates, one per source (overrides --num-sources)")
    p.add_argument("--n-val", type=int, default=None, help="subsample validation (default: all 1000)")
    p.add_argument("--n-test", type=int, default=None, help="subsample test (default: all 1000)")
    return p


if __name__ == "__main__":
    common.main(build, parser())
