"""The built-in toy task: counting coloured shapes on a 4x4 grid.

Every problem is a 112x112 PNG: a 4x4 grid of 28x28 cells, some filled with one of four colours
(a coloured square per cell). 112x112 is exactly 16 merged vision tokens for
Qwen2.5-VL (patch 14, merge 2): one token per cell. Three kinds of question, none answerable
without looking at the image:

    count     "How many red shapes are in the image?"            free_form / integer
    total     "How many shapes are in the image in total?"        free_form / integer
    majority  "Which colour appears most often in the image?"     multi_choice (A-D)

The generator is deterministic given the seed. It writes

    images/<id>.png
    rl_train.jsonl, eval.jsonl     RL format: {"id", "images": ["images/<id>.png"], "problem", "answer"}
                                   (+ "choices", "question_type", "answer_type", "category" for scoring)
    cold_start.json                Vision-R1-cold format (LLaMA-Factory sharegpt) with R1-style traces
    instruct.json                  the same format with direct answers (no reasoning): to build the
                                   toy's "instruct model", the starting point of the Zero baseline

The cold-start traces read like R1's: the model looks, counts colour by colour, questions
itself ("Wait, ...") and answers as `<think> ... </think><answer> ... </answer>`. They vary in
length, and some are deliberately flawed, so SFT teaches format and style but not perfect
accuracy, leaving room for RL. The flaw is the paper's "overthinking" in miniature: a trace
that keeps second-guessing ("Wait, ... let me recount") talks itself out of a correct count in
80% of the traces with two or more reflections, while the short, direct traces are right. So, like Vision-R1-CI,
the SFT model's long answers are less accurate than its short ones; RL with a short length
limit (PTST stage 1) has a reason to shorten them. Flaws are decided by the seeded generator,
not by the image, so no model can predict which traces are flawed from the input.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
COLOR_NAMES = list(COLORS)           # the order of the multiple-choice options: A red, B green, C blue, D yellow
SHAPES = ["circle", "square", "triangle"]
GRID, CELL = 4, 28
IMAGE_SIZE = GRID * CELL             # 112 px -> 16 vision tokens after Qwen's 2x2 merge
LETTERS = "ABCD"
KINDS = ["count", "total", "majority"]


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


def make_question(scene: Scene, kind: str, rng: random.Random) -> dict:
    """The problem text, gold answer and scoring metadata for one question about a scene."""
    if kind == "count":
        color = rng.choice(COLOR_NAMES)
        return {"kind": kind, "color": color, "answer": str(scene.count(color)),
                "question": f"How many {color} shapes are in the image?",
                "question_type": "free_form", "answer_type": "integer", "choices": None}
    if kind == "total":
        return {"kind": kind, "color": None, "answer": str(len(scene.cells)),
                "question": "How many shapes are in the image in total?",
                "question_type": "free_form", "answer_type": "integer", "choices": None}
    counts = scene.counts()
    best = max(counts.values())
    winner = next(c for c in COLOR_NAMES if counts[c] == best)
    options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(COLOR_NAMES))
    return {"kind": kind, "color": winner, "answer": LETTERS[COLOR_NAMES.index(winner)],
            "question": f"Which color appears most often in the image?\nChoices:\n{options}",
            "question_type": "multi_choice", "answer_type": "text", "choices": None}


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


def _color_list(counts: dict[str, int]) -> str:
    parts = [f"{n} {c}" for c, n in counts.items() if n]
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def cold_start_trace(scene: Scene, q: dict, rng: random.Random, n_waits: int, flawed: bool) -> str:
    """An R1-style response: look, count, reflect `n_waits` times, answer.

    A flawed trace second-guesses itself into an off-by-one count in its last reflection and
    answers with it; its final answer is wrong.
    """
    counts = scene.counts()
    lines = [rng.choice(OPENERS)]
    if q["kind"] == "count":
        lines.append(f"The question asks for the {q['color']} shapes.")
    elif q["kind"] == "total":
        lines.append("The question asks for all the shapes.")
    else:
        lines.append("The question asks which color is the most common.")
    lines.append(f"I see {_color_list(counts)} shapes.")

    def value_of(cnts):
        if q["kind"] == "count":
            return cnts[q["color"]]
        if q["kind"] == "total":
            return sum(cnts.values())
        return max(COLOR_NAMES, key=lambda c: (cnts[c], -COLOR_NAMES.index(c)))

    def statement(cnts):
        if q["kind"] == "count":
            return f"So there are {cnts[q['color']]} {q['color']} shapes."
        if q["kind"] == "total":
            nums = [str(n) for n in cnts.values() if n]
            return f"In total that is {' + '.join(nums)} = {sum(cnts.values())} shapes."
        best = value_of(cnts)
        return f"The most common color is {best}, with {cnts[best]} shapes."

    lines.append(statement(counts))
    for i in range(n_waits):
        lines.append(rng.choice(WAITS[i]))
        last = i == n_waits - 1
        if flawed and last:
            wrong = dict(counts)
            target = q["color"] if q["kind"] == "count" else rng.choice([c for c in COLOR_NAMES if counts[c]])
            if q["kind"] == "majority":
                # talk itself into a different winner: bump a non-winning colour past the winner
                target = rng.choice([c for c in COLOR_NAMES if c != value_of(counts)])
                wrong[target] = counts[value_of(counts)] + 1
            else:
                wrong[target] = max(0, counts[target] + (1 if counts[target] == 0 or rng.random() < 0.5 else -1))
            lines.append(f"I think I see {wrong[target]} {target} shapes, not {counts[target]}.")
            lines.append(statement(wrong))
            final = value_of(wrong)
        else:
            lines.append(f"Looking again, I count {counts[q['color']] if q['kind'] == 'count' else _color_list(counts)}.")
            lines.append(rng.choice(CONFIRMS))
    if not (flawed and n_waits):
        final = value_of(counts)
    answer = LETTERS[COLOR_NAMES.index(final)] if q["kind"] == "majority" else str(final)
    return "<think>\n" + "\n".join(lines) + "\n</think>\n<answer>" + answer + "</answer>"


def direct_answer(scene: Scene, q: dict) -> str:
    """What an instruct model without reasoning says: the answer alone (the Zero baseline's start)."""
    return q["answer"]


# ----------------------------------------------------------------------------------------------
# Writing a dataset


def generate(out_dir: str | Path, n_train: int = 2000, n_eval: int = 500, n_cold: int = 1000,
             seed: int = 0, flaw_rate_long: float = 0.8, kinds: list[str] = KINDS) -> dict:
    """Write the toy task to `out_dir` (see the module docstring). Returns the paths written.

    `n_cold` cold-start records use their own scenes (drawn from the same distribution as the
    RL split but disjoint images); the eval split never overlaps either.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def problems(split: str, n: int):
        for i in range(n):
            kind = kinds[i % len(kinds)]
            while True:
                scene = random_scene(rng)
                if kind != "majority" or unique_majority(scene):
                    break
            q = make_question(scene, kind, rng)
            pid = f"{split}-{i:05d}"
            render(scene, rng).save(out / "images" / f"{pid}.png")
            yield pid, scene, q

    def rl_record(pid, q):
        return {"id": pid, "images": [f"images/{pid}.png"], "problem": "<image>" + q["question"],
                "answer": q["answer"], "question_type": q["question_type"],
                "answer_type": q["answer_type"], "category": q["kind"]}

    paths = {}
    for split, n in (("rl_train", n_train), ("eval", n_eval)):
        path = out / f"{split}.jsonl"
        with open(path, "w") as f:
            for pid, _, q in problems(split, n):
                f.write(json.dumps(rl_record(pid, q)) + "\n")
        paths[split] = path

    cold = []
    for pid, scene, q in problems("cold", n_cold):
        n_waits = rng.choices(range(MAX_WAITS + 1), WAIT_WEIGHTS)[0]
        flawed = n_waits >= 2 and rng.random() < flaw_rate_long
        cold.append({"id": pid, "images": [f"images/{pid}.png"], "conversations": [
            {"from": "human", "value": "<image>" + q["question"]},
            {"from": "gpt", "value": cold_start_trace(scene, q, rng, n_waits, flawed)}]})
    paths["cold_start"] = out / "cold_start.json"
    paths["cold_start"].write_text(json.dumps(cold, indent=1))

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


def corpus(n: int = 300, seed: int = 1234) -> list[str]:
    """Text that covers the toy task's vocabulary, for training the tiny models' tokenizer."""
    from minivr1.chat import R1_ZERO_SYSTEM_PROMPT

    rng = random.Random(seed)
    texts = [R1_ZERO_SYSTEM_PROMPT, "You are a helpful assistant."] * 20    # the system prompts, as whole words
    for i in range(n):
        scene = random_scene(rng)
        kind = KINDS[i % 3]
        if kind == "majority" and not unique_majority(scene):
            continue
        q = make_question(scene, kind, rng)
        texts.append(q["question"])
        texts.append(cold_start_trace(scene, q, rng, rng.randint(0, MAX_WAITS), rng.random() < 0.3))
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
    p.add_argument("--model_size", default="small", choices=["none", "tiny", "small"],
                   help="also build a random base model of this size in OUT_DIR/base ('none' to skip)")
    from minivr1 import tiny

    p.add_argument("--family", default="qwen2_5_vl", choices=list(tiny.FAMILIES),
                   help="model family of the base model (minivr1.tiny; default Qwen2.5-VL, the paper's)")
    a = p.parse_args()
    paths = generate(Path(a.out_dir) / "data", a.n_train, a.n_eval, a.n_cold, a.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")
    if a.model_size != "none":
        print(f"base model: {tiny.build(a.model_size, Path(a.out_dir) / 'base', seed=a.seed, family=a.family)}")
