"""The run folder (--output_dir): one run at a time in it, and a rerun that continues a run only with the
settings that produced it. Every script starts with

    out = rundir.claim(args.output_dir, args.overwrite, is_main)     # usable, ours alone, cleared by --overwrite

and, once it knows what it is about to compute (before any model loads),

    rundir.check_settings(out, args, RESUME_MAY_CHANGE, derived={...}, resume=args.resume)

`claim` creates the folder; a file in its place, or a folder that cannot be written, ends the run at once.
It then takes `out/.lock` (an fcntl lock, with this process's PID, host, start time and command line written
into the file): a second run in the same folder stops at once and says who holds it. The kernel drops the
lock when its process ends, however it ends (kill -9 too), so the .lock file a killed run leaves blocks
nothing. Under several processes only the main one locks. `--overwrite` then deletes the previous run's
outputs (only files minivr1 writes: `outputs`), so that nothing of two runs mixes.

`check_settings` writes `out/args.json`: the run's arguments and, under "derived", what they came to (the
global batch, the records read, the data file's size). When the folder already holds results (checkpoints,
final/, predictions, bridging stage files), the new settings are first compared with the recorded ones: a
difference in anything outside the script's RESUME_MAY_CHANGE stops the run with one line that names each
difference and what to do. RESUME_MAY_CHANGE lists what does not change what a run computes (logging,
checkpoint frequency, the split of a batch into micro-batches, timeouts, ...), so a rerun may change it.
PTST stages may change where they do not touch the steps already run: more steps is "continue training".
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from minivr1.cli import UserError

LOCK = ".lock"
RECORD = "args.json"
# What --overwrite deletes: everything minivr1 writes into a run folder, nothing else.
TRAINING_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "samples.jsonl", RECORD, "training_curves.png",
                    "tensorboard", "wandb")
# Files and folders that mean "this folder holds a run's results" (a rerun continues them).
RESULTS = ("checkpoints", "final", "predictions.jsonl", "stage1_pseudo_cot.jsonl")
# Settings that are paths: compared as paths ("runs/x" and "./runs/x" are the same folder).
PATH_SETTINGS = ("model", "data", "image_root", "mllm", "reasoner", "tokenizer", "predictions")

_held: dict[Path, object] = {}          # folder -> its open, locked .lock file (held until the process ends)


def claim(output_dir, overwrite: bool = False, is_main: bool = True, outputs=TRAINING_OUTPUTS) -> Path:
    """The run folder `output_dir`, created if missing and locked for this process; with `overwrite`, the
    previous run's `outputs` (names or glob patterns inside it) deleted first. See the module docstring."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a folder: pass a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output_dir {out} ({e.strerror}): pass a folder you can write to") from e
    if not is_main:
        return out
    key = out.resolve()
    if key not in _held:
        try:
            lock = open(out / LOCK, "a+")
        except OSError as e:
            raise UserError(f"cannot write into --output_dir {out} ({e.strerror}): pass a folder you can write "
                            "to") from e
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = _describe_holder(lock.read())
            lock.close()
            raise UserError(f"{out} is in use by another run ({holder}). Wait for it to finish or stop it, or "
                            "pass another --output_dir") from None
        lock.seek(0)
        lock.truncate()
        lock.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])}) + "\n")
        lock.flush()
        _held[key] = lock
    if overwrite:
        removed = _remove(out, outputs)
        if removed:
            print(f"--overwrite: deleted the previous run in {out} ({', '.join(removed)})", flush=True)
    return out


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"PID {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet said which"


def release_all() -> None:
    """Give up every folder this process holds (the end of a script; the process's end does it too)."""
    for lock in _held.values():
        lock.close()
    _held.clear()


def _remove(out: Path, outputs) -> list[str]:
    removed = []
    for pattern in outputs:
        for p in sorted(out.glob(pattern)):
            folder = p.is_dir() and not p.is_symlink()
            shutil.rmtree(p) if folder else p.unlink()
            removed.append(str(p.relative_to(out)) + ("/" if folder else ""))
    return removed


def holds_results(out: Path) -> list[str]:
    """The names in `out` that hold a run's results (see RESULTS)."""
    found = []
    for name in RESULTS:
        p = out / name
        if name == "checkpoints":
            if p.is_dir() and any(c.name.startswith("step-") for c in p.iterdir()):
                found.append(name + "/")
        elif p.is_dir() or (p.is_file() and p.stat().st_size > 0):
            found.append(name + ("/" if p.is_dir() else ""))
    return found


def check_settings(out: Path, args, may_change=(), derived: dict | None = None, resume: str | None = "auto",
                   is_main: bool = True) -> None:
    """Compare the settings of this run (`args`: a dataclass or a dict, plus `derived` values) with those
    recorded in the run it would continue, stop on a difference outside `may_change`, then record them.

    The run it would continue: the one in `out` (resume "auto"), or for `resume` PATH to a checkpoint, the
    run that checkpoint belongs to. `resume` None ("--resume none") into a folder that holds results is an
    error: the second run would write into the first's files."""
    out = Path(out)
    settings = _jsonable(dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(args))
    settings["derived"] = _jsonable(derived or {})
    held = holds_results(out)
    if held and resume is None:
        raise UserError(f"{out} holds a run ({', '.join(held)}): --resume none would write a second run into its "
                        "files. Pass --overwrite to delete it and start over, or use another --output_dir")
    source = out if resume in (None, "auto") else Path(resume).parent.parent
    record = source / RECORD
    if held or source != out:
        if record.is_file():
            try:
                old = json.loads(record.read_text())
            except (OSError, ValueError) as e:
                raise UserError(f"{record} cannot be read ({e}); it records what made the run in {source}. Pass "
                                "--overwrite to start over, or use another --output_dir") from e
            differences = _differences(old, settings, set(may_change), source, args)
            if differences:
                raise UserError(f"{source} holds a run made with other settings: {'; '.join(differences)}. To "
                                f"continue it, rerun with its settings ({record}); to start over, pass --overwrite "
                                f"(deletes it); or use another --output_dir")
        elif held:
            print(f"warning: {out} holds results ({', '.join(held)}) but no {RECORD}: cannot check that they "
                  "were made with these settings", file=sys.stderr, flush=True)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / RECORD).write_text(json.dumps(settings, indent=2) + "\n")


def _jsonable(values: dict) -> dict:
    return json.loads(json.dumps(values, default=str))


def _differences(old: dict, new: dict, may_change: set, source: Path, args) -> list[str]:
    """'name old -> new' for each setting that differs and may not; derived values under their own names."""
    defaults = {f.name: f.default for f in dataclasses.fields(args)} if dataclasses.is_dataclass(args) else {}
    pairs = [(k, old.get(k, _MISSING), v) for k, v in new.items() if k != "derived"]
    pairs += [(k, (old.get("derived") or {}).get(k, _MISSING), v) for k, v in new["derived"].items()]
    found = []
    for key, before, after in pairs:
        if key in may_change or _same(key, before, after):
            continue
        if before is _MISSING:
            if key in new["derived"] or after == _jsonable({"v": defaults.get(key)})["v"]:
                continue                     # not recorded by an older version: its default is what ran
            found.append(f"{key} (not recorded) -> {_show(after)}")
        elif key in _STEPWISE:
            problem = _STEPWISE[key](before, after, _steps_run(source))
            if problem:
                found.append(f"{key} {_show(before)} -> {_show(after)} ({problem})")
        else:
            found.append(f"{key} {_show(before)} -> {_show(after)}")
    return found


_MISSING = object()


def _same(key: str, a, b) -> bool:
    if a == b:
        return True
    if key in PATH_SETTINGS and isinstance(a, str) and isinstance(b, str):
        if os.path.normpath(a) == os.path.normpath(b):
            return True
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False
    return False


def _show(value) -> str:
    return "none" if value is None else str(value)


def _steps_run(run: Path) -> int | None:
    """The step of the newest checkpoint in `run` (None: no checkpoint to tell)."""
    from minivr1 import checkpoint

    ckpt = checkpoint.latest_checkpoint(run)
    state = checkpoint.read_trainer_state(ckpt) if ckpt else None
    return state["step"] if state else None


def _stages_problem(old: str, new: str, steps_run: int | None) -> str | None:
    """PTST stages may change where no step has run: the steps already run must have the same stage, length
    limit and group size under both."""
    from minivr1.stages import parse_stages, stage_at

    old_stages, new_stages = parse_stages(old), parse_stages(new)
    done = sum(s.steps for s in old_stages) if steps_run is None else steps_run
    if sum(s.steps for s in new_stages) < done:
        return f"fewer steps than the {done} steps already run"

    def at(stages, step):
        i, s = stage_at(stages, step)
        return i, s.max_completion_length, s.group_size

    if any(at(old_stages, step) != at(new_stages, step) for step in range(done)):
        return f"not the same for the {done} steps already run"
    return None


# Settings allowed to change where they do not touch the steps already run: name -> problem(old, new, steps run).
_STEPWISE = {"ptst_stages": _stages_problem}
