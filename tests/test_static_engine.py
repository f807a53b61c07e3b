"""The static-cache decode engine (minivr1/static_engine.py) samples what `model.generate` samples.

Checked against the reference engine (HFEngine: `model.generate` on every row): the same tokens for
the same seed, drawn from the same probabilities at every step (the tensors handed to
torch.multinomial are recorded: a position, cache or mask error moves them even where a draw happens
to land on the same token); and the log-probs of those tokens under the distribution they were
drawn from equal the teacher-forced forward's (what GRPO's update recomputes). The compiled step
(`--rollout static_compiled`) is checked for the same tokens in the slow tier (it compiles for ~1 min).
"""
import pytest
import torch

from minivr1 import models
from minivr1.chat import prompt_batch
from minivr1.policy import TokenLogprobs, completion_logprobs
from minivr1.rollout import HFEngine, make_engine
from minivr1.shared_prompt import SharedPrefixEngine
from minivr1.static_engine import Sampler, StaticCacheEngine, decoder_supported
from conftest import make_eos_likely


@pytest.fixture(scope="module")
def eos_model(tiny_model_dir, processor, problems):
    """The tiny model with <|im_end|> made likely, so completions stop at different lengths."""
    model = models.load_for_inference(tiny_model_dir, dtype="fp32")
    make_eos_likely(model, processor, prompt_batch(processor, problems, repeat=4), 16)
    return model


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_static_engine_draws_the_same_tokens_as_generate(eos_model, processor, problems, temperature, top_p,
                                                         monkeypatch):
    G, L = 4, 20
    real_multinomial, probs = torch.multinomial, {"hf": [], "static": []}
    runs = {}
    for engine in (HFEngine(eos_model, processor, temperature, top_p),
                   StaticCacheEngine(eos_model, processor, temperature, top_p)):
        monkeypatch.setattr(torch, "multinomial", lambda p, *a, **k: probs[engine.name].append(p.clone())
                            or real_multinomial(p, *a, **k))
        torch.manual_seed(3)
        ro = engine.generate(problems, G, L)
        runs[engine.name] = ro, probs[engine.name], torch.rand(1)    # the random stream goes on from the same state
    (plain, plain_probs, plain_after), (static, static_probs, static_after) = runs["hf"], runs["static"]
    lengths = plain.completion_mask.sum(1)
    assert len(set(lengths.tolist())) >= 3, f"precondition: varied completion lengths, got {lengths.tolist()}"
    for field in ("prompt_ids", "prompt_mask", "prompt_types", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(static, field), getattr(plain, field)), field
    assert static.texts == plain.texts and static.images_per_prompt == plain.images_per_prompt
    assert len(static_probs) == len(plain_probs) == plain.completion_ids.shape[1]
    torch.testing.assert_close(torch.stack(static_probs), torch.stack(plain_probs), atol=1e-6, rtol=1e-4)
    assert torch.equal(static_after, plain_after)


@pytest.mark.parametrize("n_prompts, dtype", [(3, "fp32"), (1, "fp32"), (3, "bf16")])   # left padding, none; bf16
def test_static_engine_computes_the_shared_prefix_engines_numbers_bit_for_bit(eos_model, tiny_model_dir, processor,
                                                                             problems, n_prompts, dtype, monkeypatch):
    """Eager, the static step attends over the filled columns with the kernel generate's cache uses, so
    its probabilities are SharedPrefixEngine's exactly: same runs, same numbers, engine for engine
    (in bf16 too: the rotary embedding, norms and head in the model's own dtype, as generate runs them)."""
    model = eos_model if dtype == "fp32" else models.load_for_inference(tiny_model_dir, dtype="bf16")
    real_multinomial, probs = torch.multinomial, {"shared_prefix": [], "static": []}
    out = {}
    for engine in (SharedPrefixEngine(model, processor, 0.7, 1.0), StaticCacheEngine(model, processor, 0.7, 1.0)):
        monkeypatch.setattr(torch, "multinomial", lambda p, *a, **k: probs[engine.name].append(p.clone())
                            or real_multinomial(p, *a, **k))
        torch.manual_seed(1)
        out[engine.name] = engine.generate(problems[:n_prompts], 4, 16).completion_ids
    assert torch.equal(out["static"], out["shared_prefix"])
    assert torch.equal(torch.stack(probs["static"]), torch.stack(probs["shared_prefix"]))


def test_static_engine_logprobs_equal_the_teacher_forced_forward(eos_model, processor, problems, monkeypatch):
    """log softmax(raw logits / T) at each sampled token, as the decode step computed the raw logits,
    equals what the training forward recomputes for the same rollout (plain and shared-prompt)."""
    T, G = 0.7, 4
    seen = []                                 # the raw logits [N, V] each sampling step received
    real_call = Sampler.__call__
    monkeypatch.setattr(Sampler, "__call__", lambda self, logits, unfinished: seen.append(logits.clone())
                        or real_call(self, logits, unfinished))
    torch.manual_seed(5)
    ro = StaticCacheEngine(eos_model, processor, T, 1.0).generate(problems, G, 12)
    raw = torch.stack(seen, 1)                                                   # [N, C, V]
    gen_logp = (raw / T).log_softmax(-1).gather(-1, ro.completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = ro.completion_mask.bool()
    assert mask.sum() > len(problems) * G and len(set(ro.completion_mask.sum(1).tolist())) >= 3
    rows = list(range(len(ro.texts)))
    for share in (False, True):
        policy = TokenLogprobs(eos_model, chunk_size=7, share_prompt=share)
        logp = completion_logprobs(policy, ro, rows, temperature=T, grad=False)
        torch.testing.assert_close(logp[mask], gen_logp[mask], atol=1e-5, rtol=1e-5)


def test_sampler_applies_generates_processors(eos_model, processor, problems):
    """Sampler's scores equal transformers' own processors' for the same settings (top-p cuts, the
    vision tokens suppressed, temperature)."""
    from minivr1.rollout import sampling_kwargs
    from minivr1.shared_prompt import generation_processors

    ids = prompt_batch(processor, problems)["input_ids"]
    _, processors = generation_processors(eos_model, ids, **sampling_kwargs(eos_model, processor, 8, 0.7, 0.8))
    sampler = Sampler(processors, [0], 0, torch.device("cpu"))
    assert [op[0] for op in sampler.ops] == ["suppress", "temperature", "top_p"]
    torch.manual_seed(0)
    logits = torch.randn(len(problems), eos_model.config.text_config.vocab_size) * 3
    probs = []
    real = torch.multinomial
    torch.multinomial = lambda p, *a, **k: probs.append(p) or real(p, *a, **k)
    try:
        sampler(logits, torch.ones(len(problems), dtype=torch.long))
    finally:
        torch.multinomial = real
    torch.testing.assert_close(probs[0], torch.softmax(processors(ids, logits.clone()), -1), atol=0, rtol=0)


def test_the_engine_falls_back_where_it_must(eos_model, processor):
    assert decoder_supported(eos_model)
    assert make_engine("static", eos_model, processor, 1.0, 1.0).name == "static"
    assert make_engine("static", eos_model, processor, 1.0, 1.0, synced_gpus=True).name == "hf"       # ZeRO-3
    # a processor the step does not implement (a checkpoint's no_repeat_ngram_size): the shared-prefix engine
    eos_model.generation_config.no_repeat_ngram_size = 2
    try:
        engine = make_engine("static", eos_model, processor, 1.0, 1.0)
    finally:
        eos_model.generation_config.no_repeat_ngram_size = None
    assert type(engine) is SharedPrefixEngine
    with pytest.raises(ValueError, match="unknown rollout engine"):
        make_engine("vllm", eos_model, processor, 1.0, 1.0)


@pytest.mark.slow
def test_compiled_step_draws_the_same_tokens_as_generate(eos_model, processor, problems):
    """`--rollout static_compiled`: torch.compile's step (C++ kernels here; inductor told to use aten's
    random ops) gives generate's tokens. ~1 minute: the first call compiles."""
    G, L = 4, 20
    out = {}
    for engine in (HFEngine(eos_model, processor, 0.7, 0.9), make_engine("static_compiled", eos_model, processor, 0.7, 0.9)):
        torch.manual_seed(3)
        out[engine.name] = engine.generate(problems, G, L)
    assert torch.equal(out["static_compiled"].completion_ids, out["hf"].completion_ids)
    assert torch.equal(out["static_compiled"].completion_mask, out["hf"].completion_mask)
