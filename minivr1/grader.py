"""The response format, answer extraction, answer equivalence and Vision-R1's rewards.

Pure functions from text to values. Model output is never executed: math answers go through
the small recursive-descent parser below, which builds sympy objects from a token stream
(sympy's own `sympify`/`parse_expr` call `eval`, so they are never used on model text).

Format (`parse_response(...).format_ok`), strict:
  1. optional leading whitespace, then exactly one `<think> ... </think>` block, first;
  2. then optional whitespace and exactly one `<answer> ... </answer>` block;
  3. then only whitespace to the end; one trailing `<|im_end|>` or `<|endoftext|>` token text
     is tolerated (decoders that keep special tokens leave it there);
  4. each of the four tags occurs exactly once in the whole text, so a second answer block, a
     second think, or a tag inside the answer all fail the format;
  5. the extracted answer is non-empty (the think may be empty);
  6. an unterminated `<think>` or a missing `</answer>` fails: that is what a completion cut
     off at PTST's length limit looks like, and why HFRRF gives it 0.

Answer (`extract_answer`): the content of the LAST complete `<answer>...</answer>` block,
stripped, with a leading `Final Answer:` removed (the released Vision-R1 models write
`<answer> Final Answer:C </answer>`) and a `\\boxed{...}` unwrapped when it is the whole
answer. No complete block -> None: an answer outside the tags is not an answer.

Equivalence (`is_equivalent(pred, gold, ...)`), first rule that applies:
  - multiple choice (`choices` given): the prediction names an option by letter (`C`, `(C)`,
    `C.`, `C) text`, `Option C`, any case; A = choices[0]) or by its text (case- and
    whitespace-insensitive) or by a value equal to exactly one option's; the gold may be the
    option text (MathVista stores the text) or a letter. Correct iff both name the same option;
  - `answer_type="list"` (MathVista): "[1, 2]" vs "1,2", element by element;
  - plain text: equal after case folding, dropping whitespace and a trailing period (yes/no);
  - numbers and expressions, parsed to sympy: "1,000" = 1000; "7 cm" = 7 (a trailing unit word
    is dropped only when the rest is a number); "30^\\circ" = "30°" = 30; "50%" = 50 (MathVista
    convention, not 0.5); "x = 3" = 3. With `precision`, both values are rounded to that many
    decimals (as MathVista does); else an integer gold must be hit exactly ("7.0" yes, "7.001"
    no) and other values within relative 1e-4 (absolute 1e-8 near zero). Expressions with
    single-letter variables are compared at a few fixed pseudo-random points.
Work is bounded by structure rather than signals (signals only work on the main thread):
answers over MAX_ANSWER_CHARS characters are wrong, math over MAX_MATH_CHARS characters, nesting over MAX_DEPTH, exponents over MAX_EXPONENT or
exact powers over MAX_BITS bits are rejected (not equivalent), and a wall-clock BUDGET_S is
checked between parser and evaluation steps. Any exception on model output means False.
"""

from __future__ import annotations

import cmath
import random
import re
import time
from dataclasses import dataclass
from fractions import Fraction

import sympy

from minivr1.cli import UserError

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
MAX_ANSWER_CHARS = 10_000  # no real final answer is longer; keeps grading cheap on runaways
MAX_MATH_CHARS = 200  # longer "math" is not an answer a grader should spend time on
MAX_DEPTH = 50  # nesting of parentheses / unary signs / exponents
MAX_EXPONENT = 1000  # |exponent| of a numeric power
MAX_BITS = 100_000  # size of an exact integer power sympy would compute (9^9^9 would hang)
BUDGET_S = 1.0  # wall clock per math comparison, checked between steps

_FINAL = re.compile(r"final\s*answer\s*:", re.I)
_WAIT = re.compile(r"\bWait\b")


# ----------------------------------------------------------------------------- format


@dataclass(frozen=True)
class Parsed:
    think: str | None  # text inside the first complete <think>...</think>, stripped
    answer: str | None  # extract_answer(text)
    format_ok: bool  # the strict format in the module docstring


def _unbox(s: str) -> str:
    """`\\boxed{x}` -> `x` when the box spans the whole string (braces matched, not regexed).
    Answers over 10k characters are left alone: matching braces is a per-character loop."""
    if not (s.startswith("\\boxed{") and s.endswith("}")) or len(s) > 10_000:
        return s
    depth = 0
    for i in range(6, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
        if depth == 0:  # the box's own brace closes here; it must be the last character
            return s[7:i].strip() if i == len(s) - 1 else s
    return s


def _clean_answer(s: str) -> str:
    s = s.strip()
    m = _FINAL.match(s)
    if m:
        s = s[m.end() :].strip()
    return _unbox(s)


def extract_answer(text: str) -> str | None:
    """The cleaned content of the last complete <answer>...</answer> block, or None."""
    if not isinstance(text, str):
        return None
    close = text.rfind("</answer>")  # rfind/find keep this linear on megabyte strings
    if close < 0:
        return None
    open_ = text.rfind("<answer>", 0, close)
    if open_ < 0:
        return None
    close = text.find("</answer>", open_)  # a block ends at its first </answer> (nested tags)
    answer = _clean_answer(text[open_ + len("<answer>") : close])
    return answer or None


def _strip_end(text: str) -> str:
    text = text.strip()
    for tok in END_TOKENS:
        if text.endswith(tok):  # once only: a loop would be quadratic on repeated tokens
            return text[: -len(tok)].rstrip()
    return text


def parse_response(text: str) -> Parsed:
    if not isinstance(text, str):
        return Parsed(None, None, False)
    t0 = text.find("<think>")
    t1 = text.find("</think>", t0) if t0 >= 0 else -1
    think = text[t0 + len("<think>") : t1].strip() if 0 <= t0 < t1 else None
    answer = extract_answer(text)

    body = _strip_end(text)
    i, j, k = body.find("</think>"), body.find("<answer>"), body.find("</answer>")
    format_ok = (
        all(body.count(tag) == 1 for tag in TAGS)
        and body.startswith("<think>")
        and 0 < i < j < k
        and not body[i + len("</think>") : j].strip()  # only whitespace between the blocks
        and k == len(body) - len("</answer>")  # nothing after </answer>
        and answer is not None
    )
    return Parsed(think, answer, format_ok)


def count_wait(text: str) -> int:
    """Occurrences of the word "Wait" (case-sensitive, whole word), as the paper counts them."""
    return len(_WAIT.findall(text))


# ----------------------------------------------------------------------------- math parser


class _Reject(Exception):
    """Input is not math we are willing to evaluate."""


_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|(\\[a-zA-Z]+)|([a-zA-Z]+)|([-+*/^(){}\[\]]))")
_CLOSE = {"(": ")", "{": "}", "[": "]"}
_REPLACE = [  # LaTeX / unicode spellings -> what the parser reads; order matters
    ("\\left", ""), ("\\right", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
    ("\\cdot", "*"), ("\\times", "*"), ("×", "*"), ("·", "*"), ("\\div", "/"), ("÷", "/"),
    ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("°", ""), ("\\%", ""), ("%", ""),
    ("\\!", ""), ("\\,", " "), ("\\;", " "), ("\\:", " "), ("\\ ", " "), ("$", ""),
    ("**", "^"), ("π", "\\pi"), ("√", "\\sqrt"), ("−", "-"),
]
_TEXT_CMD = re.compile(r"\\(?:text|mathrm|mbox)\{([^{}]*)\}")  # non-nested: no backtracking
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUM_UNIT = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))\s*([a-zA-Z]{2,}|(?<=\s)[a-zA-Z])(?:\^?\{?[23]\}?|[²³])?")
_ASSIGN = re.compile(r"[a-zA-Z]\s*=\s*([^=]+)")
_NAMES = {"pi", "sqrt", "frac"}


def _pow(base, exp):
    """base ** exp, refusing powers that would make sympy compute a gigantic exact number."""
    if exp.is_number:
        e = abs(complex(exp.evalf(15)))
        bits = max((max(r.p.bit_length(), r.q.bit_length()) for r in base.atoms(sympy.Rational)), default=1)
        if not e <= MAX_EXPONENT or e * bits > MAX_BITS:
            raise _Reject("exponent too large")
    return base**exp


class _Parser:
    """expr := term (('+'|'-') term)*        term := unary (('*'|'/') unary | implicit power)*
    unary := ('+'|'-') unary | power         power := atom ('^' unary)?
    atom := number | letter | pi | (expr) | {expr} | [expr] | \\frac arg arg | \\sqrt[n]? arg"""

    def __init__(self, text: str, deadline: float):
        self.toks, pos = [], 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                if text[pos:].strip():
                    raise _Reject(f"unexpected character {text[pos]!r}")
                break
            kind = m.lastindex  # 1 number, 2 \command, 3 word, 4 operator
            self.toks.append((("num", "cmd", "word", "op")[kind - 1], m.group(kind)))
            pos = m.end()
        self.i, self.depth, self.deadline = 0, 0, deadline

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "")

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def expect(self, value):
        if self.take()[1] != value:
            raise _Reject(f"expected {value}")

    def parse(self):
        e = self.expr()
        if self.i != len(self.toks):
            raise _Reject("trailing tokens")
        return e

    def expr(self):
        e = self.term()
        while self.peek()[1] in ("+", "-"):
            e = e + self.term() if self.take()[1] == "+" else e - self.term()
        return e

    def term(self):
        e = self.unary()
        while True:
            kind, v = self.peek()
            if v in ("*", "/"):
                self.take()
                e = e * self.unary() if v == "*" else e / self.unary()
            elif kind in ("cmd", "word") or v in _CLOSE:  # "2x", "3\pi", "2\sqrt{3}", "2(x+1)"
                e = e * self.power()  # but never number-number: "12 15" is not 180
            else:
                return e

    def unary(self):
        self.depth += 1  # every nesting level (parens, signs, exponents) passes through here
        if self.depth > MAX_DEPTH:
            raise _Reject("nested too deeply")
        try:
            if self.peek()[1] in ("+", "-"):
                return self.unary() if self.take()[1] == "+" else -self.unary()
            return self.power()
        finally:
            self.depth -= 1

    def power(self):
        base = self.atom()
        if self.peek()[1] == "^":
            self.take()
            return _pow(base, self.unary())  # right-associative: 2^3^2 = 2^(3^2)
        return base

    def atom(self):
        if time.monotonic() > self.deadline:
            raise _Reject("out of time")
        kind, v = self.take()
        if kind == "num":
            return sympy.Rational(v)  # exact: "0.1" is 1/10
        if v in _CLOSE:
            e = self.expr()
            self.expect(_CLOSE[v])
            return e
        if kind == "word" and len(v) == 1:
            return sympy.Symbol(v)
        name = v.lstrip("\\")
        if name == "pi":
            return sympy.pi
        if name == "frac":
            return self.arg() / self.arg()
        if name == "sqrt":
            if self.peek()[1] == "[":  # \sqrt[3]{8}
                self.take()
                n = self.expr()
                self.expect("]")
                return _pow(self.arg(), 1 / n)
            return _pow(self.arg(), sympy.Rational(1, 2))
        raise _Reject(f"unknown token {v!r}")

    def arg(self):
        """A LaTeX argument: {expr}, or a single token, so that \\frac12 is \\frac{1}{2}."""
        kind, v = self.peek()
        if kind == "num" and len(v) > 1 and v[0] != ".":
            self.toks[self.i] = ("num", v[1:])
            return sympy.Integer(v[0])
        return self.atom()


def _to_math(s: str, deadline: float):
    """Answer text -> sympy expression, or None if it is not (bounded) math."""
    if len(s) > MAX_MATH_CHARS:
        return None
    s = _TEXT_CMD.sub(r" \1", s)
    for old, new in _REPLACE:
        s = s.replace(old, new)
    s = s.strip().rstrip(".").strip()
    if m := _ASSIGN.fullmatch(s):  # "x = 3" answers 3
        s = m.group(1).strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if (m := _NUM_UNIT.fullmatch(s)) and m.group(2).lower() not in _NAMES:
        s = m.group(1)  # "7 cm" -> 7, but "3pi" stays 3*pi
    try:
        return _Parser(s, deadline).parse()
    except (_Reject, RecursionError, ValueError, TypeError, ZeroDivisionError):
        return None


def parse_math(text: str, deadline: float | None = None):
    """Answer text -> a sympy expression built by the safe parser above, or None when it is not
    bounded math. The one door minivr1.benchmarks uses, so its scorers share these limits;
    `deadline` (time.monotonic() seconds) defaults to BUDGET_S from now."""
    return _to_math(text, time.monotonic() + BUDGET_S if deadline is None else deadline)


def _value(e):
    """A constant expression's value: exact Fraction when rational, else a complex float."""
    if e.is_Rational:
        return Fraction(int(e.p), int(e.q))
    return complex(e.evalf(30))


def _numbers_equal(a, b, precision: int | None) -> bool:
    """Predicted value a vs gold value b (Fractions or complex)."""
    if isinstance(a, Fraction) and isinstance(b, Fraction) and precision is None:
        if a == b or b.denominator == 1:  # an exact integer gold needs an exact answer: 7.001 is not 7
            return a == b
    rel = 1e-9 if isinstance(b, Fraction) and b.denominator == 1 else 1e-4
    a, b = complex(a), complex(b)  # OverflowError on astronomically large exact values -> False
    if not (cmath.isfinite(a) and cmath.isfinite(b)):  # inf == inf must not count as equal
        return False
    if precision is not None:
        if abs(a.imag) > 1e-12 or abs(b.imag) > 1e-12:
            return False
        return round(a.real, precision) == round(b.real, precision)
    return abs(a - b) <= max(rel * max(abs(a), abs(b)), 1e-8)


def _math_equal(pred: str, gold: str, precision: int | None) -> bool:
    deadline = time.monotonic() + BUDGET_S
    a, b = _to_math(pred, deadline), _to_math(gold, deadline)
    if a is None or b is None:
        return False
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    if not symbols:
        return _numbers_equal(_value(a), _value(b), precision)
    if a == b:  # sympy's canonical form already equates "x+1" and "1+x"
        return True
    rng = random.Random(0)  # fixed points: the same pair always gets the same verdict
    for _ in range(3):
        if time.monotonic() > deadline:
            return False
        point = {s: rng.uniform(0.5, 2.5) for s in symbols}  # positive: sqrt(x) stays real
        va, vb = complex(a.evalf(20, subs=point)), complex(b.evalf(20, subs=point))
        if not _numbers_equal(va, vb, None):
            return False
    return True


# ----------------------------------------------------------------------------- equivalence

# no two adjacent \s* anywhere: that would backtrack quadratically on a megabyte of spaces
_LETTER = re.compile(r"(?:(?:option|choice)\s*)?[(\[]?([a-z])\s*(?:[)\].:]\s*(?:\S.*)?)?", re.I | re.S)


def _norm_text(s: str) -> str:
    return "".join(s.split()).casefold().rstrip(".")


def _clean(s: str) -> str:
    return _clean_answer(str(s)).strip().strip("$").strip()


def _choice_index(s: str, choices: list[str], *, by_value: bool) -> int | None:
    """Which option s names: by its text, by its letter, or (pred only) by an equal value."""
    texts, norm = [_norm_text(_clean(c)) for c in choices], _norm_text(s)
    if norm in texts:
        return texts.index(norm)
    m = _LETTER.fullmatch(s)
    if m and ord(m.group(1).upper()) - ord("A") < len(choices):
        return ord(m.group(1).upper()) - ord("A")
    if by_value:
        same = [i for i, c in enumerate(choices) if _scalar_equal(s, _clean(c), None)]
        if len(same) == 1:
            return same[0]
    return None


def _scalar_equal(pred: str, gold: str, precision: int | None) -> bool:
    if _norm_text(pred) == _norm_text(gold):
        return True
    return _math_equal(pred, gold, precision)


def _split_list(s: str) -> list[str]:
    s = s.strip()
    if s[:1] in "[(" and s[-1:] in "])":
        s = s[1:-1]
    return [x.strip() for x in s.split(",")]


def is_equivalent(
    pred: str | None,
    gold: str,
    *,
    choices: list[str] | None = None,
    answer_type: str | None = None,
    precision: int | None = None,
) -> bool:
    """Whether the predicted answer means the gold answer (rules in the module docstring)."""
    try:
        if pred is None or gold is None:
            return False
        pred, gold = _clean(pred), _clean(gold)
        if not pred or len(pred) > MAX_ANSWER_CHARS:
            return False
        try:  # datasets store precision as float (2.0) or NaN
            precision = None if precision is None else int(float(precision))
        except (TypeError, ValueError, OverflowError):
            precision = None
        choices = [str(c) for c in choices] if choices is not None and len(choices) else None

        if choices:
            g = _choice_index(gold, choices, by_value=False)
            if g is not None:
                return _choice_index(pred, choices, by_value=True) == g
        if str(answer_type).lower() == "list":
            ps, gs = _split_list(pred), _split_list(gold)
            return len(ps) == len(gs) and all(_scalar_equal(p, g, precision) for p, g in zip(ps, gs))
        return _scalar_equal(pred, gold, precision)
    except Exception:  # never raise on model output: garbage in -> not equivalent
        return False


# ----------------------------------------------------------------------------- rewards


def _meta(meta: dict) -> dict:
    """Keep the grading keys of a dataset record; ignore the rest (question_type, unit, ...)."""
    return {k: meta.get(k) for k in ("choices", "answer_type", "precision")}


def format_reward(text: str, gold: str | None = None, **meta) -> float:
    """1.0 iff the format is right; takes (and ignores) the answer, like every reward function."""
    return 1.0 if parse_response(text).format_ok else 0.0


def accuracy_reward(text: str, gold: str, **meta) -> float:
    """1.0 iff the last complete answer block is equivalent to the gold (format not checked)."""
    return 1.0 if is_equivalent(extract_answer(text), gold, **_meta(meta)) else 0.0


def hfrrf_reward(text: str, gold: str, **meta) -> float:
    """Vision-R1's hard formatting result reward: 1 only if the format AND the answer are right."""
    p = parse_response(text)
    return 1.0 if p.format_ok and is_equivalent(p.answer, gold, **_meta(meta)) else 0.0


def zero_reward(text: str, gold: str, **meta) -> float:
    """Vision-R1-Zero: format and result rewards 1:1, scaled by 0.5 so the total lies in [0, 1]
    like HFRRF's (GRPO's group normalisation makes the overall scale irrelevant anyway)."""
    return 0.5 * format_reward(text) + 0.5 * accuracy_reward(text, gold, **meta)


REWARDS = {"hfrrf": hfrrf_reward, "zero": zero_reward, "format": format_reward, "accuracy": accuracy_reward}


def load_reward(name: str):
    """A reward function by name ("hfrrf", "zero", ...) or import path "package.module:function".

    A custom reward is a pure function (completion_text, gold_answer, **meta) -> float, where
    meta holds the problem's choices / answer_type / precision.
    """
    if name in REWARDS:
        return REWARDS[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise RewardError(f"unknown reward {name!r}: use one of {sorted(REWARDS)} or 'module:function'")
    import importlib

    try:
        fn = getattr(importlib.import_module(module), attr, None)
    except ImportError as e:
        raise RewardError(f"--reward {name!r}: cannot import {module} ({e}). Check the module path (it must be "
                          "importable from the current folder or PYTHONPATH)") from e
    if not callable(fn):
        raise RewardError(f"reward {name!r}: {module} has no function {attr!r}")
    return fn


class RewardError(UserError, ValueError):
    """A reward that cannot be loaded or that fails on a completion; the message says which and where."""


def call_reward(reward_fn, text: str, problem, step: int) -> float:
    """`reward_fn`'s score of one completion of `problem` as a float. A reward that raises, or returns
    something that is not a number, ends the run with one line naming the step, the reward and the value
    (a user's reward: RewardError is a UserError)."""
    import numbers

    name = next((k for k, f in REWARDS.items() if f is reward_fn), None) or \
        f"{getattr(reward_fn, '__module__', '?')}:{getattr(reward_fn, '__qualname__', repr(reward_fn))}"
    where = f"on problem {problem.id} (completion {text[:60]!r}{'...' if len(text) > 60 else ''})"
    try:
        value = reward_fn(text, problem.answer, **problem.grading_meta())
    except Exception as e:  # noqa: BLE001 - any failure of a user's function is reported the same way
        raise RewardError(f"step {step}: reward {name!r} raised {type(e).__name__}: {e} {where}. Fix the reward "
                          "function; MINIVR1_DEBUG=1 shows the traceback") from e
    if not isinstance(value, numbers.Real) and hasattr(value, "item"):
        try:
            value = value.item()                     # a one-element tensor or array
        except (ValueError, RuntimeError):
            pass
    if not isinstance(value, numbers.Real):
        raise RewardError(f"step {step}: reward {name!r} returned {value!r:.60} ({type(value).__name__}), not a number, "
                          f"{where}. A reward returns a float (e.g. 1.0 or 0.0)")
    return float(value)
