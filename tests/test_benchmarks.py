"""The paper's four benchmarks (minivr1.benchmarks, evaluate.py): reading each release's files,
prompts, answer rules (table-driven, one row per trap), each benchmark's metrics, and whole
runs: scoring predictions without images, several benchmarks in one run, a server, the tiny model.

Fixture files are written in each benchmark's released schema; records marked "verbatim" are
copied from the releases, the others are made up to cover every answer type and trap."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from accelerate.state import AcceleratorState
from PIL import Image

import evaluate
from minivr1 import benchmarks, evaluation
from minivr1.cli import UserError
from minivr1.benchmarks import BENCHMARKS, MathVerse, boxed_all, letters
from minivr1.data import DataError, Problem

MV, DM, MM, VISTA = (BENCHMARKS[n] for n in ("mathverse", "dynamath", "mmmath", "mathvista"))


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (28, 28), (200, 30, 30)).save(path)
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


# ============================================================================= fixture records

MC_COT = "Please first conduct reasoning, and then answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\nQuestion: "
FF_COT = "Please first conduct reasoning, and then answer the question and provide the final value, e.g., 1, 2.5, 300, at the end.\nQuestion: "
VO_COT = "According to the question shown in the image, please first conduct reasoning, and then answer the question and provide the final value, e.g., 1, 2.5, 300, at the end."
VO_MC_COT = "According to the question shown in the image, please first conduct reasoning, and then answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
Q1 = ("As shown in the figure, in triangle ABC, it is known that angle A = 80.0, angle B = 60.0, point D is on AB "
      "and point E is on AC, DE parallel BC, then the size of angle CED is ()\nChoices:\nA:40°\nB:60°\nC:120°\nD:140°")


def mv(sample, index, version, question, answer, qtype, image, subject="Plane Geometry", subfield="Angle"):
    folder = {"Vision Dominant": "images_version_5", "Vision Only": "images_version_6"}.get(version, "images_version_1-4")
    cot = (VO_MC_COT if qtype == "multi-choice" else VO_COT) if version == "Vision Only" else \
        (MC_COT if qtype == "multi-choice" else FF_COT) + question
    return {"sample_index": str(sample), "problem_index": str(index), "problem_version": version, "question": question,
            "image": f"{folder}/image_{index}.png" if image else "", "answer": answer, "question_type": qtype,
            "metadata": {"split": "testmini", "source": "made up", "subject": subject, "subfield": subfield},
            "query_wo": "(not used)", "query_cot": cot}


# 5-version file: problem 685 in all five versions (Vision Dominant and Vision Only verbatim), problem 1
# in two versions (its Vision Only has no choices in text), an option-text gold, a multi-answer gold.
MATHVERSE = [
    mv(3421, 685, "Text Dominant", "The cone has slant height 14 and radius 6. Find L.", "14", "free-form", True,
       "Solid Geometry", "Length"),
    mv(3422, 685, "Text Lite", "The cone has radius 6. Find L.", "14", "free-form", True, "Solid Geometry", "Length"),
    mv(3423, 685, "Vision Intensive", "Find L.", "14", "free-form", True, "Solid Geometry", "Length"),
    mv(3424, 685, "Vision Dominant", "Find L.", "14", "free-form", True, "Solid Geometry", "Length"),      # verbatim
    mv(3425, 685, "Vision Only", "", "14", "free-form", True, "Solid Geometry", "Length"),               # verbatim
    mv(1, 1, "Text Dominant", Q1, "D", "multi-choice", True),
    mv(5, 1, "Vision Only", "", "D", "multi-choice", True),
    mv(6, 2, "Text Dominant", "Is the bearing 053°?\nChoice:\nA. True\nB. False", "False", "multi-choice", True),
    mv(7, 3, "Text Dominant", "Which two are right angles?\nChoices:\nA:∠1\nB:∠2\nC:∠3\nD:∠4", "C\nD",
       "multi-choice", True),
]
MATHVERSE_TEXT_ONLY = [mv(1, 1, "Text Only", Q1, "D", "multi-choice", False)]                          # verbatim

# DynaMath, GitHub layout: trial{k}/dataset.json keyed by seed (records 1, 5, 21, 477 verbatim per trial)
DYNA_ANSWERS = {1: ["2.0944", "6.2832", "3.1416"], 5: ["B", "B", "A"], 21: ["4:45", "8:0", "4:45"],
                477: ["-16.899999999999995", "-16.899999999999995", "-16.899999999999995"]}
DYNA_META = {
    1: ("What is the period of this function y = a*sin(b*x), where both a and b are integers? Answer the question "
        "with a floating-point number.", "float", "analytic geometry", "high school"),
    5: ("Is Dark Magenta greater than Rosy Brown? Choices: (A) yes (B) no", "multiple choice", "statistics",
        "elementary school"),
    21: ("What time is shown? Please answer in the form like __:__.", "text", "arithmetic", "elementary school"),
    477: ("Matrix A is given in the image. What is the sum of all elements in the matrix A?", "float", "algebra",
          "undergraduate"),
}


def dynamath_trials(root: Path, n_trials=3, images=True, responses=None) -> Path:
    """root/trial{k}/dataset.json (+ image/image{seed}.png); responses: {(seed, trial): text}."""
    for t in range(1, n_trials + 1):
        records = {}
        for seed, (question, kind, subject, level) in DYNA_META.items():
            rec = {"question": question, "answer": DYNA_ANSWERS[seed][t - 1], "image": f"image/image{seed}.png",
                   "answer_type": kind, "subject": subject, "level": level}
            if responses is not None:
                if (seed, t) not in responses:
                    continue
                rec["response"] = responses[(seed, t)]
            records[str(seed)] = rec
            if images:
                png(root / f"trial{t}" / "image" / f"image{seed}.png")
        write_json(root / f"trial{t}" / "dataset.json", records)
    return root


def mmmath_record(i, solution, **over):
    rec = {"question": f"Question {i}: in the figure, find the value.", "file_name": f"{i}.png", "solution": solution,
           "year": "eight", "difficult": "hard" if i % 2 else "medium",
           "knowledge": {"level_1": "Functions" if i % 2 else "Properties of Shapes", "level_2": "Linear functions"}}
    rec.update(over)
    return rec


MMMATH = [
    mmmath_record(0, "Since ... the answer is $\\boxed{3}$."),
    mmmath_record(1, "First part \\boxed{2}; second part \\boxed{\\frac{1}{2}}."),
    mmmath_record(2, "The range is \\boxed{1<x\\le 3}."),
    mmmath_record(3, "So $AB=\\boxed{5\\text{cm}}$.", year="nine"),
]


@pytest.fixture
def mathverse_dir(tmp_path) -> Path:
    root = tmp_path / "mathverse"
    write_json(root / "testmini.json", MATHVERSE)
    write_json(root / "testmini_text_only.json", MATHVERSE_TEXT_ONLY)
    for r in MATHVERSE:
        png(root / "images" / r["image"])
    return root


@pytest.fixture
def mmmath_file(tmp_path) -> Path:
    for i in range(len(MMMATH)):
        png(tmp_path / "mm" / f"{i}.png")
    return write_jsonl(tmp_path / "mm" / "MM_Math.jsonl", MMMATH)


# ============================================================================= reading


def test_mathverse_reads_both_files_keyed_by_problem_and_version(mathverse_dir):
    problems, report = MV.read(benchmarks.expand(str(mathverse_dir)), mathverse_dir / "images")
    by_id = {p.id: p for p in problems}
    assert report.read == report.kept == 10 and len(by_id) == 10
    # sample_index 1 is in both files; the keys still differ
    assert {"1:Text Dominant", "1:Text Only", "1:Vision Only"} <= by_id.keys()
    p = by_id["1:Text Dominant"]
    assert p.choices == ["40°", "60°", "120°", "140°"] and p.question_type == "multi_choice"
    assert by_id["1:Vision Only"].choices == p.choices                   # borrowed from its sibling version
    assert by_id["2:Text Dominant"].choices == ["True", "False"]        # "Choice:\nA. True" spelling
    assert MathVerse.parse_choices("Which?\nChoices:\n(A) 3\n(B) 4\nC) 5\nSo.") == ["3", "4", "5"]
    assert by_id["685:Vision Only"].question_type == "free_form"
    assert by_id["1:Text Only"].images == []
    assert by_id["685:Vision Only"].images[0].path.name == "image_685.png"
    assert by_id["685:Vision Only"].images[0].path.parent.name == "images_version_6"
    assert by_id["685:Text Lite"].meta == {"problem_index": "685", "problem_version": "Text Lite",
                                           "subject": "Solid Geometry", "subfield": "Length"}


def test_mathverse_prompts(mathverse_dir):
    files = benchmarks.expand(str(mathverse_dir / "*.json"))
    plain = {p.id: p.question for p in MV.read(files, mathverse_dir / "images", "plain")[0]}
    official = {p.id: p.question for p in MV.read(files, mathverse_dir / "images", "official")[0]}
    assert plain["685:Vision Dominant"] == "Find L."                         # the plain question
    assert official["685:Vision Dominant"] == FF_COT + "Find L."             # query_cot
    assert plain["685:Vision Only"] == official["685:Vision Only"] == VO_COT  # no question text: query_cot
    assert plain["1:Text Only"].endswith("D:140°") and official["1:Text Only"].startswith(MC_COT)


def test_mathverse_hf_parquet_with_embedded_images(tmp_path):
    buf = tmp_path / "x.png"
    png(buf)
    rows = [{**r, "image": {"bytes": buf.read_bytes(), "path": r["image"]}} for r in MATHVERSE[:5]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "testmini.parquet")
    problems, _ = MV.read([tmp_path / "testmini.parquet"])
    assert len(problems) == 5 and all(p.images[0].data == buf.read_bytes() for p in problems)


def test_dynamath_trials_folder_glob_and_files(tmp_path):
    root = dynamath_trials(tmp_path / "10trials")
    for entry in (str(root), str(root / "trial*" / "dataset.json")):
        problems, report = DM.read(benchmarks.expand(entry))
        assert report.kept == 12
        # seed by seed (so --limit keeps whole seeds), then variant
        assert [p.id for p in problems[:4]] == ["1:1", "1:2", "1:3", "5:1"]
    by_id = {p.id: p for p in problems}
    assert [by_id[f"1:{v}"].answer for v in (1, 2, 3)] == ["2.0944", "6.2832", "3.1416"]
    assert by_id["21:2"].answer == "8:0" and by_id["21:2"].answer_type == "text"
    assert by_id["5:3"].question_type == "multi_choice" and by_id["5:3"].answer == "A"
    assert by_id["477:1"].meta == {"seed": "477", "variant": 1, "subject": "algebra", "level": "undergraduate"}
    assert by_id["1:3"].images[0].path == (root / "trial3" / "image" / "image1.png").resolve()
    assert by_id["1:1"].question == DYNA_META[1][0]                        # plain: the question itself


def test_dynamath_hf_splits_and_official_prompt(tmp_path):
    buf = png(tmp_path / "x.png").read_bytes()
    (tmp_path / "data").mkdir()
    for v in (1, 2):  # HF's split names and fields; the image path is not there, its bytes are
        rows = [{"id": str(seed), "question": q, "image": f"image{seed}.png", "decoded_image": {"bytes": buf, "path": None},
                 "ground_truth": DYNA_ANSWERS[seed][v - 1], "answer_type": kind, "subject": subject,
                 "knowledge_level": level} for seed, (q, kind, subject, level) in DYNA_META.items()]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / f"sample_variant{v}-00000-of-00001.parquet")
    assert benchmarks.detect(tmp_path / "data" / "sample_variant1-00000-of-00001.parquet") == "dynamath"
    problems, _ = DM.read(benchmarks.expand(str(tmp_path / "data")), style="official")
    by_id = {p.id: p for p in problems}
    assert set(by_id) == {f"{s}:{v}" for s in DYNA_META for v in (1, 2)}
    assert by_id["1:2"].answer == "6.2832" and by_id["1:2"].meta["level"] == "high school"
    float_prompt, mc_prompt = by_id["1:1"].question, by_id["5:1"].question
    assert float_prompt.startswith("## Question\n" + DYNA_META[1][0] + " Please answer in a floating-point number.")
    assert "Please answer in a floating-point number" not in mc_prompt
    assert mc_prompt.endswith('{\n    "solution": "[Detailed step-by-step explanation]",\n'
                              '    "short answer": "[Concise Answer]"\n}')
    assert "'short answer'" in mc_prompt and "three-digit floating-point number" in mc_prompt


def test_mmmath_gold_from_boxes_knowledge_and_prompt(mmmath_file):
    problems, _ = MM.read([mmmath_file])
    assert [p.answer for p in problems] == ["3", "2,\\frac{1}{2}", "1<x\\le 3", "5\\text{cm}"]
    assert [p.id for p in problems] == ["MM_Math-0", "MM_Math-1", "MM_Math-2", "MM_Math-3"]
    assert problems[1].meta == {"difficulty": "hard", "grade": "eight", "knowledge": "Functions",
                                "knowledge_l2": "Linear functions"}
    assert problems[0].question == MMMATH[0]["question"]
    official = MM.read([mmmath_file], style="official")[0][0].question
    assert official.startswith(MMMATH[0]["question"]) and official.endswith("within \\boxed{}.")


def test_mmmath_plain_answer_and_vlmevalkit_columns(tmp_path):
    rec = {"question": "q", "answer": "7", "difficulty": "Easy", "year": "seven", "knowledge_l1": "Functions",
           "knowledge_l2": "Quadratics", "prediction": "\\boxed{7}"}
    problems, _ = MM.read([write_jsonl(tmp_path / "mm.jsonl", [rec])], with_images=False)
    assert problems[0].answer == "7" and problems[0].meta["knowledge"] == "Functions"
    assert problems[0].meta["difficulty"] == "Easy" and problems[0].response == "\\boxed{7}"


def test_mathvista_official_prompt_is_the_query_hint(tmp_path):
    png(tmp_path / "images" / "1.jpg")
    records = {
        "1": {"question": "When a spring does work on an object, we cannot find the work?", "image": "images/1.jpg",
              "choices": None, "unit": None, "precision": 1, "answer": "1.2", "question_type": "free_form",
              "answer_type": "float"},                                                               # verbatim (cut)
        "3": {"question": "△ABC的两内角平分线OB、OC相交于点O，若∠A＝110°，则∠BOC＝（）", "choices": ["135°", "140°", "145°", "150°"],
              "answer": "145°", "question_type": "multi_choice", "answer_type": "text", "precision": None,
              "unit": None, "image": "images/1.jpg"},                                                # verbatim
        "4": {"question": "How long is the bar?", "image": "images/1.jpg", "choices": None, "unit": "cm",
              "precision": None, "answer": "7", "question_type": "free_form", "answer_type": "integer"},
    }
    path = write_json(tmp_path / "testmini.json", records)
    plain = {p.id: p.question for p in VISTA.read([path], style="plain")[0]}
    official = {p.id: p.question for p in VISTA.read([path], style="official")[0]}
    assert plain["3"].endswith("\nChoices:\n(A) 135°\n(B) 140°\n(C) 145°\n(D) 150°")   # today's prompt
    assert official["1"] == ("Hint: Please answer the question requiring a floating-point number with one decimal "
                             "place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: "
                             + records["1"]["question"])
    assert official["3"] == ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
                             "at the end.\nQuestion: " + records["3"]["question"]
                             + "\nChoices:\n(A) 135°\n(B) 140°\n(C) 145°\n(D) 150°")
    assert official["4"].endswith("Question: How long is the bar? (Unit: cm)")
    assert official["4"].startswith("Hint: Please answer the question requiring an integer answer")


# one bad record per benchmark: the error names file, line and field, and says what to do
BAD = [
    (MV, dict(MATHVERSE[2], problem_version="Vision Heavy"), "problem_version"),
    (MV, dict(MATHVERSE[2], question_type="mcq"), "question_type"),
    (MV, {k: v for k, v in MATHVERSE[2].items() if k != "problem_index"}, "problem_index"),
    (MV, dict(MATHVERSE[2], image="images_version_1-4/missing.png"), "image"),
    (DM, {"qid": "9", "question": "q", "answer": "1", "answer_type": "fraction", "image": "a.png"}, "answer_type"),
    (DM, {"qid": "9", "question": "q", "answer": "1", "answer_type": "float", "image": "a.png", "varid": "x"}, "varid"),
    (DM, {"qid": "9", "question": "q", "answer_type": "float", "image": "a.png"}, "answer"),
    (MM, mmmath_record(9, "no box here"), "solution"),
    (MM, {k: v for k, v in mmmath_record(9, "").items() if k != "solution"}, "solution"),
    (MM, dict(mmmath_record(9, "\\boxed{1}"), file_name=None), "file_name"),
]


@pytest.mark.parametrize("bench, bad, field", BAD, ids=[f"{b.name}-{f}-{i}" for i, (b, _, f) in enumerate(BAD)])
def test_bad_record_names_file_line_and_field(tmp_path, bench, bad, field):
    for name in ("a.png", "0.png", "9.png"):
        png(tmp_path / name)
    for r in MATHVERSE[:3]:
        png(tmp_path / r["image"])
    good = {MV: MATHVERSE[0], DM: {"qid": "8", "question": "q", "answer": "1", "answer_type": "float", "image": "a.png"},
            MM: mmmath_record(0, "\\boxed{1}")}[bench]
    path = write_jsonl(tmp_path / "bench.jsonl", [good, bad])
    with pytest.raises(DataError) as e:
        bench.read([path])
    assert f"bench.jsonl:line 2: field '{field}':" in str(e.value) and "--skip_bad_records" in str(e.value)
    problems, report = bench.read([path], skip_bad=True)               # skipped, counted, reported
    assert len(problems) == 1 and report.read == 2 and f"line 2: field '{field}'" in report.skipped[0]


def test_mmmath_missing_answer_message_says_what_to_add(tmp_path):
    path = write_jsonl(tmp_path / "mm.jsonl", [{"question": "q", "file_name": "0.png"}])
    with pytest.raises(DataError, match=r"field 'solution': missing, and no 'answer' either\. Add 'solution'"):
        MM.read([path], with_images=False)


def test_score_only_reading_opens_no_image(tmp_path, monkeypatch):
    def never(*a, **kw):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", never)
    mvf = write_json(tmp_path / "mv.json", [dict(r, response="x") for r in MATHVERSE])
    dmf = dynamath_trials(tmp_path / "dyna", images=False)
    mmf = write_jsonl(tmp_path / "mm.jsonl", MMMATH)
    assert len(MV.read([mvf], with_images=False)[0]) == 9
    assert len(DM.read(benchmarks.expand(str(dmf)), with_images=False)[0]) == 12
    assert len(MM.read([mmf], with_images=False)[0]) == 4
    with pytest.raises(DataError, match="not found"):                   # generating: images are required
        MV.read([mvf])


def test_detect_and_plan(tmp_path, mathverse_dir, mmmath_file):
    dyna = dynamath_trials(tmp_path / "dyna", images=False)
    vista = write_json(tmp_path / "vista.json", {"1": {"question": "q", "answer": "1", "image": "a.png"}})
    assert benchmarks.detect(mathverse_dir / "testmini.json") == "mathverse"
    assert benchmarks.detect(mathverse_dir / "testmini_text_only.json") == "mathverse"
    assert benchmarks.detect(mmmath_file) == "mmmath"
    assert benchmarks.detect(dyna / "trial1" / "dataset.json") == "dynamath"
    assert benchmarks.detect(vista) == "mathvista"
    runs = benchmarks.plan("auto", f"{vista},{mathverse_dir},{mmmath_file},{dyna}/trial*/dataset.json")
    assert [(b.name, len(files)) for b, files, _ in runs] == [("mathvista", 1), ("mathverse", 2), ("mmmath", 1),
                                                              ("dynamath", 3)]
    assert benchmarks.plan("MM-Math", str(mmmath_file))[0][0] is MM
    with pytest.raises(DataError, match="one --data entry per benchmark"):
        benchmarks.plan("mathverse,mmmath", str(mmmath_file))
    with pytest.raises(DataError, match="unknown benchmark 'mathvision'"):
        benchmarks.plan("mathvision", str(mmmath_file))
    with pytest.raises(DataError, match="named twice"):
        benchmarks.plan("mmmath", f"{mmmath_file},{mmmath_file}")
    with pytest.raises(DataError, match="no data files"):
        benchmarks.plan("dynamath", str(tmp_path / "nothing*" / "x.json"))
    unknown = write_jsonl(tmp_path / "other.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="cannot tell the benchmark.*Pass --benchmark"):
        benchmarks.detect(unknown)


def test_the_same_variant_twice_is_refused(tmp_path):
    dyna = dynamath_trials(tmp_path / "dyna", n_trials=1, images=False)
    f = dyna / "trial1" / "dataset.json"
    with pytest.raises(DataError, match="already read from .*Pass each file once"):
        DM.read([f, f], with_images=False)


# ============================================================================= answer rules


def mv_problem(gold, qtype="free_form", question=""):
    return Problem(id="x", question=question, answer=gold, images=[], question_type=qtype,
                   choices=MathVerse.parse_choices(question) if qtype == "multi_choice" else None)


def dm_problem(gold, kind):
    return Problem(id="x", question="", answer=gold, images=[], answer_type=kind)


def mm_problem(gold):
    return Problem(id="x", question="", answer=gold, images=[])


OPTIONS = "\nChoices:\nA:053 ^\\circ T\nB:090 ^\\circ T\nC:120°\nD:140°"
# (benchmark, problem, prediction, correct): one row per trap
RULES = [
    # --- MathVerse, multiple choice: letters, letter sets, option-text golds, no credit for option text
    (MV, mv_problem("D", "multi_choice", Q1), "D", True),
    (MV, mv_problem("D", "multi_choice", Q1), "D:140°", True),
    (MV, mv_problem("D", "multi_choice", Q1), "(D)", True),
    (MV, mv_problem("D", "multi_choice", Q1), "Option D", True),
    (MV, mv_problem("D", "multi_choice", Q1), "\\boxed{D}", True),
    (MV, mv_problem("D", "multi_choice", Q1), "140°", False),             # option text: no credit
    (MV, mv_problem("C", "multi_choice", Q1), "B:2√{3}", False),          # the official judge's own example
    (MV, mv_problem("(C)", "multi_choice", Q1), "C", True),
    (MV, mv_problem("C\nD", "multi_choice", Q1), "C, D", True),           # multi-answer gold: a letter set
    (MV, mv_problem("C\nD", "multi_choice", Q1), "D and C", True),
    (MV, mv_problem("C\nD", "multi_choice", Q1), "C", False),
    (MV, mv_problem("053 ^\\circ T", "multi_choice", "Find the bearing." + OPTIONS), "A", True),  # text gold -> A
    (MV, mv_problem("053 ^\\circ T", "multi_choice", "Find the bearing." + OPTIONS), "053°T", False),
    (MV, mv_problem("False", "multi_choice", "Is it?\nChoice:\nA. True\nB. False"), "B", True),
    (MV, mv_problem("D", "multi_choice"), "D", True),                     # Vision Only: letters only
    # --- MathVerse, free form
    (MV, mv_problem("14"), "14", True),
    (MV, mv_problem("14"), "L = 14", True),
    (MV, mv_problem("14"), "14 cm", True),
    (MV, mv_problem("14"), "13.6", False),                                # an integer gold needs the value
    (MV, mv_problem("Area $=113.1 \\mathrm{~cm}^{2}$"), "113.1", True),   # label, $, \mathrm{~cm}^{2}
    (MV, mv_problem("Area $=113.1 \\mathrm{~cm}^{2}$"), "113.1 cm^2", True),
    (MV, mv_problem("Area $=113.1 \\mathrm{~cm}^{2}$"), "36\\pi", True),   # 113.097 rounds to the gold
    (MV, mv_problem("Area $=113.1 \\mathrm{~cm}^{2}$"), "113", False),
    (MV, mv_problem("$h=15$"), "15", True),
    (MV, mv_problem("$h=15$"), "h = 15", True),
    (MV, mv_problem("4.4 m"), "4.4", True),
    (MV, mv_problem("4.4 m"), "4.40 meters", True),
    (MV, mv_problem("4.4 m"), "4.5", False),
    (MV, mv_problem("y=-2 x+5"), "y = -2x + 5", True),                    # equations
    (MV, mv_problem("y=-2 x+5"), "2x + y = 5", True),
    (MV, mv_problem("y=-2 x+5"), "-2x+5", True),
    (MV, mv_problem("y=-2 x+5"), "y = 2x + 5", False),
    (MV, mv_problem("\\frac{\\sqrt{30}}{2}"), "\\sqrt{7.5}", True),       # LaTeX expressions
    (MV, mv_problem("\\frac{\\sqrt{30}}{2}"), "2.74", True),
    (MV, mv_problem("\\frac{\\sqrt{30}}{2}"), "2.7", False),
    (MV, mv_problem("4+4\\sqrt{3}"), "4(1+\\sqrt{3})", True),
    (MV, mv_problem("4+4\\sqrt{3}"), "8\\sqrt{3}", False),
    (MV, mv_problem("230 ^\\circ T"), "230°T", True),                      # bearings
    (MV, mv_problem("230 ^\\circ T"), "230", True),
    (MV, mv_problem("230 ^\\circ T"), "50° T", False),
    (MV, mv_problem("S 23.5 ^\\circ W"), "S23.5°W", True),
    (MV, mv_problem("S 23.5 ^\\circ W"), "N 23.5° W", False),
    (MV, mv_problem("S 23.5 ^\\circ W"), "23.5", False),
    (MV, mv_problem("S 23.5 ^\\circ W"), "S 23.5° E", False),
    (MV, mv_problem("118掳T"), "118°T", True),                             # mojibake degree sign
    (MV, mv_problem("-4.9\n-4.9"), "-4.9", True),
    (MV, mv_problem("even"), "Even", True),
    (MV, mv_problem("Bugs Bunny"), "bugs bunny", True),
    (MV, mv_problem("(-\\infty, 2]"), "(-∞, 2]", True),                   # intervals: brackets matter
    (MV, mv_problem("(-\\infty, 2]"), "(-\\infty, 2)", False),
    (MV, mv_problem("(2, -3)"), "(2.0, -3)", True),
    # --- DynaMath
    (DM, dm_problem("2.0944", "float"), "2.094", True),                   # absolute 1e-3
    (DM, dm_problem("2.0944", "float"), "2π/3", True),                    # π multiples
    (DM, dm_problem("6.2832", "float"), "2\\pi", True),
    (DM, dm_problem("2.0944", "float"), "2.096", False),
    (DM, dm_problem("2.0944", "float"), "2.094 radians", True),
    (DM, dm_problem("0.3333", "float"), "1/3", True),
    (DM, dm_problem("-16.899999999999995", "float"), "-16.9", True),
    (DM, dm_problem("B", "multiple choice"), "B", True),
    (DM, dm_problem("B", "multiple choice"), "(B) no", True),
    (DM, dm_problem("B", "multiple choice"), "b", True),
    (DM, dm_problem("B", "multiple choice"), "A", False),
    (DM, dm_problem("8:0", "text"), "8:00", True),                        # times
    (DM, dm_problem("4:45", "text"), "04:45", True),
    (DM, dm_problem("4:45", "text"), "4:46", False),
    (DM, dm_problem("(-2.777, -1.136)", "text"), "(-2.7772, -1.1359)", True),  # coordinates, 1e-3
    (DM, dm_problem("(-2.777, -1.136)", "text"), "(-2.78, -1.14)", False),
    (DM, dm_problem("(1.000, 0.000)", "text"), "(1, 0)", True),
    (DM, dm_problem("[3, 2, 3, 3, 6]", "text"), "3, 2, 3, 3, 6", True),   # lists, in order
    (DM, dm_problem("[3, 2, 3, 3, 6]", "text"), "[3, 3, 2, 3, 6]", False),
    (DM, dm_problem("69, 51, 59", "text"), "69,51,59", True),
    (DM, dm_problem("11/02/2006", "text"), "11/2/2006", True),            # dates
    (DM, dm_problem("Sep", "text"), "September", True),                   # months, days
    (DM, dm_problem("Sunday", "text"), "sun", True),
    (DM, dm_problem("y = 4", "text"), "y=4", True),
    (DM, dm_problem("BS", "text"), "bs", True),                           # words, case-insensitive
    (DM, dm_problem("White", "text"), "White and black", False),          # no substring credit
    (DM, dm_problem("Product C", "text"), "product c", True),
    # --- MM-Math
    (MM, mm_problem("3,\\frac{1}{2}"), "\\boxed{0.5}, \\boxed{3}", True), # several boxes, matched unordered
    (MM, mm_problem("3,\\frac{1}{2}"), "\\boxed{3}", False),               # lists must have equal length
    (MM, mm_problem("3"), "\\boxed{3} and \\boxed{4}", False),             # an extra box changes the length
    (MM, mm_problem("1<x\\le 3"), "(1, 3]", True),                         # intervals
    (MM, mm_problem("1<x\\le 3"), "(1, 3)", False),
    (MM, mm_problem("0.333"), "\\frac{1}{3}", True),                       # absolute 1e-2
    (MM, mm_problem("2.5"), "2.51", True),
    (MM, mm_problem("2.5"), "2.52", False),
    (MM, mm_problem("25"), "0.25", True),                                  # x100 / /100 leniency
    (MM, mm_problem("0.25"), "25", True),
    (MM, mm_problem("\\frac{\\sqrt{3}}{2}"), "\\dfrac{\\sqrt3}{2}", True),  # LaTeX equivalence
    (MM, mm_problem("2\\sqrt{3}"), "\\sqrt{12}", True),
    (MM, mm_problem("5\\text{cm}"), "5", True),                            # units
    (MM, mm_problem("5"), "5米", True),
    (MM, mm_problem("x=2\\pm\\sqrt{3}"), "2+\\sqrt{3}, 2-\\sqrt{3}", True),  # \pm expanded
    (MM, mm_problem("y=2x+1"), "2x-y+1=0", True),                          # equations
    (MM, mm_problem("y=2x+1"), "y=2x-1", False),
    (MM, mm_problem("60^\\circ"), "60", True),
    # --- MathVista (the grader's rule, unchanged)
    (VISTA, Problem(id="x", question="", answer="145°", images=[], choices=["135°", "140°", "145°", "150°"],
                    question_type="multi_choice"), "C", True),
    (VISTA, Problem(id="x", question="", answer="1.2", images=[], answer_type="float", precision=1), "1.23", True),
]


@pytest.mark.parametrize("bench, problem, pred, correct", RULES,
                         ids=[f"{i}-{b.name}-{p.answer[:12]}-{pred[:12]}" for i, (b, p, pred, _) in enumerate(RULES)])
def test_answer_rules(bench, problem, pred, correct):
    assert bench.correct(pred, problem) is correct


@pytest.mark.parametrize("bench", list(BENCHMARKS.values()), ids=list(BENCHMARKS))
def test_judges_are_total_and_bounded(bench):
    problem = {MV: mv_problem("14"), DM: dm_problem("2.0", "float"), MM: mm_problem("3"),
               VISTA: Problem(id="x", question="", answer="3", images=[])}[bench]
    for junk in (None, "", "9^9^9^9", "(" * 5000 + "1", "x" * 20_000, "1," * 5000, "\\boxed{" * 300):
        assert bench.correct(junk, problem) is False


def test_boxed_all_and_letters():
    assert boxed_all("a \\boxed{\\frac{1}{2}} b \\boxed{3} \\boxed{unclosed") == ["\\frac{1}{2}", "3"]
    assert letters("C\nD") == {"C", "D"} and letters("The answer is (B).") == {"B"}
    assert letters("A triangle") is None and letters("a and b") is None and letters("G") is None


# official-style extraction: responses without an <answer> block
FIND = [
    (MV, mv_problem("D", "multi_choice", Q1), "... so the angle is 140°. Therefore the correct option is D.", "D"),
    (MV, mv_problem("D", "multi_choice", Q1), "Since DE ∥ BC, angle CED = 140°, which is choice D", "D"),
    (MV, mv_problem("14"), "Using the formula, L = 14.\nThe answer is 14.", "14"),
    (DM, dm_problem("2.0944", "float"),
     '```json\n{"solution": "The period is $\\\\frac{2\\\\pi}{b}$ ...", "short answer": "2.094"}\n```', "2.094"),
    (DM, dm_problem("2.0944", "float"),
     '{"solution": "period = \\frac{2\\pi}{3}", "short answer": "2.094"}', "2.094"),  # invalid JSON escapes
    (DM, dm_problem("B", "multiple choice"), "Dark Magenta is smaller.\nB", "B"),
    (MM, mm_problem("3,\\frac{1}{2}"), "First \\boxed{3}. Then \\boxed{\\frac12}.", "3,\\frac12"),
    (MM, mm_problem("3"), "So we get\nthe value $x=3$", "x=3"),
    (VISTA, Problem(id="x", question="", answer="3", images=[]), "I count them.\n**Answer:** 3", "3"),
]


@pytest.mark.parametrize("bench, problem, text, found", FIND, ids=[f"{i}-{b.name}" for i, (b, *_) in enumerate(FIND)])
def test_official_extraction_and_scoring(bench, problem, text, found):
    assert bench.find_answer(text, problem) == found
    official = evaluation.score(problem, text, 10, bench, official=True)
    plain = evaluation.score(problem, text, 10, bench, official=False)
    assert official["extracted"] == found and official["correct"] is True and official["format_ok"] is False
    assert plain["extracted"] is None and plain["correct"] is False      # plain: no <answer> block, no answer


# ============================================================================= metrics


def rec(correct, **fields):
    return {"correct": correct, "format_ok": True, "length": 10, "waits": 0, **fields}


def test_mathverse_overall_is_the_five_vision_versions_without_text_only():
    rows = [rec(c, problem_version=v, subject="Plane Geometry", subfield="Angle")
            for v, cs in [("Text Dominant", [1, 1]), ("Text Lite", [1, 0]), ("Vision Intensive", [0, 0]),
                          ("Vision Dominant", [1, 0]), ("Vision Only", [0, 0]), ("Text Only", [1, 1])] for c in cs]
    m = MV.metrics(rows)
    assert m["overall"] == 4 / 10 and m["overall_n"] == 10                # Text Only's 2/2 not in it
    assert m["mean_of_versions"] == pytest.approx((1 + 0.5 + 0 + 0.5 + 0) / 5)
    assert list(m["per_version"]) == [*MathVerse.VERSIONS, "Text Only"]
    assert m["per_version"]["Text Lite"] == {"n": 2, "accuracy": 0.5}
    assert m["text_only"] == {"n": 2, "accuracy": 1.0}
    assert m["per_subject"] == {"Plane Geometry": {"n": 10, "accuracy": 0.4}}


def test_dynamath_worst_case_on_a_hand_made_set():
    # seeds 1-3 have all 3 variants; seed 4 only two (incomplete: not in the worst case)
    pattern = {"1": [1, 1, 1], "2": [1, 0, 1], "3": [0, 0, 0], "4": [1, 1]}
    rows = [rec(bool(c), seed=s, variant=v + 1, subject="algebra" if s in "12" else "puzzle test", level="high school")
            for s, cs in pattern.items() for v, c in enumerate(cs)]
    m = DM.metrics(rows)
    assert m["average_case"] == 7 / 11                                    # every record
    assert m["worst_case"] == 1 / 3                                       # seed 1 of the 3 complete seeds
    assert m["reasoning_robustness"] == pytest.approx((1 / 3) / (5 / 9))  # worst / average over seeds 1-3 = 0.6
    assert (m["variants"], m["seeds"], m["complete_seeds"], m["incomplete_seeds"]) == (3, 4, 3, 1)
    assert m["per_subject"]["algebra"]["worst_case"] == 0.5 and m["per_subject"]["algebra"]["average_case"] == 5 / 6
    assert m["per_subject"]["puzzle test"]["worst_case"] == 0.0 and m["per_subject"]["puzzle test"]["seeds"] == 1
    assert m["per_level"]["high school"]["n"] == 11


def test_mmmath_breakdowns():
    rows = [rec(True, difficulty="hard", grade="eight", knowledge="Functions", knowledge_l2="a"),
            rec(False, difficulty="hard", grade="nine", knowledge="Functions", knowledge_l2="b"),
            rec(True, difficulty="medium", grade="nine", knowledge="Properties of Shapes", knowledge_l2="b")]
    m = MM.metrics(rows)
    assert m["overall"] == 2 / 3
    assert m["per_difficulty"] == {"hard": {"n": 2, "accuracy": 0.5}, "medium": {"n": 1, "accuracy": 1.0}}
    assert m["per_grade"]["nine"] == {"n": 2, "accuracy": 0.5}
    assert m["per_knowledge"]["Functions"] == {"n": 2, "accuracy": 0.5}


# ============================================================================= whole runs


@pytest.fixture(autouse=True)
def _reset_accelerate_after():
    yield
    AcceleratorState._reset_state(True)


def tagged(answer: str) -> str:
    return f"<think>I look at the figure.</think><answer> Final Answer:{answer} </answer>"


def test_score_only_mathverse_without_images(tmp_path):
    answers = {"685": "14", "1": "D", "2": "B", "3": "C, D"}
    wrong = {"685:Vision Intensive", "685:Vision Only", "3:Text Dominant"}
    rows = [dict(r, response=tagged("0" if f"{r['problem_index']}:{r['problem_version']}" in wrong
                                    else answers[r["problem_index"]])) for r in MATHVERSE + MATHVERSE_TEXT_ONLY]
    preds = write_json(tmp_path / "preds.json", rows)                     # no image exists anywhere
    s = evaluate.main(evaluate.Args(benchmark="mathverse", predictions=str(preds), output_dir=str(tmp_path / "out")))
    m = s["metrics"]
    assert s["benchmark"] == "mathverse" and s["n"] == 10 and s["format_rate"] == 1.0
    assert m["overall"] == s["score"] == 6 / 9 and m["overall_n"] == 9    # Text Only apart
    assert m["text_only"] == {"n": 1, "accuracy": 1.0}
    assert m["per_version"]["Vision Only"] == {"n": 2, "accuracy": 0.5}
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert {r["problem_version"] for r in records} == {*MathVerse.VERSIONS, "Text Only"}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["metrics"]["overall"] == 6 / 9


def test_score_only_dynamath_trials_worst_case(tmp_path):
    good = {1: ["2.094", "2π", "3.142"], 5: ["B", "B", "A"], 21: ["4:45", "8:00", "4:45"], 477: ["-16.9"] * 3}
    responses = {(s, t): tagged(good[s][t - 1]) for s in good for t in (1, 2, 3)}
    responses[(21, 2)] = tagged("8:30")                                  # seed 21 fails one variant
    del responses[(477, 3)]                                               # seed 477 lacks variant 3
    root = dynamath_trials(tmp_path / "preds", responses=responses, images=False)
    s = evaluate.main(evaluate.Args(predictions=f"{root}/trial*/dataset.json", output_dir=str(tmp_path / "out")))
    m = s["metrics"]
    assert s["benchmark"] == "dynamath" and s["n"] == 11
    assert m["average_case"] == s["score"] == 10 / 11
    assert m["worst_case"] == 2 / 3 and (m["complete_seeds"], m["incomplete_seeds"]) == (3, 1)
    assert m["reasoning_robustness"] == pytest.approx((2 / 3) / (8 / 9))


def test_score_only_mmmath_and_vlmevalkit_predictions(tmp_path):
    rows = [dict(MMMATH[0], response=tagged("3")), dict(MMMATH[1], response=tagged("\\boxed{2}, \\boxed{0.5}")),
            dict(MMMATH[2], response=tagged("(1, 3)")), dict(MMMATH[3], response=tagged("5 cm"))]
    preds = write_jsonl(tmp_path / "mm.jsonl", rows)
    s = evaluate.main(evaluate.Args(predictions=str(preds), output_dir=str(tmp_path / "out")))
    assert s["benchmark"] == "mmmath" and s["metrics"]["overall"] == 3 / 4
    assert s["metrics"]["per_grade"] == {"eight": {"n": 3, "accuracy": 2 / 3}, "nine": {"n": 1, "accuracy": 1.0}}
    # VLMEvalKit: a `prediction` column with the extracted answer or the raw reply, no tags
    vlm = write_jsonl(tmp_path / "vlm.jsonl", [dict(MMMATH[0], prediction="3"),
                                               dict(MMMATH[1], prediction="So \\boxed{2} and \\boxed{1/2}.")])
    args = dict(benchmark="mmmath", predictions=str(vlm), output_dir=str(tmp_path / "vlm"))
    assert evaluate.main(evaluate.Args(**args, prompt_style="official"))["accuracy"] == 1.0
    assert evaluate.main(evaluate.Args(**args))["accuracy"] == 0.0       # plain: only <answer> blocks count


def test_several_benchmarks_in_one_run_print_the_papers_table(tmp_path, capsys):
    vista = write_jsonl(tmp_path / "vista.jsonl", [
        {"pid": "1", "question": "How many?", "image": "gone.png", "answer": "3", "response": tagged("3")},
        {"pid": "2", "question": "How many?", "image": "gone.png", "answer": "4", "response": tagged("5")}])
    mverse = write_json(tmp_path / "mv.json", [dict(r, response=tagged("14")) for r in MATHVERSE[:5]])
    mm = write_jsonl(tmp_path / "mm.jsonl", [dict(MMMATH[0], response=tagged("3"))])
    responses = {(s, t): tagged(DYNA_ANSWERS[s][t - 1]) for s in DYNA_META for t in (1, 2)}
    responses[(1, 2)] = tagged("1.0")
    dyna = dynamath_trials(tmp_path / "dyna", n_trials=2, responses=responses, images=False)
    out = tmp_path / "paper"
    combined = evaluate.main(evaluate.Args(benchmark="mathvista,mathverse,mmmath,dynamath",
                                           predictions=f"{vista},{mverse},{mm},{dyna}", output_dir=str(out)))
    assert set(combined["benchmarks"]) == {"mathvista", "mathverse", "mmmath", "dynamath"}
    for name in combined["benchmarks"]:
        assert (out / name / "predictions.jsonl").is_file() and (out / name / "summary.json").is_file()
    # DynaMath: 7/8 average, 3 of 4 seeds right in both variants, RR = 0.75 / 0.875
    assert combined["table"].splitlines()[2] == f"| {vista},{mverse},{mm},{dyna} | 50.0 | 100.0 | 100.0 | 87.5 | 75.0 | 85.7 |"
    assert combined["table"] in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["table"] == combined["table"]


def test_predictions_in_an_unknown_benchmark_name_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="unknown benchmark"):
        evaluate.main(evaluate.Args(benchmark="mathvision", predictions=str(tmp_path / "x.json")))
    with pytest.raises(UserError, match="--prompt_style 'fancy'"):
        evaluate.main(evaluate.Args(predictions="x.json", prompt_style="fancy"))


def test_dynamath_through_a_server_resumes(tmp_path):
    from fake_openai_server import FakeOpenAIServer, user_text

    def reply(body):  # variant 1's answer in DynaMath's JSON format, no tags: right on variant 1 only
        seed = next(s for s, (q, *_) in DYNA_META.items() if q in user_text(body))
        return {"content": json.dumps({"solution": "...", "short answer": DYNA_ANSWERS[seed][0]})}

    dyna = dynamath_trials(tmp_path / "dyna", n_trials=2)
    args = dict(api_model="served", benchmark="dynamath", data=str(dyna), output_dir=str(tmp_path / "out"),
                prompt_style="official", concurrency=2, request_timeout=5, limit=6)
    with FakeOpenAIServer({}, default=reply) as server:
        s = evaluate.main(evaluate.Args(api_base=server.url, **args))
        assert server.counts["default"] == 6                               # --limit 6: seeds 1, 5, 21 whole
        again = evaluate.main(evaluate.Args(api_base=server.url, **{**args, "limit": 0}))
        assert server.counts["default"] == 8                               # resumed: only seed 477 asked
    assert user_text(server.requests[0]["body"]).strip().startswith("## Question\n")        # the official prompt
    assert s["n"] == 6 and s["metrics"]["complete_seeds"] == 3 and s["accuracy"] == 4 / 6
    with pytest.raises(UserError, match="holds predictions made for .*'official'.* not dynamath with --prompt_style plain"):
        evaluate.main(evaluate.Args(api_base="http://127.0.0.1:9", **{**args, "prompt_style": "plain"}))
    # variant 2 differs from variant 1 for seeds 1 and 21: 6 of 8 right, 2 of 4 seeds right in both
    assert again["n"] == 8 and again["metrics"]["average_case"] == 6 / 8 and again["metrics"]["worst_case"] == 0.5


def test_tiny_model_generates_on_a_mathverse_file(tiny_model_dir, tmp_path, monkeypatch):
    from minivr1 import rollout

    root = tmp_path / "mathverse"
    write_json(root / "testmini.json", MATHVERSE[3:6])
    write_json(root / "testmini_text_only.json", MATHVERSE_TEXT_ONLY)
    for r in MATHVERSE[3:6]:
        png(root / r["image"])
    calls, real = [], rollout.generate

    def counting(model, processor, batch, *a, **kw):
        calls.append(batch["input_ids"].shape[0])
        return real(model, processor, batch, *a, **kw)

    monkeypatch.setattr(rollout, "generate", counting)
    args = dict(model=str(tiny_model_dir), benchmark="mathverse", data=str(root), image_root=str(root),
                output_dir=str(tmp_path / "out"), batch_size=4, max_new_tokens=4, temperature=0.0, dtype="fp32")
    s = evaluate.main(evaluate.Args(**args))
    records = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["1:Text Dominant", "1:Text Only", "685:Vision Dominant",
                                                "685:Vision Only"]
    assert all(1 <= r["length"] <= 4 and isinstance(r["correct"], bool) for r in records)
    assert s["metrics"]["overall_n"] == 3 and s["metrics"]["text_only"]["n"] == 1 and calls == [4]
    evaluate.main(evaluate.Args(**args))                                   # a rerun generates nothing
    assert calls == [4] and len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 4
