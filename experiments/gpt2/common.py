"""Shared plumbing for the GPT-2 data builders: reading the shared inputs, decontamination, atomic output.

Every builder turns files under ``../shared/data`` into a folder

    sources/<name>.jsonl   one training source per file
    val.jsonl, test.jsonl  the validation set of the bilevel upper level and the held-out test set
    manifest.json          counts and sha256 of every file, the inputs used, the build parameters

Records are Alpaca ``{"instruction", "input", "output"}`` or plain text ``{"text"}``. Output is a pure
function of the inputs and the seed: randomness comes from named ``random.Random`` generators seeded with a
string (``random.Random`` hashes str seeds with SHA-512, so this does not depend on PYTHONHASHSEED).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger("scalebio.gpt2_data")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SHARED_DATA = "../shared/data"
# Stanford Alpaca 52k in its original order, ~3k records per file (the last file has 993).
ALPACA_PARTS = [f"alpaca_52k_parts/alpaca_data-{a}-{b}-en.json" for a, b in [
    (0, 3252), (3252, 6382), (6382, 9407), (9407, 12345), (12345, 15323), (15323, 18280), (18280, 21320),
    (21320, 24319), (24319, 27270), (27270, 30186), (30186, 33190), (33190, 36122), (36122, 39162),
    (39162, 42148), (42148, 45095), (45095, 48066), (48066, 51009), (51009, 52002)]]


# ----------------------------------------------------------------------------------------------- paths


def repo_path(path: str | Path) -> Path:
    """A path given on the command line, relative to the repository root (not the cwd) unless absolute."""
    path = Path(path)
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


class Inputs:
    """Reads files under the shared data folder and remembers each one's sha256 for the manifest."""

    def __init__(self, shared_data: Path):
        self.root = Path(shared_data)
        if not self.root.is_dir():
            raise FileNotFoundError(f"shared data folder not found: {self.root} (pass --shared-data)")
        self.sha256: dict[str, str] = {}

    def path(self, rel: str) -> Path:
        full = self.root / rel
        if not full.is_file():
            raise FileNotFoundError(f"missing input file: {full} (expected under --shared-data {self.root})")
        return full

    def read_bytes(self, rel: str) -> bytes:
        data = self.path(rel).read_bytes()
        self.sha256[rel] = hashlib.sha256(data).hexdigest()
        return data

    def json(self, rel: str):
        return json.loads(self.read_bytes(rel))

    def lines(self, rel: str) -> list[str]:
        """Lines of a plain-text or gzipped text file, without line terminators."""
        data = self.read_bytes(rel)
        if rel.endswith(".gz"):
            data = gzip.decompress(data)
        return data.decode("utf-8").splitlines()


# ------------------------------------------------------------------------------------ records and keys


def normalise(text: str) -> str:
    """Lowercase, whitespace collapsed: the key that decides whether two prompts are "the same"."""
    return " ".join(text.lower().split())


def prompt_key(record: dict) -> str:
    """Normalised prompt: instruction + "\\n" + input for Alpaca records, the text for text records."""
    if "text" in record:
        return normalise(record["text"])
    return normalise(record["instruction"] + "\n" + record.get("input", ""))


def alpaca(record: dict) -> dict:
    """Keep exactly the three Alpaca fields, as strings (a few upstream records lack ``input``)."""
    return {"instruction": record["instruction"], "input": record.get("input") or "", "output": record["output"]}


def named_rng(seed: int, *names: str) -> random.Random:
    """An independent generator per purpose, so changing one source's size leaves the others' draws alone."""
    return random.Random("/".join([str(seed), *names]))


def take(
    pool: Iterable[dict], n: int, banned: set[str], rng: random.Random, name: str, used: set[str] = frozenset()
) -> tuple[list[dict], dict]:
    """Shuffle ``pool`` with ``rng`` and keep the first ``n`` records that pass decontamination.

    Dropped before the draw, with counts: prompts in ``banned`` (val/test), empty or "." outputs, prompts
    seen earlier in this pool or in ``used`` (prompts already taken by other sources, where sources must be
    disjoint). Raises ValueError when fewer than ``n`` records remain.
    """
    pool = list(pool)
    stats = {"pool": len(pool), "removed_val_test_overlap": 0, "removed_empty_output": 0, "removed_duplicate": 0}
    eligible, keys = [], set()
    for record in pool:
        key = prompt_key(record)
        if key in banned:
            stats["removed_val_test_overlap"] += 1
        elif "output" in record and record["output"].strip() in ("", "."):
            # An upstream "." answer would be indistinguishable from a corrupted one (denoising).
            stats["removed_empty_output"] += 1
        elif not key or key in keys or key in used:
            stats["removed_duplicate"] += 1
        else:
            keys.add(key)
            eligible.append(record)
    stats["available"] = len(eligible)
    if n > len(eligible):
        raise ValueError(f"source {name!r}: asked for {n} examples but only {len(eligible)} remain after "
                         f"decontamination ({stats})")
    order = list(range(len(eligible)))
    rng.shuffle(order)
    chosen = [eligible[i] for i in order[:n]]
    stats["selected"] = len(chosen)
    return chosen, stats


def subsample(records: list[dict], n: int | None, rng: random.Random) -> list[dict]:
    """``n`` records drawn without replacement, kept in file order; all of them when ``n`` is None."""
    if n is None or n >= len(records):
        if n is not None and n > len(records):
            raise ValueError(f"asked for {n} records but the file has {len(records)}")
        return list(records)
    keep = sorted(rng.sample(range(len(records)), n))
    return [records[i] for i in keep]


def split_val_test(val: list[dict], test: list[dict]) -> tuple[list[dict], list[dict], int]:
    """Drop test records whose prompt occurs in val, and duplicates inside each set."""
    def dedup(records):
        out, keys = [], set()
        for r in records:
            if prompt_key(r) not in keys:
                keys.add(prompt_key(r))
                out.append(r)
        return out

    val, test = dedup(val), dedup(test)
    val_keys = {prompt_key(r) for r in val}
    kept = [r for r in test if prompt_key(r) not in val_keys]
    return val, kept, len(test) - len(kept)


# -------------------------------------------------------------------------------------------- output


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write_dataset(out: Path, files: dict[str, list[dict]], inputs: Inputs, manifest: dict) -> dict:
    """Write ``files`` (relative path → records) and manifest.json into ``out``, atomically.

    Everything goes into a temporary sibling folder first; only a complete folder replaces ``out``, so a
    failure leaves either the old output or none, never a half-written one.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = {**manifest, "inputs": dict(sorted(inputs.sha256.items())), "files": {}}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for rel, records in files.items():
            data = jsonl_bytes(records)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            # inside a temporary folder that replaces the target whole
            (tmp / rel).write_bytes(data)
            manifest["files"][rel] = {"records": len(records), "sha256": hashlib.sha256(data).hexdigest()}
        # inside a temporary folder that replaces the target whole
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%s)", out, ", ".join(f"{k}: {v['records']}" for k, v in manifest["files"].items()))
    return manifest


# ----------------------------------------------------------------------------------------------- CLI


def base_parser(description: str, task: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shared-data", default=DEFAULT_SHARED_DATA,
                        help="folder of the shared inputs, relative to the repo root (default: %(default)s)")
    parser.add_argument("--out", default=f"data/gpt2/{task}",
                        help="output folder, relative to the repo root (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: %(default)s)")
    return parser


def main(build: Callable[..., dict], parser: argparse.ArgumentParser, argv: list[str] | None = None) -> dict:
    """Parse arguments, resolve paths against the repo root, call ``build`` with the rest as keywords."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = vars(parser.parse_args(argv))
    shared, out = repo_path(args.pop("shared_data")), repo_path(args.pop("out"))
    try:
        return build(shared, out, **args)
    except (FileNotFoundError, ValueError) as err:
        # A missing input or an impossible size is a usage error: say which, without a traceback.
        parser.exit(1, f"{parser.prog}: error: {err}\n")


def val_test_alpaca(inputs: "Inputs", val_file: str, test_file: str, n_val, n_test, seed: int):
    """(val, test, test_dropped, banned): the authors' val/test in Alpaca form, subsampled by the seed and made
    disjoint; ``banned`` holds the prompts of the FULL files, so training is decontaminated even when val/test
    are subsampled."""
    val_all = [alpaca(r) for r in inputs.json(val_file)]
    test_all = [alpaca(r) for r in inputs.json(test_file)]
    banned = {prompt_key(r) for r in val_all + test_all}
    val = subsample(val_all, n_val, named_rng(seed, "val"))
    test = subsample(test_all, n_test, named_rng(seed, "test"))
    val, test, test_dropped = split_val_test(val, test)
    return val, test, test_dropped, banned
