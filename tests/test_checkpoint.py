"""Tests for minivr1.checkpoint: exact resume (full and LoRA models), atomicity, pruning.

"Exact" means bitwise: after resuming, the weights, the optimizer state, the LR and the next
python / numpy / torch random numbers equal those of the run that never stopped.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors import safe_open
from torch import nn

from minivr1 import checkpoint as ckpt
from minivr1.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

K = 3  # steps before the checkpoint; the runs continue to 2K


@pytest.fixture(autouse=True)
def _reset_accelerate_after():
    yield
    AcceleratorState._reset_state(True)  # leave no Accelerator state behind for other test files


def fresh_accelerator() -> Accelerator:
    # AcceleratorState is shared process-wide; reset it so each "process" starts clean.
    AcceleratorState._reset_state(True)
    return Accelerator(cpu=True)


class Block(nn.Module):
    """A tiny attention-free 'transformer block': enough named Linear layers for LoRA targets."""

    def __init__(self, d: int = 16, hidden: int = 128):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)  # the "big" frozen part
        self.drop = nn.Dropout(0.1)  # consumes torch RNG in every forward

    def forward(self, x):  # (B, d) -> (B, d)
        h = x + self.v_proj(torch.tanh(self.q_proj(x)))
        return h + self.down(self.drop(torch.relu(self.up(h))))


def build(use_lora: bool, init_seed: int, hidden: int = 128):
    """Model, AdamW and a LambdaLR schedule. LoRA runs need the same base weights (seed 0)."""
    torch.manual_seed(0 if use_lora else init_seed)
    model = Block(hidden=hidden)
    if use_lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(init_seed)  # LoRA A init differs between "processes": the checkpoint must fix it
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train(accelerator, model, opt, sched, steps: int) -> None:
    for _ in range(steps):
        x, y = torch.randn(8, 16), torch.randn(8, 16)
        # python and numpy randomness too, as a data pipeline would use
        scale = 1.0 + random.random() + float(np.random.rand())
        loss = scale * ((model(x) - y) ** 2).mean()
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()


def snapshot(model, opt, sched) -> dict:
    """Everything that must match bitwise; draws the next random numbers (so call it last)."""
    opt_state = opt.state_dict()["state"]
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "opt": {(i, k): v.clone() for i, s in opt_state.items() for k, v in s.items()},
        "lr": sched.get_last_lr(),
        "torch": torch.rand(4),
        "python": random.random(),
        "numpy": np.random.rand(),
    }


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), n
    assert a["opt"].keys() == b["opt"].keys() and a["opt"]
    for k in a["opt"]:
        assert torch.equal(a["opt"][k], b["opt"][k]), k
    assert a["lr"] == b["lr"]
    assert torch.equal(a["torch"], b["torch"])
    assert (a["python"], a["numpy"]) == (b["python"], b["numpy"])


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_resume_is_bitwise_exact(tmp_path, use_lora):
    # The run that never stops: K steps, checkpoint, K more.
    acc = fresh_accelerator()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    model, opt, sched = acc.prepare(*build(use_lora, init_seed=1))
    train(acc, model, opt, sched, K)
    path = save_checkpoint(acc, tmp_path, K, {"stage": 0, "data_pos": 24}, model=model)
    train(acc, model, opt, sched, K)
    expected = snapshot(model, opt, sched)

    # A new "process": new Accelerator, new objects, different init and RNG; resume from disk.
    acc = fresh_accelerator()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    model, opt, sched = acc.prepare(*build(use_lora, init_seed=7))
    assert latest_checkpoint(tmp_path) == path
    state = load_checkpoint(acc, path)
    assert state == {"stage": 0, "data_pos": 24, "step": K, "complete": True}
    train(acc, model, opt, sched, K)
    assert_bitwise_equal(snapshot(model, opt, sched), expected)


def test_lora_checkpoint_holds_only_the_adapter(tmp_path):
    acc = fresh_accelerator()
    # A wide frozen MLP (256 KiB) so the base weights would dominate the ~30 KiB of other files.
    model, opt, sched = acc.prepare(*build(use_lora=True, init_seed=1, hidden=2048))
    train(acc, model, opt, sched, 1)
    path = save_checkpoint(acc, tmp_path, 1, {})

    assert (path / "adapter" / "adapter_model.safetensors").is_file()
    assert (path / "adapter" / "adapter_config.json").is_file()
    assert not (path / "model.safetensors").exists()
    for f in path.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            assert all("lora_" in k for k in sf.keys()), list(sf.keys())
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    ckpt_bytes = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert ckpt_bytes < base_bytes / 4, (ckpt_bytes, base_bytes)


def test_full_model_saved_as_safetensors(tmp_path):
    acc = fresh_accelerator()
    model, opt, sched = acc.prepare(*build(use_lora=False, init_seed=1))
    path = save_checkpoint(acc, tmp_path, 1, {})
    with safe_open(str(path / "model.safetensors"), "pt") as sf:
        assert set(sf.keys()) == set(model.state_dict())


def test_unprepared_model_is_rejected(tmp_path):
    acc = fresh_accelerator()
    model, opt, sched = acc.prepare(*build(use_lora=False, init_seed=1))
    with pytest.raises(ValueError, match="prepare"):
        save_checkpoint(acc, tmp_path, 1, {}, model=Block())


def _setup(tmp_path):
    acc = fresh_accelerator()
    model, opt, sched = acc.prepare(*build(use_lora=False, init_seed=1))
    train(acc, model, opt, sched, 1)
    first = save_checkpoint(acc, tmp_path, 1, {"tag": "first"})
    train(acc, model, opt, sched, 1)
    return acc, model, first


def _reload(tmp_path, expected_dir):
    """latest_checkpoint finds `expected_dir` and it loads into fresh objects."""
    assert latest_checkpoint(tmp_path) == expected_dir
    acc = fresh_accelerator()
    model, opt, sched = acc.prepare(*build(use_lora=False, init_seed=3))
    return load_checkpoint(acc, expected_dir)


def test_crash_inside_save_state_keeps_previous(tmp_path, monkeypatch):
    acc, model, first = _setup(tmp_path)

    def dies_half_way(output_dir, **kw):
        os.makedirs(output_dir, exist_ok=True)
        open(os.path.join(output_dir, "model.safetensors"), "wb").write(b"half a file")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(acc, "save_state", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(acc, tmp_path, 2, {})
    assert (tmp_path / "checkpoints" / ".tmp-step-0000002").is_dir()
    assert _reload(tmp_path, first)["tag"] == "first"


def test_crash_at_rename_keeps_previous_and_next_save_cleans_up(tmp_path, monkeypatch):
    acc, model, first = _setup(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(src).startswith(".tmp-step-"):
            raise OSError("killed during rename")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(acc, tmp_path, 2, {})
    monkeypatch.undo()
    assert not (tmp_path / "checkpoints" / "step-0000002").exists()
    assert _reload(tmp_path, first)["tag"] == "first"

    acc = fresh_accelerator()  # a later save in the same directory removes the debris
    model, opt, sched = acc.prepare(*build(use_lora=False, init_seed=1))
    save_checkpoint(acc, tmp_path, 3, {})
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_crash_before_latest_update_keeps_previous(tmp_path, monkeypatch):
    acc, model, first = _setup(tmp_path)
    monkeypatch.setattr(ckpt, "_write_text_atomic", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        save_checkpoint(acc, tmp_path, 2, {})
    # step-2 is complete on disk but `latest` was never switched: `latest` stays authoritative.
    assert (tmp_path / "checkpoints" / "step-0000002" / "trainer_state.json").is_file()
    assert _reload(tmp_path, first)["tag"] == "first"


def test_fallback_without_latest_and_incomplete_dirs(tmp_path):
    acc, model, first = _setup(tmp_path)
    second = save_checkpoint(acc, tmp_path, 2, {"tag": "second"})
    root = tmp_path / "checkpoints"
    (root / "latest").unlink()
    # A step dir without the completion mark (e.g. copied by hand and cut off) is never chosen.
    (root / "step-0000009").mkdir()
    (root / "step-0000009" / "trainer_state.json").write_text('{"step": 9}')
    assert _reload(tmp_path, second)["tag"] == "second"
    acc = fresh_accelerator()
    with pytest.raises(RuntimeError, match="step-0000009.*incomplete"):
        load_checkpoint(acc, root / "step-0000009")
    assert latest_checkpoint(tmp_path / "empty") is None


def test_keep_last_prunes_but_never_latest(tmp_path):
    acc = fresh_accelerator()
    model, opt, sched = acc.prepare(*build(use_lora=False, init_seed=1))
    for step in range(1, 6):
        save_checkpoint(acc, tmp_path, step, {}, keep_last=2)
    root = tmp_path / "checkpoints"
    names = lambda: sorted(p.name for p in root.iterdir())  # noqa: E731
    assert names() == ["latest", "step-0000004", "step-0000005"]
    assert latest_checkpoint(tmp_path) == root / "step-0000005"

    # Resumed from an earlier step and saving again: the new checkpoint is older than step 4 and 5
    # by number, but it is `latest`, so it survives keep_last=1.
    save_checkpoint(acc, tmp_path, 3, {}, keep_last=1)
    assert latest_checkpoint(tmp_path) == root / "step-0000003"
    assert (root / "step-0000003").is_dir()
    # Saving an existing step replaces it whole.
    save_checkpoint(acc, tmp_path, 5, {"again": True}, keep_last=0)
    assert load_checkpoint(acc, latest_checkpoint(tmp_path))["again"] is True
    assert not list(root.glob(".tmp-*"))


# ----------------------------------------------------------------------------- damaged checkpoints (issue 11)


def _two_checkpoints(tmp_path):
    """Checkpoints at steps 1 and 2 of a model with an optimizer and a registered scheduler (as the scripts have:
    custom_checkpoint_0.pkl)."""
    acc = fresh_accelerator()
    model, opt, sched = build(use_lora=False, init_seed=1)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    for step in (1, 2):
        train(acc, model, opt, sched, 1)
        save_checkpoint(acc, tmp_path, step, {}, model=model, keep_last=0)
    return tmp_path / "checkpoints"


def _resume(tmp_path):
    from minivr1 import training

    acc = fresh_accelerator()
    model, opt, sched = build(use_lora=False, init_seed=3)
    model, opt = acc.prepare(model, opt)
    acc.register_for_checkpointing(sched)
    return training.resume_step(acc, tmp_path, "auto")


def _cut(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGE = {   # what happens to step-2, the step a rerun then resumes from, and what the warning must name
    "weights cut short": (lambda d: _cut(d / "model.safetensors"), 1, "model.safetensors"),
    "weights random": (lambda d: (d / "model.safetensors").write_bytes(os.urandom((d / "model.safetensors").stat().st_size)),
                       1, "model.safetensors"),
    "weights deleted": (lambda d: (d / "model.safetensors").unlink(), 1, "model.safetensors"),
    "optimizer cut short": (lambda d: _cut(d / "optimizer.bin"), 1, "optimizer.bin"),
    "scheduler deleted": (lambda d: (d / "custom_checkpoint_0.pkl").unlink(), 1, "custom_checkpoint_0.pkl"),
    "state unreadable": (lambda d: (d / "trainer_state.json").write_bytes(b"\xff\xfe{"), 1, "trainer_state.json"),
    "latest not UTF-8": (lambda d: (d.parent / "latest").write_bytes(b"step-\xff\xfe\n"), 2, "latest"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, damage, capsys):
    """Issue: with step-2 damaged and step-1 intact, a rerun died in a long traceback from safetensors, torch or
    accelerate (or, for non-UTF-8 bytes in `latest`, a UnicodeDecodeError; an unreadable trainer_state.json
    was skipped silently). Now the checkpoint is verified before use and the run falls back to the newest
    usable one, with a warning that names the file."""
    root = _two_checkpoints(tmp_path)
    spoil, expected_step, named = DAMAGE[damage]
    spoil(root / "step-0000002")
    capsys.readouterr()
    assert _resume(tmp_path) == expected_step
    warning = capsys.readouterr().err
    assert "warning" in warning and named in warning, warning
    if expected_step == 1:
        assert "step-0000002" in warning


def test_no_usable_checkpoint_is_one_clear_error(tmp_path):
    from minivr1.cli import UserError

    root = _two_checkpoints(tmp_path)
    _cut(root / "step-0000001" / "model.safetensors")
    (root / "step-0000002" / "optimizer.bin").unlink()
    with pytest.raises(UserError, match=r"no usable checkpoint in .*step-0000002: .*optimizer\.bin.*"
                                        r"step-0000001: .*model\.safetensors.*--overwrite"):
        _resume(tmp_path)


def test_trainer_state_records_every_file_and_its_size(tmp_path):
    root = _two_checkpoints(tmp_path)
    files = ckpt.read_trainer_state(root / "step-0000002")["files"]
    on_disk = {str(p.relative_to(root / "step-0000002")): p.stat().st_size
               for p in (root / "step-0000002").rglob("*") if p.is_file() and p.name != "trainer_state.json"}
    assert files == on_disk and "model.safetensors" in files and "optimizer.bin" in files


# ----------------------------------------------------------------------------- disk full (issue 11)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4304")],
                         ids=["ENOSPC", "torch"])
def test_disk_full_removes_the_partial_checkpoint_and_keeps_the_last(tmp_path, monkeypatch, error):
    """Issue: a full disk during a save ended in `RuntimeError: [enforce fail at inline_container.cc:672]
    unexpected pos ...` and left the partial checkpoint holding the space. Now: one line that says so and
    roughly how much a checkpoint needs, the partial one removed, the last good one kept as `latest`."""
    import collections
    import shutil

    from minivr1.cli import UserError

    acc, model, first = _setup(tmp_path)

    def fills_the_disk(output_dir, **kw):
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "optimizer.bin"), "wb") as f:
            f.write(b"\0" * 4096)
        raise error

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(acc, "save_state", fills_the_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 512, 512))
    with pytest.raises(UserError, match=r"no space left on the device of .*checkpoints \(a checkpoint needs ~[\d.]+ [kMG]?B, "
                                        r"512 B free\).*step-0000001"):
        save_checkpoint(acc, tmp_path, 2, {}, model=model)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert latest_checkpoint(tmp_path) == first
