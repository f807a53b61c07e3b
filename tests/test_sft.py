"""Cold-start SFT: the collator's labels, and train_sft.py on the tiny model.

Collator: labels sit on the assistant turns only (content + the closing <|im_end|>), in every
assistant turn; truncation cuts the response from the right and never the prompt.
Script: the loss falls on a small repeated dataset; metrics, checkpoints and final/ are written;
resuming from a checkpoint gives bitwise the weights of the run that never stopped (full and
LoRA); Ctrl-C saves a checkpoint, exits 0, and a rerun resumes from it; bad data names its line.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import train_sft
from minivr1 import checkpoint, data, models, training
from minivr1.chat import SFTCollator, conversation_messages
from minivr1.cli import UserError
from minivr1.data import Conversation, DataError
from conftest import assert_standard_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _reset_accelerate_after():
    yield
    AcceleratorState._reset_state(True)  # each main() builds its own Accelerator


@pytest.fixture(scope="module")
def cold(toy_dir):
    convs, _ = data.read_sft(toy_dir / "data" / "cold_start.json")
    return convs


def _spans(labels: torch.Tensor) -> list[list[int]]:
    """Maximal runs of labelled positions, as lists of indices."""
    runs, pos = [], 0
    for labelled, group in itertools.groupby((labels != -100).tolist()):
        n = len(list(group))
        if labelled:
            runs.append(list(range(pos, pos + n)))
        pos += n
    return runs


def _prompt_len(processor, conv) -> int:
    """Tokens up to and including the last `<|im_start|>assistant\\n` header."""
    imgs = [ref.load() for ref in conv.images]
    msgs = conversation_messages(conv.messages[:-1], len(imgs))
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=imgs or None, return_tensors="pt")["input_ids"].shape[1]


# ----------------------------------------------------------------------------- the collator


def test_collator_labels_exactly_the_assistant_turn(processor, cold):
    tok = processor.tokenizer
    convs = [cold[0], cold[1]]                                  # different lengths: right padding
    batch = SFTCollator(processor, max_length=4096)(convs)
    ids, att, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert batch["image_grid_thw"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2 * 64
    assert att[0].sum() != att[1].sum()
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    for row, conv in enumerate(convs):
        n = int(att[row].sum())
        assert att[row, :n].all() and not att[row, n:].any()       # right padding
        assert (labels[row, n:] == -100).all()
        lab = labels[row]
        on = lab != -100
        assert torch.equal(lab[on], ids[row][on])                  # a label is the token itself
        assert tok.decode(lab[on]) == conv.messages[-1]["content"] + "<|im_end|>"
        # nothing of the system prompt, the user turn or the image is labelled
        p = _prompt_len(processor, conv)
        assert (ids[row, :p] == image_id).sum() == 16
        assert not on[:p].any() and on[p:n - 1].all() and not on[n - 1]    # the trailing "\n" is not
        assert "user" in tok.decode(ids[row, :p]) and "system" in tok.decode(ids[row, :p])


def test_collator_labels_every_assistant_turn(processor, cold):
    tok = processor.tokenizer
    conv = Conversation(id="multi", images=cold[0].images, messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "<image>How many red shapes?"},
        {"role": "assistant", "content": "<think>I count them.</think><answer>2</answer>"},
        {"role": "user", "content": "And blue ones?"},
        {"role": "assistant", "content": "Three blue."}])
    batch = SFTCollator(processor, max_length=4096)([conv])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    spans = _spans(labels)
    assert [tok.decode(ids[s]) for s in spans] == ["<think>I count them.</think><answer>2</answer><|im_end|>",
                                                   "Three blue.<|im_end|>"]
    unlabelled = tok.decode(ids[labels == -100])
    for text in ("Answer briefly.", "How many red shapes?", "And blue ones?"):
        assert text in unlabelled


def test_collator_truncation_cuts_the_response_never_the_prompt(processor, cold):
    tok = processor.tokenizer
    conv = cold[0]
    full = SFTCollator(processor, max_length=4096)([conv])
    n, p = full["input_ids"].shape[1], _prompt_len(processor, conv)
    assert n > p + 5
    # a cut inside the response: the same tokens and labels, cut from the right
    cut = SFTCollator(processor, max_length=p + 5)([conv])
    assert cut["input_ids"].shape == (1, p + 5)
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, :p + 5])
    assert torch.equal(cut["labels"][0], full["labels"][0, :p + 5])
    assert (cut["labels"][0] != -100).sum() == 5
    assert conv.messages[-1]["content"].startswith(tok.decode(cut["labels"][0, p:]))
    assert torch.equal(cut["pixel_values"], full["pixel_values"])
    # the smallest max_length that keeps one response token works; one less would leave no label
    assert (SFTCollator(processor, max_length=p + 1)([conv])["labels"] != -100).sum() == 1
    for max_length in (p, p - 20):
        with pytest.raises(ValueError, match=rf"{conv.id}.*prompt alone is {p} tokens.*max_length={max_length}"):
            SFTCollator(processor, max_length=max_length)([conv])


def test_collator_refuses_to_cut_an_image_of_a_later_turn(processor, cold):
    conv = Conversation(id="late-image", images=cold[0].images, messages=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "<image>How many shapes?"}, {"role": "assistant", "content": "Five."}])
    full = SFTCollator(processor, max_length=4096)([conv])
    image_at = (full["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).nonzero()
    first_label = int((full["labels"][0] != -100).nonzero()[0])
    assert first_label < int(image_at[0])
    # a cut before (or inside) the image would leave its pixels without their tokens: the forward fails
    for max_length in (int(image_at[0]) - 2, int(image_at[5])):
        with pytest.raises(ValueError, match="late-image.*cuts off an image"):
            SFTCollator(processor, max_length=max_length)([conv])
    # a cut after the image is fine
    cut = SFTCollator(processor, max_length=int(image_at[-1]) + 4)([conv])
    assert cut["input_ids"].shape[1] == int(image_at[-1]) + 4


# ----------------------------------------------------------------------------- train_sft.py


def _write_cold(toy_dir: Path, path: Path, n: int) -> Path:
    records = json.loads((toy_dir / "data" / "cold_start.json").read_text())[:n]
    path.write_text(json.dumps(records))
    return path


def _args(tiny_model_dir, toy_dir, data_path, out, **kw) -> train_sft.Args:
    base = dict(model=str(tiny_model_dir), data=str(data_path), image_root=str(toy_dir / "data"),
                output_dir=str(out), max_length=256, per_device_batch_size=2, gradient_accumulation_steps=2,
                learning_rate=1e-2, logging_steps=1, save_steps=2, keep_last=0, dtype="fp32")
    return train_sft.Args(**{**base, **kw})


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


STEPS = 6


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, toy_dir, tmp_path_factory):
    """Full fine-tuning, 6 steps over the same 4 conversations (global batch 4 = 2 x 2 accumulation)."""
    tmp = tmp_path_factory.mktemp("sft-full")
    data_path = _write_cold(toy_dir, tmp / "cold4.json", 4)
    args = _args(tiny_model_dir, toy_dir, data_path, tmp / "run", max_steps=STEPS, warmup_ratio=0.05)  # 1 warmup step
    final = train_sft.main(args)
    AcceleratorState._reset_state(True)
    return args, final


def test_sft_learns_and_writes_its_outputs(full_run, tiny_model_dir):
    args, final = full_run
    out = Path(args.output_dir)
    assert final == out / "final"
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    losses = [m["loss"] for m in metrics]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    # the same 4 conversations every step: the loss must fall clearly
    assert losses[-1] < 0.8 * losses[0], losses
    # one warmup step, then cosine decay to 0 (lr is logged after the step's scheduler.step())
    assert metrics[0]["lr"] == pytest.approx(args.learning_rate) and metrics[-1]["lr"] == pytest.approx(0.0)
    recorded = json.loads((out / "args.json").read_text())
    # what ran: 6 steps of a 4-conversation global batch over 4 conversations are 6 epochs (issue 11: args.json
    # said the default 2 while max_steps decided)
    assert recorded["max_steps"] == STEPS and recorded["num_train_epochs"] == STEPS
    assert not (out / "samples.jsonl").exists()          # SFT writes no samples: no empty file either
    try:                                                  # the run drew its curves (matplotlib is optional)
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "training_curves.png").exists()
    else:
        assert (out / "training_curves.png").read_bytes().startswith(b"\x89PNG")

    steps = [int(p.name.split("-")[1]) for p in sorted((out / "checkpoints").glob("step-*"))]
    assert steps == [2, 4, 6]
    assert checkpoint.latest_checkpoint(out).name == "step-0000006"
    assert checkpoint.read_trainer_state(out / "checkpoints" / "step-0000004")["step"] == 4

    # final/ is an ordinary HF directory holding the trained weights (those of the last checkpoint)
    model = models.load_for_inference(final, dtype="fp32")
    trained = model.state_dict()
    ckpt = load_file(out / "checkpoints" / "step-0000006" / "model.safetensors")
    assert len(ckpt) == len(trained)
    for k, v in ckpt.items():
        assert torch.equal(trained[k.removeprefix("model.")], v), k
    base = models.load_for_inference(tiny_model_dir, dtype="fp32").state_dict()
    changed = [k for k in base if not torch.equal(base[k], trained[k])]
    assert changed and not any(k.startswith("model.visual") for k in changed)   # vision tower frozen
    assert models.load_processor(final).tokenizer.convert_tokens_to_ids("<think>") is not None
    assert_standard_checkpoint(final)
    # weights are readable like every other output (issue 11: model.safetensors was written 0600)
    ckpt_dir = out / "checkpoints" / "step-0000006"
    for weights, other in [(final / "model.safetensors", final / "config.json"),
                           (ckpt_dir / "model.safetensors", ckpt_dir / "trainer_state.json")]:
        assert oct(weights.stat().st_mode & 0o777) == oct(other.stat().st_mode & 0o777), weights


def test_sft_resume_is_exact(full_run, toy_dir, tmp_path, capsys):
    """Resume from the step-2 checkpoint of the 6-step run: the same schedule, optimizer state and data
    order, so the final weights are bitwise those of the run that never stopped."""
    args, final = full_run
    out = tmp_path / "resumed"
    shutil.copytree(Path(args.output_dir) / "checkpoints" / "step-0000002", out / "checkpoints" / "step-0000002")
    resumed = train_sft.main(train_sft.Args(**{**vars(args), "output_dir": str(out)}))
    assert "resumed from" in capsys.readouterr().out
    a, b = load_file(final / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["step"] for m in _metrics(out)] == [3, 4, 5, 6]
    assert [m["loss"] for m in _metrics(out)] == [m["loss"] for m in _metrics(Path(args.output_dir))][2:]


@pytest.fixture(scope="module")
def lora_runs(tiny_model_dir, toy_dir, tmp_path_factory):
    """LoRA (with dropout), 3 steps; then the same run resumed from its step-1 checkpoint."""
    tmp = tmp_path_factory.mktemp("sft-lora")
    data_path = _write_cold(toy_dir, tmp / "cold4.json", 4)
    kw = dict(mode="lora", lora_r=4, lora_alpha=8, lora_dropout=0.2, max_steps=3, save_steps=1)
    final = train_sft.main(_args(tiny_model_dir, toy_dir, data_path, tmp / "a", **kw))
    AcceleratorState._reset_state(True)
    shutil.copytree(tmp / "a" / "checkpoints" / "step-0000001", tmp / "b" / "checkpoints" / "step-0000001")
    resumed = train_sft.main(_args(tiny_model_dir, toy_dir, data_path, tmp / "b", **kw))
    AcceleratorState._reset_state(True)
    return final, resumed


def test_sft_lora_resume_is_exact_and_final_is_an_adapter(lora_runs, tiny_model_dir):
    """Exact resume with LoRA dropout also needs the RNG state. final/ is an adapter that
    load_for_inference merges into its base."""
    final, resumed = lora_runs
    assert [m["step"] for m in _metrics(resumed.parent)] == [2, 3]          # it did resume
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    assert_standard_checkpoint(final)
    assert models.adapter_base(final) == str(tiny_model_dir)
    a, b = load_file(final / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    merged = models.load_for_inference(final, dtype="fp32").state_dict()
    assert not any("lora" in k for k in merged)
    base = models.load_for_inference(tiny_model_dir, dtype="fp32").state_dict()
    name = "model.language_model.layers.0.self_attn.q_proj"
    A, B = a[f"base_model.model.{name}.lora_A.weight"], a[f"base_model.model.{name}.lora_B.weight"]
    assert B.abs().sum() > 0                                   # the adapter trained (B starts at zero)
    torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + (8 / 4) * B @ A)
    assert torch.equal(merged["model.visual.patch_embed.proj.weight"], base["model.visual.patch_embed.proj.weight"])


def test_sft_lora_checkpoint_holds_only_the_adapter(lora_runs):
    ckpt = lora_runs[0].parent / "checkpoints" / "step-0000003"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists()


def _start_sft_after_one_step(args, log) -> subprocess.Popen:
    """train_sft.py with `args` in a process of its own (output to the open file `log`), returned once its
    first step is logged in metrics.jsonl."""
    cmd = [sys.executable, "train_sft.py"] + [
        a for k, v in vars(args).items() if v is not None and not isinstance(v, bool) for a in (f"--{k}", str(v))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    metrics = Path(args.output_dir) / "metrics.jsonl"
    deadline = time.time() + 120
    try:
        while not (metrics.exists() and metrics.read_text().strip()):
            assert proc.poll() is None, Path(log.name).read_text()
            assert time.time() < deadline, "no step completed in 120 s"
            time.sleep(0.02)
    except BaseException:
        proc.kill()
        raise
    return proc


def test_sft_ctrl_c_saves_a_checkpoint_and_resumes(tiny_model_dir, toy_dir, tmp_path, capsys):
    data_path = _write_cold(toy_dir, tmp_path / "cold8.json", 8)
    out = tmp_path / "run"
    args = _args(tiny_model_dir, toy_dir, data_path, out, max_steps=10, per_device_batch_size=1,
                 gradient_accumulation_steps=1, save_steps=0, learning_rate=1e-3)
    log = open(tmp_path / "log.txt", "w")
    proc = _start_sft_after_one_step(args, log)
    try:
        proc.send_signal(signal.SIGINT)                       # one Ctrl-C, after step 1 finished
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "log.txt").read_text()
    assert rc == 0, text
    assert "Setting accelerator to CPU" not in text        # DeepSpeed's import-time notice broke the progress bar
    stop_step = _metrics(out)[-1]["step"]
    assert 1 <= stop_step < args.max_steps, "the run ended before Ctrl-C: make its steps slower"
    assert f"stopped at step {stop_step}" in text
    ckpt = checkpoint.latest_checkpoint(out)
    assert ckpt is not None and checkpoint.read_trainer_state(ckpt)["step"] == stop_step
    assert not (out / "final").exists()

    final = train_sft.main(args)                              # the same command again
    assert f"resumed from {ckpt} at step {stop_step}" in capsys.readouterr().out
    steps = [m["step"] for m in _metrics(out)]
    assert steps == list(range(1, args.max_steps + 1))       # continued where it stopped, nothing twice
    assert (final / "model.safetensors").is_file()


def test_sft_bad_record_names_file_and_line(tiny_model_dir, toy_dir, tmp_path):
    good = json.loads((toy_dir / "data" / "cold_start.json").read_text())[:3]
    bad = dict(good[1], conversations=[{"from": "human", "value": "<image>How many?"}])   # no answer turn
    path = tmp_path / "cold.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good[0], bad, good[2]]) + "\n")
    with pytest.raises(DataError, match=rf"{path}:line 2: field 'conversations'"):
        train_sft.main(_args(tiny_model_dir, toy_dir, path, tmp_path / "run", max_steps=1))


class _StopAfterFirstStep:
    """Stands in for training.StopRequested: Ctrl-C "pressed" during step 1."""

    def __init__(self):
        self.requested = True

    def restore(self):
        pass


def test_sft_ctrl_c_takes_the_same_teardown_path_as_a_finished_run(tiny_model_dir, toy_dir, tmp_path, monkeypatch):
    """Issue: SFT's Ctrl-C path returned before the teardown that frees the model and ends the process
    group (with gloo, skipping it aborts at exit in a fraction of runs). Both paths must end the run."""
    from accelerate import Accelerator

    ended = []
    real = Accelerator.end_training
    monkeypatch.setattr(Accelerator, "end_training", lambda self: ended.append(1) or real(self))
    monkeypatch.setattr(training, "StopRequested", _StopAfterFirstStep)
    data_path = _write_cold(toy_dir, tmp_path / "cold4.json", 4)
    out = train_sft.main(_args(tiny_model_dir, toy_dir, data_path, tmp_path / "run", max_steps=4, save_steps=0))
    assert out == tmp_path / "run" and not (out / "final").exists()
    assert checkpoint.read_trainer_state(checkpoint.latest_checkpoint(out))["step"] == 1
    assert ended == [1]


def test_sft_never_saves_nan_weights_and_its_stop_message_is_true(tiny_model_dir, toy_dir, tmp_path):
    """Issue: at learning rate 1e8 the gradient norm went NaN at step 2 and was logged, not checked;
    the step-2 checkpoint held NaN weights, `latest` named it, and the run stopped at step 3 calling
    the last checkpoint intact (a rerun resumed the NaN weights). Now the update is refused, every
    checkpoint on disk is finite, and the message names the checkpoint a rerun resumes from."""
    from safetensors.torch import load_file as load

    data_path = _write_cold(toy_dir, tmp_path / "cold4.json", 4)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError) as info:
        train_sft.main(_args(tiny_model_dir, toy_dir, data_path, out, max_steps=12, save_steps=1,
                             learning_rate=1e8, warmup_ratio=0.0))
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert saved, "precondition: at least one step finished before the NaN"
    for ckpt in saved:
        weights = load(ckpt / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), f"{ckpt} holds non-finite weights"
    latest = checkpoint.latest_checkpoint(out)
    assert latest == saved[-1] and f"{latest}" in str(info.value)


def test_sft_nan_at_the_first_step_says_there_is_no_checkpoint(tiny_model_dir, toy_dir, tmp_path, monkeypatch):
    from minivr1.policy import TokenLogprobs

    real = TokenLogprobs.forward
    monkeypatch.setattr(TokenLogprobs, "forward", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    data_path = _write_cold(toy_dir, tmp_path / "cold4.json", 4)
    with pytest.raises(FloatingPointError, match="step 1: .*no checkpoint"):
        train_sft.main(_args(tiny_model_dir, toy_dir, data_path, tmp_path / "run", max_steps=4, save_steps=1))
    assert checkpoint.latest_checkpoint(tmp_path / "run") is None


# ----------------------------------------------------------------------------- reruns (issue 11, items 2, 5, 10)


def test_sft_rerun_continues_only_with_the_settings_that_made_the_run(tiny_model_dir, toy_dir, tmp_path):
    """Issue: a rerun into a used output dir resumed whatever was there, whatever the new flags said, and
    overwrote args.json. Now a setting that changes what is trained stops the run and is named; a setting that
    does not (the split of the global batch, logging, checkpoint frequency) may change."""
    data_path = _write_cold(toy_dir, tmp_path / "cold4.json", 4)
    out = tmp_path / "run"
    args = _args(tiny_model_dir, toy_dir, data_path, out, max_steps=2, save_steps=1)
    train_sft.main(args)
    recorded = (out / "args.json").read_text()
    for change, named in [({"learning_rate": 1e-3}, r"learning_rate 0\.01 -> 0\.001"),
                          ({"max_steps": 4}, r"max_steps 2 -> 4"),      # the cosine schedule spans the whole run
                          ({"per_device_batch_size": 1}, r"global_batch 4 -> 2"),
                          ({"model": str(tmp_path)}, r"model .* -> " + str(tmp_path))]:
        with pytest.raises(UserError, match=named + r".*--overwrite"):
            train_sft.main(train_sft.Args(**{**vars(args), **change}))
        assert (out / "args.json").read_text() == recorded              # the record still says what made the run
    # the same global batch of 4 split as 1 x 4 accumulation; other logging and checkpointing
    train_sft.main(train_sft.Args(**{**vars(args), "per_device_batch_size": 1, "gradient_accumulation_steps": 4,
                                     "logging_steps": 2, "save_steps": 5, "keep_last": 1}))
    # other data in the same file
    _write_cold(toy_dir, data_path, 5)
    with pytest.raises(UserError, match=r"records 4 -> 5"):
        train_sft.main(args)
    # "--resume none" into a run's folder would mix two runs
    with pytest.raises(UserError, match="--overwrite"):
        train_sft.main(train_sft.Args(**{**vars(args), "resume": None}))
    # --overwrite starts over with the new settings
    train_sft.main(train_sft.Args(**{**vars(args), "learning_rate": 1e-3, "overwrite": True}))
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    assert json.loads((out / "args.json").read_text())["learning_rate"] == 1e-3


def test_output_dir_problems_are_found_before_the_model_loads(tiny_model_dir, toy_dir, tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the model was loaded before the output dir was checked")

    monkeypatch.setattr(models, "load_policy", never)
    data_path = _write_cold(toy_dir, tmp_path / "cold4.json", 4)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    with pytest.raises(UserError, match=rf"--output_dir {a_file} is a file"):
        train_sft.main(_args(tiny_model_dir, toy_dir, data_path, a_file, max_steps=1))
    try:                                                   # a folder no one may create, even root (sysfs)
        os.mkdir("/sys/minivr1-run")
        os.rmdir("/sys/minivr1-run")
        pytest.skip("no folder here that cannot be created")
    except OSError:
        pass
    with pytest.raises(UserError, match=r"cannot create --output_dir /sys/minivr1-run"):
        train_sft.main(_args(tiny_model_dir, toy_dir, data_path, "/sys/minivr1-run", max_steps=1))


def test_two_runs_in_one_output_dir(tiny_model_dir, toy_dir, tmp_path):
    """Issue: a second run in the same output dir destroyed the first's temporary checkpoint and interleaved
    metrics. Now the second stops at once, naming the process that holds the folder; a run killed with
    kill -9 leaves its lock file, which does not block the next run."""
    data_path = _write_cold(toy_dir, tmp_path / "cold8.json", 8)
    out = tmp_path / "run"
    first = _args(tiny_model_dir, toy_dir, data_path, out, max_steps=100000, per_device_batch_size=1,
                  gradient_accumulation_steps=1, save_steps=0)
    log = open(tmp_path / "log.txt", "w")
    proc = _start_sft_after_one_step(first, log)
    try:
        second = _args(tiny_model_dir, toy_dir, data_path, out, max_steps=1, save_steps=0)
        t0 = time.time()
        with pytest.raises(UserError, match=rf"{out} is in use by another run \(PID {proc.pid}\b"):
            train_sft.main(second)
        assert time.time() - t0 < 30
        assert proc.poll() is None                               # the first run goes on
    finally:
        proc.kill()                                              # kill -9
        proc.wait()
        log.close()
    assert (out / ".lock").exists()
    final = train_sft.main(train_sft.Args(**{**vars(second), "overwrite": True}))   # a stale lock does not block
    assert (final / "model.safetensors").is_file()
