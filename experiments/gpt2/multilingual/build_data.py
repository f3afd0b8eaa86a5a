"""Build the GPT-2 multilingual sources: one plain-text source per language; val/test from the target language.

    python experiments/gpt2/multilingual/build_data.py [--shared-data ../shared/data] [--out data/gpt2/multilingual]
        [--seed 0] [--target en] [--languages en,zh,fr,de,ja,es] [--per-source 2000] [--n-val 300] [--n-test 300]

method.md §6: with a validation set in one target language, the learned weight should concentrate on that
language's source. So that sources differ only in language, every language is built from the same two
corpora in the same proportion, as plain ``{"text"}`` sentences (real instruction pairs with ≥3,000 examples
exist here only for en and zh):

  * NTREX-128 (newstest2019 human translations, news, 1,997 lines, parallel across all six languages):
    one seeded permutation of line numbers is shared by all languages, so their NTREX parts are translations
    of the same sentences;
  * Tatoeba (LASER test pairs, short everyday sentences, 1,000 per language pair): each non-English
    language uses its own side of ``<lang>-eng``; English uses the English sides of all five pairs.

Val and test (default 300 + 300, same 2:1 NTREX:Tatoeba mix) are drawn from the target language. Their NTREX
line numbers and Tatoeba pair lines are removed from *every* language's source, so no source contains a
val/test sentence or its translation; any source text equal to a val/test text is also dropped.
"""

from __future__ import annotations

from pathlib import Path

if __name__ == "__main__" and not __package__:  # run by its path: run it as the module it is (scalebio.scripts)
    from scalebio.scripts import run_as_module
    run_as_module(__file__)

from experiments.gpt2 import common  # noqa: E402

TASK = "multilingual"
NTREX = {
    "en": "ntrex128/newstest2019-src.eng.txt",
    "zh": "ntrex128/newstest2019-ref.zho-CN.txt",
    "fr": "ntrex128/newstest2019-ref.fra.txt",
    "de": "ntrex128/newstest2019-ref.deu.txt",
    "ja": "ntrex128/newstest2019-ref.jpn.txt",
    "es": "ntrex128/newstest2019-ref.spa.txt",
}
TATOEBA_PAIR = {"zh": "cmn", "fr": "fra", "de": "deu", "ja": "jpn", "es": "spa"}
LANGUAGES = tuple(NTREX)
NTREX_SHARE = 2 / 3  # NTREX has 1,997 lines per language and Tatoeba 1,000: keep that 2:1 ratio everywhere.


def tatoeba_files(lang: str) -> dict[str, str]:
    """Tatoeba pair code → file holding ``lang``'s side of that pair (English: the English side of every pair)."""
    if lang == "en":
        return {pair: f"tatoeba_laser/tatoeba.{pair}-eng.eng" for pair in TATOEBA_PAIR.values()}
    pair = TATOEBA_PAIR[lang]
    return {pair: f"tatoeba_laser/tatoeba.{pair}-eng.{pair}"}


def load_units(inputs: common.Inputs) -> dict[tuple, dict[str, str]]:
    """Aligned unit → {language: sentence}. Units: ("ntrex", line) in all six languages, ("tatoeba", pair, line)
    in English and the pair's language. The same unit in two languages is the same sentence translated."""
    ntrex = {lang: inputs.lines(rel) for lang, rel in NTREX.items()}
    units = {}
    for i in range(len(ntrex["en"])):
        units[("ntrex", i)] = {lang: lines[i].strip() for lang, lines in ntrex.items()}
    for lang, pair in TATOEBA_PAIR.items():
        eng, other = (inputs.lines(f"tatoeba_laser/tatoeba.{pair}-eng.{side}") for side in ("eng", pair))
        if len(eng) != len(other):
            raise ValueError(f"Tatoeba {pair}-eng: {len(eng)} English lines but {len(other)} {pair} lines")
        for i, (e, o) in enumerate(zip(eng, other)):
            units[("tatoeba", pair, i)] = {"en": e.strip(), lang: o.strip()}
    if any(len(lines) != len(ntrex["en"]) for lines in ntrex.values()):
        raise ValueError(f"NTREX files are not line-aligned: {({k: len(v) for k, v in ntrex.items()})}")
    return units


def language_items(units: dict[tuple, dict[str, str]], lang: str) -> dict[tuple, str]:
    """Unit → sentence in ``lang``; empty lines and repeated sentences (after the first) are skipped."""
    items, seen = {}, set()
    for key, sides in units.items():
        text = sides.get(lang, "")
        if text and common.normalise(text) not in seen:
            seen.add(common.normalise(text))
            items[key] = text
    return items


def translation_closure(units: dict[tuple, dict[str, str]], held: set[tuple]) -> set[tuple]:
    """The held-out units plus every unit sharing a sentence with them in any language, repeated to a fixpoint.

    Holding out the unit alone is not enough: the same English sentence occurs in several Tatoeba pairs, so a
    held-out Japanese sentence's translation could otherwise reach the Spanish source via its English twin.
    """
    normalised = {key: {common.normalise(t) for t in sides.values() if t} for key, sides in units.items()}
    closed = set(held)
    while True:
        texts = set().union(*(normalised[key] for key in closed))
        grown = {key for key, sides in normalised.items() if not sides.isdisjoint(texts)}
        if grown <= closed:
            return closed
        closed |= grown


def split_counts(n: int) -> tuple[int, int]:
    n_ntrex = round(n * NTREX_SHARE)
    return n_ntrex, n - n_ntrex


def draw(items: dict[tuple, str], order: dict[str, list[tuple]], n: int, exclude: set, banned: set[str],
         name: str) -> tuple[list[tuple], dict]:
    """The first keys of each corpus's seeded order that are present, not excluded, not banned: 2:1 mix."""
    chosen, stats = [], {"removed_held_out": 0, "removed_val_test_overlap": 0}
    for corpus, k in zip(("ntrex", "tatoeba"), split_counts(n)):
        eligible = []
        for key in order[corpus]:
            if key not in items:
                continue
            if key in exclude:
                stats["removed_held_out"] += 1
            elif common.normalise(items[key]) in banned:
                stats["removed_val_test_overlap"] += 1
            else:
                eligible.append(key)
        stats[f"available_{corpus}"] = len(eligible)
        if len(eligible) < k:
            raise ValueError(f"{name}: asked for {k} {corpus} sentences, only {len(eligible)} remain after "
                             f"removing held-out and val/test sentences")
        stats[f"selected_{corpus}"] = k
        chosen += eligible[:k]
    return chosen, stats


def build(
    shared_data: Path,
    out: Path,
    seed: int = 0,
    target: str = "en",
    languages: list[str] | tuple[str, ...] = LANGUAGES,
    per_source: int = 2000,
    n_val: int = 300,
    n_test: int = 300,
) -> dict:
    """Write the multilingual dataset (one source per language, val/test in ``target``); return the manifest."""
    languages = list(languages)
    unknown = set(languages + [target]) - set(LANGUAGES)
    if unknown:
        raise ValueError(f"unknown language(s) {sorted(unknown)}; available: {LANGUAGES}")
    if target not in languages:
        raise ValueError(f"target {target!r} must be one of the source languages {languages}")

    inputs = common.Inputs(shared_data)
    units = load_units(inputs)
    items = {lang: language_items(units, lang) for lang in languages}
    # One NTREX order for every language keeps their NTREX parts parallel; Tatoeba orders are per language.
    ntrex_order = sorted({key for lang in languages for key in items[lang] if key[0] == "ntrex"})
    common.named_rng(seed, "ntrex").shuffle(ntrex_order)

    def orders(lang: str) -> dict[str, list[tuple]]:
        tatoeba = sorted(key for key in items[lang] if key[0] == "tatoeba")
        common.named_rng(seed, "tatoeba", lang).shuffle(tatoeba)
        return {"ntrex": ntrex_order, "tatoeba": tatoeba}

    target_orders = orders(target)
    val_keys, val_stats = draw(items[target], target_orders, n_val, set(), set(), f"val ({target})")
    test_keys, test_stats = draw(items[target], target_orders, n_test, set(val_keys), set(), f"test ({target})")
    held_out = translation_closure(units, set(val_keys) | set(test_keys))

    def records(lang: str, keys: list[tuple], name: str) -> list[dict]:
        keys = list(keys)
        common.named_rng(seed, "order", name).shuffle(keys)  # mix the two corpora within a file
        return [{"text": items[lang][key]} for key in keys]

    val, test = records(target, val_keys, "val"), records(target, test_keys, "test")
    banned = {common.prompt_key(r) for r in val + test}
    files, sources = {}, []
    for lang in languages:
        keys, stats = draw(items[lang], orders(lang), per_source, held_out, banned, lang)
        texts = records(lang, keys, lang)
        files[f"sources/{lang}.jsonl"] = texts
        # Equal sentence counts are not equal token counts: GPT-2's byte-level BPE spends several tokens
        # per CJK character, so report characters and bytes.
        sources.append({"name": lang, "file": f"sources/{lang}.jsonl",
                        "inputs": [NTREX[lang], *tatoeba_files(lang).values()],
                        "characters": sum(len(r["text"]) for r in texts),
                        "utf8_bytes": sum(len(r["text"].encode("utf-8")) for r in texts), **stats})
    files["val.jsonl"], files["test.jsonl"] = val, test

    manifest = {
        "task": TASK,
        "params": {"seed": seed, "target": target, "languages": languages, "per_source": per_source,
                   "n_val": n_val, "n_test": n_test, "ntrex_share": NTREX_SHARE},
        "format": "text",
        "sources": sources,
        "val": {"file": "val.jsonl", "language": target, "inputs": [NTREX[target], *tatoeba_files(target).values()],
                **val_stats},
        "test": {"file": "test.jsonl", "language": target, **test_stats},
        "decontamination": {s["name"]: {k: s[k] for k in ("removed_held_out", "removed_val_test_overlap")}
                            for s in sources},
    }
    return common.write_dataset(out, files, inputs, manifest)


def parser():
    p = common.base_parser(__doc__.splitlines()[0], TASK)
    p.add_argument("--target", default="en", choices=LANGUAGES, help="language of val/test (default: %(default)s)")
    p.add_argument("--languages", type=lambda s: s.split(","), default=list(LANGUAGES),
                   help="comma-separated source languages (default: all six)")
    p.add_argument("--per-source", type=int, default=2000, help="sentences per language (default: %(default)s)")
    p.add_argument("--n-val", type=int, default=300, help="validation sentences (default: %(default)s)")
    p.add_argument("--n-test", type=int, default=300, help="test sentences (default: %(default)s)")
    return p


if __name__ == "__main__":
    common.main(build, parser())
