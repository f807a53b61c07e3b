"""Real size on a CPU (opt-in tier: `pytest -m realsize -s`; minutes, ~12 GiB of memory; run it alone).

One GRPO step of the real Qwen2.5-VL-3B architecture (3.75B parameters, random weights, the real
151,936-token vocabulary, LM head tied to the embeddings) through bench/bench_gpu_step.py's own code
path: the checkpoint built and saved in bf16, then train_grpo.main with LoRA in bf16 on a 448x448
image and the benchmark's geometry question, G = 2 completions of 8 new tokens, beta 0.01, no
gradient checkpointing. Asserted: the step finishes with a finite loss and a finite, non-zero gradient
norm; the image became 256 image tokens; every log-prob went through grpo.token_logprobs' chunked
path with logits of the real vocabulary width, never more rows than the chunk at once. Recorded
(printed): wall time, build time, the step's rollout / update seconds, the process's peak RSS.

One thing differs from the benchmark: the reward. Random weights over 151,936 ids almost always
sample ids beyond the small hub-free tokenizer, which decode to nothing, so every completion gets the
same text reward, the advantages are 0 and so is the gradient. The test's reward alternates 0, 1 over
the completions instead, so the step has a learning signal and the gradient norm means something.
"""
import importlib.util
import itertools
import math
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.realsize

ROOT = Path(__file__).resolve().parents[1]
G, C, CHUNK = 2, 8, 8          # 16 completion tokens per pass: 2 chunks of 8 rows
VOCAB = 151936


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_step", ROOT / "bench" / "bench_gpu_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_3b_lora_grpo_step_on_cpu(tmp_path, monkeypatch):
    from transformers import AutoConfig

    from minivr1 import grpo

    chunks = []                # (rows, vocab, dtype) of every chunk the log-softmax saw
    forward = grpo._LogSoftmaxAt.forward

    def spy(ctx, logits, targets, temperature):
        chunks.append((logits.shape[0], logits.shape[1], str(logits.dtype)))
        return forward(ctx, logits, targets, temperature)

    monkeypatch.setattr(grpo._LogSoftmaxAt, "forward", staticmethod(spy))
    bench = load_bench()
    turn = itertools.count()
    monkeypatch.setattr(bench, "parity_reward", lambda text, answer, **meta: float(next(turn) % 2))
    t0 = time.perf_counter()
    try:
        results = bench.main(["--size", "3b", "--device", "cpu", "--dtype", "bf16", "--modes", "lora",
                              "--completion_length", str(C), "--group_size", str(G), "--micro_batch_size", str(G),
                              "--no-gradient_checkpointing", "--logprob_chunk_size", str(CHUNK),
                              "--rollout_options", "", "--image_size", "448", "--work_dir", str(tmp_path)])
        config = AutoConfig.from_pretrained(tmp_path / "model-3b-cpu-bf16")
    finally:
        shutil.rmtree(tmp_path / "model-3b-cpu-bf16", ignore_errors=True)      # 7.5 GB of random weights
    wall = time.perf_counter() - t0
    r = results["ours"][0]
    print(f"\nrealsize: 3B LoRA bf16 GRPO step on CPU: {wall:.0f} s in all (build + save {results['t_build']:.0f} s; "
          f"rollout {r.get('t_rollout', float('nan')):.1f} s, update {r.get('t_update', float('nan')):.1f} s); "
          f"peak RSS {r.get('peak_gib', float('nan')):.1f} GiB; prompt {results['P']} tokens; loss {r.get('loss')}, "
          f"grad_norm {r.get('grad_norm')}")

    assert r["status"] == "ok", r.get("error")
    assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    assert r["len"] == C                                         # random weights: no early end token
    assert config.text_config.vocab_size == VOCAB and config.tie_word_embeddings
    assert results["image_tokens"] == 256 and results["patches"] == 1024     # 448 / 14 = 32; 32 x 32 / (2 x 2)
    assert results["P"] > results["image_tokens"]
    # Three passes over the G x C completion tokens went through the chunked log-softmax: the reference
    # (adapter disabled, no grad), the policy's forward, and its recomputation in backward.
    assert {(rows, vocab, dtype) for rows, vocab, dtype in chunks} == {(CHUNK, VOCAB, "torch.bfloat16")}
    assert sum(rows for rows, _, _ in chunks) == 3 * G * C
