"""MT-Bench: answer the 80 two-turn questions with a model, and score the answers with a judge when one is given.

    python experiments/llama3/mt_bench.py --model MODEL_DIR --out results/llama3/<preset>/<method>_seed<s>/mt_bench.json
        [--judge-url URL --judge-model NAME] [--limit N] [--max-new-tokens 1024]

Answers: greedy generation (FastChat samples some categories at temperature 0.7; greedy keeps runs
reproducible), turn 2 conditioned on turn 1's answer. Prompts are rendered by scalebio.data.render_segments,
the same rendering training uses (the chat template when the tokenizer has one, else the plain template).

Judging (FastChat's single-answer grading, prompts from ``mt_bench/judge_prompts.jsonl``): turn 1 with
``single-v1`` (``single-math-v1`` with the GPT-4 reference answer for math, reasoning and coding), turn 2 with
the ``-multi-turn`` variants; the rating is the ``[[x]]`` in the judge's reply; ``score`` is the mean over all
judged turns. ``--judge-url`` is an OpenAI-compatible base URL (``.../v1``); the API key is read from the
environment variable named by ``--judge-api-key-env`` and never written. Without a judge the file holds the
answers and the note "no judge given: answers written, not scored", and the command exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import urllib.request
from pathlib import Path

from scalebio.data import render_segments
from scalebio.files import write_text

REPO = Path(__file__).resolve().parents[2]

log = logging.getLogger("llama3.mt_bench")

MT_BENCH = REPO.parent / "shared" / "data" / "mt_bench"
NEED_REF_CATEGORIES = ("math", "reasoning", "coding")
"""FastChat judges these against the GPT-4 reference answer."""
NO_JUDGE_NOTE = "no judge given: answers written, not scored"
PLAIN_STOP = "### Instruction:"
"""The plain template's next-turn header: a model without a chat template that runs on is cut here."""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def load_references(folder: Path) -> dict[int, list[str]]:
    """question_id → reference turns: the GPT-4 reference answers, else a question's inline ``reference``."""
    refs = {q["question_id"]: q["reference"] for q in read_jsonl(folder / "question.jsonl") if q.get("reference")}
    ref_file = folder / "reference_answer" / "gpt-4.jsonl"
    if ref_file.is_file():
        for r in read_jsonl(ref_file):
            refs[r["question_id"]] = r["choices"][0]["turns"]
    return refs


def prompt_ids(turns: list[str], answers: list[str], tokenizer) -> list[int]:
    """Token ids of the conversation so far, ending where the next assistant reply starts (as training
    tokenises it: text segments without added specials, id segments such as BOS as they are)."""
    items = []
    for i, question in enumerate(turns):
        items += [{"from": "human", "value": question}, {"from": "gpt", "value": answers[i] if i < len(answers) else ""}]
    segments = render_segments({"items": items}, "conversations", tokenizer)
    loss_at = [i for i, (_, loss) in enumerate(segments) if loss]
    start = loss_at[-1]
    while start > 0 and segments[start - 1][1]:
        start -= 1
    ids: list[int] = []
    for seg, _ in segments[:start]:
        ids += tokenizer(seg, add_special_tokens=False)["input_ids"] if isinstance(seg, str) else list(seg)
    return ids


def generate_answers(model, tokenizer, questions: list[dict], max_new_tokens: int) -> list[dict]:
    """Both turns of every question, greedy. Returns ``{question_id, category, turns, answers}`` per question."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out = []
    for q in tqdm(questions, desc="mt-bench answers", dynamic_ncols=True):
        answers: list[str] = []
        for t in range(len(q["turns"])):
            ids = torch.tensor([prompt_ids(q["turns"][: t + 1], answers, tokenizer)], device=device)
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
            text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            answers.append(text.split(PLAIN_STOP)[0].strip())
        out.append({"question_id": q["question_id"], "category": q["category"], "turns": q["turns"], "answers": answers})
    return out


def judge_request(judges: dict[str, dict], answer: dict, refs: dict[int, list[str]], turn: int) -> tuple[str, str, str]:
    """(judge prompt name, system prompt, user prompt) for one turn (0 or 1) of one answered question."""
    ref = refs.get(answer["question_id"]) if answer["category"] in NEED_REF_CATEGORIES else None
    name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 1 else "")
    judge = judges[name]
    q, a = answer["turns"], answer["answers"]
    fields = {"question": q[0], "answer": a[0], "question_1": q[0], "answer_1": a[0],
              "question_2": q[-1], "answer_2": a[-1],
              "ref_answer_1": ref[0] if ref else "", "ref_answer_2": ref[-1] if ref else ""}
    return name, judge["system_prompt"], judge["prompt_template"].format(**fields)


def call_judge(url: str, model: str, system: str, user: str, api_key: str | None, timeout: float = 120.0) -> str:
    """One chat completion from an OpenAI-compatible endpoint (temperature 0, as FastChat's judge)."""
    body = json.dumps({"model": model, "temperature": 0, "max_tokens": 2048,
                       "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]})
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body.encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def parse_rating(text: str) -> float | None:
    """The judge's ``[[x]]`` rating (FastChat also accepts ``[x]``); None when there is none."""
    for pattern in (r"\[\[(\d+\.?\d*)\]\]", r"\[(\d+\.?\d*)\]"):
        match = re.search(pattern, text)
        if match:
            return float(match.group(1))
    return None


def score(answers: list[dict], judges: dict[str, dict], refs: dict[int, list[str]], url: str, model: str,
          api_key: str | None) -> dict:
    rows = []
    for answer in answers:
        for turn in range(len(answer["answers"])):
            name, system, user = judge_request(judges, answer, refs, turn)
            reply = call_judge(url, model, system, user, api_key)
            rows.append({"question_id": answer["question_id"], "category": answer["category"], "turn": turn + 1,
                         "judge_prompt": name, "rating": parse_rating(reply), "judgment": reply})
    rated = [r for r in rows if r["rating"] is not None]

    def mean(values):
        return statistics.fmean(values) if values else None

    return {
        "scores": rows,
        "unparsed": len(rows) - len(rated),
        "score": mean([r["rating"] for r in rated]),
        "score_by_turn": {str(t): mean([r["rating"] for r in rated if r["turn"] == t]) for t in (1, 2)},
        "score_by_category": {c: mean([r["rating"] for r in rated if r["category"] == c])
                              for c in sorted({r["category"] for r in rows})},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory or hub id")
    parser.add_argument("--gguf-file", default=None, help="a GGUF file inside --model")
    parser.add_argument("--out", required=True, help="mt_bench.json to write")
    parser.add_argument("--mt-bench", default=str(MT_BENCH), help="folder with question.jsonl, judge_prompts.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="first N questions (default all 80)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL, e.g. https://host/v1")
    parser.add_argument("--judge-model", default=None, help="judge model name (e.g. gpt-4)")
    parser.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable with the API key")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if bool(args.judge_url) != bool(args.judge_model):
        parser.error("--judge-url and --judge-model go together")
    from scalebio.evaluation import load_model

    folder = Path(args.mt_bench)
    questions = read_jsonl(folder / "question.jsonl")[: args.limit]
    model, tokenizer = load_model(args.model, args.gguf_file, args.device)
    answers = generate_answers(model, tokenizer, questions, args.max_new_tokens)
    result = {"format": "scalebio.llama3.mt_bench/1", "model": args.model, "n_questions": len(answers),
              "generation": {"do_sample": False, "max_new_tokens": args.max_new_tokens}, "answers": answers}
    if args.judge_url:
        judges = {j["name"]: j for j in read_jsonl(folder / "judge_prompts.jsonl")}
        result["judge"] = {"url": args.judge_url, "model": args.judge_model}
        result.update(score(answers, judges, load_references(folder), args.judge_url, args.judge_model,
                            os.environ.get(args.judge_api_key_env)))
        log.info("MT-Bench score %.3f (%d judged turns, %d unparsed)", result["score"] or float("nan"),
                 len(result["scores"]), result["unparsed"])
    else:
        result.update({"judge": None, "note": NO_JUDGE_NOTE, "score": None})
        log.info("%s (%s)", NO_JUDGE_NOTE, args.out)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
