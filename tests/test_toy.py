"""The toy task's generator (minivr1/toy.py): determinism, the original task kept as level 1, and
the properties docs/toy-task.md claims for the cold-start traces, measured on generated data
(no training): reasoning length by level against the configs' length limits, loop, runaway and
flaw rates, every trace well formed with its own arithmetic right, and answers that need the
image (not predictable from the question text)."""
from __future__ import annotations

import collections
import hashlib
import json
import re
import statistics
from pathlib import Path

import pytest
import yaml

from minivr1 import grader, toy

ROOT = Path(__file__).resolve().parents[1]
N_COLD = 1200


def _config(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def _stage_limits(name: str) -> list[int]:
    return [int(s.split("x")[0]) for s in _config(name)["stages"].split(",")]


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """N_COLD cold-start traces with their generator draws, and each trace's length in tokens of
    the tiny models' tokenizer (the unit of every length limit in the configs)."""
    from minivr1 import tiny

    out = tmp_path_factory.mktemp("toy") / "data"
    paths = toy.generate(out, n_train=600, n_eval=300, n_cold=N_COLD, seed=11, trace_log=True, **toy.TASKS["v2"])
    records = json.loads(paths["cold_start"].read_text())
    plans = [json.loads(line) for line in paths["cold_start_plan"].read_text().splitlines()]
    tokenizer = tiny.build_tokenizer(texts=toy.corpus(task="v2"))     # what `python -m minivr1.toy --task v2` builds
    rows = []
    for rec, plan in zip(records, plans):
        assert rec["id"] == plan["id"]
        text = rec["conversations"][1]["value"]
        rows.append(dict(plan, text=text, question=rec["conversations"][0]["value"],
                         tokens=len(tokenizer(text)["input_ids"])))
    return {"rows": rows, "paths": paths, "tokenizer": tokenizer}


def _plain(rows, level=None, short=None):
    """Traces with no reflection and no loop: what a problem needs, nothing more."""
    return [r for r in rows if not r["n_waits"] and not r["loop"] and (level is None or r["level"] == level)
            and (short is None or r["short"] == short)]


# ------------------------------------------------------------------------------------------------
# Determinism and backwards compatibility


def _tree_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        toy.generate(tmp_path / name, n_train=30, n_eval=12, n_cold=30, seed=seed, trace_log=True, **toy.TASKS["v2"])
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a["cold_start.json"] != c["cold_start.json"]
    assert a["images/eval-00000.png"] != c["images/eval-00000.png"]


# sha256 of the original toy task's files (minivr1/toy.py before levels existed, commit 4c48239) for
# generate(n_train=12, n_eval=6, n_cold=12, seed=3); the RL splits with the new "level" field removed.
ORIGINAL = {
    "rl_train.jsonl": "badabb57977f18bac2d085597e4ab70c45993e4070173dff5212a09db02cf127",
    "eval.jsonl": "47d3391b013865ed386d94ad48fad166bd7b235e96f60aaf7b490256b8d37884",
    "cold_start.json": "8adb6b211f5aa698e85b4c067e3ed20d2ecba7fa97112afb899704310d2f174e",
    "instruct.json": "61aa0359811750a2c9c2014d2d4c0d2597fa1b92203d73fa463875ee216db8da",
    "images": "f776acab844095a75ba18e40d78012cb4c31b0e63149ac60acb4b5eeaf360966",
}


def test_the_default_task_is_the_original_byte_for_byte(tmp_path):
    toy.generate(tmp_path, n_train=12, n_eval=6, n_cold=12, seed=3)
    digest = {}
    for name in ("rl_train.jsonl", "eval.jsonl"):
        records = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        assert {r.pop("level") for r in records} == {1}
        digest[name] = hashlib.sha256("".join(json.dumps(r) + "\n" for r in records).encode()).hexdigest()
    for name in ("cold_start.json", "instruct.json"):
        digest[name] = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    images = sorted((tmp_path / "images").iterdir())
    digest["images"] = hashlib.sha256(b"".join(p.read_bytes() for p in images)).hexdigest()
    assert digest == ORIGINAL


def test_the_default_tokenizer_text_is_the_original():
    """The tiny models' tokenizer is trained on toy.corpus(): the original task's text (sha256 at commit
    4c48239), so the default tokenizer, base model and the toy pipeline's numbers stay what they were; v2's
    words come only with corpus(task="v2")."""
    text = json.dumps(toy.corpus()).encode()
    assert hashlib.sha256(text).hexdigest() == "574eb792d09117cc43a9ed806b49c3bafb7855badaf4df7733a1cd1df59ef106"
    assert "so far" not in " ".join(toy.corpus()) and "so far" in " ".join(toy.corpus(task="v2"))


def test_the_conftest_call_still_writes_the_original_task_and_v2_writes_every_level(tmp_path):
    from minivr1 import data

    paths = toy.generate(tmp_path / "v1", n_train=48, n_eval=12, n_cold=48, seed=0)   # as tests/conftest.py
    assert set(paths) == {"rl_train", "eval", "cold_start", "instruct"}
    records = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    assert [r["level"] for r in records] == [1] * 12 and [r["category"] for r in records[:3]] == toy.KINDS

    paths = toy.generate(tmp_path / "v2", n_train=48, n_eval=12, n_cold=48, seed=0, **toy.TASKS["v2"])
    records = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    assert [r["level"] for r in records] == [1, 2, 3] * 4
    assert {r["category"] for r in records} == set(toy.ALL_KINDS)
    for r in records:
        assert toy.LEVEL_OF[r["category"]] == r["level"] and r["problem"].startswith("<image>")
        assert (tmp_path / "v2" / r["images"][0]).is_file()
    problems, _ = data.read_problems(paths["eval"])          # the project's reader takes the new field
    assert len(problems) == 12 and [p.category for p in problems[:4]] == ["count", "sum", "three", "total"]


# ------------------------------------------------------------------------------------------------
# Every trace is well formed; its own arithmetic is right; flaws are the only wrong answers


def test_every_trace_is_well_formed_and_only_flawed_traces_answer_wrong(cold):
    for r in cold["rows"]:
        parsed = grader.parse_response(r["text"])
        assert parsed.format_ok, r["text"]
        letter_or_number = parsed.answer.strip()
        gold = r["answer"]
        assert (letter_or_number == gold) == (not r["flawed"]), r["text"]
        if r["flawed"]:
            assert r["n_waits"] >= 2 and not r["loop"]
        for expression, result in re.findall(r"((?:-?\d+ [+-] )+\d+) = (-?\d+)", r["text"]):
            terms = expression.split()
            value = int(terms[0])
            for op, term in zip(terms[1::2], terms[2::2]):
                value += int(term) if op == "+" else -int(term)
            assert value == int(result), r["text"]


def test_complete_traces_scan_the_list_in_order_and_short_ones_skip_the_steps(cold):
    for r in cold["rows"]:
        listed = re.search(r"I see (.*?) shapes\.", r["text"]).group(1)
        entries = re.findall(r"(\d+) (red|green|blue|yellow)", listed)
        scan = re.findall(r"^(\d+) (red|green|blue|yellow): (?:add|take away|skip)", r["text"], re.M)
        if r["level"] == 1 or r["short"]:
            assert toy.PLAN not in r["text"] and not scan
        else:
            assert toy.PLAN in r["text"] and scan == entries      # one step per colour listed, in the list's order


# ------------------------------------------------------------------------------------------------
# Reasoning length by level, against the length limits of the configs


def test_needed_reasoning_grows_with_the_level(cold):
    rows = cold["rows"]
    median = {key: statistics.median(r["tokens"] for r in _plain(rows, *key))
              for key in ((1, None), (2, False), (3, False), (2, True), (3, True))}
    assert median[(1, None)] + 20 < median[(2, False)] < median[(3, False)] - 10
    # a short trace skips the steps: about level-1 length at every level
    assert abs(median[(2, True)] - median[(1, None)]) < 10 and abs(median[(3, True)] - median[(1, None)]) < 10


def test_the_short_limit_cuts_level_3s_worked_steps_and_the_long_one_fits_them(cold):
    short_limit, long_limit = _stage_limits("toy_grpo_ptst.yaml")
    assert _stage_limits("toy_grpo_fixed.yaml") == [short_limit] and _stage_limits("toy_grpo_long.yaml") == [long_limit]
    middle = _stage_limits("toy_grpo_ptst3.yaml")[1]
    rows = cold["rows"]

    def over(sel, limit):            # a completion of `limit` tokens holds limit - 1 text tokens and the end token
        return sum(r["tokens"] >= limit for r in sel) / len(sel)

    assert over(_plain(rows, 1), short_limit) == 0                  # level 1 needs no more than the short limit
    assert over(_plain(rows, 2, short=True), short_limit) == 0 and over(_plain(rows, 3, short=True), short_limit) == 0
    assert 0.25 < over(_plain(rows, 2, short=False), short_limit) < 0.7   # level 2's worked steps: about half fit
    assert over(_plain(rows, 3, short=False), short_limit) > 0.8          # level 3's: almost never
    assert over(_plain(rows, 3, short=False), middle) < 0.3               # PTST-3's middle stage fits most
    assert over(_plain(rows, 3, short=False), long_limit) == 0            # ... and the long limit all
    one_reflection = [r for r in rows if r["n_waits"] == 1 and not r["loop"] and not r["short"]]
    assert over([r for r in one_reflection if r["level"] == 1], short_limit) < 0.1
    assert over([r for r in one_reflection if r["level"] == 3], long_limit) == 0


def test_reflections_add_length_at_every_level(cold):
    rows = [r for r in cold["rows"] if not r["loop"]]
    for level in toy.LEVELS:
        by_waits = [statistics.median(r["tokens"] for r in rows if r["level"] == level and r["n_waits"] == k)
                    for k in range(toy.MAX_WAITS + 1)]
        assert by_waits == sorted(by_waits) and by_waits[-1] - by_waits[0] > 80, (level, by_waits)


# ------------------------------------------------------------------------------------------------
# Loops and flaws: rates as documented, drawn without looking at the image


def test_loop_and_runaway_rates_and_lengths(cold):
    rows = cold["rows"]
    eval_limit = _config("toy_eval.yaml")["max_new_tokens"]
    sft_limit = _config("toy_v2_sft.yaml")["max_length"]
    looped = [r for r in rows if r["loop"]]
    runaway = [r for r in looped if r["loop"] >= toy.RUNAWAY_ITERATIONS[0]]
    assert abs(len(looped) / len(rows) - toy.LOOP_RATE) < 0.03
    assert abs(len(runaway) / len(rows) - toy.LOOP_RATE * toy.RUNAWAY_RATE) < 0.02
    for r in looped:
        assert r["text"].count("shapes: ") >= r["loop"] and not r["n_waits"] and not r["flawed"]
    # a runaway loop is longer than every limit a model is sampled under; every other trace fits them
    assert min(r["tokens"] for r in runaway) > eval_limit
    assert max(r["tokens"] for r in rows if r not in runaway) < eval_limit
    # ... and SFT sees runaway traces whole (prompt + trace < max_length): the model learns loops that end late
    assert max(r["tokens"] for r in rows) + 80 < sft_limit


def test_flaw_rate_and_that_flaws_do_not_depend_on_the_image(cold):
    reflective = [r for r in cold["rows"] if r["n_waits"] >= 2]
    assert abs(sum(r["flawed"] for r in reflective) / len(reflective) - 0.8) < 0.05
    assert not any(r["flawed"] for r in cold["rows"] if r["n_waits"] < 2)
    # the draws are the generator's, not the scene's: flaws and the short style are as frequent for
    # small answers as for large ones
    def rate(xs):
        return sum(xs) / len(xs)

    for key, subset in (("flawed", reflective), ("short", [r for r in cold["rows"] if r["level"] > 1])):
        numeric = [r for r in subset if r["answer"].lstrip("-").isdigit()]
        small = [r[key] for r in numeric if int(r["answer"]) <= 2]
        large = [r[key] for r in numeric if int(r["answer"]) > 2]
        assert len(small) > 50 and len(large) > 50 and abs(rate(small) - rate(large)) < 0.12, key


def test_short_rate_is_as_documented(cold):
    rows = [r for r in cold["rows"] if r["level"] > 1]
    assert abs(sum(r["short"] for r in rows) / len(rows) - toy.SHORT_RATE) < 0.05
    assert not any(r["short"] for r in cold["rows"] if r["level"] == 1)


# ------------------------------------------------------------------------------------------------
# Only the image tells the answer


def test_answers_are_not_predictable_from_the_question_text(cold):
    """The best a text-only model can do is the most frequent training answer for each question
    text: measured on the eval split, it stays far below what reading the image gives."""
    def load(name):
        return [json.loads(line) for line in cold["paths"][name].read_text().splitlines()]

    train, held_out = load("rl_train"), load("eval")
    answers = collections.defaultdict(collections.Counter)
    for r in train:
        answers[r["problem"]][r["answer"]] += 1
    overall = collections.Counter()
    fallback = collections.Counter(r["answer"] for r in train).most_common(1)[0][0]
    by_level = collections.defaultdict(list)
    for r in held_out:
        seen = answers.get(r["problem"])
        guess = seen.most_common(1)[0][0] if seen else fallback
        by_level[r["level"]].append(guess == r["answer"])
        overall[guess == r["answer"]] += 1
    for level, hits in by_level.items():
        assert sum(hits) / len(hits) < 0.4, (level, sum(hits) / len(hits))
    # and no question text comes with a single answer: every text seen 5+ times has 2+ answers
    assert all(len(c) > 1 for c in answers.values() if sum(c.values()) >= 5)


def test_the_tokenizer_knows_the_new_words(cold):
    tok = cold["tokenizer"]
    for word in (" add", " take", " away", " skip", " far", " together", " more", " than"):
        assert len(tok(word)["input_ids"]) == 1, word
