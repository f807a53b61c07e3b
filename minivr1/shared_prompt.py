"""Speed-ups: the G completions of a GRPO group share one prompt, so encode it once.

Nothing here changes a number the plain path computes (tests/test_shared_prompt.py checks the same
sampled tokens and the same log-probs and gradients); it saves the prompt's compute G-1 times:

  * `SharedPrefixEngine` (`--rollout shared_prefix`, the default): the rollout prefills each
    prompt once and copies its KV cache to the group's G rows, then samples as `model.generate`
    does, with the same random draws.
  * `shared_prompt_hidden`: the log-prob forward runs each group's prompt once and continues every
    row of the group from its KV cache (`policy.TokenLogprobs` uses it when `share_prompt` is on).

Both compute the Qwen families' 3-D M-RoPE positions themselves with the model's own
`get_rope_index`, so they are for the families listed in `SUPPORTED` only, each tested equal to the
plain path (tests/test_shared_prompt.py); any other model gets the plain path (`supports`): the
engine falls back to `HFEngine`, `policy.TokenLogprobs` to the plain forward.

The sampler rebuilds `model.generate`'s logits processors with two PRIVATE transformers helpers,
`GenerationMixin._prepare_generation_config` and `GenerationMixin._get_logits_processor`
(`generation_processors`; the transformers version is pinned for this reason: re-check them on an
upgrade). Nothing else in minivr1 calls a private transformers API (`minivr1/static_engine.py`
calls them through `generation_processors`).
"""
from __future__ import annotations

import torch

from minivr1.models import unwrap_peft
from minivr1.rollout import HFEngine, Rollout, eval_mode, finish, sampling_kwargs


# Model types whose positions these speed-ups compute (M-RoPE from get_rope_index) and whose cache can be
# repeated per row, each tested equal to the plain path. Not Qwen3.5: its Gated DeltaNet layers' cache cannot
# be repeated or selected per row (transformers 5.23: LinearAttentionLayer has no batch_select_indices); not
# Idefics3 / SmolVLM (1-D positions, not written here).
SUPPORTED = ("qwen2_5_vl", "qwen3_vl")


def supports(model) -> bool:
    """Whether these speed-ups are exact for this model: a family in SUPPORTED (M-RoPE positions from its
    own get_rope_index). Anything else runs the plain path."""
    hf = unwrap_peft(model)
    return getattr(hf.config, "model_type", None) in SUPPORTED and hasattr(getattr(hf, "model", None), "get_rope_index")


class SharedPrefixEngine(HFEngine):
    """`HFEngine` with each group's prompt prefilled once (falls back to it where unsupported)."""

    name = "shared_prefix"

    @torch.no_grad()
    def generate(self, problems, G: int, max_new_tokens: int) -> Rollout:
        batch, images, counts = self.prompts(problems)
        if G == 1 or "mm_token_type_ids" not in batch or not images or not supports(self.model):
            return super().generate(problems, G, max_new_tokens)
        lead = {**batch, **images}
        kwargs = sampling_kwargs(self.model, self.processor, max_new_tokens, self.temperature, self.top_p)
        with eval_mode(self.model):
            completion = sample_shared_prompts(self.model, lead, G, **kwargs)
        rows = {k: v.repeat_interleave(G, 0) for k, v in lead.items() if k not in images}
        return finish(completion, rows, self.processor.tokenizer, kwargs["eos_token_id"], G, images, counts)


def sample_shared_prompts(model, lead: dict, G: int, **generate_kwargs) -> torch.Tensor:
    """What `model.generate(**rows, **generate_kwargs)[:, P:]` returns for the rows that repeat each
    prompt of `lead` (one row per prompt, with its images) G times: the completions [N, C], N = G x prompts.

    The decoding loop is transformers' `_sample` (do_sample=True): the logits processors `generate`
    would build for these arguments (suppressed tokens, temperature, top-p, and whatever the model's
    generation_config adds; built by transformers' private helpers), softmax, one
    `torch.multinomial` draw per step for all rows, finished rows padded, a stop when all rows have
    ended or `max_new_tokens` is reached (EOS and length only: no stop strings or time limits); the
    same random draws. What differs: the prefill runs on one row per prompt and its KV cache is
    repeated G times, positions are passed explicitly (M-RoPE: generated tokens continue at the
    prompt's largest position + 1, as in `generate`), and none of generate's per-step bookkeeping
    for features not used here.
    """
    ids, mask = lead["input_ids"], lead["attention_mask"]
    config, processors = generation_processors(model, ids.repeat_interleave(G, 0), **generate_kwargs)
    eos = torch.tensor(config.eos_token_id, device=ids.device).flatten()
    pad = config.pad_token_id
    P = ids.shape[1]

    cache, logits, next_pos = prefill_prompts(model, lead)
    cache.batch_repeat_interleave(G)
    logits, next_pos = logits.repeat_interleave(G, 0), next_pos.repeat_interleave(G)
    N = logits.shape[0]
    seqs, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    unfinished = torch.ones(N, dtype=torch.long, device=ids.device)
    for t in range(generate_kwargs["max_new_tokens"]):
        scores = processors(seqs, logits)
        tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        tokens = tokens * unfinished + pad * (1 - unfinished)
        seqs = torch.cat([seqs, tokens[:, None]], 1)
        unfinished = unfinished & ~torch.isin(tokens, eos)
        if t + 1 == generate_kwargs["max_new_tokens"] or unfinished.max() == 0:
            break
        mask = torch.cat([mask, mask.new_ones(N, 1)], 1)
        step_pos = (next_pos + t).view(1, N, 1).expand(3, N, 1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=step_pos, past_key_values=cache,
                       use_cache=True).logits[:, -1].float()
    return seqs[:, P:]


def generation_processors(model, rows_ids: torch.Tensor, **generate_kwargs):
    """The generation config and the logits processors `model.generate(rows_ids, **generate_kwargs)`
    would use (built by transformers' two PRIVATE helpers; see the module docstring)."""
    hf = unwrap_peft(model)
    config, _ = hf._prepare_generation_config(None, **generate_kwargs)      # private: what generate() would use
    processors = hf._get_logits_processor(config, input_ids_seq_length=rows_ids.shape[1], encoder_input_ids=rows_ids,
                                          device=rows_ids.device)          # private
    return config, processors


def prefill_prompts(model, lead: dict):
    """Prefill each prompt of `lead` (one row per prompt, with its images) once: its KV cache (a
    DynamicCache, one row per prompt), the last position's logits [prompts, V] in fp32, and the
    position of the first generated token [prompts] (M-RoPE: the prompt's largest position + 1, in
    all three sections, as in `generate`)."""
    ids, mask = lead["input_ids"], lead["attention_mask"]
    positions, _ = unwrap_peft(model).model.get_rope_index(ids, lead["mm_token_type_ids"], lead["image_grid_thw"],
                                                           attention_mask=mask)        # [3, prompts, P]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=lead.get("pixel_values"),
                image_grid_thw=lead["image_grid_thw"], use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1].float(), positions.amax(dim=(0, 2)) + 1


def shared_prompt_hidden(backbone, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
                         prompt_len: int, group_sizes: list[int]) -> torch.Tensor:
    """Final hidden states [N, T, H] of N rows in consecutive groups of group_sizes[k] rows that share
    their first `prompt_len` columns (ids, mask, types); pixel_values / image_grid_thw hold each
    GROUP's images once. Each group's prompt runs once; its rows continue from its KV cache.

    Positions are passed explicitly, as the plain forward computes them: M-RoPE positions of the
    prompt (the model's own get_rope_index), then the completion continuing at the prompt's
    largest position + 1 in all three sections; or, for a text-only batch, 1-D positions counting the
    attention mask (as generate and the plain forward number a left-padded row's tokens). Gradients
    reach the prompt through the shared cache. Not with gradient checkpointing (transformers drops
    the cache in checkpointed layers).
    """
    N, T = input_ids.shape
    C = T - prompt_len
    if C < 1:
        raise ValueError(f"shared prompts: no columns after the {prompt_len}-column prompt")
    sizes = torch.tensor(group_sizes, device=input_ids.device)
    if int(sizes.sum()) != N:
        raise ValueError(f"group_sizes {group_sizes} do not add up to the {N} rows")
    first = torch.cumsum(sizes, 0) - sizes                                      # each group's first row
    rows = torch.repeat_interleave(torch.arange(len(group_sizes), device=input_ids.device), sizes)  # row -> group
    prompt_ids, prompt_mask = input_ids[first, :prompt_len], attention_mask[first, :prompt_len]
    if not (torch.equal(input_ids[:, :prompt_len], prompt_ids[rows])
            and torch.equal(attention_mask[:, :prompt_len], prompt_mask[rows])):
        raise ValueError("shared prompts: rows of a group do not have the same prompt")
    if mm_token_type_ids is not None and image_grid_thw is not None:
        prompt_pos, _ = backbone.get_rope_index(prompt_ids, mm_token_type_ids[first, :prompt_len], image_grid_thw,
                                                attention_mask=prompt_mask)            # [3, groups, P]
        start = prompt_pos.amax(dim=(0, 2)) + 1                                       # [groups]
        completion_pos = (start[rows, None] + torch.arange(C, device=start.device)).expand(3, N, C)
    else:                                   # 1-D positions counting the attention mask, as generate's
        prompt_pos = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)                  # [groups, P]
        completion_pos = prompt_mask.sum(-1)[rows, None] + torch.arange(C, device=input_ids.device)
    out = backbone(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos,
                   pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=True)
    cache = out.past_key_values
    cache.batch_select_indices(rows)                                            # each row gets its group's cache
    rest = backbone(input_ids=input_ids[:, prompt_len:], attention_mask=attention_mask, position_ids=completion_pos,
                    past_key_values=cache, use_cache=True)
    return torch.cat([out.last_hidden_state[rows], rest.last_hidden_state], 1)
