"""Every preset's header comment agrees with its body: each number the header states (vocabulary, sequence length,
steps, batches, learning rates, LISA, ...) is read with the phrase that states it and compared with the YAML below.

A preset is a YAML under experiments/ that opens with the `scalebio reweight` / `scalebio finetune` command that
runs it. The phrases are the ones the headers use; a header that states a number in a phrase not listed here is
not checked, so a new phrasing belongs in CLAIMS.
"""

import math
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p for p in (REPO / "experiments").rglob("*.yaml")
                 if p.read_text().startswith(("# scalebio reweight ", "# scalebio finetune ")))


def _solver(c: dict) -> dict:
    """A reweighting config's solver section; a fine-tuning config keeps the same fields at the top."""
    return c.get("solver", c)


def _max_length(c: dict):
    return c["data"]["max_length"] if "data" in c else c["max_length"]


def _steps_of_examples(c: dict):
    """Examples a fine-tuning run sees: steps × global batch."""
    return c["steps"] * c["global_batch"]


def _one_epoch(c: dict) -> bool:
    return _solver(c).get("steps") is None and c.get("epochs", 1) == 1


CLAIMS = [  # (phrase with the stated numbers as groups, the body's values in the same order)
    (r"([\d,]+)-token (?:byte-level )?BPE", lambda c: [c["tokenizer"]["vocab_size"]]),
    (r"\((\d+) blocks, width (\d+)\)",
     lambda c: [c["model"]["config_overrides"]["n_layer"], c["model"]["config_overrides"]["n_embd"]]),
    (r"sequences cut at (\d+) tokens", lambda c: [_max_length(c)]),
    (r"(\d+)-token sequences", lambda c: [_max_length(c)]),
    (r"max length (\d+)", lambda c: [_max_length(c)]),
    (r"steps of \d+ at (\d+) tokens", lambda c: [_max_length(c)]),
    (r"(?<!every )\b(\d+) steps", lambda c: [_solver(c)["steps"]]),
    (r"\b(\d+) steps of (\d+)", lambda c: [_solver(c)["steps"], _solver(c)["global_batch"]]),
    (r"every (\d+) steps", lambda c: [c["lisa"]["interval"]]),
    (r"γ = (\d+)", lambda c: [c["lisa"]["gamma"]]),
    (r"global batch (\d+)", lambda c: [_solver(c)["global_batch"]]),
    (r"micro batch (\d+)", lambda c: [_solver(c)["micro_batch"]]),
    (r"\((\d+) per step", lambda c: [_solver(c)["global_batch"]]),
    (r"two micro-batches of (\d+)", lambda c: [_solver(c)["micro_batch"]]),
    (r"(\d+) examples of each source per batch|batches of (\d+) per source",
     lambda c: [_solver(c)["global_batch"] / len(c["data"]["sources"])]),
    (r"([\d,]+) records per source", lambda c: sorted({s["limit"] for s in c["data"]["sources"]})),
    (r"(\d+) validation examples", lambda c: [_solver(c)["val_batch"]]),
    (r"on ([\d,]+) examples|N = ([\d,]+) examples", lambda c: [_steps_of_examples(c)]),
    (r"lr_u = lr_w = (\d[\d.]*e-\d+)", lambda c: [_solver(c)["lr_u"]] if _solver(c)["lr_u"] == _solver(c)["lr_w"]
     else [None]),
    (r"lr_λ = (\d[\d.]*e-\d+)", lambda c: [_solver(c)["lr_lambda"]]),
    (r"\blr (\d[\d.]*e-\d+)", lambda c: [c["lr"]]),
    (r"α = (\d+)", lambda c: [_solver(c)["alpha"]]),
    (r"warmup (\d+)%", lambda c: [round(100 * _solver(c)["warmup_ratio"], 6)]),
    (r"clipping c = (\d[\d.]*)", lambda c: [_solver(c)["clip_grad_norm"]]),
    (r"weight decay (\d[\d.]*e-\d+) on u and w",
     lambda c: [_solver(c)["weight_decay_u"]] if _solver(c)["weight_decay_u"] == _solver(c)["weight_decay_w"]
     else [None]),
    (r"(one) epoch\b", lambda c: ["one" if _one_epoch(c) else "not one"]),
    (r"(?:[:,] |\bin )(bf16|fp32)\b", lambda c: [c["precision"]]),
    (r"conventions: (\w+)", lambda c: [_solver(c)["conventions"]]),
    (r"data\.sampling: (\w+)", lambda c: [c["data"]["sampling"]]),
]


def header(path: Path) -> str:
    """The comment lines above the first setting, without the command line and without the '#'s."""
    lines = []
    for line in path.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def _value(text: str):
    text = text.replace(",", "")
    try:
        return float(text)
    except ValueError:
        return text


def stated(text: str, body: dict) -> list[tuple[str, object, object]]:
    """(phrase, value the header states, value in the body) for every claim the header makes."""
    out = []
    for pattern, actual in CLAIMS:
        for m in re.finditer(pattern, text):
            claimed = [_value(g) for g in m.groups() if g is not None]
            try:
                values = actual(body)
            except (KeyError, TypeError) as err:
                values = [f"<not in the body: {err!r}>"]
            out += list(zip([m.group(0)] * len(claimed), claimed, values))
    return out


def _equal(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def test_the_presets_are_found():
    names = {p.relative_to(REPO / "experiments").as_posix() for p in PRESETS}
    assert {"gpt2/denoising/cpu.yaml", "gpt2/multilingual/cpu.yaml", "gpt2/instruction_following/paper.yaml",
            "llama3/llama3_8b.yaml", "llama3/protocol_smollm2.yaml", "llama3/protocol_finetune.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.relative_to(REPO / "experiments").as_posix())
def test_header_numbers_agree_with_the_body(path):
    text = header(path)
    claims = stated(text, yaml.safe_load(path.read_text()))
    wrong = [f"header says {phrase!r}: {claimed!r}, the body has {actual!r}" for phrase, claimed, actual in claims
             if not _equal(claimed, actual)]
    assert not wrong, f"{path.relative_to(REPO)}:\n  " + "\n  ".join(wrong)


@pytest.mark.parametrize("task", ["denoising", "multilingual", "instruction_following"])
def test_cpu_headers_state_vocabulary_length_and_steps(task):
    """The CPU presets' headers are checked for the numbers they were wrong about (issue 21)."""
    path = REPO / "experiments" / "gpt2" / task / "cpu.yaml"
    phrases = " ".join(phrase for phrase, _, _ in stated(header(path), yaml.safe_load(path.read_text())))
    assert "BPE" in phrases and " steps" in phrases and re.search(r"cut at \d+ tokens|\d+-token sequences", phrases)


def test_the_check_reads_a_wrong_header():
    """The phrases of the old denoising header against its body: every wrong number is named."""
    body = {"tokenizer": {"vocab_size": 2048}, "data": {"max_length": 64, "sources": []},
            "solver": {"steps": 200}, "model": {"config_overrides": {"n_layer": 2, "n_embd": 128}}}
    text = ("GPT-2 architecture scaled down (2 blocks, width 128) from random init, a 4,096-token byte-level BPE "
            "trained on this experiment's text, sequences cut at 128 tokens, 300 steps.")
    wrong = [(claimed, actual) for _, claimed, actual in stated(text, body) if not _equal(claimed, actual)]
    assert sorted(wrong) == [(128.0, 64), (300.0, 200), (4096.0, 2048)]
