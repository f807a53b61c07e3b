"""Modality bridging (Vision-R1 Sec. 3.1), everything but the control flow: the prompts, the
resumable stage files, the word replacement, the filter rules and the report. bridge.py runs it.

Prompts (all of them are here, nowhere else):
    PSEUDO_COT_PROMPT   step 1, MLLM sees image + question: caption, then reasoning (ours; the paper
                        describes the step, not its prompt)
    DESCRIPTION_PROMPT  step 2, MLLM sees image + question + pseudo-CoT: the paper's prompt, asking,
                        given an image, a question and a thinking process, for a detailed
                        description with every detail of the image needed to answer correctly
    REASONING_PROMPT    step 3, the text-only reasoner sees description + question (ours: R1's
                        recommended "reason step by step ... \\boxed{}" wording); with
                        `give_answer`, ANSWER_HINT adds the ground truth, as the authors did

Filter rules, pure functions `rule(sample, limits) -> (keep, reason)`, applied in this order
(a dropped sample is counted under the first rule it fails; `failed` counts every rule it fails):
    truncated             the reasoner stopped on its own (finish_reason not "length"): the last
                          line of a reply cut off mid-sentence is no final answer
    format                <think>...</think><answer>...</answer>, strict (minivr1.grader)
    answer                the answer equals the ground truth (the project's grader)
    length                between limits.min_words and limits.max_words words
    repetition            no word n-gram (REPEAT_NGRAM words) more than limits.max_repeats times:
                          a generation stuck in a loop
    unseen_image          no "I cannot see the image": a text-only reasoner's remark that would
                          teach a VLM to deny the image in front of it (the paper's "logically
                          inconsistent" samples)
    answer_leak           no "the given/provided answer": with --give_answer the reasoner may
                          cite the hint, which the trained model will never get
    description_leftover  no "description"/"caption" left after the word replacement (REWRITES)
                          that the question itself does not use
Before the rules run, `rewrite_references` replaces phrases about the description in the
thinking ("the description says" -> "the image shows", ...), as the paper's word replacement
does, so the text reads as if the model looked at the image.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from minivr1 import grader
from minivr1.data import IMAGE_TOKEN, Problem

# ----------------------------------------------------------------------------- prompts

PSEUDO_COT_PROMPT = (
    "Look at the image and answer the question.\n"
    "First describe what the image shows that matters for the question, then reason step by step "
    "to the answer.\n\n"
    "Question: {question}"
)

# The paper's description prompt (Vision-R1 Sec. 3.1, modality bridging): the wording is ours, its
# content is the paper's: image + question + thinking process in, a detailed description out.
DESCRIPTION_PROMPT = (
    "Given an image, a question and a thinking process, please generate a detailed description of the "
    "image that contains all the details of the image needed to answer the question correctly.\n\n"
    "Question: {question}\n\n"
    "Thinking process: {pseudo_cot}"
)

REASONING_PROMPT = (
    "Here is a detailed description of an image, followed by a question about the image.\n\n"
    "Image description:\n{description}\n\n"
    "Question: {question}\n\n"
    "Please reason step by step, and put your final answer within \\boxed{{}}. For a multiple-choice "
    "question, put the option letter in the box."
)

ANSWER_HINT = (
    "\n\nThe correct answer is {answer}. Use it only to check your work: reach it by your own reasoning, "
    "and do not mention that it was given."
)


def _question(problem: Problem) -> str:
    """The question as prompt text: `<image>` placeholders dropped (the images go first)."""
    return problem.question.replace(IMAGE_TOKEN, "").strip()


def pseudo_cot_prompt(problem: Problem) -> str:
    return PSEUDO_COT_PROMPT.format(question=_question(problem))


def description_prompt(problem: Problem, pseudo_cot: str) -> str:
    return DESCRIPTION_PROMPT.format(question=_question(problem), pseudo_cot=pseudo_cot)


def reasoning_prompt(problem: Problem, description: str, give_answer: bool = False) -> str:
    prompt = REASONING_PROMPT.format(description=description, question=_question(problem))
    return prompt + (ANSWER_HINT.format(answer=problem.answer) if give_answer else "")


# ----------------------------------------------------------------------------- stage files


def write_json(path: Path, value) -> None:
    """Write JSON to a temporary name and rename: a kill never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- word replacement

_QUAL = r"(?:given |provided |detailed |above |image |image's |textual )?"
# (pattern, replacement), in order: the specific phrases first, the bare noun last.
REWRITES = [
    (rf"\b(?:the|this) {_QUAL}description (?:says|states|mentions|notes|shows|indicates|specifies|tells us|tells me)\b",
     "the image shows"),
    (rf"\b(?:described|mentioned|stated|given) in the {_QUAL}description\b", "shown in the image"),
    (rf"\bthe {_QUAL}description of the (?:image|figure|diagram|picture)\b", "the image"),
    (rf"\b(according to|based on|from|in) the {_QUAL}description\b", r"\1 the image"),
    (rf"\bthe {_QUAL}description\b", "the image"),
    (r"\bas described\b", "as shown"),
    (r"\bdescribed\b", "shown"),
]
_REWRITES = [(re.compile(p, re.I), r) for p, r in REWRITES]


def rewrite_references(text: str) -> tuple[str, int]:
    """Apply REWRITES (keeping a capital first letter); returns the text and the number of changes."""
    total = 0
    for pattern, replacement in _REWRITES:
        def sub(m, replacement=replacement):
            out = m.expand(replacement)
            return out[0].upper() + out[1:] if m.group(0)[0].isupper() else out
        text, n = pattern.subn(sub, text)
        total += n
    return text, total


def rewrite_thinking(response: str) -> tuple[str, int]:
    """`rewrite_references` on the thinking only: the answer block is the answer, left as it is."""
    head, sep, rest = response.partition("</think>")
    if not sep:
        return response, 0
    head, n = rewrite_references(head)
    return head + sep + rest, n


# ----------------------------------------------------------------------------- filter rules


@dataclass(frozen=True)
class Sample:
    """One candidate cold-start response and what judging it needs."""

    response: str                       # after word replacement
    question: str
    gold: str
    meta: dict                          # the problem's grading_meta(): choices, answer_type, precision
    finished: bool = True               # False when the reply hit the generation limit


@dataclass(frozen=True)
class Limits:
    min_words: int = 20
    max_words: int = 12000              # ~16K tokens, the paper's SFT cutoff length
    max_repeats: int = 8


REPEAT_NGRAM = 8
_UNSEEN = re.compile(
    r"\b(?:can ?not|can't|cannot|unable to|not able to|don't|do not|couldn't|could not) (?:actually )?"
    r"(?:see|view|look at|access) (?:the |this |an? )?(?:actual )?(?:image|picture|figure|diagram|graph|photo)"
    r"|\bwithout (?:seeing|viewing|access to|looking at) (?:the |this )?(?:actual )?(?:image|picture|figure|diagram|graph)"
    r"|\bno (?:image|picture|figure|diagram) (?:is |was )?(?:provided|given|attached|available)", re.I)
_LEAK = re.compile(
    r"\b(?:given|provided|expected|reference|ground[- ]truth|stated|supplied) (?:correct |final )?"
    r"(?:answer|solution)s?\b(?! (?:choices|options))"
    r"|\b(?:correct |right )?answer (?:is|was) (?:given|provided|stated|supplied)\b", re.I)
_LEFTOVER = re.compile(r"\bdescriptions?\b|\bcaptions?\b|\bthe text (?:says|mentions|states)\b", re.I)


def check_truncated(s: Sample, limits: Limits) -> tuple[bool, str]:
    return s.finished, "" if s.finished else "cut off at the generation limit"


def check_format(s: Sample, limits: Limits) -> tuple[bool, str]:
    ok = grader.parse_response(s.response).format_ok
    return ok, "" if ok else "not exactly <think>...</think><answer>...</answer> (or no answer)"


def check_answer(s: Sample, limits: Limits) -> tuple[bool, str]:
    answer = grader.extract_answer(s.response)
    ok = grader.is_equivalent(answer, s.gold, **s.meta)
    return ok, "" if ok else f"answer {answer!r:.60} is not the ground truth {s.gold!r:.60}"


def check_length(s: Sample, limits: Limits) -> tuple[bool, str]:
    n = len(s.response.split())
    ok = limits.min_words <= n <= limits.max_words
    return ok, "" if ok else f"{n} words, outside [{limits.min_words}, {limits.max_words}]"


def check_repetition(s: Sample, limits: Limits) -> tuple[bool, str]:
    words = s.response.split()
    grams = Counter(tuple(words[i:i + REPEAT_NGRAM]) for i in range(len(words) - REPEAT_NGRAM + 1))
    if not grams:
        return True, ""
    gram, n = grams.most_common(1)[0]
    ok = n <= limits.max_repeats
    return ok, "" if ok else f"{' '.join(gram)!r:.80} occurs {n} times (> {limits.max_repeats})"


def check_unseen_image(s: Sample, limits: Limits) -> tuple[bool, str]:
    m = _UNSEEN.search(s.response)
    return m is None, "" if m is None else f"says it cannot see the image: {m.group(0)!r}"


def check_answer_leak(s: Sample, limits: Limits) -> tuple[bool, str]:
    m = _LEAK.search(s.response)
    return m is None, "" if m is None else f"refers to a given answer: {m.group(0)!r}"


def check_description_leftover(s: Sample, limits: Limits) -> tuple[bool, str]:
    allowed = {w.lower() for w in _LEFTOVER.findall(s.question)}   # the question may use the word itself
    left = [w for w in _LEFTOVER.findall(s.response) if w.lower() not in allowed]
    return not left, "" if not left else f"still mentions {left[0]!r} after word replacement"


RULES: dict[str, Callable[[Sample, Limits], tuple[bool, str]]] = {
    "truncated": check_truncated,
    "format": check_format,
    "answer": check_answer,
    "length": check_length,
    "repetition": check_repetition,
    "unseen_image": check_unseen_image,
    "answer_leak": check_answer_leak,
    "description_leftover": check_description_leftover,
}


def judge(sample: Sample, limits: Limits) -> dict[str, str]:
    """{rule: reason} for every rule the sample fails, in RULES order; empty means keep."""
    failed = {}
    for name, rule in RULES.items():
        keep, reason = rule(sample, limits)
        if not keep:
            failed[name] = reason
    return failed


# ----------------------------------------------------------------------------- output


def _safe_name(record_id: str) -> str:
    """A file name for a record id; ids that needed changing get a hash, so two never collide."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", record_id)[:100]
    return safe if safe == record_id else f"{safe}-{hashlib.sha1(record_id.encode()).hexdigest()[:8]}"


def export_images(problem: Problem, out_dir: Path) -> list[str]:
    """Put the problem's images under out_dir/images and return their paths relative to out_dir, so
    train_sft.py reads cold_start.json with no --image_root. A hard link when the file system
    allows (no copy, and our data reader refuses symlinks that point outside the image root),
    else a copy; embedded image bytes are written out."""
    from PIL import Image

    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    paths = []
    for k, ref in enumerate(problem.images):
        if ref.data is not None:
            with Image.open(io.BytesIO(ref.data)) as image:
                suffix = "." + (image.format or "png").lower().replace("jpeg", "jpg")
        else:
            suffix = ref.path.suffix
        rel = f"images/{_safe_name(problem.id)}-{k}{suffix}"
        target = out_dir / rel
        if not target.exists():
            if ref.data is not None:
                target.write_bytes(ref.data)
            else:
                try:
                    os.link(ref.path, target)
                except OSError:                       # another file system, or links not allowed
                    shutil.copyfile(ref.path, target)
        paths.append(rel)
    return paths


def cold_start_record(problem: Problem, response: str, images: list[str]) -> dict:
    """A Vision-R1-cold (LLaMA-Factory sharegpt) record; the user turn marks its images explicitly."""
    question = problem.question
    if IMAGE_TOKEN not in question:
        question = IMAGE_TOKEN * len(images) + question
    return {"id": problem.id, "images": images,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": response}]}


# ----------------------------------------------------------------------------- report

LENGTH_EDGES = [0, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def histogram(values: list[int], edges: list[int] = LENGTH_EDGES) -> dict[str, int]:
    """Counts per bin "lo-hi" (inclusive), the last bin open ("16384+"); every bin listed."""
    bins = {f"{lo}-{hi - 1}": 0 for lo, hi in zip(edges, edges[1:])}
    bins[f"{edges[-1]}+"] = 0
    keys = list(bins)
    for v in values:
        i = sum(v >= e for e in edges) - 1
        bins[keys[max(i, 0)]] += 1
    return bins


def build_report(log: list[dict], n_in: int, stage_counts: dict[str, int]) -> dict:
    """The run's report from the per-record filter log (one dict per record: dropped_by, failed,
    waits, words, rewrites)."""
    kept = [r for r in log if r["dropped_by"] is None]
    waits = [r["waits"] for r in kept]
    words = [r["words"] for r in kept]
    return {
        "records_in": n_in,
        "records_out": len(kept),
        "stage_outputs": stage_counts,
        "dropped_by_rule": {name: sum(r["dropped_by"] == name for r in log) for name in RULES},
        "failed_rule": {name: sum(name in r["failed"] for r in log) for name in RULES},
        "rewritten_samples": sum(r["rewrites"] > 0 for r in kept),
        "waits": {"total": sum(waits), "mean_per_sample": statistics.fmean(waits) if waits else None,
                  "per_sample_histogram": {str(k): v for k, v in sorted(Counter(waits).items())}},
        "length_words": {"mean": statistics.fmean(words) if words else None,
                         "median": statistics.median(words) if words else None,
                         "min": min(words, default=None), "max": max(words, default=None),
                         "histogram": histogram(words)},
        "length_words_all_responses": histogram([r["words"] for r in log]),
    }


def format_report(report: dict) -> str:
    """The report for the terminal: counts, drops per rule, 'Wait's, a length histogram with bars."""
    lines = [f"records in {report['records_in']}, out {report['records_out']}  "
             f"(stage outputs: {', '.join(f'{k} {v}' for k, v in report['stage_outputs'].items())})",
             "dropped by rule (first failed): " + ", ".join(f"{k} {v}" for k, v in report["dropped_by_rule"].items()),
             "failed rule (any):              " + ", ".join(f"{k} {v}" for k, v in report["failed_rule"].items())]
    w = report["waits"]
    if w["mean_per_sample"] is not None:
        lines.append(f"'Wait' in kept samples: {w['total']} in all, {w['mean_per_sample']:.2f} per sample, "
                     f"histogram {w['per_sample_histogram']}")
    hist = {k: v for k, v in report["length_words"]["histogram"].items() if v}
    if hist:
        top = max(hist.values())
        lines.append("length of kept samples (words):")
        lines += [f"  {k:>11} {'#' * max(1, round(30 * v / top))} {v}" for k, v in hist.items()]
    return "\n".join(lines)
