"""The policy as a module that returns log-probs of chosen tokens, never full logits.

A causal VLM's forward normally returns logits of shape [N, T, V]: with Qwen's V = 152K and
16 sequences of 4K tokens that is ~40 GB in fp32 (pitfall 9). `TokenLogprobs` runs the
backbone to its last hidden states, keeps only the positions we score, and applies the LM head
chunk by chunk (`grpo.token_logprobs`). Both SFT (label tokens) and GRPO (completion tokens)
use it.

It is an `nn.Module` whose `forward` does the whole computation so that `accelerator.prepare`
can wrap it (DDP / FSDP / DeepSpeed): gradient synchronisation hooks fire on the wrapper's
forward, which calling `model.model(...)` directly would bypass.
"""
from __future__ import annotations

import torch
from torch import nn

from minivr1.grpo import token_logprobs
from minivr1.models import unwrap_peft


class TokenLogprobs(nn.Module):
    def __init__(self, model, chunk_size: int = 1024):
        super().__init__()
        self.model = model                    # the HF model, possibly wrapped by peft
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, score_mask, pixel_values=None, image_grid_thw=None,
                mm_token_type_ids=None, temperature: float = 1.0, prompt_len: int = 0,
                group_sizes: list[int] | None = None) -> torch.Tensor:
        """Log-probs of the tokens selected by `score_mask`, as a flat [M] fp32 tensor.

        input_ids, attention_mask, score_mask: [N, T]. score_mask[n, t] = 1 scores token
        input_ids[n, t] given everything before it (so it must be 0 at t = 0). The hidden state
        at t-1 predicts token t: the shift that pitfall 5 is about. mm_token_type_ids (1 on image
        tokens) lets Qwen2-VL/2.5-VL compute the 3-D M-RoPE positions that generation used
        (pitfall 13); without it the model silently falls back to 1-D positions.

        Shared prompts (GRPO: the G completions of a prompt): with `prompt_len` and `group_sizes`,
        the N rows form consecutive groups of group_sizes[k] rows that share their first
        `prompt_len` columns (ids, mask, types) and their images, and pixel_values / image_grid_thw
        hold each GROUP's images once. The prompt then runs once per group and the group's rows
        continue from its KV cache: the same log-probs as the plain forward (up to float rounding;
        gradients reach the prompt through the shared cache) for 1/G of the prompt's compute.
        Not with gradient checkpointing (transformers drops the cache in checkpointed layers).
        """
        hf = unwrap_peft(self.model)
        if prompt_len and group_sizes is not None:
            hidden = _shared_prompt_hidden(hf.model, input_ids, attention_mask, pixel_values, image_grid_thw,
                                           mm_token_type_ids, prompt_len, group_sizes)
        else:
            extra = {"mm_token_type_ids": mm_token_type_ids} if mm_token_type_ids is not None else {}
            hidden = hf.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                              image_grid_thw=image_grid_thw, use_cache=False, **extra).last_hidden_state   # [N, T, H]
        select = score_mask[:, 1:].bool()                                                    # [N, T-1]
        return token_logprobs(hidden[:, :-1][select], hf.get_output_embeddings(), input_ids[:, 1:][select],
                              temperature=temperature, chunk_size=self.chunk_size)           # [M]


def _shared_prompt_hidden(backbone, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
                          prompt_len: int, group_sizes: list[int]) -> torch.Tensor:
    """Final hidden states [N, T, H] of the rows, each group's prompt computed once (see forward).

    Positions are passed explicitly, as the plain forward computes them: M-RoPE positions of the
    prompt (the model's own get_rope_index), then the completion continuing at the prompt's
    largest position + 1 in all three sections; or plain 0..T-1 for a text-only batch.
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
    if mm_token_type_ids is not None and image_grid_thw is not None and hasattr(backbone, "get_rope_index"):
        prompt_pos, _ = backbone.get_rope_index(prompt_ids, mm_token_type_ids[first, :prompt_len], image_grid_thw,
                                                attention_mask=prompt_mask)            # [3, groups, P]
        start = prompt_pos.amax(dim=(0, 2)) + 1                                       # [groups]
        completion_pos = (start[rows, None] + torch.arange(C, device=start.device)).expand(3, N, C)
    else:
        prompt_pos = torch.arange(prompt_len, device=input_ids.device).expand(len(group_sizes), prompt_len)
        completion_pos = torch.arange(prompt_len, T, device=input_ids.device).expand(N, C)
    out = backbone(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos,
                   pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=True)
    cache = out.past_key_values
    cache.batch_select_indices(rows)                                            # each row gets its group's cache
    rest = backbone(input_ids=input_ids[:, prompt_len:], attention_mask=attention_mask, position_ids=completion_pos,
                    past_key_values=cache, use_cache=True)
    return torch.cat([out.last_hidden_state[rows], rest.last_hidden_state], 1)


def scatter_logprobs(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put a flat [M] vector back at the 1-positions of a [S, C] mask (zeros elsewhere)."""
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    return out.masked_scatter(mask.bool(), flat)
