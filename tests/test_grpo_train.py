"""train_grpo.main on the tiny VLM, in-process: what the trainer must do beyond the pure math.

Each test runs the real script (`main(Args(...))`) for a step or a few. Where a test needs to see
inside a step it wraps a function the script calls (`grpo_loss`, `generate`, the optimizer) with
one that records its arguments and then calls the real thing, so the numbers are those of the
real loop. Pitfall numbers refer to docs/pitfalls.md.
"""
import dataclasses
import json
import os
import re
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

import train_grpo
from minivr1 import checkpoint, data, grader, models, rollout, tracking, training
from minivr1.cli import UserError
from minivr1.chat import prompt_batch, repeat_images
from minivr1.grpo import grpo_loss
from minivr1.policy import TokenLogprobs, scatter_logprobs
from conftest import assert_standard_checkpoint, make_eos_likely

TIMING_KEYS = {"t_rollout", "t_update", "tok_per_s", "time"}


def length_reward(text, answer, **meta):
    """Varies within groups even on a random model, so every step has a learning signal."""
    return float(len(text) % 3)


@pytest.fixture(scope="module", autouse=True)
def extra_rewards():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(grader.REWARDS, "length_mod3", length_reward)
        mp.setitem(grader.REWARDS, "constant", lambda text, answer, **meta: 1.0)
        mp.setitem(grader.REWARDS, "nan", lambda text, answer, **meta: float("nan"))
        yield


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's matmuls are too small to gain from threads; on a busy 2-core machine OpenMP's
    spin-waiting made a run 4x slower with 2 threads than with 1 (and 2 are no faster when idle)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """main() installs a Ctrl-C handler; a run that raises leaves it in place: put pytest's back."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in old.items():
        signal.signal(s, handler)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, processor, toy_dir, tmp_path_factory):
    """The tiny model with <|im_end|> made likely, so completions end at different lengths (else all
    run to the limit, every mask is full, and seq_mean == token_mean: tests could not tell them apart).
    Its LM-head row is put along the mean final hidden state of sampled completions. And attention
    dropout on, as some checkpoints ship it: the trainer must turn it off (docs/pitfalls.md #6)."""
    out = tmp_path_factory.mktemp("eos") / "model"
    shutil.copytree(tiny_model_dir, out)
    model = models.load_for_inference(out, dtype="fp32")
    problems, _ = data.read_problems(toy_dir / "data" / "rl_train.jsonl")
    batch = prompt_batch(processor, problems[:4], repeat=4)
    make_eos_likely(model, processor, batch, 24)
    torch.manual_seed(0)
    lengths = rollout.generate(model, processor, batch, 24).completion_mask.sum(1)
    assert len(set(lengths.tolist())) >= 4, f"precondition: varied completion lengths, got {lengths.tolist()}"
    model.config.text_config.attention_dropout = 0.1
    model.save_pretrained(out)
    return out


def make_args(model_dir, toy_dir, out, **overrides):
    args = dict(model=str(model_dir), data=str(toy_dir / "data" / "rl_train.jsonl"), output_dir=str(out),
                mode="full", stages="24x4:1", prompts_per_step=2, micro_batch_size=8, num_iterations=1,
                learning_rate=1e-3, beta=0.04, reward="length_mod3", save_steps=0, sample_every=0, seed=0)
    args.update(overrides)
    return train_grpo.Args(**args)


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out):
    files = sorted((out / "final").glob("*.safetensors"))
    assert files, f"no weights in {out / 'final'}"
    return {k: v for f in files for k, v in load_file(f).items()}


class LossSpy:
    """Stands in for train_grpo.grpo_loss: records each micro-batch's inputs, then calls the real one."""

    def __init__(self):
        self.calls = []

    def __call__(self, logp, old_logp, ref_logp, adv, mask, **kwargs):
        self.calls.append({"logp": logp.detach().clone(), "old": old_logp.detach().clone(),
                           "ref": None if ref_logp is None else ref_logp.detach().clone(),
                           "adv": adv.detach().clone(), "mask": mask.bool().clone()})
        return grpo_loss(logp, old_logp, ref_logp, adv, mask, **kwargs)


def max_diff(a, b, mask):
    return (a - b)[mask].abs().max().item()


# ----------------------------------------------------------------------------- first step

@pytest.mark.parametrize("mode", ["full", "lora"])
def test_first_update_has_ratio_one_and_zero_kl(mode, model_dir, toy_dir, tmp_path, monkeypatch):
    """Pitfalls 6-8. With num_iterations=2 the old log-probs are a separate no-grad pass before any
    update, and the reference is a separate model (full: a frozen copy; LoRA: the adapter disabled).
    At the first update all three must agree exactly: any dropout, temperature or batching mismatch
    would show here. After one optimizer step they must not (else the check above proves nothing)."""
    spy = LossSpy()
    monkeypatch.setattr(train_grpo, "grpo_loss", spy)
    train_grpo.main(make_args(model_dir, toy_dir, tmp_path, mode=mode, stages="24x4:2", micro_batch_size=4,
                              num_iterations=2, lora_r=8, lora_alpha=16, temperature=0.7))
    assert len(spy.calls) == 2 * 2 * 2                       # steps x iterations x micro-batches
    step1_iter1, step1_iter2, step2_iter1 = spy.calls[0:2], spy.calls[2:4], spy.calls[4:6]
    for c in step1_iter1:                                    # rho == 1, KL == 0
        assert max_diff(c["logp"], c["old"], c["mask"]) <= 1e-6
        assert max_diff(c["logp"], c["ref"], c["mask"]) <= 1e-6
    for c in step1_iter2:                                    # the first update moved the policy
        assert max_diff(c["logp"], c["old"], c["mask"]) > 1e-4
    for c in step2_iter1:                                    # old recomputed for the new rollout, ref stays
        assert max_diff(c["logp"], c["old"], c["mask"]) <= 1e-6
        assert max_diff(c["logp"], c["ref"], c["mask"]) > 1e-4


# ----------------------------------------------------------------------------- micro-batches

class GradRecorder(torch.optim.SGD):
    """Plain SGD that records every gradient it is asked to apply (Adam's first step is ~lr * sign(g),
    which would hide a wrongly scaled gradient)."""

    def __init__(self, params):
        super().__init__(params, lr=1e-2)
        self.grads = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


# micro-batchings of the same 8 completions: a number of rows, or a token budget (--micro_batch_tokens; a row is
# ~80-100 tokens, prompt + completion, so 200 gives micro-batches of 2 rows, 400 of 4, sorted by length)
MICRO = {"seq_mean": [8, 4, 2, "200 tokens", "400 tokens"], "token_mean": [8, 4, 2, "200 tokens"],
         "dr_grpo": [8, 2, "200 tokens"]}


def test_gradient_does_not_depend_on_micro_batching(model_dir, toy_dir, tmp_path, monkeypatch):
    """Pitfall 4: the rollout's S = 8 completions as 1, 2 or 4 micro-batches give the same gradients,
    for every loss aggregation, at both updates of num_iterations=2 (the second with rho != 1 and
    KL > 0). The global seq/token counts are what makes this hold. So do micro-batches formed by a
    token budget (rows sorted by length: not consecutive, groups cut across micro-batches)."""
    recorders, splits = [], []

    def build_optimizer(model, lr, weight_decay=0.0, name="adamw"):
        recorders.append(GradRecorder([p for p in model.parameters() if p.requires_grad]))
        return recorders[-1]

    real_split = train_grpo.token_budget_micro_batches
    monkeypatch.setattr(training, "build_optimizer", build_optimizer)
    monkeypatch.setattr(train_grpo, "token_budget_micro_batches",
                        lambda *a, **k: splits.append(real_split(*a, **k)) or splits[-1])
    grads = {}
    for aggregation, micros in MICRO.items():
        for micro in micros:
            size = dict(micro_batch_tokens=int(micro.split()[0])) if isinstance(micro, str) else dict(micro_batch_size=micro)
            train_grpo.main(make_args(model_dir, toy_dir, tmp_path / f"{aggregation}-{micro}", **size,
                                      num_iterations=2, max_grad_norm=0.0, loss_aggregation=aggregation))
            grads[aggregation, micro] = recorders[-1].grads
            assert len(grads[aggregation, micro]) == 2            # one optimizer step per iteration
    # the token budgets did cut the rollout into several micro-batches of rows that are not consecutive
    assert all(len(s) >= 2 for s in splits) and any(r != list(range(r[0], r[-1] + 1)) for s in splits for r in s)

    def flat(gs):
        return torch.cat([g.flatten() for g in gs])

    for aggregation, micros in MICRO.items():
        whole = grads[aggregation, 8]
        assert flat(whole[0]).norm() > 1e-2                       # there is a gradient to compare
        assert (flat(whole[1]) - flat(whole[0])).abs().max() > 1e-4   # the second update differs
        for micro in micros[1:]:
            for it in range(2):
                torch.testing.assert_close(flat(grads[aggregation, micro][it]), flat(whole[it]), atol=1e-6, rtol=1e-5,
                                           msg=lambda m: f"{aggregation}, micro_batch_size {micro}, update {it + 1}: {m}")
    # completions have different lengths, so the aggregations are different losses
    assert (flat(grads["seq_mean", 8][0]) - flat(grads["token_mean", 8][0])).abs().max() > 1e-4
    assert (flat(grads["dr_grpo", 8][0]) - flat(grads["token_mean", 8][0])).abs().max() > 1e-4


# ----------------------------------------------------------------------------- LoRA reference

def test_lora_reference_is_the_sft_model(model_dir, toy_dir, processor, tmp_path, monkeypatch):
    """Starting from a saved SFT LoRA adapter, load_policy merges it, so "adapter disabled" (the KL
    reference) is the SFT model, not the bare base. The reference log-probs of the real run must be
    the SFT model's (computed here independently, adapter unmerged) and differ from the base's."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = models.load_policy(model_dir, mode="full", dtype="fp32")
    sft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=models.lora_targets(base)))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)                               # a trained adapter changes the outputs
    adapter_dir = tmp_path / "sft_adapter"
    sft.save_pretrained(adapter_dir)
    assert models.adapter_base(adapter_dir) == str(model_dir)

    spy, rollouts = LossSpy(), []
    monkeypatch.setattr(train_grpo, "grpo_loss", spy)
    record_rollouts(monkeypatch, lambda problems, G, ro: rollouts.append(ro))
    train_grpo.main(make_args(adapter_dir, toy_dir, tmp_path / "run", mode="lora", lora_r=8, lora_alpha=16))

    (ro,) = rollouts
    (call,) = spy.calls
    ids, mask = torch.cat([ro.prompt_ids, ro.completion_ids], 1), ro.completion_mask
    images = repeat_images(ro.images, ro.images_per_prompt, [ro.group_size] * len(ro.images_per_prompt))

    def logprobs(model):
        with torch.no_grad():
            flat = TokenLogprobs(model.eval())(ids, torch.cat([ro.prompt_mask, mask], 1),
                                               torch.cat([torch.zeros_like(ro.prompt_mask), mask], 1),
                                               images["pixel_values"], images["image_grid_thw"],
                                               torch.cat([ro.prompt_types, torch.zeros_like(mask)], 1))
        return scatter_logprobs(flat, mask)

    sft_logp = logprobs(PeftModel.from_pretrained(models.load_policy(model_dir, mode="full", dtype="fp32"), adapter_dir))
    base_logp = logprobs(models.load_policy(model_dir, mode="full", dtype="fp32"))
    m = mask.bool()
    assert max_diff(base_logp, sft_logp, m) > 1e-2              # precondition: the adapter matters
    assert max_diff(call["ref"], sft_logp, m) <= 1e-5           # the reference is the SFT model
    assert max_diff(call["logp"], sft_logp, m) <= 1e-5          # and so is the starting policy


# ----------------------------------------------------------------------------- resume

RESUME = dict(stages="24x4:2,48x2:2", micro_batch_size=4)       # a PTST boundary after step 2


def record_rollouts(monkeypatch, on_rollout):
    """Wraps the script's rollout engine: on_rollout(problems, G, rollout) after each of its rollouts."""
    real_make_engine = train_grpo.make_engine

    def make_engine(*args, **kwargs):
        engine = real_make_engine(*args, **kwargs)
        real_generate = engine.generate

        def generate(problems, G, max_new_tokens):
            ro = real_generate(problems, G, max_new_tokens)
            on_rollout(problems, G, ro)
            return ro

        engine.generate = generate
        return engine

    monkeypatch.setattr(train_grpo, "make_engine", make_engine)


def record_prompts(monkeypatch, seen):
    """Appends each step's problem ids to `seen`."""
    record_rollouts(monkeypatch, lambda problems, G, ro: seen.append([p.id for p in problems]))


@pytest.fixture(scope="module")
def straight_runs(model_dir, toy_dir, tmp_path_factory):
    """straight_runs(mode): 4 steps over two PTST stages, uninterrupted (run once per mode); returns
    its directory and each step's problem ids."""
    runs = {}

    def get(mode):
        if mode not in runs:
            out, seen = tmp_path_factory.mktemp(f"straight-{mode}"), []
            with pytest.MonkeyPatch.context() as mp:
                record_prompts(mp, seen)
                train_grpo.main(make_args(model_dir, toy_dir, out, mode=mode, **RESUME))
            runs[mode] = out, seen
        return runs[mode]
    return get


def test_first_step_metrics_kl_and_clip_are_zero(straight_runs):
    """Pitfall 8, as logged: at step 1 the policy is the reference (kl 0) and the ratio is 1 (clip 0);
    at later steps the policy has moved (kl > 0), and the length reward gave groups some variance."""
    metrics = read_metrics(straight_runs("full")[0])
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["stage"] for m in metrics] == [1, 1, 2, 2]
    assert metrics[0]["kl"] < 1e-10 and metrics[0]["clip"] == 0
    assert all(m["kl"] > 1e-6 for m in metrics[1:])
    assert all(m["grad_norm"] > 0 and m["zero_var"] < 1 for m in metrics)
    # the compute a step spent: its completions (2 prompts x G, G = 4 then 2) times their mean length
    assert [m["completion_tokens"] for m in metrics] == pytest.approx([m["len"] * 2 * g for m, g in
                                                                       zip(metrics, [4, 4, 2, 2])])


class StopAfter:
    """Stands in for training.StopRequested: Ctrl-C arrives during step k (the loop asks once a step)."""

    def __init__(self, k):
        self.k, self.asked = k, 0

    @property
    def requested(self):
        self.asked += 1
        return self.asked >= self.k

    def restore(self):
        pass


# stopped at the PTST boundary / inside stage 2; LoRA: the adapter-disabled reference and peft checkpoint hooks
@pytest.mark.parametrize("mode, k", [("full", 2), ("full", 3), ("lora", 3)])
def test_resume_matches_an_uninterrupted_run(mode, k, straight_runs, model_dir, toy_dir, tmp_path, monkeypatch, capsys):
    """Pitfall 17: stop after k steps, rerun the same command: the same weights and the same per-step
    metrics (so the same prompts and the same sampled completions: data position and torch RNG state
    restored) as the uninterrupted run, bit for bit on a CPU."""
    straight, straight_prompts = straight_runs(mode)
    args, seen = make_args(model_dir, toy_dir, tmp_path, mode=mode, **RESUME), []
    record_prompts(monkeypatch, seen)
    real_stop = training.StopRequested
    monkeypatch.setattr(training, "StopRequested", lambda: StopAfter(k))
    assert train_grpo.main(args) == tmp_path
    assert checkpoint.latest_checkpoint(tmp_path).name == f"step-{k:07d}"
    assert not (tmp_path / "final").exists()
    monkeypatch.setattr(training, "StopRequested", real_stop)

    train_grpo.main(args)
    assert f"resumed from {tmp_path / 'checkpoints' / f'step-{k:07d}'} at step {k}" in capsys.readouterr().out
    assert seen == straight_prompts                              # the data position resumed
    got, want = read_metrics(tmp_path), read_metrics(straight)
    strip = [{key: v for key, v in m.items() if key not in TIMING_KEYS} for m in got]
    assert strip == [{key: v for key, v in m.items() if key not in TIMING_KEYS} for m in want]
    got_w, want_w = final_weights(tmp_path), final_weights(straight)
    assert got_w.keys() == want_w.keys()
    for name in want_w:
        assert torch.equal(got_w[name], want_w[name]), name


def test_ctrl_c_saves_a_checkpoint_and_gives_the_handler_back(model_dir, toy_dir, tmp_path, monkeypatch):
    """A real SIGINT during step 1 (sent from inside the reward function): the step finishes, is
    checkpointed, the run returns without final/, and Ctrl-C is handed back to whoever had it."""
    sent = []

    def interrupting_reward(text, answer, **meta):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return length_reward(text, answer)

    monkeypatch.setitem(grader.REWARDS, "interrupting", interrupting_reward)
    before = signal.getsignal(signal.SIGINT)
    out = train_grpo.main(make_args(model_dir, toy_dir, tmp_path, reward="interrupting", stages="8x4:3"))
    assert out == tmp_path and not (tmp_path / "final").exists()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-0000001"
    assert [m["step"] for m in read_metrics(tmp_path)] == [1]
    assert signal.getsignal(signal.SIGINT) is before


# ----------------------------------------------------------------------------- guards

def count_updates(monkeypatch):
    """Makes the optimizer that train_grpo builds append to the returned list at every real step."""
    updates, build = [], training.build_optimizer

    def counting_build(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: updates.append(1))
        return optimizer

    monkeypatch.setattr(training, "build_optimizer", counting_build)
    return updates


def test_nan_reward_stops_the_run(model_dir, toy_dir, tmp_path):
    with pytest.raises(FloatingPointError, match=r"step 1: reward is \[nan"):
        train_grpo.main(make_args(model_dir, toy_dir, tmp_path, reward="nan", stages="8x4:1"))


def test_nan_loss_stops_the_run_before_the_update(model_dir, toy_dir, tmp_path, monkeypatch):
    """A NaN loss at step 2 raises, names the step, and nothing of it is applied or saved: one
    optimizer step in all (step 1's), and the checkpoint of step 1 stays the latest."""
    calls, updates = [], count_updates(monkeypatch)

    def nan_at_step_2(*args, **kwargs):
        calls.append(1)
        loss, stats = grpo_loss(*args, **kwargs)
        return (loss * float("nan") if len(calls) > 1 else loss), stats

    monkeypatch.setattr(train_grpo, "grpo_loss", nan_at_step_2)
    with pytest.raises(FloatingPointError, match=r"step 2: loss is \[nan"):
        train_grpo.main(make_args(model_dir, toy_dir, tmp_path, stages="8x4:2", save_steps=1))
    assert len(updates) == 1
    assert [m["step"] for m in read_metrics(tmp_path)] == [1]
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-0000001"


def test_nan_gradient_stops_the_run_before_the_update(model_dir, toy_dir, tmp_path, monkeypatch):
    """A finite loss whose gradient is NaN (here: a hook on the log-probs at step 2) must not reach the
    weights: the clipped grad norm is checked before optimizer.step."""
    calls, updates = [], count_updates(monkeypatch)

    def nan_grad_at_step_2(logp, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            logp.register_hook(lambda g: torch.full_like(g, float("nan")))
        return grpo_loss(logp, *args, **kwargs)

    monkeypatch.setattr(train_grpo, "grpo_loss", nan_grad_at_step_2)
    with pytest.raises(FloatingPointError, match=r"step 2: grad_norm is \[nan"):
        train_grpo.main(make_args(model_dir, toy_dir, tmp_path, stages="8x4:2", save_steps=1))
    assert len(updates) == 1
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-0000001"


def test_zero_variance_groups_give_no_update(model_dir, toy_dir, tmp_path, monkeypatch):
    """Pitfall 1: a constant reward makes every group zero-variance: advantages exactly 0 (not NaN),
    grad norm 0, zero_var 1, and the weights do not move (so kl stays 0 at step 2 too)."""
    spy = LossSpy()
    monkeypatch.setattr(train_grpo, "grpo_loss", spy)
    train_grpo.main(make_args(model_dir, toy_dir, tmp_path, reward="constant", stages="8x4:2"))
    assert spy.calls and all((c["adv"] == 0).all() for c in spy.calls)
    for m in read_metrics(tmp_path):
        assert m["zero_var"] == 1 and m["grad_norm"] == 0 and m["loss"] == 0 and m["kl"] == 0, m
        assert m["reward"] == 1 and m["reward_std"] == 0
    start = {k: v for f in model_dir.glob("*.safetensors") for k, v in load_file(f).items()}
    final = final_weights(tmp_path)
    assert_standard_checkpoint(tmp_path / "final")
    assert final.keys() == start.keys()
    assert all(torch.equal(final[k], start[k]) for k in start)


# ----------------------------------------------------------------------------- arguments said one way

def test_single_stage_flags_conflicting_with_stages_are_an_error(model_dir, toy_dir, tmp_path):
    """Issue: --max_completion_length, --num_generations and --max_steps were silently ignored whenever
    --stages was set, which the default and every preset do. Now a conflict is an error, and the three
    flags alone set the one stage."""
    from minivr1.config import ConfigError

    with pytest.raises(ConfigError, match="say it one way"):
        train_grpo.main(make_args(model_dir, toy_dir, tmp_path / "both", stages="24x4:1", max_steps=2))
    assert not (tmp_path / "both").exists()                     # nothing started
    train_grpo.main(make_args(model_dir, toy_dir, tmp_path / "one", stages=None, max_completion_length=6,
                              num_generations=2, max_steps=2))
    metrics = read_metrics(tmp_path / "one")
    assert [m["step"] for m in metrics] == [1, 2] and all(m["len_max"] <= 6 for m in metrics)
    assert json.loads((tmp_path / "one" / "args.json").read_text())["max_steps"] == 2


def test_with_several_updates_per_rollout_the_schedule_counts_optimizer_steps(model_dir, toy_dir, tmp_path,
                                                                              monkeypatch):
    """Issue: with --num_iterations 2 the warmup counted rollouts, and grad_norm logged only the last
    update's. Decided: --warmup_steps counts optimizer steps, and grad_norm is the mean of the step's updates."""
    from minivr1 import distributed

    lrs, norms = [], []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    real_clip = distributed.clip_gradients

    def recording_clip(*a, **k):
        norms.append(real_clip(*a, **k))
        return norms[-1]

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    monkeypatch.setattr(distributed, "clip_gradients", recording_clip)
    train_grpo.main(make_args(model_dir, toy_dir, tmp_path, stages="24x4:2", num_iterations=2, warmup_steps=4,
                              learning_rate=1e-3, micro_batch_size=8))
    assert lrs == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])      # 2 rollout steps x 2 updates
    metrics = read_metrics(tmp_path)
    assert len(norms) == 4 and norms[0] != norms[1]
    assert [m["grad_norm"] for m in metrics] == pytest.approx([(norms[0] + norms[1]) / 2, (norms[2] + norms[3]) / 2])
    assert [m["lr"] for m in metrics] == pytest.approx([0.75e-3, 1e-3])   # logged after the step: the next update's


# ----------------------------------------------------------------------------- options beside the paper (one step each)

def numbers_only_reward(text, answer, **meta):
    """Varies within groups for counting questions; constant for multiple choice (the toy's majority questions,
    letter answers): those groups are all-equal, with no learning signal."""
    return length_reward(text, answer) if answer.isdigit() else 1.0


def group_rows(x, G):
    return x.view(-1, G)


def test_dynamic_sampling_trains_only_groups_with_a_signal(model_dir, toy_dir, tmp_path, monkeypatch):
    """--dynamic_sampling: the step's own prompts include all-equal groups (multiple-choice questions under this
    reward); they are dropped and extra prompts rolled out until the step holds prompts_per_step groups whose
    rewards differ: every trained group has nonzero advantages, and the log counts what it cost. At a bound of 0
    extra rollouts the step is filled with dropped groups instead (zero_var > 0)."""
    monkeypatch.setitem(grader.REWARDS, "numbers_only", numbers_only_reward)
    rollouts, spy = [], LossSpy()

    def all_equal_groups(problems, G, ro):                            # this rollout's groups with no signal
        r = torch.tensor([numbers_only_reward(t, p.answer) for t, p in zip(ro.texts, [p for p in problems for _ in range(G)])])
        rollouts.append((problems, int((group_rows(r, G) == group_rows(r, G)[:, :1]).all(1).sum())))
    record_rollouts(monkeypatch, all_equal_groups)
    monkeypatch.setattr(train_grpo, "grpo_loss", spy)
    train_grpo.main(make_args(model_dir, toy_dir, tmp_path / "ds", reward="numbers_only", prompts_per_step=4,
                              dynamic_sampling=True, max_extra_rollouts=4))
    assert rollouts[0][1] > 0, "precondition: the step's own prompts include groups with no signal"
    assert len(rollouts) >= 2                                         # it rolled out more prompts
    assert not {p.id for p in rollouts[0][0]} & {p.id for p in rollouts[1][0]}      # other prompts
    adv = torch.cat([c["adv"] for c in spy.calls])
    assert adv.numel() == 4 * 4 and (group_rows(adv, 4) != 0).any(dim=1).all()   # 4 groups, each with a signal
    (m,) = read_metrics(tmp_path / "ds")
    assert m["zero_var"] == 0 and m["sampled_groups"] == 4 * len(rollouts)
    assert m["dropped_groups"] == sum(n for _, n in rollouts)         # every group with no signal, none kept

    rollouts.clear()
    train_grpo.main(make_args(model_dir, toy_dir, tmp_path / "bound", reward="numbers_only", prompts_per_step=4,
                              dynamic_sampling=True, max_extra_rollouts=0))
    (m,) = read_metrics(tmp_path / "bound")
    assert len(rollouts) == 1 and m["sampled_groups"] == 4 and m["dropped_groups"] == 0 and m["zero_var"] > 0


def test_overlong_penalty_is_added_to_the_reward(model_dir, toy_dir, tmp_path, monkeypatch):
    """--overlong_buffer 8 at a 24-token limit: the reward the advantages see is the base reward plus
    -(length - 16) / 8 for completions longer than 16 tokens (-1 at the limit), 0 for the others."""
    rollouts, rewards = [], []
    record_rollouts(monkeypatch, lambda problems, G, ro: rollouts.append(ro))
    real = train_grpo.group_advantages
    monkeypatch.setattr(train_grpo, "group_advantages", lambda r, G: rewards.append(r.clone()) or real(r, G))
    train_grpo.main(make_args(model_dir, toy_dir, tmp_path, overlong_buffer=8))
    (ro,), (reward,) = rollouts, rewards
    lengths = ro.completion_mask.sum(1).float()
    penalty = -((lengths - 16) / 8).clamp(0, 1)
    assert (penalty < 0).any() and (penalty == 0).any(), f"precondition: lengths on both sides of 16: {lengths}"
    base = torch.tensor([length_reward(t, None) for t in ro.texts])
    torch.testing.assert_close(reward, base + penalty)
    from minivr1.cli import UserError
    with pytest.raises(UserError, match="shorter than every stage's completion limit"):    # nothing left before it
        train_grpo.main(make_args(model_dir, toy_dir, tmp_path / "too_long", stages="48x2:1,24x4:1", overlong_buffer=24))


def test_mask_truncated_completions_leaves_them_out_of_the_loss(model_dir, toy_dir, tmp_path, monkeypatch):
    rollouts, spy = [], LossSpy()
    record_rollouts(monkeypatch, lambda problems, G, ro: rollouts.append(ro))
    monkeypatch.setattr(train_grpo, "grpo_loss", spy)
    train_grpo.main(make_args(model_dir, toy_dir, tmp_path, mask_truncated_completions=True))
    (ro,), (call,) = rollouts, spy.calls
    assert ro.truncated.any() and not ro.truncated.all(), "precondition: some completions cut off, some not"
    assert not call["mask"][ro.truncated].any()                                   # truncated rows: no token counts
    assert torch.equal(call["mask"][~ro.truncated], ro.completion_mask[~ro.truncated].bool())
    (m,) = read_metrics(tmp_path)
    assert m["truncated"] > 0 and m["len"] == ro.completion_mask.sum().item() / 8     # the log still sees them


@pytest.mark.parametrize("scale", ["none", "batch"])
def test_scale_rewards(scale, model_dir, toy_dir, tmp_path, monkeypatch):
    """--scale_rewards none: A = r - group mean (Dr.GRPO); batch: divided by the std of all the step's rewards."""
    rollouts, spy = [], LossSpy()
    record_rollouts(monkeypatch, lambda problems, G, ro: rollouts.append(ro))
    monkeypatch.setattr(train_grpo, "grpo_loss", spy)
    train_grpo.main(make_args(model_dir, toy_dir, tmp_path, scale_rewards=scale))
    (ro,), (call,) = rollouts, spy.calls
    r = torch.tensor([length_reward(t, None) for t in ro.texts])
    centred = (group_rows(r, 4) - group_rows(r, 4).mean(1, keepdim=True)).flatten()
    want = centred if scale == "none" else centred / (r.std(correction=0) + 1e-6)
    assert centred.abs().max() > 0 and (scale == "none" or abs(r.std(correction=0) - 1) > 0.05), "precondition"
    torch.testing.assert_close(call["adv"], want)


def test_gspo_equals_the_token_ratio_on_policy_and_differs_off_policy(model_dir, toy_dir, tmp_path, monkeypatch):
    """--importance_sampling_level sequence with num_iterations 2: the first update (ratio 1) has the same gradient
    as the per-token ratio, the second (the policy has moved) does not."""
    recorders = []

    def build_optimizer(model, lr, weight_decay=0.0, name="adamw"):
        recorders.append(GradRecorder([p for p in model.parameters() if p.requires_grad]))
        return recorders[-1]

    monkeypatch.setattr(training, "build_optimizer", build_optimizer)
    for level in ["token", "sequence"]:
        train_grpo.main(make_args(model_dir, toy_dir, tmp_path / level, importance_sampling_level=level,
                                  num_iterations=2, max_grad_norm=0.0, epsilon=0.5))
    (token1, token2), (seq1, seq2) = ([torch.cat([g.flatten() for g in gs]) for gs in r.grads] for r in recorders)
    torch.testing.assert_close(seq1, token1)
    assert (seq2 - token2).abs().max() > 1e-4 * token2.abs().max()


# ----------------------------------------------------------------------------- reruns and failures (issue 11)

def test_a_rerun_continues_only_with_the_settings_that_made_the_run(model_dir, toy_dir, tmp_path):
    """Issue: rerun into a finished output dir with another learning rate, GRPO resumed, trained at the old one
    and wrote the new one into args.json. Now a setting that changes results stops the rerun and is named;
    settings that do not (micro-batch size, checkpoint and sample frequency, the rollout engine) may change,
    and so may the PTST stages after the steps already run (training continues)."""
    args = make_args(model_dir, toy_dir, tmp_path, stages="8x4:1", save_steps=1)
    train_grpo.main(args)
    recorded = (tmp_path / "args.json").read_text()
    with pytest.raises(UserError, match=r"learning_rate 0\.001 -> 0\.0005.*--overwrite"):
        train_grpo.main(dataclasses.replace(args, learning_rate=5e-4))
    assert (tmp_path / "args.json").read_text() == recorded
    train_grpo.main(dataclasses.replace(args, micro_batch_size=2, save_steps=5, sample_every=1, rollout="hf"))
    train_grpo.main(dataclasses.replace(args, stages="8x4:2"))          # one more step of the same stage
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]
    with pytest.raises(UserError, match=r"stages .*steps already run"):
        train_grpo.main(dataclasses.replace(args, stages="16x4:3"))     # step 1 ran at 8 tokens, not 16
    train_grpo.main(dataclasses.replace(args, learning_rate=5e-4, overwrite=True))
    assert [m["step"] for m in read_metrics(tmp_path)] == [1]
    assert json.loads((tmp_path / "args.json").read_text())["learning_rate"] == 5e-4


def test_a_killed_run_resumes_without_duplicate_lines(model_dir, toy_dir, tmp_path, monkeypatch):
    """Issue: after every kill -9 resume, metrics.jsonl held the steps logged after the last checkpoint twice.
    Here the run dies right after logging step 3 (checkpoints every 2 steps); the rerun resumes from step 2."""
    args = make_args(model_dir, toy_dir, tmp_path, stages="8x4:4", save_steps=2, sample_every=1)
    real_log = tracking.Tracker.log

    def dies_after_step_3(self, metrics, step):
        real_log(self, metrics, step)
        if step == 3:
            raise KeyboardInterrupt("kill -9")

    monkeypatch.setattr(tracking.Tracker, "log", dies_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_grpo.main(args)
    monkeypatch.setattr(tracking.Tracker, "log", real_log)
    train_grpo.main(args)
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]
    samples = [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == [1, 1, 2, 2, 3, 3, 4, 4]


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(model_dir, toy_dir, tmp_path, capsys):
    """Issue: with step-2's weights cut short and step-1 intact, a rerun died in safetensors. Now it warns,
    naming what is wrong, and resumes from step 1."""
    args = make_args(model_dir, toy_dir, tmp_path, stages="8x4:2", save_steps=1, keep_last=0)
    train_grpo.main(args)
    weights = tmp_path / "checkpoints" / "step-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    capsys.readouterr()
    train_grpo.main(dataclasses.replace(args, stages="8x4:3"))
    out = capsys.readouterr()
    assert re.search(r"step-0000002.*model\.safetensors.*resuming from .*step-0000001", out.err.replace("\n", " ")), out.err
    assert f"resumed from {tmp_path / 'checkpoints' / 'step-0000001'} at step 1" in out.out
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_qlora_grpo_runs_on_cpu(model_dir, toy_dir, tmp_path, gradient_checkpointing):
    """Issue: QLoRA GRPO failed on a CPU after the first rollout: switching the model to eval mode for
    sampling made bitsandbytes repack its 4-bit weights for CPU inference, which training cannot use."""
    train_grpo.main(make_args(model_dir, toy_dir, tmp_path, mode="qlora", stages="8x4:2", lora_r=4, lora_alpha=8,
                              gradient_checkpointing=gradient_checkpointing))
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2] and metrics[1]["kl"] > 0
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()


def test_a_failing_custom_reward_is_named_with_the_step_and_the_value(model_dir, toy_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(grader.REWARDS, "divides", lambda text, answer, **meta: 1 / 0)
    monkeypatch.setitem(grader.REWARDS, "forgets", lambda text, answer, **meta: None)
    with pytest.raises(UserError, match=r"step 1: reward 'divides' raised ZeroDivisionError: division by zero"):
        train_grpo.main(make_args(model_dir, toy_dir, tmp_path / "a", reward="divides", stages="8x4:1"))
    with pytest.raises(UserError, match=r"step 1: reward 'forgets' returned None \(NoneType\), not a number"):
        train_grpo.main(make_args(model_dir, toy_dir, tmp_path / "b", reward="forgets", stages="8x4:1"))
    with pytest.raises(UserError, match=r"reward 'no_such_module:f'.*no_such_module"):
        train_grpo.main(make_args(model_dir, toy_dir, tmp_path / "c", reward="no_such_module:f", stages="8x4:1"))
