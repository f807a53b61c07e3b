"""Readers for the three data formats minivr1 trains and evaluates on.

Every reader returns the parsed records and a `ReadReport`, checks each record when it reads
it, and raises `DataError` with a message that says where the problem is and what to do:

    train.jsonl:line 7: field 'images': image 'imgs/a.png' not found (looked for /data/imgs/a.png).
    Fix the path or the image root (--image_root), or pass --skip_bad_records to skip the
    record (skipped records are counted and reported).

JSONL locations are 1-based line numbers; JSON lists ("index N") and parquet files ("row N")
are 0-based, and the message says "(0-based)". With `skip_bad=True` a bad record is skipped
and its message kept in `ReadReport.skipped`; nothing is dropped silently, so print
`report.summary()`. Problems with the whole file (missing, empty, unreadable, unknown suffix)
always raise.

(a) Cold-start SFT: Vision-R1-cold, LLaMA-Factory "sharegpt" (`read_sft`). A .json file
    holding a list of records, or .jsonl with one record per line:

        {"id": "cold-0",                                    # optional, else "<file stem>-<index>"
         "system": "You are a helpful assistant.",          # optional
         "conversations": [{"from": "human", "value": "<image>What is x?"},
                           {"from": "gpt", "value": "<think>...</think><answer> 3 </answer>"}],
         "images": ["mulberry/0001.png"]}                   # or "image": "mulberry/0001.png"

    Turns use "from"/"value" (roles human, gpt, system) or "role"/"content" (user, assistant,
    system); "messages" is accepted for "conversations". An optional system turn comes first,
    then user and assistant alternate, starting with user and ending with assistant. Images are
    paths relative to the image root (default: the data file's folder). The number of
    "<image>" placeholders in the user turns must equal the number of images, except that a
    record with images and no placeholder at all is allowed: the chat code then puts the
    images before the text of the first user turn. The text is kept unchanged here. A record
    with no images is a text-only sample.

(b) RL problems: Vision-R1-rl, geometry3k layout (`read_rl`). Parquet as HF datasets writes it
    (an Image feature is a struct {bytes, path}), or .jsonl / .json:

        {"id": "geo-12",                                    # optional, else "<file stem>-<index>"
         "problem": "<image>Find x. Round to the nearest tenth.",
         "answer": "7.5",
         "images": [{"bytes": b"\\x89PNG...", "path": null}]}

    `images` may also be a list of path strings, and a single "image" (a path string or one
    {bytes, path} dict) may replace it. Embedded bytes win over a path when both are given; in
    JSON, bytes are written as a base64 string ({"bytes": "iVBORw0..."}), which is what
    `write_jsonl` does with bytes values. At least one image is required (a misspelled image
    field would otherwise train a vision model blind). Optional: "category" (the toy task's
    question kind) and the grading fields of format (c).

(c) Benchmark problems: MathVista style (`read_benchmark`). testmini.json (a dict keyed by
    pid), a .json list, .jsonl or parquet:

        {"pid": "1", "question": "What is the value of x?", "image": "images/1.jpg",
         "choices": ["3", "4", "5"],            # or null
         "answer": "4",                         # multi_choice: the TEXT of the correct option
         "question_type": "multi_choice",       # or free_form
         "answer_type": "text",                 # integer | float | text | list
         "precision": null,                     # decimal places a float answer is compared at
         "unit": null,
         "metadata": {"category": "math-targeted-vqa", "task": "geometry problem solving"},
         "response": "<think>...</think>..."}   # only in predictions files

    "decoded_image" (an HF image dict with bytes) wins over "image". A multi_choice gold answer
    given as an option letter ("B") is replaced by that option's text, so the grader always
    compares option text. A multi_choice record with no `choices` (the toy task writes its
    options into the question text) keeps its answer as stored. `Problem.question` gets the
    lettered choices appended in this exact layout (once: a question that already ends with
    the block, as in a predictions file, is left alone):

        What is the value of x?
        Choices:
        (A) 3
        (B) 4
        (C) 5

    In a predictions file VLMEvalKit's `prediction` column stands for `response`. The three other
    benchmarks of the paper (MathVerse, MM-Math, DynaMath) have readers in minivr1.benchmarks,
    built on `read_records`, the loop every reader here shares.

Besides .jsonl, .json and .parquet, problem files may be .tsv tables (a header row; VLMEvalKit's
layout), located by line number. With `with_images=False` (scoring predictions) no image field
is read at all: nothing is opened, so the images need not be there.

`read_problems` picks (b) or (c) from the first record's keys. Every image is decoded once at read
time (`ImageRef.check`, on several threads, with a progress bar for large files: PNGs by their
checksums, JPEGs at 1/8 scale), so a truncated or corrupt image is found before training
starts, named by its record, and skipped with `skip_bad`; `ImageRef.load` decodes it again when the
batch needs it (and, should the file change in between, names the record too). Image paths must
stay inside the image root: "../", absolute paths elsewhere and symlinks pointing out are
rejected, so a data file cannot make the trainer read arbitrary files. Images larger than
`max_image_pixels` are rejected at read time (from the header, before any decoding) and again
before decoding, which is also the guard against decompression bombs (PIL's own, lower limit is
raised to ours, so that --max_image_pixels decides).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import math
import os
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from minivr1.cli import UserError

DEFAULT_MAX_PIXELS = 8192 * 8192
SKIP_HINT = "pass --skip_bad_records to skip the record (skipped records are counted and reported)"
QUESTION_TYPES = ("multi_choice", "free_form")
ANSWER_TYPES = ("integer", "float", "text", "list")
IMAGE_TOKEN = "<image>"


class DataError(UserError, ValueError):
    """A record or file that cannot be used; the message says where, which field, and what to do."""


class ImageError(DataError):
    """An unusable image (missing, unreadable, too large); the readers add the record's location."""

    def __init__(self, message: str, *, too_large: bool = False, limit: int | None = None):
        super().__init__(message)
        self.too_large, self.limit = too_large, limit


# ----------------------------------------------------------------------------------------------
# Records


@dataclass
class ImageRef:
    """An image not yet decoded: a file path or embedded bytes (bytes win when both are set)."""

    path: Path | None = None
    data: bytes | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    where: str | None = None            # the record it belongs to ("train.jsonl:line 7"), for errors at use time
    key: str = "images"                 # the record's field that names it

    def __repr__(self) -> str:
        data = None if self.data is None else f"<{len(self.data)} bytes>"
        return f"ImageRef(path={str(self.path) if self.path else None!r}, data={data})"

    def _open(self) -> Image.Image:
        if self.data is None and self.path is None:
            raise ImageError("ImageRef has neither path nor data")
        source = io.BytesIO(self.data) if self.data is not None else self.path
        what = "embedded image bytes" if self.data is not None else f"image {self.path}"
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < self.max_pixels:
            Image.MAX_IMAGE_PIXELS = self.max_pixels   # PIL refuses above twice its own limit: ours decides
        try:
            # PIL warns (and past 2x its own limit raises) on huge images; our own limit below
            # is the one that counts, so silence the warning and report the error our way.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(source)
        except Image.DecompressionBombError as e:
            raise ImageError(f"{what} is too large ({e})", too_large=True, limit=self.max_pixels) from e
        except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
            raise ImageError(f"{what} cannot be opened as an image ({e})") from e
        w, h = image.size
        if w * h > self.max_pixels:
            image.close()
            message = f"{what} is {w}x{h} = {w * h} pixels, more than the limit of {self.max_pixels}"
            raise ImageError(message, too_large=True, limit=self.max_pixels)
        return image

    def size(self) -> tuple[int, int]:
        """(width, height) from the header alone; ImageError if missing, unreadable or too large."""
        with self._open() as image:
            return image.size

    def check(self) -> None:
        """Read the whole image once, so that a truncated or corrupt file is found when the data is read, not
        at the training step that first uses it; ImageError if it cannot be. A PNG: PIL's verify(), every
        chunk's checksum (17x faster than decoding a photo-sized PNG); a JPEG: decoded at 1/8 scale, which
        still reads all its data; anything else: decoded."""
        with self._open() as image:
            try:
                if image.format == "PNG":
                    image.verify()
                    return
                if image.format == "JPEG":
                    image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
            except Exception as e:  # noqa: BLE001 - whatever PIL raises on bad bytes (OSError, SyntaxError, struct.error)
                raise ImageError(f"image {self.path or '(embedded bytes)'} cannot be decoded ({e})") from e

    def load(self) -> Image.Image:
        """Decode to a fully loaded RGB image (size checked before decoding); raises ImageError."""
        try:
            return self._load()
        except ImageError as e:
            if self.where is None:
                raise
            raise ImageError(f"{self.where}: {e}. Replace the image, or remove the record", too_large=e.too_large) \
                from e

    def _load(self) -> Image.Image:
        with self._open() as image:
            try:
                has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
                if has_alpha:
                    # Diagrams are often black lines on a transparent background: dropping the
                    # alpha channel would turn them black on black, so paint them on white.
                    rgba = image.convert("RGBA")
                    out = Image.new("RGB", rgba.size, (255, 255, 255))
                    out.paste(rgba, mask=rgba.getchannel("A"))
                    return out
                out = image.convert("RGB")
                out.load()
                return out
            except (OSError, SyntaxError, ValueError) as e:  # e.g. a truncated file
                raise ImageError(f"image {self.path or '(embedded bytes)'} cannot be decoded ({e})") from e


@dataclass
class Problem:
    """One RL or evaluation problem.

    `question` is the text shown to the model: it may hold "<image>" placeholders (RL format),
    and for multiple-choice records ends with "\\nChoices:\\n(A) ...\\n(B) ..." (see the module
    docstring). `answer` is the gold answer; for multi_choice it is the option text.
    """

    id: str
    question: str
    answer: str
    images: list[ImageRef]
    choices: list[str] | None = None
    question_type: str | None = None  # multi_choice | free_form
    answer_type: str | None = None  # integer | float | text | list
    precision: int | None = None  # decimal places a float answer is compared at
    unit: str | None = None
    category: str | None = None  # MathVista metadata.category (else .task), or the toy task's kind
    response: str | None = None  # the model's output, when reading a predictions file
    meta: dict = field(default_factory=dict)  # benchmark fields the metrics group by (minivr1.benchmarks)

    def grading_meta(self) -> dict:
        """What the grader needs besides the two answers."""
        return {"choices": self.choices, "answer_type": self.answer_type, "precision": self.precision}


@dataclass
class Conversation:
    """One cold-start SFT record: messages with normalised roles, "<image>" placeholders kept."""

    id: str
    messages: list[dict]  # [{"role": "system" | "user" | "assistant", "content": str}]
    images: list[ImageRef]


@dataclass
class ReadReport:
    """How many records a reader saw and kept, and why it skipped the others."""

    path: str
    read: int = 0
    kept: int = 0
    skipped: list[str] = field(default_factory=list)  # one message per skipped record

    def summary(self) -> str:
        text = f"read {self.read} records from {self.path}, kept {self.kept}"
        if self.skipped:
            text += f", skipped {len(self.skipped)} bad records (first: {self.skipped[0]})"
        return text


# ----------------------------------------------------------------------------------------------
# JSONL helpers


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, record) for each non-blank line; DataError on a broken line."""
    for line_no, record in _jsonl_lines(Path(path)):
        if isinstance(record, DataError):
            raise record
        yield line_no, record


def write_jsonl(path: str | Path, records: Iterable[dict], *, append: bool = False) -> None:
    """Write one JSON object per line (UTF-8). bytes values become base64 strings, Paths strings.

    Without `append` the file is written to a temporary name and renamed, so a crash never
    leaves a half-written file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path if append else path.with_name(path.name + ".tmp")
    with open(target, "a" if append else "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")
    if not append:
        os.replace(target, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _jsonl_lines(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    """Like iter_jsonl, but yields a broken line's DataError instead of raising it."""
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"broken JSON ({e.msg} at column {e.colno})"
                yield line_no, DataError(f"{where}: {problem}. Fix the line, or {SKIP_HINT}.")
                continue
            if not isinstance(record, dict):
                problem = f"expected a JSON object, got {type(record).__name__}"
                yield line_no, DataError(f"{where}: {problem}. Fix the line, or {SKIP_HINT}.")
                continue
            yield line_no, record


# ----------------------------------------------------------------------------------------------
# Where a record lives, and errors that say so


@dataclass
class Loc:
    """Where a record lives; readers (here and in minivr1.benchmarks) read its fields with `text_field`,
    `image_field` and `response_field`, whose errors name the file, the record and the field."""
    file: str
    where: str  # "line 7" | "index 3 (0-based)" | "row 3 (0-based)" | "key '12'"
    index: int  # 0-based position of the record in the file, for default ids

    def error(self, name: str, problem: str, fix: str = "Fix the record") -> DataError:
        return DataError(f"{self.file}:{self.where}: field '{name}': {problem}. {fix}, or {SKIP_HINT}.")


def _iter_records(path: Path) -> Iterator[tuple[Loc, dict | DataError]]:
    """Yield each record of a .jsonl, .json (list or dict of records) or .parquet file."""
    suffix = path.suffix.lower()
    file = str(path)
    if suffix == ".jsonl":
        for index, (line_no, record) in enumerate(_jsonl_lines(path)):
            yield Loc(file, f"line {line_no}", index), record
    elif suffix == ".json":
        text = path.read_text(encoding="utf-8-sig")
        if not text.strip():
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{file}:line {e.lineno}: broken JSON ({e.msg} at column {e.colno}). Fix the file "
                "(a .json file holds one list of records; use .jsonl for one record per line)."
            ) from None
        if isinstance(data, list):
            for index, record in enumerate(data):
                loc = Loc(file, f"index {index} (0-based)", index)
                if not isinstance(record, dict):
                    problem = f"expected a JSON object, got {type(record).__name__}"
                    record = DataError(f"{file}:{loc.where}: {problem}. Fix the record, or {SKIP_HINT}.")
                yield loc, record
        elif isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
            # MathVista's testmini.json: {"1": {...}, "2": {...}} keyed by pid.
            for index, (key, record) in enumerate(data.items()):
                yield Loc(file, f"key {key!r}", index), {"pid": key, **record}
        else:
            raise DataError(
                f"{file}: expected a JSON list of records or a dict of records keyed by id. "
                "Convert the file to one of these layouts (or to .jsonl)."
            )
    elif suffix == ".tsv":  # VLMEvalKit-style tables: a header row, tab-separated, cells as strings
        csv.field_size_limit(2**31 - 1)  # cells may hold base64 images
        with open(path, encoding="utf-8-sig", newline="") as f:
            for index, record in enumerate(csv.DictReader(f, delimiter="\t")):
                yield Loc(file, f"line {index + 2}", index), record
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            index = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                for record in batch.to_pylist():
                    yield Loc(file, f"row {index} (0-based)", index), record
                    index += 1
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise _bad_parquet(path, e) from e
    else:
        raise DataError(f"{file}: unsupported file type '{path.suffix}'. Use .jsonl, .json, .parquet or .tsv.")


def _bad_parquet(path: Path, e: Exception) -> DataError:
    return DataError(f"{path}: cannot read as parquet ({e}). Check that the file is complete parquet.")


def _no_records(path: Path) -> DataError:
    return DataError(f"{path}: the file holds no records. Check that it is the right file, fully written.")


# ----------------------------------------------------------------------------------------------
# Field checks


def text_field(rec: dict, name: str, loc: Loc, *, required=True, numbers_ok=False) -> str | None:
    """A string field; numbers become strings when `numbers_ok` (answers stored as 3 or 2.5)."""
    value = rec.get(name)
    if value is None:
        if required:
            raise loc.error(name, "missing", f"Add a '{name}' field")
        return None
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise loc.error(name, f"expected a string, got {type(value).__name__} {value!r:.60}")
    if required and not value.strip():
        raise loc.error(name, "empty")
    return value


def _choice_field(rec: dict, name: str, allowed: tuple[str, ...], loc: Loc) -> str | None:
    value = text_field(rec, name, loc, required=False)
    if value in (None, ""):
        return None
    if value not in allowed:
        raise loc.error(name, f"{value!r} is not one of {', '.join(allowed)}")
    return value


def _precision(rec: dict, loc: Loc) -> int | None:
    """MathVista stores precision as 1.0 or null (NaN in some parquet files); we want an int."""
    value = rec.get("precision")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        problem = f"expected a whole number of decimal places (e.g. 2) or null, got {value!r}"
        raise loc.error("precision", problem)
    return value


def _choices(rec: dict, loc: Loc) -> list[str] | None:
    value = rec.get("choices")
    if value is None or value == []:
        return None
    scalar = (str, int, float)
    if not isinstance(value, list) or any(not isinstance(c, scalar) or isinstance(c, bool) for c in value):
        raise loc.error("choices", f"expected a list of strings or null, got {value!r:.80}")
    if len(value) > 26:
        raise loc.error("choices", f"{len(value)} choices; at most 26 can be lettered A-Z")
    return [str(c) for c in value]


def with_choices(question: str, choices: list[str] | None) -> str:
    """Append the lettered choices (once: predictions files already hold the appended text)."""
    if not choices:
        return question
    block = "\nChoices:\n" + "\n".join(f"({a}) {c}" for a, c in zip(string.ascii_uppercase, choices))
    return question if question.endswith(block) else question + block


# ----------------------------------------------------------------------------------------------
# Images


def _image_ref(value: Any, name: str, loc: Loc, root: Path, max_pixels: int) -> ImageRef:
    """Turn a path string or an HF image dict {bytes, path} into a checked ImageRef."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, str) and data:  # JSON cannot hold bytes: base64
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise loc.error(name, "'bytes' is a string but not valid base64") from None
        if data:
            if not isinstance(data, (bytes, bytearray)):
                problem = f"'bytes' must be bytes or a base64 string, got {type(data).__name__}"
                raise loc.error(name, problem)
            ref = ImageRef(data=bytes(data), max_pixels=max_pixels)
        elif path:
            ref = _path_ref(path, name, loc, root, max_pixels)
        else:
            raise loc.error(name, "image dict has neither 'bytes' nor 'path'")
    elif isinstance(value, str):
        ref = _path_ref(value, name, loc, root, max_pixels)
    else:
        problem = f"expected an image path or a {{bytes, path}} dict, got {type(value).__name__}"
        raise loc.error(name, problem)
    try:
        ref.size()  # header only: exists, is an image, not too large (read_records decodes it after)
    except ImageError as e:
        raise _image_error(loc, name, e) from None
    ref.where, ref.key = f"{loc.file}:{loc.where}", name
    return ref


def _image_error(loc: Loc, name: str, e: ImageError) -> DataError:
    if e.too_large:
        return loc.error(name, str(e), f"Shrink the image or raise --max_image_pixels (now {e.limit})")
    return loc.error(name, str(e), "Replace the image")


def _check_images(items: list, locs: list, report: ReadReport, skip_bad: bool) -> tuple[list, list]:
    """Decode every image of `items` (on threads: PIL decodes without the GIL); a record with an image that
    cannot be decoded raises its DataError, or with `skip_bad` is skipped and reported."""
    from concurrent.futures import ThreadPoolExecutor

    from minivr1.tracking import progress_bar

    jobs = [(k, ref) for k, item in enumerate(items) for ref in item.images]
    if not jobs:
        return items, locs

    def check(job):
        try:
            job[1].check()
        except ImageError as e:
            return e
        return None

    bad: dict[int, DataError] = {}
    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    try:
        results = pool.map(check, jobs)
        bar = progress_bar(results, total=len(jobs), desc="checking images", leave=False, disable=len(jobs) < 2000)
        for (k, ref), error in zip(jobs, bar):
            if error is not None and k not in bad:
                bad[k] = _image_error(locs[k], ref.key, error)
                if not skip_bad:
                    break
    finally:
        pool.shutdown(cancel_futures=True)
    if bad and not skip_bad:
        raise bad[min(bad)]
    for k in sorted(bad):
        report.skipped.append(str(bad[k]).replace(f", or {SKIP_HINT}.", "."))
        report.kept -= 1
    keep = [k for k in range(len(items)) if k not in bad]
    return [items[k] for k in keep], [locs[k] for k in keep]


def _path_ref(path: Any, name: str, loc: Loc, root: Path, max_pixels: int) -> ImageRef:
    if not isinstance(path, str) or not path.strip():
        raise loc.error(name, f"expected a non-empty image path, got {path!r}")
    # resolve() follows symlinks, so "../x", "/etc/x" and a link pointing out all land outside.
    full = (root / path).resolve()  # an absolute `path` replaces `root`
    if not full.is_relative_to(root):
        raise loc.error(
            name,
            f"image path {path!r} resolves to {full}, outside the image root {root}; refusing to read it",
            "Use a path relative to the image root, or set --image_root to a folder that holds the images",
        )
    if not full.is_file():
        problem = f"image {path!r} not found (looked for {full})"
        raise loc.error(name, problem, "Fix the path or the image root (--image_root)")
    return ImageRef(path=full, max_pixels=max_pixels)


def image_field(rec: dict, loc: Loc, root: Path | None, max_pixels: int, keys: tuple) -> list[ImageRef]:
    """Read the first present image field of `keys`; a list field holds several images.
    `root` None: images are not wanted (scoring predictions), so none are read or checked."""
    if root is None:
        return []
    for key in keys:
        value = rec.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        return [_image_ref(v, key, loc, root, max_pixels) for v in values]
    return []


def _check_placeholders(texts: list[str], n_images: int, name: str, loc: Loc) -> None:
    n = sum(t.count(IMAGE_TOKEN) for t in texts)
    if n != n_images and not (n == 0 and n_images > 0):  # none at all: images go first (docstring)
        problem = f"{n} '{IMAGE_TOKEN}' placeholders but {n_images} image(s)"
        raise loc.error(name, problem, "Make the counts equal")


# ----------------------------------------------------------------------------------------------
# Per-format record parsers


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


def _parse_sft(rec: dict, loc: Loc, root: Path, max_pixels: int, stem: str) -> Conversation:
    name = "conversations" if "conversations" in rec else "messages"
    turns = rec.get(name)
    if not isinstance(turns, list) or not turns:
        raise loc.error("conversations", "missing, empty or not a list of turns", "Add the turns")
    system = text_field(rec, "system", loc, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    expected, n_dialogue = "user", 0
    for i, turn in enumerate(turns):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise loc.error(where, f"expected a turn object, got {type(turn).__name__}")
        role_key, text_key = ("from", "value") if "from" in turn else ("role", "content")
        raw_role = turn.get(role_key)
        role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise loc.error(where, f"'{role_key}' is {raw_role!r}, not one of {', '.join(_ROLES)}")
        content = turn.get(text_key)
        if not isinstance(content, str) or not content.strip():
            raise loc.error(where, f"'{text_key}' must be a non-empty string, got {content!r:.60}")
        if role == "system":
            if i != 0 or system:
                problem = "a system turn is allowed only first, and not with a top-level 'system'"
                raise loc.error(where, problem)
        elif role != expected:
            problem = f"a {role} turn where a {expected} turn was expected"
            raise loc.error(where, problem, "Start with a user turn and alternate user/assistant")
        else:
            expected = "assistant" if role == "user" else "user"
            n_dialogue += 1
        messages.append({"role": role, "content": content})
    if n_dialogue < 2 or expected != "user":
        problem = "needs at least one user and one assistant turn, ending with an assistant turn"
        raise loc.error(name, problem, "Fix the turns")
    images = image_field(rec, loc, root, max_pixels, ("images", "image"))
    user_texts = [m["content"] for m in messages if m["role"] == "user"]
    _check_placeholders(user_texts, len(images), "images" if "images" in rec else "image", loc)
    record_id = text_field(rec, "id", loc, required=False, numbers_ok=True) or f"{stem}-{loc.index}"
    return Conversation(id=record_id, messages=messages, images=images)


def _parse_problem(rec: dict, loc: Loc, root: Path, max_pixels: int, stem: str, *, benchmark: bool):
    """One parser for both problem formats; they differ in field names only."""
    id_key, text_key = ("pid", "question") if benchmark else ("id", "problem")
    image_keys = ("decoded_image", "image") if benchmark else ("images", "image")
    question = text_field(rec, text_key, loc)
    answer = text_field(rec, "answer", loc, numbers_ok=True)
    images = image_field(rec, loc, root, max_pixels, image_keys)
    if not images and root is not None:
        raise loc.error(image_keys[-1], "no image", f"Add '{image_keys[0]}' or '{image_keys[1]}'")
    if not benchmark and root is not None:
        image_key = next(k for k in image_keys if rec.get(k) is not None)
        _check_placeholders([question], len(images), image_key, loc)

    choices = _choices(rec, loc)
    question_type = _choice_field(rec, "question_type", QUESTION_TYPES, loc)
    question_type = question_type or ("multi_choice" if choices else None)
    if question_type == "multi_choice" and choices and answer not in choices:
        letter = answer.strip().strip("()").upper()
        if len(letter) == 1 and letter in string.ascii_uppercase[: len(choices)]:
            answer = choices[string.ascii_uppercase.index(letter)]  # gold given as a letter
        else:
            problem = f"{answer!r} is neither one of the choices {choices} nor an option letter"
            raise loc.error("answer", problem)

    metadata = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
    category = rec.get("category") or metadata.get("category") or metadata.get("task")
    record_id = text_field(rec, id_key, loc, required=benchmark, numbers_ok=True) or f"{stem}-{loc.index}"
    return Problem(
        id=record_id,
        question=with_choices(question, choices),
        answer=answer,
        images=images,
        choices=choices,
        question_type=question_type,
        answer_type=_choice_field(rec, "answer_type", ANSWER_TYPES, loc),
        precision=_precision(rec, loc),
        unit=text_field(rec, "unit", loc, required=False) or None,
        category=str(category) if category else None,
        response=response_field(rec, loc),
    )


def response_field(rec: dict, loc: Loc) -> str | None:
    """A predictions file's model output: `response`, or VLMEvalKit's `prediction` column."""
    return text_field(rec, "response" if "response" in rec else "prediction", loc, required=False)


# ----------------------------------------------------------------------------------------------
# Readers


def read_records(path, image_root, skip_bad: bool, max_image_pixels: int, parse: Callable, id_field: str,
                 with_images: bool = True):
    """The shared loop of every reader (minivr1.benchmarks' too): parse each record with
    `parse(record, loc, root, max_image_pixels, file_stem)`, enforce unique ids, skip or raise, count
    everything. Without `with_images` the parser gets root None and no image is read or checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file. Check the path.")
    root = None
    if with_images:
        root = Path(image_root) if image_root is not None else path.parent
        if not root.is_dir():
            raise DataError(
                f"{root}: the image root is not a folder. "
                "Pass the folder the image paths are relative to (--image_root)."
            )
        root = root.resolve()
    report = ReadReport(path=str(path))
    items, locs, first_seen = [], [], {}
    for loc, record in _iter_records(path):
        report.read += 1
        try:
            if isinstance(record, DataError):
                raise record
            item = parse(record, loc, root, max_image_pixels, path.stem)
            if item.id in first_seen:
                problem = f"duplicate id {item.id!r} (first at {first_seen[item.id]})"
                raise loc.error(id_field, problem, "Ids key resumable outputs, so make them unique")
        except DataError as e:
            if not skip_bad:
                raise
            report.skipped.append(str(e).replace(f", or {SKIP_HINT}.", "."))  # already skipping
            continue
        first_seen[item.id] = loc.where
        items.append(item)
        locs.append(loc)
        report.kept += 1
    if report.read == 0:
        raise _no_records(path)
    if with_images:
        items, locs = _check_images(items, locs, report, skip_bad)
    if not items:
        raise DataError(
            f"{path}: all {report.read} records are bad (first: {report.skipped[0]}) "
            "Check that this is the right file, format and image root."
        )
    return items, report


def read_sft(
    path, image_root=None, *, skip_bad=False, max_image_pixels=DEFAULT_MAX_PIXELS
) -> tuple[list[Conversation], ReadReport]:
    """Read cold-start SFT conversations (format (a) of the module docstring)."""
    return read_records(path, image_root, skip_bad, max_image_pixels, _parse_sft, "id")


def read_rl(
    path, image_root=None, *, skip_bad=False, max_image_pixels=DEFAULT_MAX_PIXELS, with_images=True
) -> tuple[list[Problem], ReadReport]:
    """Read RL problems in the Vision-R1-rl / geometry3k layout (format (b))."""

    def parse(rec, loc, root, max_pixels, stem):
        return _parse_problem(rec, loc, root, max_pixels, stem, benchmark=False)

    return read_records(path, image_root, skip_bad, max_image_pixels, parse, "id", with_images)


def read_benchmark(
    path, image_root=None, *, skip_bad=False, max_image_pixels=DEFAULT_MAX_PIXELS, with_images=True
) -> tuple[list[Problem], ReadReport]:
    """Read MathVista-style benchmark problems or predictions (format (c))."""

    def parse(rec, loc, root, max_pixels, stem):
        return _parse_problem(rec, loc, root, max_pixels, stem, benchmark=True)

    return read_records(path, image_root, skip_bad, max_image_pixels, parse, "pid", with_images)


def read_problems(path, image_root=None, **kw) -> tuple[list[Problem], ReadReport]:
    """Read problems in format (b) or (c), picked by the first record's keys.

    "question" -> (c); else "problem" -> (b); else "pid" -> (c) (which then names what is missing).
    """
    path = Path(path)
    keys = first_keys(path)
    if "question" in keys:
        return read_benchmark(path, image_root, **kw)
    if "problem" in keys:
        return read_rl(path, image_root, **kw)
    if "pid" in keys:
        return read_benchmark(path, image_root, **kw)
    if not keys:
        raise _no_records(path)
    raise DataError(
        f"{path}: cannot tell the format from the first record's fields {sorted(keys)}. "
        "Problems need 'problem' (RL layout) or 'pid'/'question' (MathVista layout)."
    )


def first_keys(path) -> set[str]:
    """The field names of a file's first record (of its schema, for parquet): how readers tell formats apart."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file. Check the path.")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            return set(pq.read_schema(path).names)
        except (OSError, ValueError) as e:
            raise _bad_parquet(path, e) from e
    return set(next((r for _, r in _iter_records(path) if isinstance(r, dict)), {}))


# ----------------------------------------------------------------------------- resumable outputs


def read_done(path: str | Path) -> dict[str, dict]:
    """Records of an append-only results file (predictions, bridging stages) by id: what a resumed
    run need not redo. The first of duplicate ids wins; unparsable lines (a line torn by a kill
    mid-write) are skipped, so their records are simply redone."""
    path = Path(path)
    done = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    done.setdefault(record["id"], record)
                except (ValueError, KeyError, TypeError):
                    continue
    return done


def repair_tail(path: str | Path) -> None:
    """Cut a torn last line (a kill mid-write) so the next append starts on a line of its own; a
    complete last record that only lacks its newline gets one."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb+") as f:
        text = f.read()
        if not text or text.endswith(b"\n"):
            return
        start = text.rfind(b"\n") + 1
        try:
            json.loads(text[start:])
            f.write(b"\n")                            # complete, only its newline is missing
        except ValueError:
            f.truncate(start)
