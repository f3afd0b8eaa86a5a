"""Draw a fine-tuning set of N examples from a pool of sources by learned (or uniform) weights.

Each draw picks a source with probability p_i from a seeded generator, then that source's next example from
a seeded permutation: without replacement inside a source while it lasts, reshuffled only once it is used up.
The output records which weights file produced it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .weights import atomic_write_text, file_sha256, load_weights


def draw_counts_and_order(probabilities: list[float], sizes: list[int], n: int, seed: int) -> list[tuple[int, int]]:
    """N (source, index) pairs. probabilities [k] (sum 1), sizes [k] → list of length n."""
    rng = np.random.default_rng(seed)
    choices = rng.choice(len(probabilities), size=n, p=np.asarray(probabilities, dtype=float))
    perms = [rng.permutation(s) for s in sizes]
    cursor = [0] * len(sizes)
    out = []
    for c in choices:
        c = int(c)
        if sizes[c] == 0:
            raise ValueError(f"source {c} is empty but has weight {probabilities[c]}")
        if cursor[c] == sizes[c]:  # used up: start a fresh permutation (only then does an example repeat)
            perms[c] = rng.permutation(sizes[c])
            cursor[c] = 0
        out.append((c, int(perms[c][cursor[c]])))
        cursor[c] += 1
    return out


def resample(weights_file: str | Path | None, sources: dict[str, list[dict]], n: int, seed: int,
             out: str | Path) -> dict:
    """Write ``out`` (JSONL; each record gains a ``source`` field) and ``out`` + ``.manifest.json``.

    ``weights_file`` None means uniform weights (the baseline). ``sources`` maps source name → records, and
    every source the weights file names must be present.
    """
    names = list(sources)
    if weights_file is None:
        probs = [1.0 / len(names)] * len(names)
        origin = {"weights_file": None, "weights": "uniform"}
    else:
        data = load_weights(weights_file)
        missing = [s for s in data["sources"] if s not in sources]
        if missing:
            raise ValueError(f"{weights_file}: source {missing[0]!r} has a weight but no data was given for it")
        names = list(data["sources"])
        probs = [data["weights"][s] for s in names]
        origin = {"weights_file": str(weights_file), "weights_sha256": file_sha256(Path(weights_file)),
                  "weights": dict(zip(names, probs))}
    sizes = [len(sources[s]) for s in names]
    picks = draw_counts_and_order(probs, sizes, n, seed)
    lines = [json.dumps({**sources[names[c]][i], "source": names[c]}, ensure_ascii=False) + "\n" for c, i in picks]
    out = Path(out)
    atomic_write_text(out, "".join(lines))
    counts = {s: 0 for s in names}
    for c, _ in picks:
        counts[names[c]] += 1
    manifest = {**origin, "n": n, "seed": seed, "counts": counts, "pool_sizes": dict(zip(names, sizes)),
                "output": out.name, "output_sha256": file_sha256(out)}
    atomic_write_text(out.with_name(out.name + ".manifest.json"), json.dumps(manifest, indent=2) + "\n")
    return manifest


def pool_from_run(run_dir: str | Path) -> dict[str, list[dict]]:
    """The training sources of a reweighting run, read and decontaminated as the run did (same files, same
    held-out prompts), as name → records."""
    import yaml

    from . import data as data_mod
    from .config import RunConfig, from_dict

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a reweighting run directory (no config.yaml)")
    cfg = from_dict(RunConfig, yaml.safe_load(path.read_text()))
    held_out = set()
    if cfg.data.decontaminate:
        for src in [cfg.data.validation, *cfg.data.decontaminate_against]:
            records, fmt = data_mod.load_with_format(src, cfg)
            held_out.update(data_mod.prompt_key(r, fmt) for r in records)
    pool = {}
    for src in cfg.data.sources:
        records, fmt = data_mod.load_with_format(src, cfg)
        pool[src.name] = [r for r in records if data_mod.prompt_key(r, fmt) not in held_out]
    return pool
