"""The shared-prompt speed-ups (minivr1/shared_prompt.py) give what the plain paths give.

A GRPO group's G sequences share one prompt; it is processed, prefilled and run through the
log-prob forwards once per group. Checked against the reference paths: the same prompt tensors,
the same sampled tokens for the same seed (and the same distributions at every step), the same
log-probs and gradients up to float rounding.
"""
import copy

import pytest
import torch

from minivr1 import models
from minivr1.chat import problem_messages, prompt_batch
from minivr1.policy import TokenLogprobs, completion_logprobs
from minivr1.rollout import HFEngine, make_engine
from minivr1.shared_prompt import SUPPORTED, SharedPrefixEngine, shared_prompt_hidden, supports
from conftest import FAMILIES, make_eos_likely


@pytest.fixture(scope="module", params=SUPPORTED)
def family(request):
    """The speed-ups are checked on every family they declare (and only used there: last test)."""
    return request.param


@pytest.fixture(scope="module")
def processor(family, family_dir):
    return models.load_processor(family_dir(family))


@pytest.fixture(scope="module")
def eos_model(family, family_dir, processor, problems):
    """The tiny model with its end-of-turn token made likely, so completions stop at different lengths."""
    model = models.load_for_inference(family_dir(family), dtype="fp32")
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
def test_shared_prefix_engine_draws_the_same_tokens_as_generate(eos_model, processor, problems, temperature, top_p,
                                                                monkeypatch):
    """Same tokens, and the same distributions at every step: the probabilities handed to
    torch.multinomial are recorded (a position or cache error moves them, even where the draw
    happens to land on the same token)."""
    G = 4
    real_multinomial, probs = torch.multinomial, {"hf": [], "shared_prefix": []}

    def run(engine):
        monkeypatch.setattr(torch, "multinomial", lambda p, *a, **k: probs[engine.name].append(p.clone())
                            or real_multinomial(p, *a, **k))
        torch.manual_seed(3)
        return engine.generate(problems, G, 20)

    plain = run(HFEngine(eos_model, processor, temperature, top_p))
    shared = run(SharedPrefixEngine(eos_model, processor, temperature, top_p))
    lengths = plain.completion_mask.sum(1)
    assert len(set(lengths.tolist())) >= 3, f"precondition: varied completion lengths, got {lengths.tolist()}"
    for field in ("prompt_ids", "prompt_mask", "prompt_types", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(shared, field), getattr(plain, field)), field
    assert shared.texts == plain.texts
    assert len(probs["shared_prefix"]) == len(probs["hf"]) == plain.completion_ids.shape[1]
    torch.testing.assert_close(torch.stack(probs["shared_prefix"]), torch.stack(probs["hf"]), atol=1e-6, rtol=1e-4)


def test_the_engine_falls_back_to_the_reference_where_it_must(eos_model, processor):
    assert make_engine("shared_prefix", eos_model, processor, 1.0, 1.0).name == "shared_prefix"
    assert make_engine("shared_prefix", eos_model, processor, 1.0, 1.0, synced_gpus=True).name == "hf"   # ZeRO-3
    with pytest.raises(ValueError, match="unknown rollout engine"):
        make_engine("vllm", eos_model, processor, 1.0, 1.0)


def test_shared_prompt_forward_rejects_rows_that_are_not_groups(eos_model):
    ids = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 8]])          # two rows, different "prompts"
    with pytest.raises(ValueError, match="not have the same prompt"):
        shared_prompt_hidden(eos_model.model, ids, torch.ones_like(ids), None, None, None, prompt_len=2,
                             group_sizes=[2])


@pytest.mark.parametrize("micro", [12, 5])           # whole groups; groups cut by micro-batches
def test_shared_prompt_logprobs_and_gradients_match_the_plain_forward(eos_model, processor, problems, micro):
    G = 4
    model = copy.deepcopy(eos_model).requires_grad_(True)
    torch.manual_seed(5)
    ro = HFEngine(model, processor, 1.0, 1.0).generate(problems, G, 12)
    assert len(set(ro.completion_mask.sum(1).tolist())) >= 3    # some rows end early: right padding in play
    rows = [list(range(i, min(i + micro, 12))) for i in range(0, 12, micro)]

    def run(share: bool):
        model.zero_grad()
        policy = TokenLogprobs(model, chunk_size=7, share_prompt=share).train()
        logp = torch.cat([completion_logprobs(policy, ro, r, temperature=0.7, grad=True) for r in rows])
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = run(False)
    shared, shared_grads = run(True)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert plain_grads.keys() == shared_grads.keys()
    assert any(n.startswith("model.visual") for n in plain_grads)          # gradients reach the vision tower
    for n in plain_grads:
        torch.testing.assert_close(shared_grads[n], plain_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_shared_prompt_logprobs_text_only(eos_model, processor):
    """No images: 1-D positions counting the attention mask, as the plain forward (and generate) number them."""
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
    with torch.no_grad():
        plain = TokenLogprobs(eos_model)(full_ids, full_mask, score)
        shared = TokenLogprobs(eos_model, share_prompt=True)(full_ids, full_mask, score, prompt_len=ids.shape[1],
                                                             group_sizes=[G, G])
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("other", [f for f in FAMILIES if f not in SUPPORTED])
def test_other_families_take_the_plain_paths(other, family_dir, toy_dir, problems):
    """A family the speed-ups do not declare is never run through them: the shared-prefix engine samples
    exactly what the reference engine samples, and the log-prob module runs the plain forward."""
    model = models.load_for_inference(family_dir(other), dtype="fp32")
    proc = models.load_processor(family_dir(other))
    assert not supports(model) and not TokenLogprobs(model, share_prompt=True).share_prompt

    def run(engine):
        torch.manual_seed(3)
        return engine.generate(problems, 2, 6)

    plain, shared = run(HFEngine(model, proc, 1.0, 1.0)), run(SharedPrefixEngine(model, proc, 1.0, 1.0))
    assert torch.equal(shared.completion_ids, plain.completion_ids) and shared.texts == plain.texts
    assert make_engine("shared_prefix", model, proc, 1.0, 1.0).name == "hf"      # what train_grpo.py reports
