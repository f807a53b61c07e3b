"""evaluate.py: generation on the tiny model (outputs, resume, a torn last line), scoring a
hand-written predictions file to exact numbers, the one-off mode, and evaluation.summarize."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from PIL import Image

import evaluate
from minivr1 import evaluation, grader, rollout
from minivr1.cli import UserError

RECORD_FIELDS = {"id", "response", "extracted", "correct", "format_ok", "length", "waits"}
SUMMARY_FIELDS = {"n", "accuracy", "format_rate", "per_category", "per_question_type", "mean_length",
                  "median_length", "accuracy_by_length"}
MAX_NEW = 8


@pytest.fixture(autouse=True)
def _reset_accelerate_after():
    yield
    AcceleratorState._reset_state(True)


def _eval_args(tiny_model_dir, toy_dir, out, **kw) -> evaluate.Args:
    base = dict(model=str(tiny_model_dir), data=str(toy_dir / "data" / "eval.jsonl"), output_dir=str(out),
                limit=3, batch_size=2, max_new_tokens=MAX_NEW, temperature=0.0, dtype="fp32")
    return evaluate.Args(**{**base, **kw})


def _lines(out: Path) -> list[str]:
    return (out / "predictions.jsonl").read_text().splitlines()


def _eval_ids(toy_dir, n) -> list[str]:
    return [json.loads(line)["id"] for line in (toy_dir / "data" / "eval.jsonl").read_text().splitlines()[:n]]


@pytest.fixture
def count_generate(monkeypatch):
    """Counts the sequences evaluate.py generates."""
    rows = []
    real = rollout.generate

    def counting(model, processor, batch, *a, **kw):
        rows.append(batch["input_ids"].shape[0])
        return real(model, processor, batch, *a, **kw)

    monkeypatch.setattr(rollout, "generate", counting)
    return rows


@pytest.fixture(scope="module")
def generated(tiny_model_dir, toy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    summary = evaluate.main(_eval_args(tiny_model_dir, toy_dir, out))
    AcceleratorState._reset_state(True)
    return out, summary


# ----------------------------------------------------------------------------- generation mode


def test_generation_writes_predictions_and_summary(generated, toy_dir):
    out, summary = generated
    records = [json.loads(line) for line in _lines(out)]
    assert [r["id"] for r in records] == _eval_ids(toy_dir, 3)
    for r in records:
        assert RECORD_FIELDS <= r.keys()
        assert isinstance(r["response"], str) and 1 <= r["length"] <= MAX_NEW
        parsed = grader.parse_response(r["response"])
        assert r["extracted"] == parsed.answer and r["format_ok"] == parsed.format_ok
        assert r["waits"] == grader.count_wait(r["response"])
        assert isinstance(r["correct"], bool) and (r["extracted"] is not None or not r["correct"])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert SUMMARY_FIELDS <= summary.keys()
    assert summary["n"] == 3
    assert summary["accuracy"] == sum(r["correct"] for r in records) / 3
    assert summary["format_rate"] == sum(r["format_ok"] for r in records) / 3
    assert summary["mean_length"] == pytest.approx(sum(r["length"] for r in records) / 3)
    assert sum(v["n"] for v in summary["per_category"].values()) == 3
    assert set(summary["per_category"]) == {"count", "total", "majority"}
    assert summary["per_question_type"].keys() == {"free_form", "multi_choice"}
    assert sum(b["n"] for b in summary["accuracy_by_length"]) == 3
    assert summary["max_new_tokens"] == MAX_NEW and summary["temperature"] == 0.0


def test_generation_resumes_without_regenerating(generated, tiny_model_dir, toy_dir, tmp_path, count_generate):
    src, _ = generated
    out = tmp_path / "run"
    shutil.copytree(src, out)
    before = _lines(out)

    summary = evaluate.main(_eval_args(tiny_model_dir, toy_dir, out))          # the same run again
    assert count_generate == [] and _lines(out) == before and summary["n"] == 3

    summary = evaluate.main(_eval_args(tiny_model_dir, toy_dir, out, limit=4))   # one more problem
    assert count_generate == [1]
    assert _lines(out)[:3] == before
    assert [json.loads(line)["id"] for line in _lines(out)] == _eval_ids(toy_dir, 4)
    assert summary["n"] == 4


def test_generation_regenerates_a_torn_last_line(generated, tiny_model_dir, toy_dir, tmp_path, count_generate):
    """A crash mid-write leaves half a line: only that problem is generated again, on a line of its own."""
    src, _ = generated
    out = tmp_path / "run"
    shutil.copytree(src, out)
    good = _lines(out)
    (out / "predictions.jsonl").write_text(good[0] + "\n" + good[1] + "\n" + good[2][:25])

    summary = evaluate.main(_eval_args(tiny_model_dir, toy_dir, out))
    assert count_generate == [1]
    lines = _lines(out)
    assert lines[:2] == good[:2]
    assert [json.loads(line)["id"] for line in lines] == _eval_ids(toy_dir, 3)       # every line parses
    assert summary["n"] == 3

    # a last record that is complete but lacks its newline is kept, not generated again
    (out / "predictions.jsonl").write_text("\n".join(good))
    summary = evaluate.main(_eval_args(tiny_model_dir, toy_dir, out, limit=4))
    assert count_generate == [1, 1]
    assert [json.loads(line)["id"] for line in _lines(out)] == _eval_ids(toy_dir, 4)
    assert summary["n"] == 4


def test_a_rerun_with_another_model_or_sampling_stops(generated, tiny_model_dir, toy_dir, tmp_path, count_generate):
    """Issue: evaluating another model into a folder holding a model's predictions printed "3 already in ..." and
    reported the other model's accuracy. Now what produced the predictions is recorded, and a rerun that would
    mix runs stops, naming the difference; the batch size and --limit may change."""
    src, _ = generated
    out = tmp_path / "run"
    shutil.copytree(src, out)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    with pytest.raises(UserError, match=rf"model .* -> {other}.*--overwrite"):
        evaluate.main(_eval_args(other, toy_dir, out))
    with pytest.raises(UserError, match=r"temperature 0\.0 -> 0\.6"):
        evaluate.main(_eval_args(tiny_model_dir, toy_dir, out, temperature=0.6))
    with pytest.raises(UserError, match=r"max_new_tokens 8 -> 9"):
        evaluate.main(_eval_args(tiny_model_dir, toy_dir, out, max_new_tokens=9))
    assert count_generate == []
    evaluate.main(_eval_args(tiny_model_dir, toy_dir, out, batch_size=3, limit=4))
    assert count_generate == [1]
    summary = evaluate.main(_eval_args(other, toy_dir, out, overwrite=True))
    assert count_generate == [1, 2, 1] and summary["n"] == 3 and summary["model"] == str(other)


def test_scoring_into_a_folder_of_generated_predictions_stops(generated, predictions_file, tmp_path):
    """Scoring writes predictions.jsonl afresh: into a folder holding a model's generated predictions it would
    have replaced them."""
    src, _ = generated
    out = tmp_path / "run"
    shutil.copytree(src, out)
    before = _lines(out)
    with pytest.raises(UserError, match="--overwrite"):
        evaluate.main(evaluate.Args(predictions=str(predictions_file), output_dir=str(out)))
    assert _lines(out) == before


# ----------------------------------------------------------------------------- predictions mode

# (pid, category, question_type, choices, gold, response, extracted, correct, format_ok, words)
PREDICTIONS = [
    ("1", "math", "free_form", None, "4", "<think>two plus two</think><answer>4</answer>", "4", True, True, 3),
    ("2", "math", "free_form", None, "7.5", "<think>a guess</think><answer>7.4</answer>", "7.4", False, True, 2),
    ("3", "math", "free_form", None, "12", "The answer is 12.", None, False, False, 4),
    # the released Vision-R1 models answer a multiple choice with its letter after "Final Answer:"
    ("4", "vqa", "multi_choice", ["3", "4", "5"], "4",
     "<think>B? Wait, yes B.</think><answer> Final Answer:B </answer>", "B", True, True, 7),
    ("5", "vqa", "multi_choice", ["red", "green", "blue"], "C", "<think>look</think><answer>blue</answer>",
     "blue", True, True, 1),                                    # gold given as a letter, answer as text
    ("6", "vqa", "multi_choice", ["3", "4", "5"], "3", "<answer>A</answer>", "A", True, False, 1),   # no think
    ("7", "vqa", "multi_choice", ["3", "4", "5"], "5", "<think>hmm</think><answer>B</answer>", "B", False, True, 1),
]


@pytest.fixture
def predictions_file(tmp_path) -> Path:
    Image.new("RGB", (28, 28), (200, 30, 30)).save(tmp_path / "img.png")
    path = tmp_path / "preds.jsonl"
    with open(path, "w") as f:
        for pid, cat, qtype, choices, gold, response, *_ in PREDICTIONS:
            f.write(json.dumps({"pid": pid, "question": f"Question {pid}?", "image": "img.png", "choices": choices,
                                "answer": gold, "question_type": qtype,
                                "answer_type": "float" if pid == "2" else "text" if choices else "integer",
                                "precision": 1 if pid == "2" else None, "unit": None,
                                "metadata": {"category": cat}, "response": response}) + "\n")
    return path


def test_predictions_mode_scores_to_exact_numbers(predictions_file, tmp_path):
    out = tmp_path / "scored"
    summary = evaluate.main(evaluate.Args(predictions=str(predictions_file), output_dir=str(out)))
    records = [json.loads(line) for line in _lines(out)]
    assert [r["id"] for r in records] == [p[0] for p in PREDICTIONS]
    for r, (pid, *_, extracted, correct, format_ok, words) in zip(records, PREDICTIONS):
        got = (r["extracted"], r["correct"], r["format_ok"], r["length"])
        assert got == (extracted, correct, format_ok, words), pid
    assert [r["waits"] for r in records] == [0, 0, 0, 1, 0, 0, 0]
    assert summary["n"] == 7
    assert summary["accuracy"] == 4 / 7
    assert summary["format_rate"] == 5 / 7
    assert summary["accuracy_given_format"] == 3 / 5
    assert summary["per_category"] == {"math": {"n": 3, "accuracy": 1 / 3}, "vqa": {"n": 4, "accuracy": 3 / 4}}
    assert summary["per_question_type"] == {"free_form": {"n": 3, "accuracy": 1 / 3},
                                            "multi_choice": {"n": 4, "accuracy": 3 / 4}}
    assert summary["mean_length"] == 19 / 7 and summary["median_length"] == 2
    assert summary["length_unit"] == "words" and summary["mean_waits"] == 1 / 7
    # lengths 1,1,1 | 2 | 3 | 4,7 in order: pids 5 6 7 | 2 | 1 | 3 4 (the three of length 1 in one bucket; the
    # cuts at 1.75, 3.5 and 5.25 of 7 move to the nearest change of length: 3, 4 (a tie: the later) and 5)
    assert summary["accuracy_by_length"] == [
        {"min_length": 1, "max_length": 1, "n": 3, "accuracy": 2 / 3},
        {"min_length": 2, "max_length": 2, "n": 1, "accuracy": 0.0},
        {"min_length": 3, "max_length": 3, "n": 1, "accuracy": 1.0},
        {"min_length": 4, "max_length": 7, "n": 2, "accuracy": 0.5}]
    assert json.loads((out / "summary.json").read_text())["accuracy"] == 4 / 7


def test_predictions_mode_lengths_in_tokens(predictions_file, tmp_path, tiny_model_dir, processor):
    summary = evaluate.main(evaluate.Args(predictions=str(predictions_file), output_dir=str(tmp_path / "s"),
                                          tokenizer=str(tiny_model_dir)))
    tokens = [len(processor.tokenizer(p[5]).input_ids) for p in PREDICTIONS]
    assert [json.loads(line)["length"] for line in _lines(tmp_path / "s")] == tokens
    assert summary["length_unit"] == "tokens" and summary["accuracy"] == 4 / 7


def test_predictions_mode_needs_responses(predictions_file, tmp_path):
    lines = predictions_file.read_text().splitlines()
    rec = json.loads(lines[2])
    del rec["response"]
    predictions_file.write_text("\n".join(lines[:2] + [json.dumps(rec)]) + "\n")
    with pytest.raises(UserError, match="1 records have no 'response' field \\(first: 3\\)"):
        evaluate.main(evaluate.Args(predictions=str(predictions_file), output_dir=str(tmp_path / "s")))


def test_mode_arguments_are_checked(tmp_path):
    with pytest.raises(UserError, match="either --model"):
        evaluate.main(evaluate.Args(output_dir=str(tmp_path)))
    with pytest.raises(UserError, match="--model needs --data"):
        evaluate.main(evaluate.Args(model="m", output_dir=str(tmp_path)))
    with pytest.raises(UserError, match="one-off mode needs"):
        evaluate.main(evaluate.Args(image="x.png", question="How many?"))


# ----------------------------------------------------------------------------- one-off mode


def test_one_off_streams_and_prints_the_answer(tiny_model_dir, toy_dir, capsys):
    image = toy_dir / "data" / "images" / "eval-00000.png"
    evaluate.main(evaluate.Args(model=str(tiny_model_dir), image=str(image), question="How many shapes are there?",
                                max_new_tokens=MAX_NEW, temperature=0.0, dtype="fp32"))
    out = capsys.readouterr().out
    m = re.search(r"\[answer: (None|'.*'), format (ok|NOT ok), (\d+) tokens\]", out)
    assert m, out
    assert 1 <= int(m.group(3)) <= MAX_NEW
    assert out.index("[answer:") > 0                       # the streamed reasoning came first


# ----------------------------------------------------------------------------- evaluation.summarize


def _rec(length, correct, format_ok=True, category="c", qtype="free_form", waits=0):
    return {"length": length, "correct": correct, "format_ok": format_ok, "category": category,
            "question_type": qtype, "waits": waits}


def test_length_buckets_equal_counts_by_length():
    records = [_rec(n, c) for n, c in [(80, False), (10, True), (70, False), (20, True),
                                       (60, True), (30, True), (50, False), (40, False)]]
    assert evaluation.length_buckets(records) == [
        {"min_length": 10, "max_length": 20, "n": 2, "accuracy": 1.0},
        {"min_length": 30, "max_length": 40, "n": 2, "accuracy": 0.5},
        {"min_length": 50, "max_length": 60, "n": 2, "accuracy": 0.5},
        {"min_length": 70, "max_length": 80, "n": 2, "accuracy": 0.0}]
    assert evaluation.length_buckets(records, n_buckets=2) == [
        {"min_length": 10, "max_length": 40, "n": 4, "accuracy": 0.75},
        {"min_length": 50, "max_length": 80, "n": 4, "accuracy": 0.25}]
    # fewer records than buckets: no empty bucket
    assert evaluation.length_buckets(records[:3]) == [
        {"min_length": 10, "max_length": 10, "n": 1, "accuracy": 1.0},
        {"min_length": 70, "max_length": 70, "n": 1, "accuracy": 0.0},
        {"min_length": 80, "max_length": 80, "n": 1, "accuracy": 0.0}]


def test_length_buckets_never_split_equal_lengths():
    """Issue: the base model's answers mostly run to the 64-token limit, and the buckets read "1-64, 64-64,
    64-64, 64-64": equal lengths were split across buckets. A length now falls in one bucket only, so there
    may be fewer buckets, each labelled by its own range."""
    records = [_rec(1, True)] + [_rec(64, False)] * 7
    buckets = evaluation.length_buckets(records)
    assert [(b["min_length"], b["max_length"], b["n"]) for b in buckets] == [(1, 1, 1), (64, 64, 7)]
    summary = evaluation.summarize(records)
    assert "accuracy by length: 1: 100%, 64: 0%" in evaluation.format_summary(summary)
    records = [_rec(n, True) for n in (1, 2, 2, 2, 2, 3, 4, 5)]
    # the cuts move to the nearest change of length: 1 | 2 2 2 2 | 3 | 4 5
    assert [(b["min_length"], b["max_length"]) for b in evaluation.length_buckets(records)] == [(1, 1), (2, 2), (3, 3),
                                                                                                (4, 5)]


def test_summarize_exact_numbers():
    records = [_rec(10, True, True, "a", "multi_choice", 0), _rec(20, False, True, "a", "free_form", 2),
               _rec(30, True, False, "b", "free_form", 1), _rec(100, False, False, None, "free_form", 3)]
    s = evaluation.summarize(records, length_unit="words")
    assert s["n"] == 4 and s["accuracy"] == 0.5 and s["format_rate"] == 0.5
    assert s["accuracy_given_format"] == 0.5
    assert s["mean_length"] == 40 and s["median_length"] == 25 and s["length_unit"] == "words"
    assert s["mean_waits"] == 1.5
    assert s["per_category"] == {"None": {"n": 1, "accuracy": 0.0}, "a": {"n": 2, "accuracy": 0.5},
                                 "b": {"n": 1, "accuracy": 1.0}}
    assert s["per_question_type"] == {"free_form": {"n": 3, "accuracy": 1 / 3},
                                      "multi_choice": {"n": 1, "accuracy": 1.0}}
    assert [b["n"] for b in s["accuracy_by_length"]] == [1, 1, 1, 1]
    assert "accuracy 50.0%" in evaluation.format_summary(s)


def test_summarize_writes_valid_json_when_nothing_is_formatted():
    s = evaluation.summarize([_rec(5, False, False), _rec(7, True, False)])
    assert s["format_rate"] == 0.0 and s["accuracy_given_format"] is None      # not NaN: summary.json stays JSON
    json.dumps(s, allow_nan=False)
    assert not any(isinstance(v, float) and math.isnan(v) for v in s.values())
    with pytest.raises(ValueError, match="no records"):
        evaluation.summarize([])
