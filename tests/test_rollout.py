"""Rollout correctness on the tiny VLM: completion masks, vision-token suppression, and the
log-probs of a teacher-forced forward matching those seen at generation (docs/pitfalls.md #5, #10, #12-14)."""
import torch

from minivr1 import data, models, rollout
from minivr1.chat import prompt_batch, select_sequences
from minivr1.policy import TokenLogprobs, scatter_logprobs


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


def test_teacher_forced_logprobs_match_generation(tiny_model_dir, processor, toy_dir):
    torch.manual_seed(0)
    model = models.load_for_inference(tiny_model_dir, dtype="fp32")
    problems = _problems(toy_dir, 3)
    G, T = 2, 0.7
    batch = prompt_batch(processor, problems, repeat=G)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1, "prompts should need left padding"
    inputs = dict(batch)
    assert inputs["mm_token_type_ids"].sum() > 0              # 3-D M-RoPE positions are in play
    eos = rollout.eos_token_ids(model, processor.tokenizer)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=True, temperature=T, top_k=0, top_p=1.0,
                         output_logits=True, return_dict_in_generate=True, eos_token_id=eos,
                         pad_token_id=processor.tokenizer.pad_token_id,
                         suppress_tokens=rollout.vision_token_ids(processor.tokenizer))
    P = inputs["input_ids"].shape[1]
    completion = out.sequences[:, P:]
    mask, _ = rollout.completion_mask(completion, eos)
    raw = torch.stack(out.logits, 1).float() / T                              # [S, C, V] raw logits / T
    gen_logp = raw.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)

    policy = TokenLogprobs(model, chunk_size=7)
    full = {"input_ids": torch.cat([inputs["input_ids"], completion], 1),
            "attention_mask": torch.cat([inputs["attention_mask"], mask], 1),
            "score_mask": torch.cat([torch.zeros_like(inputs["attention_mask"]), mask], 1),
            "completion_mask": mask, "pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"],
            "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(mask)], 1)}
    with torch.no_grad():
        flat = policy(full["input_ids"], full["attention_mask"], full["score_mask"], full["pixel_values"],
                      full["image_grid_thw"], full["mm_token_type_ids"], temperature=T)
        # without the type ids the model falls back to 1-D positions: different numbers
        flat_1d = policy(full["input_ids"], full["attention_mask"], full["score_mask"], full["pixel_values"],
                         full["image_grid_thw"], temperature=T)
    assert (flat_1d - flat).abs().max() > 1e-4
    ours = scatter_logprobs(flat, mask)
    assert mask.sum() > len(problems) * G                       # something was generated
    torch.testing.assert_close(ours[mask.bool()], gen_logp[mask.bool()], atol=1e-4, rtol=1e-4)

    # the same numbers from a micro-batch holding sequences of different prompts (own image blocks)
    idx = [1, 4]
    sub = select_sequences(full, idx, images_per_seq=[1] * len(mask))
    with torch.no_grad():
        flat_sub = policy(sub["input_ids"], sub["attention_mask"], sub["score_mask"], sub["pixel_values"],
                          sub["image_grid_thw"], sub["mm_token_type_ids"], temperature=T)
    torch.testing.assert_close(scatter_logprobs(flat_sub, sub["completion_mask"]), ours[idx], atol=1e-4, rtol=1e-4)


def test_generate_never_samples_vision_tokens(tiny_model_dir, processor, toy_dir):
    model = models.load_for_inference(tiny_model_dir, dtype="fp32")
    vision = rollout.vision_token_ids(processor.tokenizer)
    # make a vision token the most likely continuation everywhere: the row of <|image_pad|> in the
    # LM head is set to a large multiple of the final norm's output direction
    torch.manual_seed(0)
    batch = prompt_batch(processor, _problems(toy_dir, 2), repeat=2)
    inputs = dict(batch)
    with torch.no_grad():
        hidden = model.model(**inputs).last_hidden_state[:, -1].mean(0)
        model.get_output_embeddings().weight[vision] = hidden / hidden.norm() * 50
    unsuppressed = model.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=0)[:, inputs["input_ids"].shape[1]:]
    assert torch.isin(unsuppressed, torch.tensor(vision)).any(), "precondition: vision tokens are likely"
    ro = rollout.generate(model, processor, batch, 16)
    assert not torch.isin(ro.completion_ids, torch.tensor(vision)).any()
