"""bridge.py and minivr1/bridging.py: every filter rule and the word replacement on hand-written
examples (table-driven); the pipeline end to end with a scripted backend (canned pseudo-CoTs,
descriptions and R1-style replies: right, wrong, looping, blind, leaking...), whose output
train_sft.py then trains on; the pipeline with the tiny local model; kill (os._exit in a
subprocess) + torn last line + Ctrl-C, then resume: every record exactly once."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

import bridge
from minivr1 import bridging, data
from minivr1.backends import ChatResult
from minivr1.bridging import Limits, Sample
from minivr1.cli import UserError

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- filter rules

Q = "<image>How many red shapes are in the image?"
THINK = "I look at the grid and count the red squares one by one, row by row, and I find three of them in all."
GOOD = f"<think>\n{THINK}\n</think>\n<answer>3</answer>"
LOOP = "<think>\n" + "Let me count the red squares in the grid once more. " * 10 + "\n</think>\n<answer>3</answer>"


def _with(think_extra: str) -> str:
    return f"<think>\n{THINK} {think_extra}\n</think>\n<answer>3</answer>"


RULE_CASES = [
    # (rule, sample, keep)
    ("truncated", Sample(GOOD, Q, "3", {}, finished=False), False),
    ("truncated", Sample(GOOD, Q, "3", {}), True),
    ("format", Sample(GOOD, Q, "3", {}), True),
    ("format", Sample(f"<think>\n{THINK}\n</think>\n3", Q, "3", {}), False),                  # no answer block
    ("format", Sample(GOOD + " More text.", Q, "3", {}), False),                              # text after </answer>
    ("format", Sample(f"{THINK}<answer>3</answer>", Q, "3", {}), False),                     # no think block
    ("format", Sample(f"<think>\n{THINK}\n</think>\n<answer> </answer>", Q, "3", {}), False),  # empty answer
    ("answer", Sample(GOOD, Q, "3", {}), True),
    ("answer", Sample(GOOD, Q, "4", {}), False),
    ("answer", Sample(GOOD.replace(">3<", ">3.0<"), Q, "3", {}), True),                      # the grader's equivalence
    ("answer", Sample(GOOD.replace(">3<", ">B<"), Q, "blue", {"choices": ["red", "blue"]}), True),
    ("answer", Sample(GOOD.replace(">3<", ">A<"), Q, "blue", {"choices": ["red", "blue"]}), False),
    ("length", Sample(GOOD, Q, "3", {}), True),
    ("length", Sample("<think>\nthree\n</think>\n<answer>3</answer>", Q, "3", {}), False),
    ("repetition", Sample(LOOP, Q, "3", {}), False),
    ("repetition", Sample(_with("Wait, let me check. Wait, let me check. Wait, let me check."), Q, "3", {}), True),
    ("unseen_image", Sample(_with("Since I cannot see the image, I trust the text."), Q, "3", {}), False),
    ("unseen_image", Sample(_with("I can't view the diagram itself."), Q, "3", {}), False),
    ("unseen_image", Sample(_with("Without seeing the actual figure, this is a guess."), Q, "3", {}), False),
    ("unseen_image", Sample(_with("No image is provided, so I assume."), Q, "3", {}), False),
    ("unseen_image", Sample(_with("I can see the image has three red squares."), Q, "3", {}), True),
    ("answer_leak", Sample(_with("That matches the given answer."), Q, "3", {}), False),
    ("answer_leak", Sample(_with("The correct answer was provided as 3."), Q, "3", {}), False),
    ("answer_leak", Sample(_with("Check the provided answer choices again."), Q, "3", {}), True),
    ("answer_leak", Sample(_with("So the correct answer is 3."), Q, "3", {}), True),
    ("description_leftover", Sample(_with("A description lists the colours."), Q, "3", {}), False),
    ("description_leftover", Sample(_with("The caption agrees."), Q, "3", {}), False),
    ("description_leftover", Sample(_with("The image shows three."), Q, "3", {}), True),
    ("description_leftover", Sample(_with("This description fits option B."), "Which description fits?", "3", {}), True),
]


@pytest.mark.parametrize("rule,sample,keep", RULE_CASES)
def test_filter_rule(rule, sample, keep):
    ok, reason = bridging.RULES[rule](sample, Limits())
    assert ok == keep and (reason == "") == keep


def test_length_limits_and_judge_order():
    assert not bridging.check_length(Sample(GOOD, Q, "3", {}), Limits(max_words=10))[0]
    failed = bridging.judge(Sample(f"<think>\nI cannot see the image.\n</think>\n<answer>4</answer>", Q, "3", {}),
                            Limits())
    assert list(failed) == ["answer", "length", "unseen_image"]      # RULES order: the first one counts
    assert not bridging.judge(Sample(GOOD, Q, "3", {}), Limits())


REWRITE_CASES = [
    ("The description says there are 3 red squares.", "The image shows there are 3 red squares.", 1),
    ("According to the description, the angle is 30.", "According to the image, the angle is 30.", 1),
    ("the point mentioned in the given description", "the point shown in the image", 1),
    ("In the provided description, two lines cross.", "In the image, two lines cross.", 1),
    ("The detailed description of the image shows a cube.", "The image shows a cube.", 1),
    ("so the description mentions a circle", "so the image shows a circle", 1),
    ("As described, AB = 4 and the triangle described is right.", "As shown, AB = 4 and the triangle shown is right.", 2),
    ("Nothing to change here.", "Nothing to change here.", 0),
]


@pytest.mark.parametrize("text,expected,n", REWRITE_CASES)
def test_rewrite_references(text, expected, n):
    assert bridging.rewrite_references(text) == (expected, n)


def test_rewrite_thinking_leaves_the_answer_alone():
    response = "<think>\nThe description says 3.\n</think>\n<answer>the description</answer>"
    assert bridging.rewrite_thinking(response) == (
        "<think>\nThe image shows 3.\n</think>\n<answer>the description</answer>", 1)


def test_prompts_hold_what_each_step_needs():
    p = data.Problem(id="a", question="<image>How many?", answer="7", images=[])
    assert bridging.pseudo_cot_prompt(p).endswith("Question: How many?")          # placeholder dropped
    step2 = bridging.description_prompt(p, "I see 7 dots.")
    assert "thinking process" in step2 and "detailed description" in step2 and "I see 7 dots." in step2
    assert "7" not in bridging.reasoning_prompt(p, "dots")                          # no answer by default
    assert "The correct answer is 7." in bridging.reasoning_prompt(p, "dots", give_answer=True)


def test_histogram_and_report():
    assert bridging.histogram([0, 31, 32, 20000])["0-31"] == 2
    assert bridging.histogram([0, 31, 32, 20000])["32-63"] == 1 and bridging.histogram([20000])["16384+"] == 1
    log = [{"dropped_by": None, "failed": {}, "waits": 2, "words": 40, "rewrites": 1},
           {"dropped_by": None, "failed": {}, "waits": 0, "words": 100, "rewrites": 0},
           {"dropped_by": "answer", "failed": {"answer": "x", "length": "y"}, "waits": 5, "words": 5, "rewrites": 0}]
    r = bridging.build_report(log, 3, {"reasoning": 3})
    assert (r["records_in"], r["records_out"], r["rewritten_samples"]) == (3, 2, 1)
    assert r["dropped_by_rule"]["answer"] == 1 and r["failed_rule"]["length"] == 1
    assert r["waits"] == {"total": 2, "mean_per_sample": 1.0, "per_sample_histogram": {"0": 1, "2": 1}}
    assert r["length_words"]["histogram"]["32-63"] == 1 and r["length_words"]["median"] == 70
    assert "length of kept samples" in bridging.format_report(r)


# ----------------------------------------------------------------------------- scripted backend

# What the scripted reasoner says about the i-th record, and the rule that must drop it.
PLAN = [("good_wait", None), ("good", None), ("wrong", "answer"), ("loop", "repetition"), ("blind", "unseen_image"),
        ("leftover", "description_leftover"), ("cut", "truncated"), ("leak", "answer_leak"), ("short", "length")]


def golds_of(path) -> dict[str, str]:
    return {rec["id"]: rec["answer"] for _, rec in data.iter_jsonl(path)}


def _wrong(gold: str) -> str:
    return str(int(gold) + 1) if gold.isdigit() else ("B" if gold == "A" else "A")


def reasoner_reply(kind: str, gold: str) -> tuple[str, str | None, str]:
    """(content, reasoning_content, finish_reason) of an R1-style reply of the given kind."""
    think = ("The description says the grid has coloured squares. Counting every square row by row, "
             "I get the number the question asks for.")
    boxed = f"So the answer is \\boxed{{{gold}}}."
    if kind == "good_wait":
        return boxed, think + " Wait, let me check that again. Looking again, the count holds. Wait, did I miss one? No.", "stop"
    if kind == "good":        # no separate reasoning field: the thinking ends with </think> in the content
        return f"{think}\n</think>\n\n{boxed}", None, "stop"
    if kind == "wrong":
        return f"So the answer is \\boxed{{{_wrong(gold)}}}.", think, "stop"
    if kind == "loop":
        return boxed, think + " Let me count the squares in the grid once more." * 10, "stop"
    if kind == "blind":
        return boxed, "Since I cannot see the image, I rely on the text. " + think, "stop"
    if kind == "leftover":
        return boxed, think + " The caption agrees with this.", "stop"
    if kind == "cut":
        return "", think + " Let me now", "length"
    if kind == "leak":
        return boxed, think + " That matches the given answer.", "stop"
    return f"<think>\nIt is {gold}.\n</think>\n{boxed}", None, "stop"      # short


class ScriptedBackend:
    """Canned replies: the step is recognised from the prompt, the reasoner's reply kind from the
    record's position in PLAN. `crash_after` / `interrupt_after` N replies in all: os._exit (a kill)
    or KeyboardInterrupt (Ctrl-C) instead of the next reply."""

    def __init__(self, golds: dict[str, str], crash_after: int | None = None, interrupt_after: int | None = None):
        self.golds, self.order = golds, list(golds)
        self.crash_after, self.interrupt_after = crash_after, interrupt_after
        self.asked: list[tuple[str, str, str]] = []          # (step, id, prompt)

    def complete(self, requests, sampling):
        for r in requests:
            if self.crash_after is not None and len(self.asked) >= self.crash_after:
                os._exit(7)
            if self.interrupt_after is not None and len(self.asked) >= self.interrupt_after:
                raise KeyboardInterrupt
            step = "cot" if r.text.startswith("Look at") else "desc" if r.text.startswith("Given an image") else "reason"
            self.asked.append((step, r.key, r.text))
            assert bool(r.images) == (step != "reason")           # the reasoner never gets the image
            if step == "cot":
                yield ChatResult(r.key, "The image shows a 4x4 grid with coloured squares. Count them.", None, 14, "stop")
            elif step == "desc":
                yield ChatResult(r.key, "A 4x4 grid; some cells hold red, green, blue or yellow squares.", None, 16, "stop")
            else:
                kind = PLAN[self.order.index(r.key) % len(PLAN)][0]
                content, reasoning, finish = reasoner_reply(kind, self.golds[r.key])
                yield ChatResult(r.key, content, reasoning, None, finish)


def _args(toy_dir, out, **kw) -> bridge.Args:
    base = dict(data=str(toy_dir / "data" / "rl_train.jsonl"), output_dir=str(out), limit=len(PLAN),
                mllm="scripted-mllm", reasoner="scripted-reasoner")
    return bridge.Args(**{**base, **kw})


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


@pytest.fixture(autouse=True)
def _reset_accelerate_after():
    yield
    AcceleratorState._reset_state(True)


def test_scripted_pipeline_keeps_the_good_samples_and_train_sft_trains_on_them(toy_dir, tiny_model_dir, tmp_path):
    import train_sft

    out = tmp_path / "bridge"
    args = _args(toy_dir, out)
    backend = ScriptedBackend(golds_of(args.data))
    report = bridge.main(args, mllm=backend, reasoner=backend)
    ids = list(golds_of(args.data))[:len(PLAN)]

    # every step asked once per record, and each prompt carried the previous step's output
    assert Counter(step for step, _, _ in backend.asked) == {"cot": 9, "desc": 9, "reason": 9}
    prompts = {(step, key): text for step, key, text in backend.asked}
    assert "The image shows a 4x4 grid" in prompts["desc", ids[0]]
    assert "A 4x4 grid; some cells" in prompts["reason", ids[0]] and "correct answer" not in prompts["reason", ids[0]]

    cold = json.loads((out / "cold_start.json").read_text())
    assert [r["id"] for r in cold] == ids[:2]
    assert report["records_in"] == 9 and report["records_out"] == 2
    expected_drops = Counter(rule for _, rule in PLAN if rule)
    assert report["dropped_by_rule"] == {rule: expected_drops.get(rule, 0) for rule in bridging.RULES}
    assert report["waits"]["per_sample_histogram"] == {"0": 1, "2": 1} and report["rewritten_samples"] == 2
    first = cold[0]["conversations"][1]["value"]
    assert first.startswith("<think>\nThe image shows the grid") and "description" not in first   # word replacement
    assert first.endswith(f"<answer>{golds_of(args.data)[ids[0]]}</answer>")
    log = [json.loads(line) for line in (out / "filter_log.jsonl").read_text().splitlines()]
    assert [r["dropped_by"] for r in log] == [rule for _, rule in PLAN]
    for name in bridge.STAGE_FILES:
        assert _ids(out / name) == ids

    # Vision-R1-cold format, images beside it: our reader and train_sft.py take it as it is
    convs, read = data.read_sft(out / "cold_start.json")
    assert read.kept == 2 and all(c.images[0].path.is_relative_to(out.resolve()) for c in convs)
    assert convs[0].messages[0]["content"].startswith("<image>How many")
    final = train_sft.main(train_sft.Args(model=str(tiny_model_dir), data=str(out / "cold_start.json"),
                                          output_dir=str(tmp_path / "sft"), max_steps=2, per_device_batch_size=1,
                                          gradient_accumulation_steps=1, max_length=1024, logging_steps=1,
                                          save_steps=0, dtype="fp32"))
    assert (final / "model.safetensors").exists()
    assert len((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()) == 2


def test_give_answer_puts_the_ground_truth_in_the_reasoning_prompt(toy_dir, tmp_path):
    args = _args(toy_dir, tmp_path / "b", limit=2, give_answer=True)
    backend = ScriptedBackend(golds_of(args.data))
    bridge.main(args, mllm=backend, reasoner=backend)
    gold = golds_of(args.data)
    for step, key, text in backend.asked:
        assert (f"The correct answer is {gold[key]}." in text) == (step == "reason")


def test_a_rerun_with_other_settings_stops_and_filter_settings_may_change(toy_dir, tmp_path):
    """Issue: a rerun with other arguments printed a "note:" and went on, mixing the replies of two settings in
    the stage files. Now a setting that changes the replies stops the run, naming it; the filter's
    thresholds (recomputed from the stage files on every run) and --limit may change."""
    args = _args(toy_dir, tmp_path / "b", limit=2)
    bridge.main(args, mllm=ScriptedBackend(golds_of(args.data)), reasoner=ScriptedBackend(golds_of(args.data)))
    with pytest.raises(UserError, match=r"reasoner_temperature 0\.6 -> 1\.0.*--overwrite"):
        bridge.main(dataclasses.replace(args, reasoner_temperature=1.0), mllm=Untouchable(), reasoner=Untouchable())
    with pytest.raises(UserError, match=r"mllm scripted-mllm -> other"):
        bridge.main(dataclasses.replace(args, mllm="other"), mllm=Untouchable(), reasoner=Untouchable())
    backend = ScriptedBackend(golds_of(args.data))
    report = bridge.main(dataclasses.replace(args, limit=3, min_words=3), mllm=backend, reasoner=backend)
    assert [(s, k) for s, k, _ in backend.asked] == [(s, list(golds_of(args.data))[2]) for s in ("cot", "desc", "reason")]
    assert report["records_in"] == 3


SUBPROCESS = """
import json, sys
sys.path[:0] = [{root!r}, {tests!r}]
import bridge
from test_bridge import ScriptedBackend, golds_of
args = bridge.Args(**json.loads(sys.argv[1]))
backend = ScriptedBackend(golds_of(args.data), crash_after=int(sys.argv[2]))
bridge.main(args, mllm=backend, reasoner=backend)
"""


def test_killed_and_interrupted_runs_resume_with_every_record_exactly_once(toy_dir, tmp_path):
    out = tmp_path / "bridge"
    args = _args(toy_dir, out, limit=6)
    ids = list(golds_of(args.data))[:6]
    script = SUBPROCESS.format(root=str(ROOT), tests=str(ROOT / "tests"))
    # killed (os._exit) after stage 1 and 3 of the 6 descriptions
    p = subprocess.run([sys.executable, "-c", script, json.dumps(vars(args)), "9"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert p.returncode == 7, p.stderr
    assert _ids(out / bridge.STAGE_FILES[0]) == ids and _ids(out / bridge.STAGE_FILES[1]) == ids[:3]
    with open(out / bridge.STAGE_FILES[1], "a") as f:          # and a line torn by the kill
        f.write(json.dumps({"id": ids[3], "content": "half a descr"})[:30])

    # Ctrl-C after the other 3 descriptions and 2 reasoning replies
    backend = ScriptedBackend(golds_of(args.data), interrupt_after=5)
    with pytest.raises(KeyboardInterrupt):
        bridge.main(args, mllm=backend, reasoner=backend)
    assert [(s, k) for s, k, _ in backend.asked] == [("desc", k) for k in ids[3:]] + [("reason", k) for k in ids[:2]]

    # the same command again: only what is missing is asked for
    backend = ScriptedBackend(golds_of(args.data))
    report = bridge.main(args, mllm=backend, reasoner=backend)
    assert [(s, k) for s, k, _ in backend.asked] == [("reason", k) for k in ids[2:]]
    for name in bridge.STAGE_FILES:
        assert sorted(_ids(out / name)) == sorted(ids)                # each id exactly once
    assert [r["id"] for r in json.loads((out / "cold_start.json").read_text())] == ids[:2]
    assert report["records_in"] == 6 and report["records_out"] == 2


# ----------------------------------------------------------------------------- tiny local models


class Untouchable:
    def complete(self, requests, sampling):
        for r in requests:
            raise AssertionError(f"asked again for {r.key}")
        yield from ()


def test_tiny_models_run_every_step(toy_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "bridge"
    args = _args(toy_dir, out, limit=3, mllm=str(tiny_model_dir), reasoner=str(tiny_model_dir), batch_size=3,
                 mllm_max_new_tokens=8, reasoner_max_new_tokens=12, dtype="fp32")
    report = bridge.main(args)
    ids = list(golds_of(args.data))[:3]
    for name in bridge.STAGE_FILES:
        records = [json.loads(line) for line in (out / name).read_text().splitlines()]
        assert [r["id"] for r in records] == ids
        assert all(isinstance(r["content"], str) and 1 <= r["tokens"] <= 12 for r in records)
    cold = json.loads((out / "cold_start.json").read_text())
    assert report["records_in"] == 3 and report["records_out"] == len(cold)   # random models: expect 0
    assert sum(report["dropped_by_rule"].values()) == 3 - len(cold)
    assert json.loads((out / "report.json").read_text())["records_in"] == 3
    # rerun: everything is done, so no model is loaded and nothing is asked again
    again = bridge.main(args, mllm=Untouchable(), reasoner=Untouchable())
    assert again["dropped_by_rule"] == report["dropped_by_rule"]
