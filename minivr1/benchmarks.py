"""The paper's four benchmarks: their released files, prompts, answer rules and metrics.

Vision-R1 (Sec. 4) reports MathVista, MathVerse, MM-Math and DynaMath. Each has one class
below with the same parts, so evaluate.py treats them alike:

  read(files, image_root, style)  the files as a user downloads them -> data.Problem list; bad
                                  records raise data.DataError ("file:line N: field 'x': ...")
  prompt, per --prompt_style:
      plain     the plain question: what the Vision-R1 models were trained on; they answer
                `<think>...</think><answer> Final Answer:X </answer>`
      official  the benchmark's own prompt (MathVista's hint, MathVerse's query_cot, DynaMath's
                JSON template; MM-Math's boxed-answer instruction is ours, see below)
  find_answer(text, problem)      how the benchmark finds the answer in a response with no
                                  <answer> block (used with --prompt_style official only)
  judge(answer, problem)          a deterministic rule, as close to the official judge as a rule
                                  can be; it never raises and never executes model text
  metrics(records)                the benchmark's own numbers, from predictions.jsonl records

Math goes through minivr1.grader's safe parser (`grader.parse_math`), with its size limits
and time budget; no eval, sympify or parse_latex. Every departure from an official protocol,
and which records trip which rule, is listed in docs/evaluation.md.
"""
from __future__ import annotations

import glob
import json
import random
import re
import string
import time
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

from minivr1 import data, grader
from minivr1.data import DataError, Problem, ReadReport

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".tsv")
MAX_ITEMS = 20  # list answers longer than this are wrong: bounds the pairwise matching work
STYLES = ("plain", "official")


# ============================================================================= text helpers


def boxed_all(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` in text, in order; braces are matched, not regexed."""
    out, i = [], text.find("\\boxed{")
    while i >= 0:
        depth, start = 0, i + len("\\boxed{")
        for j in range(start - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                out.append(text[start:j].strip())
                break
        else:
            return out  # an unclosed box: nothing more to find
        i = text.find("\\boxed{", j)
    return out


_ANSWER_IS = re.compile(r"(?:answer|option|choice)\s*(?:is\b|:)[ \t:*]*([^\n]+)", re.I)
_TEXT_CMD = re.compile(r"\\(?:text|mathrm|mbox|textbf|mathbf|operatorname)\s*\{([^{}]*)\}")
_LATEX = [  # spellings unified before any rule looks at an answer; order matters
    ("掳", "°"),  # "°" read as GBK: MathVerse has "118掳T"
    ("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\displaystyle", ""),
    ("^{\\circ}", "°"), ("^\\circ", "°"), ("\\circ", "°"), ("\\degree", "°"), ("\\infty", "∞"),
    ("\\leqslant", "≤"), ("\\geqslant", "≥"), ("\\leq", "≤"), ("\\geq", "≥"), ("\\le", "≤"), ("\\ge", "≥"),
    ("\\cup", "∪"), ("\\!", ""), ("\\,", " "), ("\\;", " "), ("\\:", " "), ("\\ ", " "), ("~", " "), ("$", ""),
    ("，", ","), ("：", ":"), ("；", ";"), ("（", "("), ("）", ")"), ("−", "-"), ("≈", ""),
]


def clean(s: str) -> str:
    """An answer with LaTeX wrappers and spacing unified: `$`, \\text{}, \\left, `~`, ^\\circ -> °."""
    s = _TEXT_CMD.sub(r" \1", str(s))
    for old, new in _LATEX:
        s = s.replace(old, new)
    s = re.sub(r"\*\*|__", "", s)  # markdown bold around an answer
    return " ".join(s.split()).strip().rstrip(".").strip()


def _unbox(s: str) -> str:
    boxes = boxed_all(s) if s.lstrip().startswith("\\boxed{") else []
    return boxes[-1] if len(boxes) == 1 else s


def _key(s: str) -> str:
    """Text compared as words: case-folded, whitespace and a final period dropped."""
    return "".join(clean(s).split()).casefold()


def final_answer(text: str) -> str:
    """The generic official-style extraction: the last \\boxed{}, else what follows the last
    "answer is" / "Answer:", else the last non-empty line."""
    boxes = boxed_all(text)
    if boxes:
        return boxes[-1]
    found = list(_ANSWER_IS.finditer(text))
    if found:
        return found[-1].group(1).strip().rstrip(".*").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


_LETTER = re.compile(r"[(\[]?([A-Fa-f])[)\]]?")
_LETTER_TEXT = re.compile(r"[(\[]?([A-F])\s*[)\]:.：．]")
_LEAD = re.compile(r"^(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)s?\s*(?:is\b|:)?\s*", re.I)


def letters(s: str | None) -> frozenset[str] | None:
    """The option letters an answer names: "C", "(C)", "C, D", "C and D", "C. 40°", "Option C";
    None when it names none (an option's text is not a letter)."""
    if s is None:
        return None
    s = _LEAD.sub("", clean(_unbox(clean(s))), count=1)
    if len(s) > 80:
        return None
    parts = [p for p in re.split(r"[\s,;、&/]+|\band\b", s) if p]
    matches = [_LETTER.fullmatch(p) for p in parts]
    if parts and all(matches):
        if any(m.group(1).islower() for m in matches) and len(parts) > 1:
            return None  # "a and b" is prose, not options
        return frozenset(m.group(1).upper() for m in matches)
    if m := _LETTER_TEXT.match(s):
        return frozenset(m.group(1))
    return None


# ============================================================================= math helpers


def _const(s: str, deadline: float):
    """A constant answer's value: a Fraction when exact and rational, else a float; None if not a
    real constant (free symbols, complex, unparsable)."""
    e = grader.parse_math(s, deadline)
    if e is None or e.free_symbols:
        return None
    try:
        if e.is_Rational:
            return Fraction(int(e.p), int(e.q))
        v = complex(e.evalf(30))
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return None
    if abs(v.imag) > 1e-12 or v.real != v.real or abs(v.real) == float("inf"):
        return None
    return v.real


def _diff(a, b) -> float:
    return float(abs(a - b)) if isinstance(a, Fraction) and isinstance(b, Fraction) else abs(float(a) - float(b))


_DECIMAL = re.compile(r"[+-]?\d*\.(\d+)")


def _decimals(s: str) -> int:
    """Digits after the point of a plain decimal number ("113.1" -> 1); 0 for anything else."""
    m = _DECIMAL.fullmatch(s.strip())
    return len(m.group(1)) if m else 0


def _points(exprs, deadline):
    """Values of sympy expressions at three fixed points: how expressions with variables compare
    (fixed, so the same pair always gets the same verdict)."""
    symbols = sorted(set().union(*(e.free_symbols for e in exprs)), key=str)
    rng = random.Random(0)
    for _ in range(3):
        if time.monotonic() > deadline:
            raise TimeoutError
        point = {s: rng.uniform(0.5, 2.5) for s in symbols}
        yield [complex(e.evalf(20, subs=point)) for e in exprs]


def _same_function(p: str, g: str, deadline: float, atol: float = 0.0) -> bool:
    """Two expressions with variables that agree at the fixed points (relative 1e-6 or atol)."""
    a, b = grader.parse_math(p, deadline), grader.parse_math(g, deadline)
    if a is None or b is None or not (a.free_symbols or b.free_symbols):
        return False
    return all(abs(va - vb) <= max(atol, 1e-6 * max(abs(va), abs(vb), 1)) for va, vb in _points([a, b], deadline))


def _sides(s: str) -> tuple[str, str] | None:
    parts = s.split("=")
    return (parts[0], parts[1]) if len(parts) == 2 and parts[0].strip() and parts[1].strip() else None


def _equation_equal(p: str, g: str, deadline: float) -> bool:
    """Equations with the same solutions: (lhs - rhs) of one is a nonzero constant times the other's
    ("y=-2x+5" = "2x+y=5")."""
    sp, sg = _sides(p), _sides(g)
    if not (sp and sg):
        return False
    exprs = [grader.parse_math(_tight(x), deadline) for x in (*sp, *sg)]
    if any(e is None for e in exprs):
        return False
    a, b = exprs[0] - exprs[1], exprs[2] - exprs[3]
    if not (a.free_symbols or b.free_symbols):
        return False
    ratios = []
    for va, vb in _points([a, b], deadline):
        if abs(vb) < 1e-12:  # a fixed point on the gold's curve: no ratio there (vanishingly rare)
            return False
        ratios.append(va / vb)
    return abs(ratios[0]) > 1e-9 and all(abs(r - ratios[0]) <= 1e-6 * abs(ratios[0]) for r in ratios)


def _label_value(s: str) -> str:
    """ "Area = 113.1" / "h = 15" / "m∠ABC = 60" -> the value: a left side with no digit and no
    operator is a name, not part of an equation."""
    sides = _sides(s)
    if sides and not re.search(r"[\d+\-*/^()]", sides[0]):
        return sides[1].strip()
    return s


_UNITS = (r"(?:square|sq\.?|cubic)?\s*(?:units?|mm|cm|dm|km|m|meters?|metres?|centimeters?|millimeters?|kilometers?"
          r"|inch(?:es)?|in|ft|feet|foot|yards?|yd|miles?|mi|kg|g|grams?|seconds?|sec|s|minutes?|mins?|hours?|hrs?"
          r"|h|days?|degrees?|deg|radians?|rad|ml|mL|L|liters?|litres?|m/s|km/h|mph|dollars?|cents?|pounds?|lbs?)")
_UNIT_TAIL = re.compile(r"(?<=[\d}).\s°])\s*" + _UNITS + r"(?:\^\{?[23]\}?|[²³])?$")


def strip_units(s: str) -> str:
    """Drop a trailing unit after a number or a closing bracket ("4.4 m", "113.1 cm^2", "5 square
    units"); "2x" keeps its x, since a unit needs a number before it."""
    for _ in range(2):  # "12 cm^2" and then nothing; "3 m/s" once
        t = _UNIT_TAIL.sub("", s).strip()
        if t == s or not t:
            break
        s = t
    return _tight(s)


def _tight(s: str) -> str:
    """ "2 x" -> "2x": a number then a space then a letter is a product here (the grader would read
    "2 x" as 2 with a unit x, since units are gone by now)."""
    return re.sub(r"(\d)\s+(?=[a-zA-Z\\(])", r"\1", s)


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split at `sep` outside brackets: "(1, 2), 3" -> ["(1, 2)", "3"]."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        depth += 1 if c in "([{" else -1 if c in ")]}" else 0
        if c == sep and depth == 0:
            parts.append(s[start:i].strip())
            start = i + 1
    return parts + [s[start:].strip()]


def _bracketed(s: str) -> tuple[str, list[str], str] | None:
    """ "(a, b]" -> ("(", ["a", "b"], "]") when the outer brackets enclose the whole text."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    depth = 0
    for i, c in enumerate(s):
        depth += 1 if c in "([{" else -1 if c in ")]}" else 0
        if depth == 0 and i < len(s) - 1:
            return None  # "(1)+(2)": the first bracket closes early
    parts = _split_top(s[1:-1])
    return (s[0], parts, s[-1]) if len(parts) >= 2 else None


def _is_inf(s: str) -> int:
    """+1 / -1 for +-infinity spellings, else 0."""
    t = s.replace(" ", "").lower()
    return {"∞": 1, "+∞": 1, "oo": 1, "inf": 1, "+inf": 1, "-∞": -1, "-oo": -1, "-inf": -1}.get(t, 0)


def _intervals_equal(p: str, g: str, same, brackets: bool = True) -> bool | None:
    """Intervals, points and unions compared part by part (`same` for each endpoint); None when
    the gold is not of that shape. `brackets`: whether "(" vs "[" matters (intervals: yes)."""
    gu, pu = re.split(r"\s*∪\s*", g), re.split(r"\s*∪\s*", p)
    gb = [_bracketed(x) for x in gu]
    if not all(gb):
        return None
    pb = [_bracketed(x) for x in pu]
    if len(pu) != len(gu) or not all(pb):
        return False
    for (pl, pp, pr), (gl, gp, gr) in zip(pb, gb):
        if len(pp) != len(gp) or (brackets and (pl, pr) != (gl, gr)):
            return False
        for a, b in zip(pp, gp):
            if _is_inf(b) or _is_inf(a):
                if _is_inf(a) != _is_inf(b):
                    return False
            elif not same(a, b):
                return False
    return True


# ============================================================================= reading


def expand(entry: str) -> list[Path]:
    """One --data entry -> its files: a file, a folder (every .json/.jsonl/.parquet/.tsv under it,
    sorted) or a glob pattern ("dynamath/trial*/dataset.json")."""
    path = Path(entry)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in DATA_SUFFIXES and f.is_file()
                       and not f.name.startswith("."))
    elif any(c in entry for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(entry, recursive=True) if Path(f).is_file())
    else:
        return [path]  # the reader says "no such file" if it is not there
    if not files:
        raise DataError(f"{entry}: no data files ({', '.join(DATA_SUFFIXES)}) match or lie under it. "
                        "Check the path or pattern.")
    return files


def _label(value) -> str | None:
    """A grouping field as a string ("hard", 8 -> "8"); None when absent."""
    if value is None or value == "" or isinstance(value, (dict, list)):
        return None
    return str(value).strip()


class Benchmark:
    """What evaluate.py needs from a benchmark (see the module docstring)."""

    name = title = score_name = ""
    id_field = "id"

    def read(self, files, image_root=None, style="plain", *, skip_bad=False, with_images=True,
             max_image_pixels=data.DEFAULT_MAX_PIXELS) -> tuple[list[Problem], ReadReport]:
        """Read every file (one benchmark's files: DynaMath's 10 variants, MathVerse's two files)."""
        files = [Path(f) for f in files]
        where = str(files[0]) if len(files) == 1 else f"{len(files)} files ({files[0]} ... {files[-1]})"
        report, problems, seen = ReadReport(path=where), [], {}
        for k, path in enumerate(files):
            items, r = self._read_one(path, k, image_root, style, skip_bad, with_images, max_image_pixels)
            for item in items:
                if item.id in seen:
                    raise DataError(f"{path}: record id {item.id!r} was already read from {seen[item.id]}. "
                                    "Pass each file once.")
                seen[item.id] = path
            problems += items
            report.read, report.kept, report.skipped = report.read + r.read, report.kept + r.kept, report.skipped + r.skipped
        return problems, report

    def _read_one(self, path, k, image_root, style, skip_bad, with_images, max_image_pixels):
        def parse(rec, loc, root, max_pixels, stem):
            return self.parse(rec, loc, root, max_pixels, stem, style=style, path=path, k=k)

        return data.read_records(path, image_root, skip_bad, max_image_pixels, parse, self.id_field, with_images)

    def find_answer(self, text: str, problem: Problem) -> str | None:
        return final_answer(text) or None

    def correct(self, answer: str | None, problem: Problem) -> bool:
        """`judge`, made total: no answer, an over-long one or any error (a time-out too) is wrong."""
        if answer is None or len(answer) > grader.MAX_ANSWER_CHARS:
            return False
        try:
            return bool(self.judge(answer, problem))
        except Exception:  # never raise on model output
            return False

    def metrics(self, records: list[dict]) -> dict:
        return {}

    def score(self, summary: dict) -> float | None:
        """The paper's number for this benchmark, from its summary."""
        return summary["metrics"].get(self.score_name, summary["accuracy"])


def _rate(records) -> float | None:
    return sum(bool(r["correct"]) for r in records) / len(records) if records else None


def _by(records: list[dict], key: str) -> dict:
    groups = defaultdict(list)
    for r in records:
        groups[str(r.get(key))].append(r)
    return {k: {"n": len(v), "accuracy": _rate(v)} for k, v in sorted(groups.items())}


# ============================================================================= MathVista


class MathVista(Benchmark):
    """MathVista (testmini 1,000 problems; test 5,141 with hidden answers).

    Release: `testmini.json`, a dict keyed by pid, or the HF parquet (`decoded_image` bytes);
    the reader is minivr1.data's format (c) (and (b), the RL layout, which the toy task uses).
    A multi_choice gold is the option TEXT. Official prompt: the `query` hint ("Hint: Please
    answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3,
    at the end.\\nQuestion: ..."), rebuilt here from question_type / answer_type / precision /
    unit / choices as MathVista's build_query does. Official scoring: a GPT call extracts the
    answer, then normalisation (letter -> option text, int / float rounding to `precision`) and
    exact match. Ours: grader.is_equivalent, the rule the GRPO reward uses (no GPT).
    """

    name, title, score_name = "mathvista", "MathVista", "accuracy"
    id_field = "pid"
    HINTS = {
        "multi_choice": "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
        "integer": "Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.",
        "float1": "Please answer the question requiring a floating-point number with one decimal place and provide the "
                  "final value, e.g., 1.2, 1.3, 1.4, at the end.",
        "float2": "Please answer the question requiring a floating-point number with two decimal places and provide the "
                  "final value, e.g., 1.23, 1.34, 1.45, at the end.",
        "list": "Please answer the question requiring a Python list as an answer and provide the final list, e.g., "
                "[1, 2, 3], [1.2, 1.3, 1.4], at the end.",
        "other": "Please answer the question and provide the final answer at the end.",  # ours: types build_query lacks
    }

    def _read_one(self, path, k, image_root, style, skip_bad, with_images, max_image_pixels):
        problems, report = data.read_problems(path, image_root, skip_bad=skip_bad, with_images=with_images,
                                              max_image_pixels=max_image_pixels)
        for p in problems if style == "official" else ():
            p.question = self.query(p)
        return problems, report

    def query(self, p: Problem) -> str:
        """MathVista's official prompt: hint, question (with unit), lettered choices."""
        block = data.with_choices("", p.choices)
        question = p.question[: len(p.question) - len(block)] if block and p.question.endswith(block) else p.question
        kind = ("multi_choice" if p.question_type == "multi_choice" else
                f"float{p.precision}" if p.answer_type == "float" else p.answer_type)
        lines = ["Hint: " + self.HINTS.get(kind, self.HINTS["other"]),
                 f"Question: {question}" + (f" (Unit: {p.unit})" if p.unit else "")]
        return "\n".join(lines) + block

    def judge(self, answer: str | None, p: Problem) -> bool:
        return grader.is_equivalent(answer, p.answer, **p.grading_meta())


# ============================================================================= MathVerse


class MathVerse(Benchmark):
    """MathVerse testmini: 788 problems x 5 versions with images, plus a Text Only file.

    Release: `testmini.json` (3,940 records) and `testmini_text_only.json` (788), JSON lists, or
    HF's json / parquet (image as {bytes, path}). Fields: sample_index, problem_index,
    problem_version, question, image ("images_version_6/image_685.png"; "" for Text Only),
    answer, question_type (`multi-choice` | `free-form`), metadata {subject, subfield, ...},
    query_wo, query_cot (question_for_eval, when present, is not needed). sample_index collides
    between the two files, so a problem is keyed by (problem_index, problem_version): id
    "685:Vision Only". Choices are parsed out of the question text ("Choices:\\nA:40°" or
    "Choice:\\nA. True"); Vision Only has none in text and borrows a sibling version's.
    Official prompt: query_cot (CoT, natural for a reasoning model; the leaderboard's primary
    "w/o" scores use query_wo). Plain: the question; Vision Only's question is empty, so it
    gets query_cot, the only text the release gives it. Official scoring: GPT extracts the
    answer from the last 30 words, a GPT judge scores 0/1 ("completely matches"; equivalent
    meaning counts for free-form; option text instead of the letter is 0). Ours: letter sets
    for multi-choice (no credit for option text), the free-form rules in `judge_free`.
    Overall = pooled accuracy over the five vision versions; Text Only is reported apart.
    """

    name, title, score_name = "mathverse", "MathVerse", "overall"
    VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only")
    TEXT_ONLY = "Text Only"
    TYPES = {"multi-choice": "multi_choice", "multi_choice": "multi_choice", "free-form": "free_form",
             "free_form": "free_form"}
    _CHOICES_HEAD = re.compile(r"(?:^|\n)\s*Choices?\s*:\s*\n", re.I)
    _CHOICE_LINE = re.compile(r"\s*\(?([A-F])(?:\)\s*[:.：．]?|\s*[:.：．])\s*(.*)")  # "A:40°", "A. True", "(A) 3"

    def read(self, files, image_root=None, style="plain", **kw):
        problems, report = super().read(files, image_root, style, **kw)
        by_index = {}
        for p in problems:  # Vision Only has no choices in its text: borrow a sibling version's
            if p.choices:
                by_index.setdefault(p.meta["problem_index"], p.choices)
        for p in problems:
            if p.question_type == "multi_choice" and not p.choices:
                p.choices = by_index.get(p.meta["problem_index"])
        return problems, report

    @classmethod
    def parse_choices(cls, question: str) -> list[str] | None:
        """["40°", "60°", ...] from the "Choices:\\nA:40°\\nB:60°" block of a question, else None."""
        heads = list(cls._CHOICES_HEAD.finditer(question))
        if not heads:
            return None
        out = []
        for line in question[heads[-1].end():].splitlines():
            m = cls._CHOICE_LINE.fullmatch(line)
            if not m or m.group(1) != string.ascii_uppercase[len(out)]:
                break
            out.append(m.group(2).strip())
        return out or None

    def parse(self, rec, loc, root, max_pixels, stem, *, style, path, k):
        index = data.text_field(rec, "problem_index", loc, numbers_ok=True).strip()
        version = data.text_field(rec, "problem_version", loc).strip()
        if version not in (*self.VERSIONS, self.TEXT_ONLY):
            raise loc.error("problem_version", f"{version!r} is not one of {', '.join(self.VERSIONS)}, Text Only")
        qtype = self.TYPES.get(data.text_field(rec, "question_type", loc).strip())
        if qtype is None:
            raise loc.error("question_type", f"{rec['question_type']!r} is not multi-choice or free-form")
        question = data.text_field(rec, "question", loc, required=False) or ""
        needs_cot = style == "official" or not question.strip()
        prompt = data.text_field(rec, "query_cot", loc, required=needs_cot) if needs_cot else question
        images = [] if version == self.TEXT_ONLY else data.image_field(rec, loc, root, max_pixels, ("image",))
        if root is not None and version != self.TEXT_ONLY and not images:
            raise loc.error("image", "no image", "Add the image path (every vision version has one)")
        meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
        return Problem(
            id=f"{index}:{version}", question=prompt, answer=data.text_field(rec, "answer", loc, numbers_ok=True).strip(),
            images=images, choices=self.parse_choices(question) if qtype == "multi_choice" else None,
            question_type=qtype, category=version, response=data.response_field(rec, loc),
            meta={"problem_index": index, "problem_version": version, "subject": _label(meta.get("subject")),
                  "subfield": _label(meta.get("subfield"))})

    def find_answer(self, text: str, p: Problem) -> str | None:
        answer = final_answer(text)
        if p.question_type == "multi_choice" and letters(answer) is None:
            # the official extractor reads the last 30 words; take their last standalone letter
            found = re.findall(r"\b([A-F])\b", " ".join(text.split()[-30:]))
            return found[-1] if found else answer or None
        return answer or None

    def gold_letters(self, p: Problem) -> frozenset[str] | None:
        """The gold as a letter set: "C", "(C)", "C\\nD"; an option-text gold ("False") is mapped to
        its letter through the choices."""
        found = letters(p.answer)
        if found is None and p.choices:
            keys = [_key(c) for c in p.choices]
            if _key(p.answer) in keys:
                found = frozenset(string.ascii_uppercase[keys.index(_key(p.answer))])
        return found

    def judge(self, answer: str | None, p: Problem) -> bool:
        if answer is None:
            return False
        if p.question_type == "multi_choice":
            gold = self.gold_letters(p)
            if gold is not None:
                return letters(answer) == gold
        return self.judge_free(answer, p.answer)

    def metrics(self, records: list[dict]) -> dict:
        """Overall: pooled over the five vision versions (equal-sized, so also their mean); Text Only
        apart, never in overall; subjects and subfields over the vision versions."""
        vision = [r for r in records if r.get("problem_version") in self.VERSIONS]
        order = {v: i for i, v in enumerate((*self.VERSIONS, self.TEXT_ONLY))}
        per_version = dict(sorted(_by(records, "problem_version").items(), key=lambda kv: order.get(kv[0], 99)))
        present = [per_version[v]["accuracy"] for v in self.VERSIONS if v in per_version]
        return {"overall": _rate(vision), "overall_n": len(vision),
                "mean_of_versions": sum(present) / len(present) if present else None,
                "per_version": per_version, "text_only": per_version.get(self.TEXT_ONLY),
                "per_subject": _by(vision, "subject"), "per_subfield": _by(vision, "subfield")}

    @staticmethod
    def judge_free(pred: str, gold: str) -> bool:
        """Free-form: units, "Label = value" prefixes, bearings, equations, intervals and points,
        numbers at the gold's precision, expressions, then words."""
        deadline = time.monotonic() + grader.BUDGET_S
        lines = [line for line in gold.splitlines() if line.strip()]
        if len(lines) > 1:  # several answers, in order; "-4.9\n-4.9" (one answer written twice) also as one
            if len({_key(x) for x in lines}) == 1 and MathVerse.judge_free(pred, lines[0]):
                return True
            items = [x for x in re.split(r"[\n,;]", pred) if x.strip()]
            return len(items) == len(lines) and all(MathVerse.judge_free(a, b) for a, b in zip(items, lines))
        p, g = clean(_unbox(clean(pred))), clean(gold)
        if _key(p) == _key(g):
            return True
        if (bearing := _bearing_equal(p, g)) is not None:
            return bearing
        if p.count("=") == 1 and g.count("=") == 1 and _equation_equal(p, g, deadline):
            return True
        p, g = strip_units(_label_value(p)), strip_units(_label_value(g))
        same = lambda a, b: _mv_number_equal(a, b, deadline) or _key(a) == _key(b)  # noqa: E731
        if (shape := _intervals_equal(p, g, same)) is not None:
            return shape
        return _key(p) == _key(g) or _mv_number_equal(p, g, deadline) or _same_function(p, g, deadline)


def _mv_number_equal(p: str, g: str, deadline: float) -> bool:
    """MathVerse numbers: a gold written with d decimals is matched by anything that rounds to it
    ("113.1" by 36π = 113.097); an integer gold needs the exact value; an exact non-integer gold
    ("\\frac{\\sqrt{30}}{2}") by the same value (relative 1e-4) or by itself rounded to the 2+
    decimals the prediction gives ("2.74")."""
    a, b = _const(p, deadline), _const(g, deadline)
    if a is None or b is None:
        return False
    if d := _decimals(g):
        return _diff(a, b) <= 0.5 * 10 ** -d * (1 + 1e-9)
    if isinstance(b, Fraction) and b.denominator == 1 and isinstance(a, Fraction):
        return a == b
    k = _decimals(p)
    if k >= 2 and _diff(a, b) <= 0.5 * 10 ** -k * (1 + 1e-9):
        return True
    return _diff(a, b) <= 1e-4 * max(abs(float(a)), abs(float(b)), 1e-8)


_BEARING = re.compile(r"([NS])?\s*(\d+(?:\.\d+)?)\s*(?:°|degrees?)?\s*([EWT])?", re.I)


def _bearing_equal(p: str, g: str) -> bool | None:
    """Bearings: "230 ^\\circ T" (true; the T may be left out) and "S 23.5 ^\\circ W" (quadrant: both
    letters must agree). None when the gold is not a bearing."""
    mg = _BEARING.fullmatch(g)
    if not mg or not (mg.group(1) or mg.group(3)):
        return None
    mp = _BEARING.fullmatch(p)
    if not mp:
        return False
    (gn, gv, ge), (pn, pv, pe) = mg.groups(), mp.groups()
    if (gn or "").upper() != (pn or "").upper():
        return False
    if (ge or "").upper() != (pe or "").upper() and not ((ge or "").upper() == "T" and not pe):
        return False
    return _mv_number_equal(pv, gv, time.monotonic() + grader.BUDGET_S)


# ============================================================================= MM-Math


class MMMath(Benchmark):
    """MM-Math: 5,929 open-ended problems from Chinese middle-school exams, in English; no split.

    Release (HF THU-KEG/MM_Math): `MM_Math.jsonl` and an image zip. Card fields: question,
    file_name (the question's image(s) in the image folder), solution (LaTeX, final answer in
    \\boxed{}), year (grade), difficult (difficulty), knowledge ({level_1, level_2} or a string).
    VLMEvalKit's spellings are accepted too: answer, difficulty, knowledge_l1, knowledge_l2. The
    gold is every \\boxed{} of `solution` joined by "," (as the official judge does), else a
    plain `answer`. There is no id field: a record is "<file stem>-<index>" unless it has `id`.
    Official prompt: not published; ours asks for a \\boxed{} answer (the judge needs one).
    Official scoring (eval.py, VLMEvalKit mmmath.py; rules, no LLM): all boxes of the response
    joined by ",", units / $ / ^\\circ stripped, exact string, then Chinese characters dropped,
    a<x<b as an interval, top-level comma lists (\\pm expanded) of equal length matched
    unordered, each element by interval, by number within 1e-2 (also gold/100 and gold*100), by
    sympy equality, by equation equivalence. Ours follows it with the safe parser (no sympy
    simplify), and does not need a box when the answer came from an <answer> block.
    """

    name, title, score_name = "mmmath", "MM-Math", "overall"
    TOL = 1e-2 * 1.01  # the official precision 1e-2, times its 1.01 slack
    INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."

    def parse(self, rec, loc, root, max_pixels, stem, *, style, path, k):
        question = data.text_field(rec, "question", loc)
        images = data.image_field(rec, loc, root, max_pixels, ("file_name", "image"))
        if root is not None and not images:
            raise loc.error("file_name", "no image", "Add the question's image name (file_name)")
        know = rec.get("knowledge")
        l1 = know.get("level_1") if isinstance(know, dict) else rec.get("knowledge_l1", know)
        l2 = know.get("level_2") if isinstance(know, dict) else rec.get("knowledge_l2")
        difficulty = _label(rec.get("difficult", rec.get("difficulty")))
        return Problem(
            id=data.text_field(rec, "id", loc, required=False, numbers_ok=True) or f"{stem}-{loc.index}",
            question=question + self.INSTRUCTION if style == "official" else question,
            answer=self.gold(rec, loc), images=images, question_type="free_form", category=difficulty,
            response=data.response_field(rec, loc),
            meta={"difficulty": difficulty, "grade": _label(rec.get("year")), "knowledge": _label(l1),
                  "knowledge_l2": _label(l2)})

    @staticmethod
    def gold(rec: dict, loc) -> str:
        solution, answer = rec.get("solution"), rec.get("answer")
        if isinstance(solution, str) and (boxes := boxed_all(solution)):
            return ",".join(boxes)
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if isinstance(answer, str) and answer.strip():
            return ",".join(boxed_all(answer)) or answer.strip()
        if isinstance(solution, str) and solution.strip():
            raise loc.error("solution", "has no \\boxed{} final answer",
                            "Box the final answer in 'solution' or add a plain 'answer' field")
        raise loc.error("solution", "missing, and no 'answer' either",
                        "Add 'solution' (with the final answer in \\boxed{}) or a plain 'answer'")

    def find_answer(self, text: str, p: Problem) -> str | None:
        """Official: every box joined by ","; no box: the $...$ spans of the last line, else the text."""
        boxes = boxed_all(text)
        if boxes:
            return ",".join(boxes)
        lines = [line for line in text.splitlines() if line.strip()]
        spans = re.findall(r"\$([^$]+)\$", lines[-1]) if lines else []
        return ",".join(spans) if spans else text.strip() or None

    @classmethod
    def prep(cls, s: str) -> str:
        """The official preprocessing: boxes joined, "\\in" prefix cut, units and $ stripped."""
        boxes = boxed_all(s)
        s = clean(",".join(boxes) if boxes else s).replace("°", "")
        if "\\in " in s:
            s = s.split("\\in ", 1)[1]
        return ",".join(strip_units(x) for x in _split_top(s))

    def judge(self, answer: str | None, p: Problem) -> bool:
        if answer is None:
            return False
        pred, gold = self.prep(answer), self.prep(p.answer)
        if pred == gold:
            return True
        cjk = re.compile(r"[\u4e00-\u9fff]")
        pred, gold = cjk.sub("", pred).strip(), cjk.sub("", gold).strip()
        if pred == gold:
            return True
        ps, gs = self.items(pred), self.items(gold)
        if not ps or len(ps) != len(gs) or len(gs) > MAX_ITEMS:
            return False
        deadline = time.monotonic() + 2 * grader.BUDGET_S
        unused = list(ps)
        for g in gs:  # unordered: each gold element takes the first still-unused equal prediction
            hit = next((i for i, x in enumerate(unused) if self.equal(x, g, deadline)), None)
            if hit is None:
                return False
            unused.pop(hit)
        return True

    def metrics(self, records: list[dict]) -> dict:
        return {"overall": _rate(records), "per_difficulty": _by(records, "difficulty"), "per_grade": _by(records, "grade"),
                "per_knowledge": _by(records, "knowledge"), "per_knowledge_l2": _by(records, "knowledge_l2")}

    @staticmethod
    def items(s: str) -> list[str]:
        """Top-level comma items, with "a \\pm b" expanded to a+b, a-b and "a<x<b" read as an interval."""
        out = []
        for x in _split_top(s):
            if "\\pm" in x or "±" in x:
                x = x.replace("\\pm", "±")
                out += [x.replace("±", "+", 1), x.replace("±", "-", 1)]
            else:
                out.append(_inequality_interval(x) or x)
        return [x for x in out if x]

    @classmethod
    def equal(cls, p: str, g: str, deadline: float) -> bool:
        if _key(p) == _key(g):
            return True
        same = lambda a, b: cls.equal(a, b, deadline)  # noqa: E731
        if (shape := _intervals_equal(p, g, same)) is not None:
            return shape
        if p.count("=") == 1 and g.count("=") == 1 and _equation_equal(p, g, deadline):
            return True
        a, b = _const(_label_value(p), deadline), _const(_label_value(g), deadline)
        if a is not None and b is not None:
            return any(_diff(a, gold) <= cls.TOL for gold in (b, b / 100, b * 100))
        return _same_function(_label_value(p), _label_value(g), deadline, atol=1e-3)


_INEQ = re.compile(r"(.+?)\s*(<|≤)\s*[a-zA-Z]\s*(<|≤)\s*(.+)")
_HALF = re.compile(r"[a-zA-Z]\s*(<|≤|>|≥)\s*(.+)")


def _inequality_interval(s: str) -> str | None:
    """ "1<x≤3" -> "(1,3]"; "x≥2" -> "[2,∞)"; else None."""
    if len(s) > grader.MAX_MATH_CHARS:
        return None
    if m := _INEQ.fullmatch(s):
        lo, a, b, hi = m.groups()
        return f"{'(' if a == '<' else '['}{lo},{hi}{')' if b == '<' else ']'}"
    if m := _HALF.fullmatch(s):
        op, v = m.groups()
        return {"<": f"(-∞,{v})", "≤": f"(-∞,{v}]", ">": f"({v},∞)", "≥": f"[{v},∞)"}[op]
    return None


# ============================================================================= DynaMath


class DynaMath(Benchmark):
    """DynaMath: 501 seed questions, each drawn as 10 variants (5,010 problems).

    Release: GitHub `trial1..trial10/dataset.json` (a dict keyed by seed "1".."501": question,
    answer, image "image/image1.png" relative to the trial folder, answer_type, subject, level),
    or HF `DynaMath_Sample` splits sample_variant1..10 (id, question, image, decoded_image,
    ground_truth, answer_type, subject, knowledge_level), or VLMEvalKit's table (qid, varid).
    Pass the variants as a folder, a glob or several files: a record's variant is its `varid`,
    else the number after "trial" / "variant" in its file's path, else the file's position;
    its seed is `qid`, else `id`, else the JSON key. Id: "seed:variant". Problems are ordered
    seed by seed, so --limit keeps whole seeds. answer_type is float | multiple choice | text
    (stray "int" is read as float, "single answer" as text).
    Official prompt: "## Question\\n" + question (+ a floating-point reminder), then the JSON
    answer template ("solution", "short answer"). Official scoring (rules): the JSON's short
    answer, else the last line; float: first token, π multiples, |pred - gold| <= 1e-3;
    multiple choice: the letter (gold within the first 3 characters); text: gold is a substring
    of the answer. Ours: the same float rule (with fractions and expressions), a letter rule,
    and typed exact matches for text (times, dates, months, tuples, lists, words) instead of
    substrings. Metrics: average-case accuracy, worst-case accuracy (a seed counts only if
    all its variants are right), reasoning robustness RR = worst / average.
    """

    name, title, score_name = "dynamath", "DynaMath", "average_case"
    TYPES = {"float": "float", "int": "float", "multiple choice": "multiple choice", "text": "text",
             "single answer": "text"}
    TOL = 1e-3
    GUIDE = ("\n## Answer Instruction Please provide an answer to the question outlined above. Your response should "
             "adhere to the following JSON format, which includes two keys: 'solution' and 'short answer'. The "
             "'solution' key can contain detailed steps needed to solve the question, and the 'short answer' key "
             "should provide a concise response. If the problem is a multiple choice problem, just provide the "
             "corresponing choice option, such as 'A', 'B', 'C', or 'D'. If the answer is a numerical value, format "
             "it as a three-digit floating-point number.\n\nExample of expected JSON response format:\n\n"
             + json.dumps({"solution": "[Detailed step-by-step explanation]", "short answer": "[Concise Answer]"},
                          indent=4))

    def read(self, files, image_root=None, style="plain", **kw):
        problems, report = super().read(files, image_root, style, **kw)
        order = lambda p: (int(p.meta["seed"]) if p.meta["seed"].isdigit() else 0, p.meta["seed"], p.meta["variant"])  # noqa: E731
        return sorted(problems, key=order), report

    def parse(self, rec, loc, root, max_pixels, stem, *, style, path, k):
        seed_key = next((key for key in ("qid", "id", "pid") if rec.get(key) not in (None, "")), "qid")
        seed = data.text_field(rec, seed_key, loc, numbers_ok=True).strip()
        from_path = re.findall(r"(?:trial|variant)[_-]?(\d+)", str(path), re.I)
        variant = rec.get("varid") or (from_path[-1] if from_path else k + 1)
        if not str(variant).strip().isdigit():
            raise loc.error("varid", f"expected a variant number, got {variant!r}")
        answer_key = "ground_truth" if "ground_truth" in rec else "answer"
        kind = self.TYPES.get(str(rec.get("answer_type")).strip().lower())
        if kind is None:
            raise loc.error("answer_type", f"{rec.get('answer_type')!r} is not one of float, multiple choice, text")
        question = data.text_field(rec, "question", loc)
        images = data.image_field(rec, loc, root, max_pixels, ("decoded_image", "image"))
        if root is not None and not images:
            raise loc.error("image", "no image", "Add the image path ('image') or bytes ('decoded_image')")
        if style == "official":
            question = ("## Question\n" + question + (" Please answer in a floating-point number." if kind == "float"
                                                      else "") + self.GUIDE)
        subject = _label(rec.get("subject"))
        return Problem(
            id=f"{seed}:{int(variant)}", question=question, answer=data.text_field(rec, answer_key, loc, numbers_ok=True).strip(),
            images=images, question_type="multi_choice" if kind == "multiple choice" else "free_form",
            answer_type=kind, category=subject, response=data.response_field(rec, loc),
            meta={"seed": seed, "variant": int(variant), "subject": subject,
                  "level": _label(rec.get("level", rec.get("knowledge_level")))})

    def find_answer(self, text: str, p: Problem) -> str | None:
        """Official: the "short answer" of the JSON reply; else (ours) a box or the last line."""
        i, j = text.find("{"), text.rfind("}")
        for candidate in (text[i:j + 1], text[i:j + 1].replace("\\", "")) if 0 <= i < j else ():
            try:  # as written; then with backslashes dropped, as the official parser does (LaTeX breaks JSON)
                reply = json.loads(candidate, strict=False)
            except ValueError:
                continue
            if isinstance(reply, dict) and reply.get("short answer") is not None:
                return str(reply["short answer"]).strip() or None
        return final_answer(text) or None

    def judge(self, answer: str | None, p: Problem) -> bool:
        if answer is None:
            return False
        deadline = time.monotonic() + grader.BUDGET_S
        if p.answer_type == "multiple choice":
            found = letters(answer)
            return found is not None and found == letters(p.answer)
        if p.answer_type == "float":
            return self.float_equal(answer, p.answer, deadline)
        return self.text_equal(answer, p.answer, deadline)

    @classmethod
    def float_equal(cls, pred: str, gold: str, deadline: float) -> bool:
        """|pred - gold| <= 1e-3 (absolute, as official); the prediction may be an expression
        ("2π/3", "\\frac{1}{3}") or start with the number ("2.094 units")."""
        b = _const(clean(gold), deadline)
        p = strip_units(_label_value(clean(_unbox(clean(pred)))))
        a = _const(p, deadline)
        if a is None and p.split():
            a = _const(p.split()[0], deadline)
        return a is not None and b is not None and _diff(a, b) <= cls.TOL * (1 + 1e-9)

    MONTHS = {m[:3].lower(): i for i, m in enumerate(
        ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
         "November", "December"], 1)}
    DAYS = {d[:3].lower(): i for i, d in enumerate(
        ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"])}
    NAMES = {"january": "jan", "february": "feb", "march": "mar", "april": "apr", "june": "jun", "july": "jul",
             "august": "aug", "september": "sep", "sept": "sep", "october": "oct", "november": "nov",
             "december": "dec", "monday": "mon", "tuesday": "tue", "wednesday": "wed", "thursday": "thu",
             "friday": "fri", "saturday": "sat", "sunday": "sun"}

    @classmethod
    def text_equal(cls, pred: str, gold: str, deadline: float) -> bool:
        """Typed exact matches: times ("8:0" = "8:00"), dates ("11/2/2006" = "11/02/2006"), month and
        day names ("Sep" = "September"), tuples and lists (numbers within 1e-3, in order),
        assignments ("y = 4" = "4"), numbers (1e-3), then case-insensitive words."""
        p, g = clean(_unbox(clean(pred))), clean(gold)
        if _key(p) == _key(g):
            return True
        for pattern in (r"(\d{1,2})\s*:\s*(\d{1,2})", r"(\d{1,4})\s*[/.-]\s*(\d{1,2})\s*[/.-]\s*(\d{1,4})"):
            if mg := re.fullmatch(pattern, g):
                mp = re.fullmatch(pattern, p)
                return bool(mp) and [int(x) for x in mp.groups()] == [int(x) for x in mg.groups()]
        word = lambda s: cls.NAMES.get(s.lower().rstrip("."), s.lower().rstrip("."))  # noqa: E731
        if word(g) in cls.MONTHS or word(g) in cls.DAYS:
            return word(p) == word(g)
        same = lambda a, b: cls.float_equal(a, b, deadline) or _key(a) == _key(b)  # noqa: E731
        if "," in g:  # "(1.000, 0.000)", "[3, 2, 3, 3, 6]", "69, 51, 59": in order, brackets free
            wrap = lambda s: s if _bracketed(s) else f"({s})"  # noqa: E731
            return bool(_intervals_equal(wrap(p), wrap(g), same, brackets=False))
        if g.count("=") == 1:
            if p.count("=") == 1 and _equation_equal(p, g, deadline):
                return True
            p, g = _label_value(p), _label_value(g)
        return same(p, g) if _const(strip_units(g), deadline) is not None else _key(p) == _key(g)

    def metrics(self, records: list[dict]) -> dict:
        """Average case over every record; worst case over the seeds that have every variant of
        the run (a seed missing one cannot be judged: counted in `incomplete_seeds`, not scored);
        RR = worst / average over those same seeds."""
        variants = {r["variant"] for r in records}
        seeds = defaultdict(list)
        for r in records:
            seeds[r["seed"]].append(r)
        complete = {s: rs for s, rs in seeds.items() if len({r["variant"] for r in rs}) == len(variants)}

        def cases(rs_by_seed) -> dict:
            rows = [r for rs in rs_by_seed.values() for r in rs]
            whole = {s: rs for s, rs in rs_by_seed.items() if s in complete}
            worst = sum(all(r["correct"] for r in rs) for rs in whole.values()) / len(whole) if whole else None
            avg_whole = _rate([r for rs in whole.values() for r in rs])
            return {"n": len(rows), "average_case": _rate(rows), "worst_case": worst, "seeds": len(whole),
                    "reasoning_robustness": worst / avg_whole if worst is not None and avg_whole else None}

        def grouped(key) -> dict:
            groups = defaultdict(dict)
            for s, rs in seeds.items():
                groups[str(rs[0].get(key))][s] = rs
            return {k: cases(v) for k, v in sorted(groups.items())}

        overall = cases(seeds)
        return {"average_case": overall["average_case"], "worst_case": overall["worst_case"],
                "reasoning_robustness": overall["reasoning_robustness"], "variants": len(variants),
                "seeds": len(seeds), "complete_seeds": len(complete), "incomplete_seeds": len(seeds) - len(complete),
                "per_subject": grouped("subject"), "per_level": grouped("level")}


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (MathVista(), MathVerse(), MMMath(), DynaMath())}


# ============================================================================= choosing benchmarks


def detect(path) -> str:
    """The benchmark a file belongs to, from its first record's fields."""
    keys = data.first_keys(path)
    if keys & {"problem_version", "query_cot", "query_wo"}:
        return "mathverse"
    if keys & {"ground_truth", "knowledge_level", "varid", "qid"} or {"level", "subject", "answer_type"} <= keys:
        return "dynamath"
    if keys & {"solution", "file_name", "difficult", "knowledge", "knowledge_l1"}:
        return "mmmath"
    if keys & {"pid", "problem", "choices", "question_type", "decoded_image"}:
        return "mathvista"
    raise DataError(f"{path}: cannot tell the benchmark from the fields {sorted(keys)}. "
                    f"Pass --benchmark ({' | '.join(BENCHMARKS)}).")


def plan(benchmark: str, entries: str, image_root: str | None = None) -> list[tuple[Benchmark, list[Path], str | None]]:
    """--benchmark, --data (or --predictions) and --image_root -> [(benchmark, files, image root)].

    Each is a comma-separated list, paired by position: one --data entry per benchmark (a file,
    a folder or a glob); one name ("auto" by default) or one image root applies to every entry."""
    items = [e.strip() for e in entries.split(",") if e.strip()]
    names = [n.strip().lower().replace("-", "").replace("_", "") for n in benchmark.split(",")]
    roots = [r.strip() or None for r in image_root.split(",")] if image_root else [None]
    names, roots = (names * len(items) if len(names) == 1 else names), (roots * len(items) if len(roots) == 1 else roots)
    if len(names) != len(items) or len(roots) != len(items):
        raise DataError(f"{len(items)} data entries, {len(names)} benchmark names and {len(roots)} image roots. "
                        "Give one --data entry per benchmark, in the same order (and one --image_root, or one each).")
    out = []
    for name, entry, root in zip(names, items, roots):
        files = expand(entry)
        name = detect(files[0]) if name == "auto" else name
        if name not in BENCHMARKS:
            raise DataError(f"unknown benchmark {name!r}. Use one of {', '.join(BENCHMARKS)} (or auto).")
        out.append((BENCHMARKS[name], files, root))
    if len({b.name for b, _, _ in out}) < len(out):
        raise DataError(f"a benchmark is named twice in {[b.name for b, _, _ in out]}. "
                        "Give each benchmark once, with all its files in one entry (a folder or a glob).")
    return out


def paper_table(results: dict[str, dict[str, dict]]) -> str:
    """The paper's table: {model: {benchmark name: summary}} -> markdown, accuracies in percent."""
    columns = [("mathvista", "MathVista", "accuracy"), ("mathverse", "MathVerse", "overall"),
               ("mmmath", "MM-Math", "overall"), ("dynamath", "DynaMath", "average_case"),
               ("dynamath", "DynaMath worst", "worst_case"), ("dynamath", "DynaMath RR", "reasoning_robustness")]
    rows = ["| model | " + " | ".join(c[1] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, by_name in results.items():
        cells = []
        for name, _, key in columns:
            s = by_name.get(name)
            value = None if s is None else (s if key == "accuracy" else s["metrics"]).get(key)
            cells.append("-" if value is None else f"{100 * value:.1f}")
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
