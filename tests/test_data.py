"""Tests for minivr1.data: the three readers, their checks and their error messages."""

import base64
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from minivr1.data import (
    DataError,
    ImageError,
    ImageRef,
    iter_jsonl,
    read_benchmark,
    read_problems,
    read_rl,
    read_sft,
    write_jsonl,
)

# ------------------------------------------------------------------------------------------------
# helpers


def png(path, size=(8, 6), color=(200, 10, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def png_bytes(size=(8, 6), color=(10, 200, 10), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # how HF datasets stores Image()


def turns(*pairs):
    """turns(("human", "hi"), ("gpt", "yo")) -> sharegpt turns."""
    return [{"from": role, "value": text} for role, text in pairs]


def sft_record(**over):
    answer = "<think>x</think><answer> 3 </answer>"
    rec = {"conversations": turns(("human", "<image>What is x?"), ("gpt", answer)), "image": "a.png"}
    rec.update(over)
    return rec


def rl_record(**over):
    rec = {"problem": "<image>Find x.", "answer": "3", "images": ["a.png"]}
    rec.update(over)
    return rec


def bench_record(**over):
    rec = {"pid": "1", "question": "How many?", "image": "a.png", "choices": None, "answer": "3",
           "question_type": "free_form", "answer_type": "integer", "precision": None, "unit": None}
    rec.update(over)
    return rec


READERS = {"sft": (read_sft, sft_record), "rl": (read_rl, rl_record), "bench": (read_benchmark, bench_record)}


# ------------------------------------------------------------------------------------------------
# (a) SFT


def test_sft_json_list_human_gpt_and_role_content(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "imgs" / "b.png")
    records = [
        sft_record(system="You are a helpful assistant."),
        {
            "id": "cold-7",
            "conversations": [
                {"role": "user", "content": "<image><image>Compare."},
                {"role": "assistant", "content": "same"},
                {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": "yes"},
            ],
            "images": ["a.png", "imgs/b.png"],
        },
    ]
    convs, report = read_sft(write_json(tmp_path / "cold.json", records))
    assert (report.read, report.kept, report.skipped) == (2, 2, [])
    first, second = convs
    assert first.id == "cold-0"  # "<file stem>-<index>"
    assert first.messages == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "<image>What is x?"},
        {"role": "assistant", "content": "<think>x</think><answer> 3 </answer>"},
    ]
    assert [im.path for im in first.images] == [(tmp_path / "a.png").resolve()]
    assert second.id == "cold-7"
    assert [m["role"] for m in second.messages] == ["user", "assistant", "user", "assistant"]
    assert [im.path.name for im in second.images] == ["a.png", "b.png"]


def test_sft_jsonl_image_root_and_no_placeholder(tmp_path):
    png(tmp_path / "images" / "a.png")
    dialogue = turns(("system", "Be brief."), ("human", "What is x?"), ("gpt", "3"))
    records = [{"conversations": dialogue, "images": ["a.png"]}, {"messages": dialogue[1:]}]
    path = write_lines(tmp_path / "cold.jsonl", records)
    convs, _ = read_sft(path, image_root=tmp_path / "images")
    # No placeholder but one image is allowed: text unchanged, the chat code puts the image first.
    assert convs[0].messages[1] == {"role": "user", "content": "What is x?"}
    assert convs[0].messages[0]["role"] == "system" and len(convs[0].images) == 1
    assert convs[1].images == []  # a text-only sample


# ------------------------------------------------------------------------------------------------
# (b) RL


def test_rl_parquet_embedded_bytes_win_over_path(tmp_path):
    table = pa.table(
        {
            "images": pa.array(
                [[{"bytes": png_bytes((8, 6)), "path": "missing/on/disk.png"}],
                 [{"bytes": png_bytes((5, 5)), "path": None}]],
                pa.list_(HF_IMAGE),
            ),
            "problem": ["<image>Find x.", "<image>Find y."],
            "answer": ["3", "4.5"],
        }
    )
    pq.write_table(table, tmp_path / "geo.parquet")
    problems, report = read_rl(tmp_path / "geo.parquet")
    assert report.kept == 2
    p = problems[0]
    assert (p.id, p.question, p.answer) == ("geo-0", "<image>Find x.", "3")
    assert p.images[0].path is None and p.images[0].load().size == (8, 6)
    assert problems[1].images[0].load().mode == "RGB"


def test_rl_jsonl_image_layouts(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    records = [
        rl_record(id="p1", images=[{"bytes": base64.b64encode(png_bytes()).decode(), "path": None}]),
        rl_record(id="p2", problem="<image> and <image>", images=["a.png", "b.png"]),
        {"id": "p3", "problem": "<image>Find x.", "answer": 3, "image": "a.png", "category": "count"},
    ]
    problems, _ = read_rl(write_lines(tmp_path / "rl.jsonl", records))
    assert [len(p.images) for p in problems] == [1, 2, 1]
    assert problems[0].images[0].data is not None
    assert problems[2].answer == "3" and problems[2].category == "count"  # numbers become strings


def test_write_jsonl_round_trip_with_bytes(tmp_path):
    path = tmp_path / "out" / "rl.jsonl"
    write_jsonl(path, [rl_record(images=[{"bytes": png_bytes(), "path": None}])])
    assert [n for n, _ in iter_jsonl(path)] == [1]
    problems, _ = read_rl(path)
    assert problems[0].images[0].load().size == (8, 6)
    write_jsonl(path, [rl_record(id="second", images=[{"bytes": png_bytes(), "path": None}])], append=True)
    assert [r["id"] for _, r in iter_jsonl(path) if "id" in r] == ["second"]


# ------------------------------------------------------------------------------------------------
# (c) benchmark


def test_mathvista_json_keyed_by_pid(tmp_path):
    png(tmp_path / "images" / "1.png")
    png(tmp_path / "images" / "2.png")
    testmini = {
        "1": bench_record(
            pid="1", image="images/1.png", question="What is x?", choices=["3", "4", "5"], answer="4",
            question_type="multi_choice", answer_type="text",
            metadata={"category": "math-targeted-vqa", "task": "geometry problem solving"},
        ),
        "2": bench_record(
            image="images/2.png", answer="1.5", answer_type="float", precision=1.0, unit="cm",
            metadata={"task": "figure question answering"},
        ),
    }
    del testmini["2"]["pid"]  # the key is the pid
    problems, _ = read_benchmark(write_json(tmp_path / "testmini.json", testmini))
    mc, ff = problems
    assert mc.question == "What is x?\nChoices:\n(A) 3\n(B) 4\n(C) 5"
    assert (mc.id, mc.answer, mc.question_type) == ("1", "4", "multi_choice")
    assert mc.category == "math-targeted-vqa"  # metadata.category first, then metadata.task
    assert mc.grading_meta() == {"choices": ["3", "4", "5"], "answer_type": "text", "precision": None}
    assert ff.id == "2"  # taken from the key
    assert (ff.question, ff.precision, ff.unit) == ("How many?", 1, "cm")
    assert ff.category == "figure question answering"
    assert ff.grading_meta() == {"choices": None, "answer_type": "float", "precision": 1}


def test_benchmark_parquet_decoded_image_and_letter_answer(tmp_path):
    rows = {
        "pid": ["7"],
        "question": ["Which?"],
        "image": ["images/7.jpg"],  # not on disk: decoded_image wins
        "decoded_image": pa.array([{"bytes": png_bytes(), "path": "images/7.jpg"}], HF_IMAGE),
        "choices": pa.array([["red", "blue"]], pa.list_(pa.string())),
        "answer": ["B"],  # a letter is mapped to the option text
        "question_type": ["multi_choice"],
        "answer_type": ["text"],
        "precision": pa.array([None], pa.float64()),
        "unit": [""],
        "metadata": [{"category": "general-vqa", "task": "vqa"}],
    }
    pq.write_table(pa.table(rows), tmp_path / "mv.parquet")
    (p,), _ = read_benchmark(tmp_path / "mv.parquet")
    assert (p.answer, p.precision, p.unit, p.category) == ("blue", None, None, "general-vqa")
    assert p.images[0].data is not None


def test_predictions_file_keeps_response_and_does_not_append_choices_twice(tmp_path):
    png(tmp_path / "a.png")
    rec = bench_record(question="Q?\nChoices:\n(A) 1\n(B) 2", choices=["1", "2"], answer="2",
                       question_type="multi_choice", response="<answer> B </answer>")
    (p,), _ = read_benchmark(write_lines(tmp_path / "pred.jsonl", [rec]))
    assert p.question == "Q?\nChoices:\n(A) 1\n(B) 2" and p.response == "<answer> B </answer>"


def test_multi_choice_without_choices_keeps_the_answer(tmp_path):
    png(tmp_path / "a.png")  # the toy task's layout: options in the question text, answer a letter
    rec = rl_record(problem="<image>Which?\nChoices:\n(A) red\n(B) blue", answer="B",
                    question_type="multi_choice")
    (p,), _ = read_rl(write_lines(tmp_path / "toy.jsonl", [rec]))
    assert (p.answer, p.choices, p.question) == ("B", None, rec["problem"])


def test_read_problems_picks_the_format(tmp_path):
    png(tmp_path / "a.png")
    rl, _ = read_problems(write_lines(tmp_path / "rl.jsonl", [rl_record()]))
    bench, _ = read_problems(write_lines(tmp_path / "b.jsonl", [bench_record()]))
    assert rl[0].id == "rl-0" and bench[0].id == "1" and bench[0].question == "How many?"
    with pytest.raises(DataError, match="cannot tell the format"):
        read_problems(write_lines(tmp_path / "x.jsonl", [{"text": "hi"}]))


# ------------------------------------------------------------------------------------------------
# bad records: every message names the file, the line and the field

BAD = [
    # (format, change to the valid record, field named in the message)
    ("sft", {"conversations": None}, "conversations"),
    ("sft", {"conversations": turns(("bot", "hi"), ("gpt", "x"))}, "conversations[0]"),
    ("sft", {"conversations": turns(("human", "<image>a"), ("human", "b"))}, "conversations[1]"),
    ("sft", {"conversations": turns(("human", "<image>a"))}, "conversations"),
    ("sft", {"conversations": turns(("human", "<image>a"), ("gpt", ""))}, "conversations[1]"),
    ("sft", {"conversations": turns(("human", "<image>a"), ("gpt", "b"), ("system", "c"))},
     "conversations[2]"),
    ("sft", {"conversations": turns(("human", "<image><image>a"), ("gpt", "b"))}, "image"),
    ("sft", {"conversations": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]},
     "conversations[0]"),
    ("sft", {"image": "nope.png"}, "image"),
    ("sft", {"image": "notes.txt"}, "image"),  # exists, not an image
    ("sft", {"image": 5}, "image"),
    ("sft", {"system": ["x"]}, "system"),
    ("rl", {"problem": None}, "problem"),
    ("rl", {"problem": "   "}, "problem"),
    ("rl", {"answer": ["3"]}, "answer"),
    ("rl", {"images": []}, "image"),
    ("rl", {"images": [{"bytes": None, "path": None}]}, "images"),
    ("rl", {"images": [{"bytes": "not base64!", "path": None}]}, "images"),
    ("rl", {"problem": "<image><image>two"}, "images"),
    ("rl", {"id": "r0"}, "id"),  # duplicate of line 1
    ("bench", {"pid": None}, "pid"),
    ("bench", {"pid": "0"}, "pid"),  # duplicate of line 1
    ("bench", {"question": 7}, "question"),
    ("bench", {"precision": "two"}, "precision"),
    ("bench", {"precision": 1.5}, "precision"),
    ("bench", {"question_type": "mcq"}, "question_type"),
    ("bench", {"answer_type": "number"}, "answer_type"),
    ("bench", {"choices": "A or B"}, "choices"),
    ("bench", {"question_type": "multi_choice", "choices": ["1", "2"], "answer": "7"}, "answer"),
    ("bench", {"image": None}, "image"),
]


@pytest.mark.parametrize("fmt, change, field", BAD, ids=[f"{i}-{f}-{name}" for i, (f, _, name) in enumerate(BAD)])
def test_bad_record_message(tmp_path, fmt, change, field):
    png(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    reader, make = READERS[fmt]
    good = make(**({"id": "r0"} if fmt != "bench" else {"pid": "0"}))
    path = write_lines(tmp_path / "data.jsonl", [good, make(**change)])
    with pytest.raises(DataError) as e:
        reader(path)
    msg = str(e.value)
    assert f"data.jsonl:line 2: field '{field}':" in msg, msg
    assert "--skip_bad_records" in msg


def test_locations_in_json_list_parquet_and_pid_keyed_json(tmp_path):
    png(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"rl\.json:index 1 \(0-based\): field 'answer'"):
        read_rl(write_json(tmp_path / "rl.json", [rl_record(), rl_record(answer="")]))
    pq.write_table(pa.Table.from_pylist([rl_record(), rl_record(problem=None)]), tmp_path / "rl.parquet")
    with pytest.raises(DataError, match=r"rl\.parquet:row 1 \(0-based\): field 'problem'"):
        read_rl(tmp_path / "rl.parquet")
    with pytest.raises(DataError, match=r"tm\.json:key '12': field 'precision'"):
        testmini = {"11": bench_record(pid="11"), "12": bench_record(pid="12", precision="x")}
        read_benchmark(write_json(tmp_path / "tm.json", testmini))


def test_skip_bad_counts_and_reports(tmp_path):
    png(tmp_path / "a.png")
    path = tmp_path / "rl.jsonl"
    lines = [json.dumps(rl_record()), "{broken", json.dumps(rl_record(answer=None)), "",
             json.dumps(rl_record(problem="ok <image>"))]
    path.write_text("\n".join(lines) + "\n")
    problems, report = read_rl(path, skip_bad=True)
    assert [p.question for p in problems] == ["<image>Find x.", "ok <image>"]
    assert (report.read, report.kept, len(report.skipped)) == (4, 2, 2)
    assert "line 2" in report.skipped[0] and "broken JSON" in report.skipped[0]
    assert "line 3: field 'answer'" in report.skipped[1]
    assert report.summary() == (
        f"read 4 records from {path}, kept 2, skipped 2 bad records (first: {report.skipped[0]})"
    )
    assert "--skip_bad_records" not in report.skipped[1]  # no advice to do what was done
    assert problems[1].id == "rl-3"  # default ids count records, so they do not shift when one is skipped
    with pytest.raises(DataError, match="all 1 records are bad"):
        read_rl(write_lines(tmp_path / "bad.jsonl", [rl_record(answer=None)]), skip_bad=True)


# ------------------------------------------------------------------------------------------------
# images: escapes, size limits, loading


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_image_path_escaping_the_root_is_refused(tmp_path, how):
    root = tmp_path / "data"
    outside = png(tmp_path / "secret.png")
    if how == "symlink":
        root.mkdir()
        os.symlink(outside, root / "link.png")
    image = {"dotdot": "../secret.png", "absolute": str(outside), "symlink": "link.png"}[how]
    path = write_lines(_mkdir(root) / "rl.jsonl", [rl_record(images=[image])])
    with pytest.raises(DataError, match=r"rl\.jsonl:line 1: field 'images': .*outside the image root"):
        read_rl(path)


def _mkdir(path):
    path.mkdir(exist_ok=True)
    return path


def test_absolute_path_inside_the_root_is_fine(tmp_path):
    inside = png(tmp_path / "a.png")
    (p,), _ = read_rl(write_lines(tmp_path / "rl.jsonl", [rl_record(images=[str(inside)])]))
    assert p.images[0].path == inside.resolve()


def test_oversized_image(tmp_path):
    png(tmp_path / "a.png", size=(100, 100))
    path = write_lines(tmp_path / "rl.jsonl", [rl_record()])
    with pytest.raises(DataError, match=r"line 1: field 'images': .*10000 pixels.*--max_image_pixels"):
        read_rl(path, max_image_pixels=100 * 99)
    (p,), _ = read_rl(path, max_image_pixels=100 * 100)
    with pytest.raises(ImageError, match="more than the limit"):
        ImageRef(path=p.images[0].path, max_pixels=50).load()  # checked again before decoding


def test_imageref_load_from_bytes_and_path(tmp_path):
    from_bytes = ImageRef(data=png_bytes((7, 3), mode="L", color=128)).load()
    from_path = ImageRef(path=png(tmp_path / "a.png", size=(4, 5))).load()
    assert (from_bytes.mode, from_bytes.size) == ("RGB", (7, 3))
    assert (from_path.mode, from_path.size) == ("RGB", (4, 5))
    clear = ImageRef(data=png_bytes(mode="RGBA", color=(0, 0, 0, 0))).load()
    assert clear.mode == "RGB" and clear.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    with pytest.raises(ImageError, match="cannot be opened"):
        ImageRef(data=b"not an image").load()


# ------------------------------------------------------------------------------------------------
# whole-file problems


def test_broken_json_names_the_line(tmp_path):
    png(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rl_record()) + '\n\n{"a": 2,,}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:line 3: broken JSON"):
        list(iter_jsonl(path))
    with pytest.raises(DataError, match=r"d\.jsonl:line 3: broken JSON"):
        read_rl(path)
    (tmp_path / "d.json").write_text('[\n{"a": 1},\n{"a" 2}\n]')
    with pytest.raises(DataError, match=r"d\.json:line 3: broken JSON"):
        read_sft(tmp_path / "d.json")


@pytest.mark.parametrize("name, content", [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.json", ""),
                                           ("e.parquet", None)])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        pq.write_table(pa.table({"problem": pa.array([], pa.string())}), path)
    else:
        path.write_text(content)
    with pytest.raises(DataError, match="holds no records"):
        read_rl(path)


def test_missing_file_bad_suffix_and_bad_root(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_sft(tmp_path / "nope.json")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        read_rl(write_lines(tmp_path / "d.csv", [rl_record()]))
    with pytest.raises(DataError, match="image root is not a folder"):
        read_rl(write_lines(tmp_path / "d.jsonl", [rl_record()]), image_root=tmp_path / "nope")


# ------------------------------------------------------------------------------------------------
# scoring predictions: no images, VLMEvalKit's `prediction`, TSV tables


def test_without_images_no_image_is_read_or_needed(tmp_path, monkeypatch):
    def never(*a, **kw):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(Image, "open", never)
    path = write_lines(tmp_path / "preds.jsonl", [bench_record(image="missing/1.png", response="r"),
                                                  bench_record(pid="2", image=None, response="s")])
    problems, report = read_problems(path, image_root=tmp_path / "no-such-root", with_images=False)
    assert [(p.id, p.images, p.response) for p in problems] == [("1", [], "r"), ("2", [], "s")]
    rl = write_lines(tmp_path / "rl.jsonl", [rl_record(images=["gone.png"], problem="<image><image>x")])
    assert read_problems(rl, with_images=False)[0][0].images == []       # placeholder count not checked either
    with pytest.raises(DataError, match="field 'image'"):               # with images: still checked
        read_problems(path)


def test_prediction_column_and_tsv_table(tmp_path):
    path = write_lines(tmp_path / "vlmeval.jsonl", [bench_record(prediction="B")])
    assert read_problems(path, with_images=False)[0][0].response == "B"
    tsv = tmp_path / "vlmeval.tsv"
    tsv.write_text("pid\tquestion\tanswer\tprediction\n7\tHow many?\t3\tthree\n8\tAnd now?\t\t4\n")
    with pytest.raises(DataError, match=r"vlmeval\.tsv:line 3: field 'answer': empty"):
        read_benchmark(tsv, with_images=False)                           # header is line 1
    problems, report = read_benchmark(tsv, with_images=False, skip_bad=True)
    assert [(p.id, p.answer, p.response) for p in problems] == [("7", "3", "three")] and report.read == 2


# ------------------------------------------------------------------------------------------------
# damaged images (issue 11)


def noise_image(path, fmt, size=(64, 64)):
    """An image whose compressed data is large (noise), so half of it is a header and part of the pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(path, format=fmt)
    return path


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_image_is_found_when_the_data_is_read(tmp_path, fmt):
    """Issue: an image cut to half its bytes (valid header) passed the reader and killed training at the step
    that first used it ("cannot be decoded", naming no data file or record); --skip_bad_records did not help.
    Now every image is decoded at read time: the record is named, and skipped with --skip_bad_records."""
    for name in ("a.png", "c.png"):
        noise_image(tmp_path / name, fmt)
    bad = noise_image(tmp_path / "b.png", fmt)
    bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
    Image.open(bad).size                                   # precondition: the header alone still reads
    path = write_lines(tmp_path / "rl.jsonl", [rl_record(images=[n]) for n in ("a.png", "b.png", "c.png")])
    with pytest.raises(DataError, match=r"rl\.jsonl:line 2: field 'images': image .*b\.png cannot be decoded"
                                        r".*--skip_bad_records"):
        read_rl(path)
    problems, report = read_rl(path, skip_bad=True)
    assert [p.images[0].path.name for p in problems] == ["a.png", "c.png"]
    assert report.kept == 2 and len(report.skipped) == 1 and "line 2" in report.skipped[0]


def test_an_image_damaged_after_reading_names_its_record(tmp_path):
    noise_image(tmp_path / "a.png", "PNG")
    (p,), _ = read_rl(write_lines(tmp_path / "rl.jsonl", [rl_record()]))
    (tmp_path / "a.png").write_bytes((tmp_path / "a.png").read_bytes()[:300])
    with pytest.raises(ImageError, match=r"rl\.jsonl:line 1.*cannot be decoded"):
        p.images[0].load()


def _png_header_only(path, width, height):
    """A PNG holding only its header (no pixel data): enough for a reader that looks at the size."""
    import struct
    import zlib

    def chunk(kind, body=b""):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)       # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT") + chunk(b"IEND"))
    return path


def test_max_image_pixels_decides_above_pils_own_limit(tmp_path):
    """Issue: the hint "raise --max_image_pixels" was false above PIL's own limit (178,956,970 pixels), which
    refused the image whatever --max_image_pixels said."""
    big = _png_header_only(tmp_path / "big.png", 15000, 12000)          # 180,000,000 pixels
    assert ImageRef(path=big, max_pixels=200_000_000).size() == (15000, 12000)
    with pytest.raises(ImageError, match=r"180000000 pixels, more than the limit of 100000000"):
        ImageRef(path=big, max_pixels=100_000_000).size()
