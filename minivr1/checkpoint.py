"""Atomic, exactly-resumable training checkpoints on top of `accelerate`.

`Accelerator.save_state` / `load_state` already store everything that makes a resume exact:
the prepared models, optimizers and LR schedulers, and every process's python / numpy / torch /
CUDA RNG states (with the FSDP and DeepSpeed variants of each). This module adds what a long
run needs around it:

  * atomicity: a checkpoint is written into `checkpoints/.tmp-step-NNNNNNN`, sealed with
    `trainer_state.json` (its `"complete": true` written last), fsynced, and only then renamed to
    `checkpoints/step-NNNNNNN`; finally the small text file `checkpoints/latest` is replaced
    atomically. A kill at any moment leaves the previous `latest` intact and loadable.
  * verification: trainer_state.json lists every file of the checkpoint with its size (`"files"`);
    `load_latest` checks them (and each safetensors header) before loading, and falls back to the
    newest usable checkpoint with a warning that names what is wrong: a file cut short, deleted or
    overwritten, an unreadable `latest` or trainer_state.json, or a load that fails anyway.
  * a full disk: the partial checkpoint is removed (it holds the space), the last good one stays
    `latest`, and the error says so in one line, with roughly how much a checkpoint needs.
  * the trainer's own state (step, PTST stage, data position, ...) as readable JSON;
  * pruning to the last `keep_last` checkpoints;
  * LoRA: for a peft model only the trainable adapter is saved (`adapter/`, the same files as
    `model.save_pretrained`), never the frozen base weights (GBs for a 7B model). The base model
    must therefore be rebuilt from its original path before `load_checkpoint`.

Layout of a run directory:

    out_dir/checkpoints/latest                    "step-0000200\\n"
    out_dir/checkpoints/step-0000200/trainer_state.json
                                    model.safetensors        (full models)
                                    adapter/adapter_model.safetensors, adapter_config.json (peft)
                                    optimizer.bin, scheduler.bin, random_states_{rank}.pkl

Usage (every process runs the same lines):

    model, opt, sched = accelerator.prepare(model, opt, sched)
    ckpt, state = load_latest(accelerator, out_dir) or (None, {"step": 0})
    for step in range(state["step"] + 1, max_steps + 1):
        ...
        if step % save_every == 0:
            save_checkpoint(accelerator, out_dir, step, {"stage": stage, "epoch": epoch})
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import sys
import warnings
import zipfile
from pathlib import Path

from minivr1.cli import UserError

CHECKPOINTS = "checkpoints"  # sub-directory of the run's out_dir
LATEST = "latest"  # text file naming the newest complete checkpoint
STATE_FILE = "trainer_state.json"
ADAPTER_DIR = "adapter"  # peft adapter of model 0 (model i > 0: adapter_{i})
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------- saving


def save_checkpoint(
    accelerator, out_dir: str | Path, step: int, state: dict, model=None, keep_last: int = 2
) -> Path:
    """Saves a complete training state as `out_dir/checkpoints/step-{step:07d}`; returns that path.

    Every process must call this (accelerate's `save_state` is collective under DDP/FSDP/DeepSpeed).
    `state` is the trainer's JSON-serialisable state (stage, data position, ...); `step` is added
    to it. `model`, if given, is checked to be one the accelerator prepared: `save_state` silently
    skips any model that was not passed to `accelerator.prepare`. `keep_last` complete checkpoints
    are kept (the one `latest` names always is); `keep_last <= 0` keeps all.
    """
    if accelerator.project_configuration.automatic_checkpoint_naming:
        raise ValueError(
            "save_checkpoint chooses the directory itself: create the Accelerator without "
            "ProjectConfiguration(automatic_checkpoint_naming=True)"
        )
    if model is not None:
        _check_prepared(accelerator, model)
        _check_finite_weights(accelerator, model, out_dir, step)
    state = {k: v for k, v in state.items() if k not in ("complete", "files")}
    state["step"] = step
    state["complete"] = True  # last key: a reader of a torn copy never sees it
    state_json = json.dumps(state, indent=2)  # not JSON-able? fail now, before anything is written
    _register_peft_hooks(accelerator)

    root = Path(out_dir) / CHECKPOINTS
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _remove_tmp_dirs(root)  # debris of an earlier save that was killed
    accelerator.wait_for_everyone()

    failure = None
    try:
        accelerator.save_state(str(tmp))
    except Exception as e:  # noqa: BLE001 - e.g. a full disk: handled below, on every process alike
        failure = e
    accelerator.wait_for_everyone()  # every rank's random_states_{rank}.pkl is in tmp before we seal it

    if accelerator.is_main_process and failure is None:
        try:
            share_modes(tmp)
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            state = {k: v for k, v in json.loads(state_json).items() if k != "complete"}
            (tmp / STATE_FILE).write_text(json.dumps({**state, "files": files, "complete": True}, indent=2) + "\n")
            _fsync_tree(tmp)
            old = None
            # The same step saved again (e.g. right after resuming): swap, never merge. A kill between the
            # two renames leaves `latest` naming a missing dir; latest_checkpoint then falls back to a scan.
            if final.exists():
                old = root / f".tmp-old-{final.name}"
                os.replace(final, old)
            os.replace(tmp, final)  # the atomic step: the checkpoint appears complete or not at all
            _fsync_dir(root)
            _write_text_atomic(root / LATEST, final.name + "\n")
            if old is not None:
                shutil.rmtree(old)
            _prune(root, keep_last, protect=final.name)
        except Exception as e:  # noqa: BLE001
            failure = e
    from minivr1.distributed import any_process

    if any_process(accelerator, failure is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint only holds space
        _raise_save_failure(failure, root, model)
    accelerator.wait_for_everyone()  # no rank races ahead and reads `latest` before it is updated
    return final


def share_modes(path: Path) -> None:
    """Give every file under `path` the mode the process's other outputs get (0666 less the umask): some
    writers (safetensors' atomic write) create theirs 0600, readable by their owner alone."""
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(path).rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _raise_save_failure(failure: BaseException | None, root: Path, model) -> None:
    """After a failed save (the partial checkpoint removed): a full disk is the user's to fix, in one line;
    anything else keeps its traceback."""
    if failure is None:  # another process failed: it says why
        raise RuntimeError("saving the checkpoint failed on another process")
    free = shutil.disk_usage(root).free
    latest = latest_checkpoint(root.parent)
    needed = _checkpoint_bytes(latest) if latest else _estimate_bytes(model)
    text = str(failure)
    disk_full = getattr(failure, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or (
        # torch's zip writer says only this when a write comes up short
        any(s in text for s in ("unexpected pos", "file write failed")) and (needed is None or free < needed))
    if not disk_full:
        raise failure
    kept = (f"the last good one, {latest}, is kept" if latest else "there is no earlier checkpoint")
    raise UserError(f"no space left on the device of {root} (a checkpoint needs ~{_human(needed)}, {_human(free)} "
                    f"free): the partial checkpoint was removed; {kept}. Free some space, then rerun the same "
                    "command to resume") from failure


def _checkpoint_bytes(ckpt: Path) -> int:
    return sum(f.stat().st_size for f in Path(ckpt).rglob("*") if f.is_file())


def _estimate_bytes(model) -> int | None:
    """Roughly what a checkpoint of `model` takes: its weights (a LoRA's: only the trainable ones) and AdamW's
    two fp32 moments per trainable parameter."""
    if model is None:
        return None
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    peft = any("lora_" in n for n, _ in model.named_parameters())
    weights = sum(p.numel() * p.element_size() for p in params if p.requires_grad or not peft)
    return weights + 8 * trainable


def _human(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _check_finite_weights(accelerator, model, out_dir, step: int) -> None:
    """Never write non-finite weights: a rerun would resume training from garbage. Checks the trainable
    parameters (each process its own shards under FSDP2 / ZeRO-3) and shares the verdict."""
    import torch

    bad = 0
    for p in model.parameters():
        if p.requires_grad:
            local = p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)   # FSDP2 / ZeRO-3 shards
            bad += int(not torch.isfinite(local.detach()).all())
    if accelerator.reduce(torch.tensor(bad, device=accelerator.device), "sum").item():
        latest = latest_checkpoint(out_dir)
        raise FloatingPointError(f"step {step}: the weights are not finite; refusing to save them. "
                                 + (f"The last checkpoint, {latest}, is intact." if latest else "No checkpoint was saved."))


def _check_prepared(accelerator, model) -> None:
    target = accelerator.unwrap_model(model)
    if not any(accelerator.unwrap_model(m) is target for m in accelerator._models):
        raise ValueError(
            "save_checkpoint: `model` was not passed to accelerator.prepare(), "
            "so accelerator.save_state would not save it"
        )


def _prune(root: Path, keep_last: int, protect: str) -> None:
    """Deletes complete checkpoints beyond the newest `keep_last`, never `protect` (what `latest` names)."""
    if keep_last <= 0:
        return
    for step_dir in _complete_checkpoints(root)[:-keep_last]:
        if step_dir.name == protect:
            continue
        # Rename first, so a kill during rmtree leaves a .tmp-* dir (ignored), not a half-deleted step-*.
        doomed = root / f".tmp-delete-{step_dir.name}"
        os.replace(step_dir, doomed)
        shutil.rmtree(doomed)


def _remove_tmp_dirs(root: Path) -> None:
    for p in root.glob(".tmp-*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(path: Path) -> None:
    """Forces every file under `path` to disk, so the rename below never publishes unwritten data."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    """Makes renames inside `path` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- finding and loading


def read_trainer_state(ckpt_dir: str | Path) -> dict | None:
    """The checkpoint's trainer_state.json, or None if it is missing, unreadable or not complete."""
    try:
        state = json.loads((Path(ckpt_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("complete") is True else None


def _complete_checkpoints(root: Path) -> list[Path]:
    """Complete step-* directories under `root`, oldest step first (.tmp-* dirs never match)."""
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and read_trainer_state(p) is not None:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` names, else the newest complete step-* dir.

    Leftover `.tmp-*` directories of a killed save are ignored here (the next `save_checkpoint`
    deletes them). Returns None when the run has no complete checkpoint yet.
    """
    root = Path(out_dir) / CHECKPOINTS
    name = _read_latest(root)
    if isinstance(name, str) and read_trainer_state(root / name) is not None:
        return root / name
    # No `latest` (or it names a directory deleted by hand, or is unreadable): fall back to scanning.
    complete = _complete_checkpoints(root)
    return complete[-1] if complete else None


def _read_latest(root: Path) -> str | Exception | None:
    """The step directory `latest` names; None without a `latest`; the error if it cannot be read or names
    no step directory."""
    try:
        name = (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        return ValueError(f"{root / LATEST} cannot be read ({type(e).__name__}: {e})")
    if not _STEP_DIR.match(name):
        return ValueError(f"{root / LATEST} names {name[:40]!r}, not a step-N directory")
    return name


def verify(ckpt_dir: str | Path) -> list[str]:
    """What is wrong with a checkpoint directory, one phrase each; [] when it looks usable.

    Cheap: file sizes against those trainer_state.json recorded when the checkpoint was saved (a checkpoint
    of an older minivr1 has none: only the checks below), every safetensors header (its tensors must exactly
    fill the file), and every torch zip archive's directory (at its end, so a cut-short file fails)."""
    ckpt = Path(ckpt_dir)
    path = ckpt / STATE_FILE
    if not path.is_file():
        return [f"no {STATE_FILE} (the save did not finish)"]
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        return [f"{STATE_FILE} cannot be read ({type(e).__name__}: {str(e)[:80]})"]
    if not isinstance(state, dict) or state.get("complete") is not True:
        return [f"{STATE_FILE} does not mark it complete (the save did not finish)"]
    problems = []
    for name, size in (state.get("files") or {}).items():
        f = ckpt / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"{name} is {f.stat().st_size} bytes, not the {size} saved (cut short or overwritten)")
    for f in sorted(ckpt.rglob("*")):
        if f.is_file() and not any(str(f.relative_to(ckpt)) in p for p in problems):
            problem = _file_problem(f)
            if problem:
                problems.append(f"{f.relative_to(ckpt)} {problem}")
    return problems


def _file_problem(f: Path) -> str | None:
    """A safetensors file whose header does not describe exactly its bytes, or a torch zip archive whose
    directory is unreadable; None when the structure is fine (or the format is not one of these)."""
    if f.suffix == ".safetensors":
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, 100_000_000):
                return "is not a safetensors file (bad header)"
            try:
                header = json.loads(fh.read(n))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                return "is not a safetensors file (bad header)"
        if 8 + n + end != size:
            return f"is {size} bytes where its header describes {8 + n + end} (cut short or overwritten)"
    elif f.suffix in (".bin", ".pkl", ".pt") and f.read_bytes()[:2] == b"PK":
        try:
            zipfile.ZipFile(f).close()
        except (zipfile.BadZipFile, OSError) as e:
            return f"is not a complete archive ({e})"
    return None


def load_latest(accelerator, out_dir: str | Path) -> tuple[Path, dict] | None:
    """Load the newest usable checkpoint of `out_dir`; return its path and trainer state, or None when the
    run has no checkpoint. Tried newest first: the one `latest` names, then older ones. A checkpoint that `verify`
    finds damaged, or whose load fails, is skipped with a warning naming what is wrong; UserError (one line)
    when there are checkpoints and none of them is usable."""
    from minivr1.distributed import any_process

    root = Path(out_dir) / CHECKPOINTS
    steps = sorted(((int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else [])
                    if (m := _STEP_DIR.match(p.name)) and p.is_dir()), reverse=True)
    named = _read_latest(root)
    if isinstance(named, Exception) or (isinstance(named, str) and not (root / named).is_dir()):
        _warn(f"{named if isinstance(named, Exception) else f'{root / LATEST} names {named}, which does not exist'}"
              "; looking for the newest checkpoint instead")
    elif isinstance(named, str):  # `latest` first, then the ones older than it
        top = int(_STEP_DIR.match(named).group(1))
        steps = [(top, root / named)] + [(k, p) for k, p in steps if k < top]
    rejected = []
    for _, ckpt in steps:
        problems = verify(ckpt)  # the same verdict on every process (the same files)
        if not problems:
            try:
                state = load_checkpoint(accelerator, ckpt)
            except Exception as e:  # noqa: BLE001 - damage that verify cannot see: try the next one
                problems = [f"loading it failed ({type(e).__name__}: {(str(e).strip() or '?').splitlines()[0][:200]})"]
            if any_process(accelerator, bool(problems)) and not problems:
                problems = ["loading it failed on another process"]
            if not problems:
                if rejected:
                    _warn(f"resuming from {ckpt}, the newest usable checkpoint")
                return ckpt, state
        rejected.append(f"{ckpt.name}: {'; '.join(problems)}")
        _warn(f"skipping checkpoint {ckpt}: {'; '.join(problems)}")
    if rejected:
        raise UserError(f"no usable checkpoint in {root}: {' | '.join(rejected)}. Delete the damaged ones to start "
                        "over from the last one left, or pass --overwrite to start the run over")
    return None


def _warn(message: str) -> None:
    from minivr1.tracking import print0

    print0(f"warning: {message}", file=sys.stderr, flush=True)


def load_checkpoint(accelerator, ckpt_dir: str | Path) -> dict:
    """Restores models, optimizers, schedulers and RNG states from `ckpt_dir`; returns its trainer state.

    Every process must call this, after `accelerator.prepare` (of the same models, in the same
    order, as when saving). For a peft model, the base model must already be loaded from its
    original weights: only the adapter comes from the checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    state = read_trainer_state(ckpt_dir)
    if state is None:
        raise RuntimeError(
            f'checkpoint {ckpt_dir} is incomplete: no {STATE_FILE} with "complete": true '
            "(the save was interrupted); resume from latest_checkpoint(out_dir) instead"
        )
    # accelerate only logs (at INFO) when a rank's RNG file is missing; say it louder.
    if not (ckpt_dir / f"random_states_{accelerator.process_index}.pkl").exists():
        warnings.warn(
            f"{ckpt_dir} has no RNG state for process {accelerator.process_index} (saved with fewer "
            "processes?): weights and optimizer resume exactly, random numbers do not",
            stacklevel=2,
        )
    _register_peft_hooks(accelerator)
    accelerator.load_state(str(ckpt_dir))
    return {k: v for k, v in state.items() if k != "files"}


# ----------------------------------------------------------------------------- peft (LoRA) hooks


def _adapter_dir(i: int) -> str:
    return ADAPTER_DIR if i == 0 else f"{ADAPTER_DIR}_{i}"


def _as_peft_model(accelerator, model):
    """The unwrapped model (or the model inside a wrapper module) if it is a peft.PeftModel, else None (without importing peft needlessly)."""
    if "peft" not in sys.modules:  # nothing can be a PeftModel if peft was never imported
        return None
    from peft import PeftModel

    unwrapped = accelerator.unwrap_model(model)
    inner = getattr(unwrapped, "model", None)        # a wrapper such as policy.TokenLogprobs
    if not isinstance(unwrapped, PeftModel) and isinstance(inner, PeftModel):
        unwrapped = inner
    return unwrapped if isinstance(unwrapped, PeftModel) else None


def _register_peft_hooks(accelerator) -> None:
    """Makes save_state/load_state store a peft model's adapter instead of its full state dict.

    accelerate calls the save hook as `hook(models, weights, output_dir)` just before writing,
    where `weights[i]` is the full state dict of `models[i]`; whatever we pop from `weights` is not
    written. The load hook is `hook(models, input_dir)`; whatever we pop from `models` is not loaded
    by accelerate. Popping the same indices on both sides keeps the remaining `model_{i}` files
    aligned. Under FSDP/DeepSpeed accelerate saves models itself (`weights` is empty): we leave
    those alone, so there the full model is saved.
    """
    if getattr(accelerator, "_minivr1_peft_hooks", False):  # once per Accelerator
        return

    def save_hook(models, weights, output_dir):
        if len(weights) != len(models):  # FSDP / DeepSpeed
            return
        for i in reversed(range(len(models))):  # reversed: popping keeps the smaller indices valid
            peft_model = _as_peft_model(accelerator, models[i])
            if peft_model is not None:
                weights.pop(i)
                peft_model.save_pretrained(
                    Path(output_dir) / _adapter_dir(i), is_main_process=accelerator.is_main_process
                )

    def load_hook(models, input_dir):
        for i in reversed(range(len(models))):
            peft_model = _as_peft_model(accelerator, models[i])
            adapter = Path(input_dir) / _adapter_dir(i)
            # No adapter/ dir: a full-weights checkpoint of this model, which accelerate loads itself.
            if peft_model is not None and adapter.is_dir():
                models.pop(i)
                _load_adapter(peft_model, adapter)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    accelerator._minivr1_peft_hooks = True


def _load_adapter(peft_model, adapter: Path) -> None:
    """Loads every adapter of `peft_model` from the layout `PeftModel.save_pretrained` wrote."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for name in peft_model.peft_config:
        path = (adapter if name == "default" else adapter / name) / "adapter_model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint adapter file {path} is missing (adapter {name!r})")
        result = set_peft_model_state_dict(peft_model, load_file(path), adapter_name=name)
        if result.unexpected_keys:
            raise RuntimeError(f"{path}: keys matching no adapter parameter: {result.unexpected_keys[:5]}")
