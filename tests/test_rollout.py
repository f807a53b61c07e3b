"""Rollout correctness on the tiny VLM of every family: completion masks, image-token suppression,
and the log-probs of a teacher-forced forward matching those seen at generation (docs/pitfalls.md
#5, #10, #12-14)."""
import pytest
import torch

from minivr1 import data, models, rollout
from minivr1.chat import IMAGE_KEYS, prompt_batch, select_sequences
from minivr1.policy import TokenLogprobs, completion_logprobs, final_hidden, scatter_logprobs
from conftest import FAMILIES


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def test_completion_mask_covers_up_to_first_eos():
    ids = torch.tensor([[5, 6, 2, 9, 2], [5, 2, 2, 2, 2], [5, 6, 7, 8, 9]])
    mask, truncated = rollout.completion_mask(ids, eos_ids=[2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def test_completion_mask_when_pad_equals_eos():
    # pad == eos == 2: a mask built as ids != pad would drop the real EOS token
    ids = torch.tensor([[4, 2, 2, 2]])
    mask, _ = rollout.completion_mask(ids, eos_ids=[2])
    assert mask.tolist() == [[1, 1, 0, 0]]


def _problems(toy_dir, n):
    problems, _ = data.read_problems(toy_dir / "data" / "rl_train.jsonl")
    # prompts of different lengths (different questions) so left padding is exercised
    by_kind = {}
    for p in problems:
        by_kind.setdefault(p.category, p)
    return list(by_kind.values())[:n]


def test_teacher_forced_logprobs_match_generation(family, family_dir, toy_dir):
    """Several prompts (left padding), G = 2 samples each: the log-probs `generate` sampled with equal
    those of the teacher-forced forward, per row (every row its own images), in micro-batches mixing
    prompts, and through the GRPO path (a Rollout holding each prompt's images once, micro-batches
    cutting a group)."""
    torch.manual_seed(0)
    model = models.load_for_inference(family_dir(family), dtype="fp32")
    processor = models.load_processor(family_dir(family))
    problems = _problems(toy_dir, 3)
    G, T = 2, 0.7
    batch = prompt_batch(processor, problems, repeat=G)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1, "prompts should need left padding"
    inputs = dict(batch)
    mrope = "mm_token_type_ids" in inputs                     # the Qwen families: 3-D M-RoPE positions
    assert mrope == family.startswith("qwen")
    if mrope:
        assert inputs["mm_token_type_ids"].sum() > 0
    eos = rollout.eos_token_ids(model, processor)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=T, top_k=0, top_p=1.0,
                         output_logits=True, return_dict_in_generate=True, eos_token_id=eos,
                         pad_token_id=processor.tokenizer.pad_token_id,
                         suppress_tokens=rollout.media_token_ids(processor))
    P = inputs["input_ids"].shape[1]
    completion = out.sequences[:, P:]
    mask, truncated = rollout.completion_mask(completion, eos)
    raw = torch.stack(out.logits, 1).float() / T                              # [S, C, V] raw logits / T
    gen_logp = raw.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)

    policy = TokenLogprobs(model, chunk_size=7)
    full = {"input_ids": torch.cat([inputs["input_ids"], completion], 1),
            "attention_mask": torch.cat([inputs["attention_mask"], mask], 1),
            "score_mask": torch.cat([torch.zeros_like(inputs["attention_mask"]), mask], 1),
            "completion_mask": mask, **{k: inputs[k] for k in IMAGE_KEYS if k in inputs}}
    if mrope:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(mask)], 1)

    def forward(b, **kw):
        with torch.no_grad():
            return policy(b["input_ids"], b["attention_mask"], b["score_mask"], b.get("pixel_values"),
                          b.get("image_grid_thw"), b.get("mm_token_type_ids"), temperature=T, **kw)

    flat = forward(full)
    if mrope:       # without the type ids the model falls back to 1-D positions: different numbers
        assert (forward({**full, "mm_token_type_ids": None}) - flat).abs().max() > 1e-4
    ours = scatter_logprobs(flat, mask)
    assert mask.sum() > len(problems) * G                       # something was generated
    torch.testing.assert_close(ours[mask.bool()], gen_logp[mask.bool()], atol=1e-4, rtol=1e-4)

    # the same numbers from a micro-batch holding sequences of different prompts (own images)
    idx = [1, 4]
    sub = select_sequences(full, idx, images_per_seq=[1] * len(mask))
    torch.testing.assert_close(scatter_logprobs(forward(sub), sub["completion_mask"]), ours[idx], atol=1e-4, rtol=1e-4)

    # and through GRPO's path: each prompt's images once in the Rollout, micro-batches [0, 3) and [3, 6)
    once = prompt_batch(processor, problems)
    ro = rollout.Rollout(inputs["input_ids"], inputs["attention_mask"], inputs.get("mm_token_type_ids"), completion,
                         mask, truncated, [""] * len(mask), G, {k: once[k] for k in IMAGE_KEYS if k in once},
                         [1] * len(problems))
    grpo = torch.cat([completion_logprobs(policy, ro, rows, temperature=T, grad=False) for rows in ([0, 1, 2], [3, 4, 5])])
    torch.testing.assert_close(grpo[mask.bool()], gen_logp[mask.bool()], atol=1e-4, rtol=1e-4)


def test_generate_never_samples_image_tokens(family, family_dir, toy_dir):
    model = models.load_for_inference(family_dir(family), dtype="fp32")
    processor = models.load_processor(family_dir(family))
    media = rollout.media_token_ids(processor)
    # make an image token the most likely continuation everywhere: its rows in the LM head are set to a
    # large multiple of the final hidden state's direction
    torch.manual_seed(0)
    batch = prompt_batch(processor, _problems(toy_dir, 2), repeat=2)
    inputs = dict(batch)
    with torch.no_grad():
        hidden = final_hidden(model, inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"),
                              inputs.get("image_grid_thw"), inputs.get("mm_token_type_ids"))[:, -1].mean(0)
        model.get_output_embeddings().weight[media] = hidden / hidden.norm() * 50
    unsuppressed = model.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=0)[:, inputs["input_ids"].shape[1]:]
    assert torch.isin(unsuppressed, torch.tensor(media)).any(), "precondition: image tokens are likely"
    ro = rollout.generate(model, processor, batch, 16)
    assert not torch.isin(ro.completion_ids, torch.tensor(media)).any()
