"""bench/bench_grpo_vs_trl.py at tiny size, and the shared-prompt paths its speed-up comes from.

The benchmark runs as a subprocess (`--quick`: tiny model, 1 warmup + 2 timed steps). The
ours-only path (`--no-trl`) needs nothing beyond requirements.txt and always runs; the TRL path
needs bench/requirements.txt (`pip install -r bench/requirements.txt`) and is skipped without it.

The shared-prompt paths (a GRPO group's G sequences share one prompt: it is processed, prefilled
and run through the log-prob forwards once per group) must give what the plain paths give:
the same prompt tensors, the same sampled tokens for the same seed, the same log-probs and
gradients up to float rounding.
"""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minivr1 import data, models, rollout
from minivr1.chat import problem_messages, prompt_batch, select_sequences
from minivr1.policy import TokenLogprobs
from conftest import make_eos_likely

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_grpo_vs_trl.py"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run_bench(*args, timeout=240):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table_row(out: str, label: str) -> list[str]:
    line = next((l for l in out.splitlines() if l.startswith(label)), None)
    assert line is not None, f"no {label!r} row in:\n{out}"
    return line[len(label):].split()


# ----------------------------------------------------------------------------- the benchmark script

def test_help():
    out = run_bench("--help", timeout=60)
    for flag in ["--size", "--prompts_per_step", "--num_generations", "--max_completion_length", "--steps",
                 "--warmup", "--beta", "--threads", "--repeats", "--no-trl", "--quick", "--json", "--baseline"]:
        assert flag in out


def test_quick_ours_only(tmp_path):
    """--no-trl, with this checkout also as the --baseline column (the before/after of our changes)."""
    out = run_bench("--quick", "--no-trl", "--baseline", str(ROOT), "--json", str(tmp_path / "r.json"))
    assert table_row(out, "per step (mean)") == ["ours", "baseline"]
    wall = table_row(out, "time/step (wall)")
    assert len(wall) == 4 and float(wall[0]) > 0 and float(wall[2]) > 0       # "0.123 s 0.120 s"
    assert all(float(x) > 0 for x in table_row(out, "mean completion length"))
    assert "ratio ours/baseline (time per step):" in out and "ratio ours/TRL" not in out
    report = json.loads((tmp_path / "r.json").read_text())
    steps = report["runs"]["ours"][0]["steps"]
    assert len(steps) == 2 and all(s["wall"] > 0 and s["cpu"] > 0 and s["rollout"] > 0 and s["update"] > 0
                                   for s in steps)
    assert report["runs"]["baseline"][0]["code"] == str(ROOT)


def test_quick_against_trl():
    pytest.importorskip("trl", reason="TRL is benchmark-only: pip install -r bench/requirements.txt")
    out = run_bench("--quick")
    assert table_row(out, "per step (mean)")[:2] == ["ours", "TRL"]
    wall = table_row(out, "time/step (wall)")
    assert len(wall) == 4 and float(wall[0]) > 0 and float(wall[2]) > 0
    lengths = table_row(out, "mean completion length")
    assert len(lengths) == 2 and all(float(x) > 0 for x in lengths)
    assert "ratio ours/TRL (time per step):" in out


# ----------------------------------------------------------------------------- shared-prompt paths

@pytest.fixture(scope="module")
def problems(toy_dir):
    probs, _ = data.read_problems(toy_dir / "data" / "rl_train.jsonl")
    by_kind = {}
    for p in probs:                           # different questions: prompts of different lengths (left padding)
        by_kind.setdefault(p.category, []).append(p)
    return [by_kind["count"][0], by_kind["majority"][0], by_kind["total"][0]]


@pytest.fixture(scope="module")
def eos_model(tiny_model_dir, processor, problems):
    """The tiny model with <|im_end|> made likely, so completions stop at different lengths."""
    model = models.load_for_inference(tiny_model_dir, dtype="fp32")
    batch = prompt_batch(processor, problems, repeat=4)
    make_eos_likely(model, processor, batch, 16)
    return model


def test_prompt_batch_repeat_equals_processing_the_repeated_list(processor, problems):
    G = 3
    texts, images = [], []
    for p in problems:
        imgs = [ref.load() for ref in p.images]
        text = processor.apply_chat_template(problem_messages(p.question, len(imgs)), add_generation_prompt=True,
                                             tokenize=False)
        texts += [text] * G
        images += imgs * G
    processor.tokenizer.padding_side = "left"
    want = processor(text=texts, images=images, return_tensors="pt", padding=True)
    got = prompt_batch(processor, problems, repeat=G)
    assert sorted(got.keys()) == sorted(want.keys())
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_grouped_sampling_draws_the_same_tokens_as_generate(eos_model, processor, problems, temperature, top_p,
                                                            monkeypatch):
    """Same tokens, and the same distributions at every step: the probabilities handed to
    torch.multinomial are recorded (a position or cache error moves them, even where the draw
    happens to land on the same token)."""
    G = 4
    batch = prompt_batch(processor, problems, repeat=G)
    real_multinomial, probs = torch.multinomial, {"plain": [], "grouped": []}

    def run(name, **kw):
        monkeypatch.setattr(torch, "multinomial", lambda p, *a, **k: probs[name].append(p.clone())
                            or real_multinomial(p, *a, **k))
        torch.manual_seed(3)
        return rollout.generate(eos_model, processor, batch, 20, temperature, top_p, **kw)

    plain, grouped = run("plain"), run("grouped", group_size=G)
    lengths = plain.completion_mask.sum(1)
    assert len(set(lengths.tolist())) >= 3, f"precondition: varied completion lengths, got {lengths.tolist()}"
    assert torch.equal(grouped.completion_ids, plain.completion_ids)
    assert torch.equal(grouped.completion_mask, plain.completion_mask)
    assert grouped.texts == plain.texts
    assert len(probs["grouped"]) == len(probs["plain"]) == plain.completion_ids.shape[1]
    torch.testing.assert_close(torch.stack(probs["grouped"]), torch.stack(probs["plain"]), atol=1e-6, rtol=1e-4)


def test_grouped_sampling_rejects_rows_that_are_not_groups(eos_model, processor, problems):
    batch = prompt_batch(processor, problems[:2], repeat=2)        # groups of 2, not of 4
    with pytest.raises(ValueError, match="not"):
        rollout.generate(eos_model, processor, batch, 4, group_size=4)


def _rollout_batch(model, processor, problems, G):
    batch = prompt_batch(processor, problems, repeat=G)
    torch.manual_seed(5)
    ro = rollout.generate(model, processor, batch, 12, group_size=G)
    return batch, ro, {"input_ids": torch.cat([ro.prompt_ids, ro.completion_ids], 1),
                       "attention_mask": torch.cat([ro.prompt_mask, ro.completion_mask], 1),
                       "score_mask": torch.cat([torch.zeros_like(ro.prompt_mask), ro.completion_mask], 1),
                       "mm_token_type_ids": torch.cat([ro.prompt_types, torch.zeros_like(ro.completion_ids)], 1),
                       "pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}


@pytest.mark.parametrize("groups", [[4, 4, 4], [3, 1, 4, 2, 2]])   # whole groups; groups cut by micro-batches
def test_shared_prompt_logprobs_and_gradients_match_the_plain_forward(eos_model, processor, problems, groups):
    G = 4
    model = copy.deepcopy(eos_model).requires_grad_(True)
    policy = TokenLogprobs(model, chunk_size=7).train()
    _, ro, b = _rollout_batch(model, processor, problems, G)
    assert len(set(ro.completion_mask.sum(1).tolist())) >= 3    # some rows end early: right padding in play
    N, P = ro.prompt_ids.shape
    firsts = [sum(groups[:k]) for k in range(len(groups))]
    lead = select_sequences(b, firsts, images_per_seq=[1] * N)       # each group's image once

    def run(shared: bool):
        model.zero_grad()
        kw = dict(prompt_len=P, group_sizes=groups) if shared else {}
        images = lead if shared else b
        flat = policy(b["input_ids"], b["attention_mask"], b["score_mask"], images["pixel_values"],
                      images["image_grid_thw"], b["mm_token_type_ids"], temperature=0.7, **kw)
        (flat * torch.linspace(-1, 1, flat.numel())).sum().backward()
        return flat.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = run(False)
    shared, shared_grads = run(True)
    assert plain.numel() == ro.completion_mask.sum()
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert plain_grads.keys() == shared_grads.keys()
    assert any(n.startswith("model.visual") for n in plain_grads)          # gradients reach the vision tower
    for n in plain_grads:
        torch.testing.assert_close(shared_grads[n], plain_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_shared_prompt_logprobs_text_only(eos_model, processor):
    """No images: plain 0..T-1 positions, as the plain forward uses."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    enc = tok(["How many red shapes?", "Which color appears most often in the image?"], return_tensors="pt",
              padding=True)
    G = 2
    ids, mask = enc["input_ids"].repeat_interleave(G, 0), enc["attention_mask"].repeat_interleave(G, 0)
    torch.manual_seed(0)
    completion = torch.randint(0, 200, (ids.shape[0], 6))
    full_ids = torch.cat([ids, completion], 1)
    full_mask = torch.cat([mask, torch.ones_like(completion)], 1)
    score = torch.cat([torch.zeros_like(mask), torch.ones_like(completion)], 1)
    policy = TokenLogprobs(eos_model)
    with torch.no_grad():
        plain = policy(full_ids, full_mask, score)
        shared = policy(full_ids, full_mask, score, prompt_len=ids.shape[1], group_sizes=[G, G])
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
