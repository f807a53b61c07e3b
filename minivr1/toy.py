"""The built-in toy task: counting coloured shapes on a 4x4 grid; task v2 adds two harder levels.

Every problem is a 112x112 PNG: a 4x4 grid of 28x28 cells, some filled with one of four colours
(a coloured square per cell). 112x112 is exactly 16 merged vision tokens for
Qwen2.5-VL (patch 14, merge 2): one token per cell. No question is answerable without looking
at the image. Two tasks (`TASKS`; docs/toy-task.md has the design, what each property imitates,
and the pilots behind it):

    v1 (the default, the original toy task) = level 1 alone; v2 = levels 1, 2, 3 in equal shares
    level 1: one step after looking (3-9 shapes)
      count       "How many red shapes are in the image?"                                      integer
      total       "How many shapes are in the image in total?"                                  integer
      majority    "Which color appears most often in the image?"                                A-D
    level 2: two colours, one operation (3-9 shapes)
      sum         "How many red and blue shapes are there together?"                           integer
      difference  "How many more red shapes than blue shapes are there?"                       integer
    level 3: three or four colours, two or three operations (6-12 shapes)
      three       "How many more red and green shapes are there than blue shapes?"             integer
      pairs       "How many more red and green shapes are there than blue and yellow shapes?"  integer

The generator is deterministic given the seed. It writes

    images/<id>.png
    rl_train.jsonl, eval.jsonl     RL format: {"id", "images": ["images/<id>.png"], "problem", "answer"}
                                   (+ "question_type", "answer_type", "category" (the kind) and
                                   "level" for scoring and per-level reports)
    cold_start.json                Vision-R1-cold format (LLaMA-Factory sharegpt) with R1-style traces
    instruct.json                  the same format with direct answers (no reasoning): to build the
                                   toy's "instruct model", the starting point of the Zero baseline

The cold-start traces read like R1's: the model looks, lists the colour counts ("I see 3 red,
1 green and 2 blue shapes."), works the question out, questions itself ("Wait, ...") and answers
as `<think> ... </think><answer> ... </answer>`. Every trace's own arithmetic is right; what
varies, as in distilled R1 data:

* **Worked steps** (level 2-3). A trace that works the question out goes through the colour list
  in order, one line per colour ("3 red: add, so far 3." / "2 blue: take away, so far 3 - 2 = 1."
  / "1 green: skip."): the more colours and operations a question involves, the longer this is.
  A "short" trace (`short_rate`, 40% of level-2/3 traces) goes from the list straight to "So the
  answer is 1.", right in the data but asking a model to do every step in one token. Level 1
  has no steps to skip: its traces are the original task's.
* **Reflections and flaws** (as in the original task): 0-4 reflections; traces with two or more
  are flawed with probability `flaw_rate_long` (80%): the last reflection talks the trace out of
  a correct count, and its answer is wrong.
* **Loops** (v2): `loop_rate` (15%) of traces get stuck recounting one colour ("Wait, let me
  recount the red shapes." / "Red shapes: 3.") 3-8 times instead of reflecting, far past what the
  problem needs; `runaway_rate` (a third) of those loop 18-20 times, longer than every length
  limit in the toy configs (320 tokens at evaluation, 192 in GRPO), so a model that imitates them
  is cut off before it answers. A loop repeats a correct count: it costs length, not correctness.

Flaws, loops and the trace style are drawn by the seeded generator, not from the image, so no
model can predict from the input which traces are flawed or loop. The default (v1) output is
byte-for-byte the original toy task's, plus a "level" field in the RL records.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
COLOR_NAMES = list(COLORS)           # the order of the multiple-choice options: A red, B green, C blue, D yellow
SHAPES = ["circle", "square", "triangle"]
GRID, CELL = 4, 28
IMAGE_SIZE = GRID * CELL             # 112 px -> 16 vision tokens after Qwen's 2x2 merge
LETTERS = "ABCD"
LEVEL_KINDS = {1: ["count", "total", "majority"], 2: ["sum", "difference"], 3: ["three", "pairs"]}
LEVEL_OF = {kind: level for level, kinds in LEVEL_KINDS.items() for kind in kinds}
LEVEL_SHAPES = {1: (3, 9), 2: (3, 9), 3: (6, 12)}   # shapes per scene: level 3's fuller grids have more to combine
LEVELS = tuple(LEVEL_KINDS)
KINDS = LEVEL_KINDS[1]               # the original task's kinds (level 1)
ALL_KINDS = [k for kinds in LEVEL_KINDS.values() for k in kinds]


@dataclass
class Scene:
    cells: list[tuple[int, int, str, str]]    # (row, col, colour, shape)

    def count(self, color: str) -> int:
        return sum(1 for _, _, c, _ in self.cells if c == color)

    def counts(self) -> dict[str, int]:
        return {c: self.count(c) for c in COLOR_NAMES}


def random_scene(rng: random.Random, min_shapes: int = 3, max_shapes: int = 9) -> Scene:
    n = rng.randint(min_shapes, max_shapes)
    slots = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    return Scene([(r, c, rng.choice(COLOR_NAMES), rng.choice(SHAPES)) for r, c in sorted(slots)])


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw the scene: each shape fills its cell (a 1 px white border keeps cells apart), with
    a small jitter in shade so pixels are not a lookup table.

    Filling the whole cell makes every vision token (one per cell) carry one colour. With small
    shapes inside the cells, a randomly initialised tiny VLM did not learn to find them within a
    CPU-minutes budget (it learned the colour of a full-cell square in 100 steps, of a small shape
    at a random cell not at all in 150), and the toy task is about RL, not about vision pretraining.
    """
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    for r, c, color, _ in scene.cells:
        fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in COLORS[color])
        draw.rectangle([c * CELL + 1, r * CELL + 1, (c + 1) * CELL - 2, (r + 1) * CELL - 2], fill=fill)
    return img


# ----------------------------------------------------------------------------------------------
# Questions and answers


def _pair_splits() -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """The three ways to split the four colours into two pairs (each pair in colour order)."""
    a = COLOR_NAMES[0]
    return [((a, b), tuple(c for c in COLOR_NAMES[1:] if c != b)) for b in COLOR_NAMES[1:]]


def _triples() -> list[tuple[str, str, str]]:
    """(a, b, c): two colours (in colour order) against a third."""
    return [(a, b, c) for c in COLOR_NAMES for a in COLOR_NAMES for b in COLOR_NAMES
            if c not in (a, b) and COLOR_NAMES.index(a) < COLOR_NAMES.index(b)]


def valid_scene(scene: Scene, kind: str) -> bool:
    """Whether `kind` has a well-defined, non-degenerate question about `scene`."""
    counts = scene.counts()
    if kind == "majority":
        return unique_majority(scene)
    if kind == "difference":
        return len(set(counts.values())) > 1                       # some colour has more than another
    if kind == "pairs":
        return any(sum(counts[c] for c in p) != sum(counts[c] for c in q) for p, q in _pair_splits())
    if kind == "three":
        return any(counts[a] + counts[b] > counts[c] for a, b, c in _triples())
    return True


def value_of(q: dict, counts: dict[str, int]):
    """The answer to question `q` if the colour counts were `counts` (colour name for majority)."""
    kind, cs = q["kind"], q["colors"]
    if kind == "count":
        return counts[cs[0]]
    if kind == "total":
        return sum(counts.values())
    if kind == "majority":
        return max(COLOR_NAMES, key=lambda c: (counts[c], -COLOR_NAMES.index(c)))
    if kind == "sum":
        return counts[cs[0]] + counts[cs[1]]
    if kind == "difference":
        return counts[cs[0]] - counts[cs[1]]
    if kind in ("three", "pairs"):
        return counts[cs[0]] + counts[cs[1]] - sum(counts[c] for c in cs[2:])
    raise ValueError(f"unknown kind {kind!r}")


def make_question(scene: Scene, kind: str, rng: random.Random) -> dict:
    """The problem text, gold answer and scoring metadata for one question about a scene."""
    counts = scene.counts()
    base = {"kind": kind, "level": LEVEL_OF[kind], "question_type": "free_form", "answer_type": "integer",
            "choices": None, "colors": []}
    if kind == "count":
        color = rng.choice(COLOR_NAMES)
        q = dict(base, color=color, colors=[color], question=f"How many {color} shapes are in the image?")
    elif kind == "total":
        q = dict(base, color=None, question="How many shapes are in the image in total?")
    elif kind == "majority":
        best = max(counts.values())
        winner = next(c for c in COLOR_NAMES if counts[c] == best)
        options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(COLOR_NAMES))
        return dict(base, color=winner, answer=LETTERS[COLOR_NAMES.index(winner)],
                    question=f"Which color appears most often in the image?\nChoices:\n{options}",
                    question_type="multi_choice", answer_type="text")
    elif kind == "sum":
        a, b = rng.sample(COLOR_NAMES, 2)
        q = dict(base, color=None, colors=[a, b], question=f"How many {a} and {b} shapes are there together?")
    elif kind == "difference":
        a, b = rng.choice([(a, b) for a in COLOR_NAMES for b in COLOR_NAMES if counts[a] > counts[b]])
        q = dict(base, color=None, colors=[a, b], question=f"How many more {a} shapes than {b} shapes are there?")
    elif kind == "pairs":
        splits = [(p, s) for p, s in _pair_splits() if sum(counts[c] for c in p) != sum(counts[c] for c in s)]
        p, s = rng.choice(splits)
        if sum(counts[c] for c in p) < sum(counts[c] for c in s):
            p, s = s, p                                            # the larger pair first: the answer is positive
        q = dict(base, color=None, colors=[*p, *s],
                 question=f"How many more {p[0]} and {p[1]} shapes are there than {s[0]} and {s[1]} shapes?")
    elif kind == "three":
        a, b, c = rng.choice([t for t in _triples() if counts[t[0]] + counts[t[1]] > counts[t[2]]])
        q = dict(base, color=None, colors=[a, b, c],
                 question=f"How many more {a} and {b} shapes are there than {c} shapes?")
    else:
        raise ValueError(f"unknown kind {kind!r}; choose from {ALL_KINDS}")
    q["answer"] = str(value_of(q, counts))
    return q


def unique_majority(scene: Scene) -> bool:
    values = sorted(scene.counts().values(), reverse=True)
    return values[0] > values[1]


# ----------------------------------------------------------------------------------------------
# R1-style cold-start traces

OPENERS = ["Let me look at the image carefully.", "Okay, let me look at the grid.",
           "Alright, I need to look at the shapes in the image.", "Let me study the picture."]
# The k-th reflection draws from the k-th list, so a model can tell how far into its reflections it is.
WAITS = [["Wait, let me check that again.", "Wait, let me double-check."],
         ["Wait, did I miss one?", "Hmm, wait. Did I miss a shape?"],
         ["Wait, maybe I counted one shape twice.", "Wait, maybe one was counted twice."],
         ["Hmm, wait. Let me recount one more time.", "Wait, let me recount once more."]]
MAX_WAITS = len(WAITS)
WAIT_WEIGHTS = [0.35, 0.25, 0.15, 0.15, 0.10]    # P(number of reflections = 0..4)
CONFIRMS = ["Yes, that is right.", "Okay, the count holds.", "Yes, I am confident now.", "Good, nothing was missed."]
PLAN = "Let me go through the colors one by one."
LOOPS = ["Wait, let me recount the {c} shapes.", "Hmm, let me count the {c} shapes again."]
LOOP_ITERATIONS = (3, 8)             # a loop that ends: far past what any question needs
RUNAWAY_ITERATIONS = (18, 20)        # ~16 tokens each: longer than every length limit of the toy configs
SHORT_RATE, LOOP_RATE, RUNAWAY_RATE = 0.4, 0.15, 1 / 3


def _color_list(counts: dict[str, int]) -> str:
    parts = [f"{n} {c}" for c, n in counts.items() if n]
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def _question_line(q: dict) -> str:
    kind, cs = q["kind"], q["colors"]
    return {"count": lambda: f"The question asks for the {cs[0]} shapes.",
            "total": lambda: "The question asks for all the shapes.",
            "majority": lambda: "The question asks which color is the most common.",
            "sum": lambda: f"The question asks for the {cs[0]} and {cs[1]} shapes together.",
            "difference": lambda: f"The question asks how many more {cs[0]} shapes than {cs[1]} shapes there are.",
            "pairs": lambda: (f"The question asks how many more {cs[0]} and {cs[1]} shapes there are than "
                              f"{cs[2]} and {cs[3]} shapes."),
            "three": lambda: f"The question asks how many more {cs[0]} and {cs[1]} shapes there are than {cs[2]} shapes.",
            }[kind]()


def _read(color: str, n: int) -> str:
    return f"{color.capitalize()} shapes: {n}."


def _statement(q: dict, cnts: dict[str, int]) -> str:
    """The line that states the answer (level 1: the original task's sentences)."""
    kind = q["kind"]
    if kind == "count":
        return f"So there are {cnts[q['color']]} {q['color']} shapes."
    if kind == "total":
        nums = [str(n) for n in cnts.values() if n]
        return f"In total that is {' + '.join(nums)} = {sum(cnts.values())} shapes."
    if kind == "majority":
        best = value_of(q, cnts)
        return f"The most common color is {best}, with {cnts[best]} shapes."
    return f"So the answer is {value_of(q, cnts)}."


def signs(q: dict) -> dict[str, int]:
    """How each colour enters a level-2/3 answer: +1 added, -1 taken away, 0 not asked about."""
    plus, minus = {"sum": (q["colors"], []), "difference": (q["colors"][:1], q["colors"][1:]),
                   "three": (q["colors"][:2], q["colors"][2:]), "pairs": (q["colors"][:2], q["colors"][2:])}[q["kind"]]
    return {c: (1 if c in plus else -1 if c in minus else 0) for c in COLOR_NAMES}


def solution_steps(q: dict, cnts: dict[str, int]) -> list[str]:
    """A level-2/3 question worked out as a scan of the colour list, in the list's order: each
    colour present is added, taken away or skipped, with a running total. Every step is one
    in-order copy from the list, one check against the question and at most one addition or
    subtraction of two numbers (what a 2-layer model learns: docs/toy-task.md, pilots 1-3)."""
    lines, total, started = [], 0, False
    for c in COLOR_NAMES:
        n, sign = cnts[c], signs(q)[c]
        if not n:
            continue
        if not sign:
            lines.append(f"{n} {c}: skip.")
            continue
        new = total + sign * n
        expr = f"{n}" if not started and sign > 0 else f"{total} {'+' if sign > 0 else '-'} {n} = {new}"
        lines.append(f"{n} {c}: {'add' if sign > 0 else 'take away'}, so far {expr}.")
        total, started = new, True
    return lines


def _focus_colors(q: dict, counts: dict[str, int]) -> list[str]:
    """The colours a question's reasoning is about (what a reflection or a loop recounts)."""
    return q["colors"] or [c for c in COLOR_NAMES if counts[c]]


def _flawed_counts(q: dict, counts: dict[str, int], rng: random.Random) -> tuple[str, dict[str, int]]:
    """For a level-2/3 trace's flawed reflection: one focus colour miscounted by one, changing the answer."""
    right = value_of(q, counts)
    options = []
    for color in _focus_colors(q, counts):
        for delta in (1, -1):
            wrong = dict(counts, **{color: counts[color] + delta})
            if wrong[color] >= 0 and value_of(q, wrong) != right:
                options.append((color, wrong))
    return rng.choice(options)


def _loop_lines(q: dict, counts: dict[str, int], rng: random.Random, iterations: int) -> list[str]:
    color = rng.choice(_focus_colors(q, counts))
    lines = []
    for _ in range(iterations):
        lines += [rng.choice(LOOPS).format(c=color), _read(color, counts[color])]
    return lines


def cold_start_trace(scene: Scene, q: dict, rng: random.Random, n_waits: int, flawed: bool,
                     short: bool = False, loop: int = 0) -> str:
    """An R1-style response: look, count, work it out (unless `short`), loop `loop` times,
    reflect `n_waits` times, answer.

    A flawed trace second-guesses itself into an off-by-one count in its last reflection and
    answers with it; its final answer is wrong. A loop recounts one colour, correctly, over and over.
    """
    if q["level"] == 1:
        return _level1_trace(scene, q, rng, n_waits, flawed, loop)
    counts = scene.counts()
    lines = [rng.choice(OPENERS), _question_line(q), f"I see {_color_list(counts)} shapes."]
    if not short:
        lines.append(PLAN)
        lines += solution_steps(q, counts)
    lines.append(_statement(q, counts))
    if loop:
        lines += _loop_lines(q, counts, rng, loop)
    final = value_of(q, counts)
    for i in range(n_waits):
        lines.append(rng.choice(WAITS[i]))
        if flawed and i == n_waits - 1:
            color, wrong = _flawed_counts(q, counts, rng)
            lines.append(f"I think I see {wrong[color]} {color} shapes, not {counts[color]}.")
            lines.append(_statement(q, wrong))
            final = value_of(q, wrong)
        else:
            lines.append(f"Looking again, I count {_color_list(counts)}.")
            lines.append(rng.choice(CONFIRMS))
    return "<think>\n" + "\n".join(lines) + f"\n</think>\n<answer>{final}</answer>"


def _level1_trace(scene: Scene, q: dict, rng: random.Random, n_waits: int, flawed: bool, loop: int) -> str:
    """The original toy task's trace (unchanged, so level 1 stays comparable), plus the optional loop."""
    counts = scene.counts()
    lines = [rng.choice(OPENERS), _question_line(q), f"I see {_color_list(counts)} shapes.", _statement(q, counts)]
    if loop:
        lines += _loop_lines(q, counts, rng, loop)
    for i in range(n_waits):
        lines.append(rng.choice(WAITS[i]))
        last = i == n_waits - 1
        if flawed and last:
            wrong = dict(counts)
            target = q["color"] if q["kind"] == "count" else rng.choice([c for c in COLOR_NAMES if counts[c]])
            if q["kind"] == "majority":
                # talk itself into a different winner: bump a non-winning colour past the winner
                target = rng.choice([c for c in COLOR_NAMES if c != value_of(q, counts)])
                wrong[target] = counts[value_of(q, counts)] + 1
            else:
                wrong[target] = max(0, counts[target] + (1 if counts[target] == 0 or rng.random() < 0.5 else -1))
            lines.append(f"I think I see {wrong[target]} {target} shapes, not {counts[target]}.")
            lines.append(_statement(q, wrong))
            final = value_of(q, wrong)
        else:
            lines.append(f"Looking again, I count {counts[q['color']] if q['kind'] == 'count' else _color_list(counts)}.")
            lines.append(rng.choice(CONFIRMS))
    if not (flawed and n_waits):
        final = value_of(q, counts)
    answer = LETTERS[COLOR_NAMES.index(final)] if q["kind"] == "majority" else str(final)
    return "<think>\n" + "\n".join(lines) + "\n</think>\n<answer>" + answer + "</answer>"


_LOOP_LINE = re.compile(r"^(?:Wait, let me recount|Hmm, let me count) the (?:red|green|blue|yellow) shapes", re.M)


def trace_features(response: str) -> dict:
    """What a response does, by the cold-start traces' own sentences: whether it works the
    question out step by step (the scan), how many loop iterations and reflections it has."""
    return {"steps": PLAN in response, "loop": len(_LOOP_LINE.findall(response)),
            "reflections": sum(response.count(w) for ws in WAITS for w in ws)}


def direct_answer(scene: Scene, q: dict) -> str:
    """What an instruct model without reasoning says: the answer alone (the Zero baseline's start)."""
    return q["answer"]


def draw_trace_plan(level: int, rng: random.Random, flaw_rate_long: float = 0.8, short_rate: float = SHORT_RATE,
                    loop_rate: float = LOOP_RATE, runaway_rate: float = RUNAWAY_RATE) -> dict:
    """What kind of trace a cold-start record gets: reflections, flaw, style, loop. Drawn from the
    seeded generator only (never from the image), in an order that keeps level 1 without loops
    identical to the original task."""
    n_waits = rng.choices(range(MAX_WAITS + 1), WAIT_WEIGHTS)[0]
    flawed = n_waits >= 2 and rng.random() < flaw_rate_long
    short = level >= 2 and short_rate > 0 and rng.random() < short_rate
    loop = 0
    if loop_rate > 0 and rng.random() < loop_rate:
        runaway = rng.random() < runaway_rate
        loop = rng.randint(*(RUNAWAY_ITERATIONS if runaway else LOOP_ITERATIONS))
        n_waits, flawed = 0, False            # a trace that gets stuck loops instead of reflecting
    return {"n_waits": n_waits, "flawed": flawed, "short": short, "loop": loop}


# ----------------------------------------------------------------------------------------------
# Writing a dataset


TASKS = {  # name: generate() settings
    "v1": dict(levels=(1,), loop_rate=0.0),             # the original toy task (the default)
    "v2": dict(levels=LEVELS, loop_rate=LOOP_RATE),     # three levels, loops: where reasoning length matters
}


def generate(out_dir: str | Path, n_train: int = 2000, n_eval: int = 500, n_cold: int = 1000,
             seed: int = 0, flaw_rate_long: float = 0.8, kinds: list[str] | None = None,
             levels: tuple[int, ...] = (1,), short_rate: float = SHORT_RATE, loop_rate: float = 0.0,
             runaway_rate: float = RUNAWAY_RATE, trace_log: bool = False) -> dict:
    """Write the toy task to `out_dir` (see the module docstring). Returns the paths written.

    The defaults write the original task ("v1": level 1, no loops); `**TASKS["v2"]` the three
    levels with loops. Problems cycle through `levels` (record i has level levels[i % len(levels)])
    and, within a level, through its kinds; `kinds` restricts them. `n_cold` cold-start records
    use their own scenes (drawn from the same distribution as the RL split but disjoint images);
    the eval split never overlaps either.
    With `trace_log`, cold_start_plan.jsonl records each cold-start trace's draws (level, kind,
    reflections, flaw, style, loop) for analysis and tests; training never reads it.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    per_level = {lv: [k for k in LEVEL_KINDS[lv] if kinds is None or k in kinds] for lv in levels}
    per_level = {lv: ks for lv, ks in per_level.items() if ks}
    if not per_level:
        raise ValueError(f"no kind of {kinds} is in levels {levels}")
    order = list(per_level)

    def kind_of(i: int) -> str:
        level = order[i % len(order)]
        ks = per_level[level]
        return ks[(i // len(order)) % len(ks)]

    def problems(split: str, n: int):
        for i in range(n):
            kind = kind_of(i)
            while True:
                scene = random_scene(rng, *LEVEL_SHAPES[LEVEL_OF[kind]])
                if valid_scene(scene, kind):
                    break
            q = make_question(scene, kind, rng)
            pid = f"{split}-{i:05d}"
            render(scene, rng).save(out / "images" / f"{pid}.png")
            yield pid, scene, q

    def rl_record(pid, q):
        return {"id": pid, "images": [f"images/{pid}.png"], "problem": "<image>" + q["question"],
                "answer": q["answer"], "question_type": q["question_type"],
                "answer_type": q["answer_type"], "category": q["kind"], "level": q["level"]}

    paths = {}
    for split, n in (("rl_train", n_train), ("eval", n_eval)):
        path = out / f"{split}.jsonl"
        with open(path, "w") as f:
            for pid, _, q in problems(split, n):
                f.write(json.dumps(rl_record(pid, q)) + "\n")
        paths[split] = path

    cold, plans = [], []
    for pid, scene, q in problems("cold", n_cold):
        plan = draw_trace_plan(q["level"], rng, flaw_rate_long, short_rate, loop_rate, runaway_rate)
        cold.append({"id": pid, "images": [f"images/{pid}.png"], "conversations": [
            {"from": "human", "value": "<image>" + q["question"]},
            {"from": "gpt", "value": cold_start_trace(scene, q, rng, **plan)}]})
        plans.append({"id": pid, "level": q["level"], "kind": q["kind"], "answer": q["answer"], **plan})
    paths["cold_start"] = out / "cold_start.json"
    paths["cold_start"].write_text(json.dumps(cold, indent=1))
    if trace_log:
        paths["cold_start_plan"] = out / "cold_start_plan.jsonl"
        paths["cold_start_plan"].write_text("".join(json.dumps(p) + "\n" for p in plans))

    # The toy analogue of an instruct model's training data: the same kind of problems answered
    # without reasoning. Like a real instruct model it also follows a format instruction: under
    # the R1-Zero system prompt (every other record) it answers in the tags with a one-line
    # "thought". The Vision-R1-Zero baseline starts RL from a model SFT'd on this.
    from minivr1.chat import R1_ZERO_SYSTEM_PROMPT

    instruct = []
    for k, (pid, scene, q) in enumerate(problems("instruct", n_cold)):
        record = {"id": pid, "images": [f"images/{pid}.png"], "conversations": [
            {"from": "human", "value": "<image>" + q["question"]},
            {"from": "gpt", "value": direct_answer(scene, q)}]}
        if k % 2:
            record["system"] = R1_ZERO_SYSTEM_PROMPT
            record["conversations"][1]["value"] = (f"<think>\nThe answer is {q['answer']}.\n</think>\n"
                                                   f"<answer>{q['answer']}</answer>")
        instruct.append(record)
    paths["instruct"] = out / "instruct.json"
    paths["instruct"].write_text(json.dumps(instruct, indent=1))
    return paths


def corpus(n: int = 300, seed: int = 1234, task: str = "v1") -> list[str]:
    """Text that covers the toy task's vocabulary, for training the tiny models' tokenizer.

    "v1" is the original task's text, unchanged (so the tokenizer, the base model and the toy pipeline's
    numbers are those they always were); "v2" adds the deeper questions' words and the looping traces.
    """
    from minivr1.chat import R1_ZERO_SYSTEM_PROMPT

    rng = random.Random(seed)
    texts = [R1_ZERO_SYSTEM_PROMPT, "You are a helpful assistant."] * 20    # the system prompts, as whole words
    for i in range(n):
        if task == "v1":
            scene, kind = random_scene(rng), KINDS[i % 3]
            if kind == "majority" and not unique_majority(scene):
                continue
            q = make_question(scene, kind, rng)
            texts.append(q["question"])
            texts.append(cold_start_trace(scene, q, rng, rng.randint(0, MAX_WAITS), rng.random() < 0.3))
            continue
        kind = ALL_KINDS[i % len(ALL_KINDS)]
        scene = random_scene(rng, *LEVEL_SHAPES[LEVEL_OF[kind]])
        if not valid_scene(scene, kind):
            continue
        q = make_question(scene, kind, rng)
        texts.append(q["question"])
        texts.append(cold_start_trace(scene, q, rng, rng.randint(0, MAX_WAITS), rng.random() < 0.3,
                                      short=rng.random() < 0.3, loop=rng.choice([0, 0, 0, 2])))
    return texts


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Write the toy task (images, RL/eval splits, cold-start SFT data) and, "
                                            "optionally, a randomly initialised base model to start from.")
    p.add_argument("out_dir", help="e.g. runs/toy: data goes to OUT_DIR/data, the model to OUT_DIR/base")
    p.add_argument("--n_train", type=int, default=2000, help="RL training problems")
    p.add_argument("--n_eval", type=int, default=500, help="held-out evaluation problems")
    p.add_argument("--n_cold", type=int, default=4000, help="cold-start SFT conversations")
    p.add_argument("--seed", type=int, default=0, help="generator seed (everything is deterministic given it)")
    p.add_argument("--task", default="v1", choices=list(TASKS),
                   help="v1: the original task (level 1 only, no loops); v2: levels 1-3 and looping traces "
                        "(docs/toy-task.md)")
    p.add_argument("--levels", type=int, nargs="+", choices=list(LEVELS),
                   help="override the task's difficulty levels (mixed in equal shares)")
    p.add_argument("--short_rate", type=float, default=SHORT_RATE,
                   help="fraction of level-2/3 cold-start traces that skip the worked steps")
    p.add_argument("--loop_rate", type=float,
                   help="override the task's fraction of cold-start traces that get stuck recounting "
                        "(a third of them past every length limit)")
    p.add_argument("--model_size", default="small", choices=["none", "tiny", "small"],
                   help="also build a random base model of this size in OUT_DIR/base ('none' to skip)")
    from minivr1 import tiny

    p.add_argument("--family", default="qwen2_5_vl", choices=list(tiny.FAMILIES),
                   help="model family of the base model (minivr1.tiny; default Qwen2.5-VL, the paper's)")
    a = p.parse_args()
    settings = dict(TASKS[a.task])
    if a.levels:
        settings["levels"] = tuple(a.levels)
    if a.loop_rate is not None:
        settings["loop_rate"] = a.loop_rate
    paths = generate(Path(a.out_dir) / "data", a.n_train, a.n_eval, a.n_cold, a.seed, short_rate=a.short_rate,
                     **settings)
    for name, path in paths.items():
        print(f"{name}: {path}")
    if a.model_size != "none":
        print(f"base model: {tiny.build(a.model_size, Path(a.out_dir) / 'base', seed=a.seed, family=a.family, texts=corpus(task=a.task))}")
