"""Atomic, exactly-resumable training checkpoints on top of `accelerate`.

`Accelerator.save_state` / `load_state` already store everything that makes a resume exact:
the prepared models, optimizers and LR schedulers, and every process's python / numpy / torch /
CUDA RNG states (with the FSDP and DeepSpeed variants of each). This module adds what a long
run needs around it:

  * atomicity: a checkpoint is written into `checkpoints/.tmp-step-NNNNNNN`, sealed with
    `trainer_state.json` (its `"complete": true` written last), fsynced, and only then renamed to
    `checkpoints/step-NNNNNNN`; finally the small text file `checkpoints/latest` is replaced
    atomically. A kill at any moment leaves the previous `latest` intact and loadable.
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
    ckpt = latest_checkpoint(out_dir)
    state = load_checkpoint(accelerator, ckpt) if ckpt else {"step": 0}
    for step in range(state["step"] + 1, max_steps + 1):
        ...
        if step % save_every == 0:
            save_checkpoint(accelerator, out_dir, step, {"stage": stage, "epoch": epoch})
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

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
    state = {k: v for k, v in state.items() if k != "complete"}
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

    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's random_states_{rank}.pkl is in tmp before we seal it

    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(state_json + "\n")
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
    accelerator.wait_for_everyone()  # no rank races ahead and reads `latest` before it is updated
    return final


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
    latest = root / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if _STEP_DIR.match(name) and read_trainer_state(root / name) is not None:
            return root / name
    # No `latest` (or it names a directory deleted by hand): fall back to scanning.
    complete = _complete_checkpoints(root)
    return complete[-1] if complete else None


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
    return state


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
