"""The policy as a module that returns log-probs of chosen tokens, never full logits.

A causal VLM's forward normally returns logits of shape [N, T, V]: with Qwen's V = 152K and
16 sequences of 4K tokens that is ~40 GB in fp32 (docs/pitfalls.md). `TokenLogprobs` runs the
backbone to its last hidden states, keeps only the positions we score, and applies the LM head
chunk by chunk (`grpo.token_logprobs`). Both SFT (label tokens) and GRPO (completion tokens)
use it.

It is an `nn.Module` whose `forward` does the whole computation so that `accelerator.prepare`
can wrap it (DDP / FSDP / DeepSpeed): gradient synchronisation hooks fire on the wrapper's
forward, which calling `model.model(...)` directly would bypass.

GRPO asks for log-probs through `completion_logprobs(policy, rollout, rows, ...)`, and for the KL
reference's through `Reference.logprobs`; neither says whether a group's shared prompt runs once
(`share_prompt`, minivr1/shared_prompt.py, for the families it supports) or once per row: the
numbers are the same.

Positions, the one thing the families' forwards differ in here: the M-RoPE families (Qwen) compute
their 3-D positions themselves from `mm_token_type_ids`, which their processors return; for the
others (Idefics3 / SmolVLM: 1-D RoPE) we pass the positions `generate` gave each token, counted
over the attention mask, so a left-padded row is scored at the positions it was sampled at.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from minivr1.chat import repeat_images
from minivr1.grpo import token_logprobs
from minivr1.models import unwrap_peft


class TokenLogprobs(nn.Module):
    def __init__(self, model, chunk_size: int = 1024, share_prompt: bool = False, trim_padding: bool = False):
        from minivr1.models import fsdp_wrap_classes
        from minivr1.shared_prompt import supports

        super().__init__()
        self.model = model                    # the HF model, possibly wrapped by peft
        self.chunk_size = chunk_size
        self.share_prompt = share_prompt and supports(model)    # run a group's shared prompt once (see forward)
        # drop the columns that are padding in every row first (see forward); off by default, where it would change
        # no number but the float rounding of a batch of another width
        self.trim_padding = trim_padding
        # What accelerate's FSDP shards as units when the config names no classes: the model's own layer
        # classes (this module, which accelerate.prepare wraps, has none of its own).
        self._no_split_modules = fsdp_wrap_classes(model)

    def forward(self, input_ids, attention_mask, score_mask, pixel_values=None, image_grid_thw=None,
                mm_token_type_ids=None, temperature: float = 1.0, prompt_len: int = 0,
                group_sizes: list[int] | None = None, images_per_group: list[int] | None = None) -> torch.Tensor:
        """Log-probs of the tokens selected by `score_mask`, as a flat [M] fp32 tensor.

        input_ids, attention_mask, score_mask: [N, T]. score_mask[n, t] = 1 scores token
        input_ids[n, t] given everything before it (so it must be 0 at t = 0). The hidden state
        at t-1 predicts token t (the shift). mm_token_type_ids (1 on image tokens) lets the
        M-RoPE families compute the 3-D positions that generation used (without it they silently
        fall back to 1-D positions); without it, positions count the attention mask, as in generate.

        Groups (GRPO): with `group_sizes`, the N rows form consecutive groups of group_sizes[k]
        rows that share their first `prompt_len` columns, and pixel_values (/ image_grid_thw) hold
        each GROUP's images once (images_per_group[k] images for group k). With `share_prompt`
        each group's prompt runs once (minivr1/shared_prompt.py); otherwise the images are
        repeated for every row and the plain forward runs.

        trim_padding: the leading and trailing columns that no row attends to are dropped before the
        forward, so a micro-batch of short completions (--micro_batch_tokens sorts them together) runs
        at its own width, not the rollout's. Positions come from the attention mask, so the scored
        tokens and their order are the same.
        """
        if self.trim_padding:
            live = attention_mask.bool().any(0).nonzero()
            first, end = int(live[0]), int(live[-1]) + 1
            input_ids, attention_mask, score_mask = (x[:, first:end] for x in (input_ids, attention_mask, score_mask))
            mm_token_type_ids = None if mm_token_type_ids is None else mm_token_type_ids[:, first:end]
            prompt_len = max(0, prompt_len - first)
        hf = unwrap_peft(self.model)
        if group_sizes is not None and self.share_prompt:
            from minivr1.shared_prompt import shared_prompt_hidden
            hidden = shared_prompt_hidden(hf.model, input_ids, attention_mask, pixel_values, image_grid_thw,
                                          mm_token_type_ids, prompt_len, group_sizes)
        else:
            if group_sizes is not None and pixel_values is not None:          # each row its own copy of its images
                rows = repeat_images(_images(pixel_values, image_grid_thw), images_per_group, group_sizes)
                pixel_values, image_grid_thw = rows["pixel_values"], rows.get("image_grid_thw")
            hidden = final_hidden(hf, input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids)
        select = score_mask[:, 1:].bool()                                                    # [N, T-1]
        return token_logprobs(hidden[:, :-1][select], hf.get_output_embeddings(), input_ids[:, 1:][select],
                              temperature=temperature, chunk_size=self.chunk_size)           # [M]


def _images(pixel_values, image_grid_thw) -> dict:
    return {k: v for k, v in (("pixel_values", pixel_values), ("image_grid_thw", image_grid_thw)) if v is not None}


def final_hidden(hf, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, mm_token_type_ids=None):
    """The plain forward: the backbone's last hidden states [N, T, H] for whole rows, every row with its
    own images. Positions as generation gave them: the M-RoPE families compute theirs from
    mm_token_type_ids; for the others (and for text-only rows) they count the attention mask."""
    if mm_token_type_ids is not None and image_grid_thw is not None:
        positions = {"mm_token_type_ids": mm_token_type_ids}
    else:
        positions = {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}
    return unwrap_peft(hf).model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                 **_images(pixel_values, image_grid_thw), **positions).last_hidden_state


def completion_logprobs(policy, rollout, rows: list[int], *, temperature: float, grad: bool) -> torch.Tensor:
    """log pi(o_t | q, o_<t) of the completion tokens of rollout rows `rows` (ascending: see Rollout.forward_inputs):
    [len(rows), C], zeros at padding. A teacher-forced forward of prompt + completion through
    `policy` (the prepared TokenLogprobs), at the sampling temperature."""
    inputs = rollout.forward_inputs(rows)
    images_per_group = [rollout.images_per_prompt[k] for k in sorted({r // rollout.group_size for r in rows})] \
        if rollout.images_per_prompt else None
    with nullcontext() if grad else torch.no_grad():
        flat = policy(inputs["input_ids"], inputs["attention_mask"], inputs["score_mask"],
                      inputs.get("pixel_values"), inputs.get("image_grid_thw"), inputs.get("mm_token_type_ids"),
                      temperature=temperature, prompt_len=inputs["prompt_len"], group_sizes=inputs["group_sizes"],
                      images_per_group=images_per_group)
    return scatter_logprobs(flat, rollout.completion_mask[rows])


class Reference:
    """The KL reference policy pi_ref: a `frozen` model (full fine-tuning), or, for LoRA, the policy
    itself with its adapter disabled (`adapter_model`, the peft model inside it): the starting
    model, at no extra memory."""

    def __init__(self, policy, frozen=None, adapter_model=None):
        self.policy, self.frozen, self.adapter_model = policy, frozen, adapter_model

    def logprobs(self, rollout, rows: list[int], *, temperature: float) -> torch.Tensor:
        if self.frozen is not None:
            return completion_logprobs(self.frozen, rollout, rows, temperature=temperature, grad=False)
        with self.adapter_model.disable_adapter():
            return completion_logprobs(self.policy, rollout, rows, temperature=temperature, grad=False)


def scatter_logprobs(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put a flat [M] vector back at the 1-positions of a [S, C] mask (zeros elsewhere)."""
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    return out.masked_scatter(mask.bool(), flat)
