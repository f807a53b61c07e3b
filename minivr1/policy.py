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
                mm_token_type_ids=None, temperature: float = 1.0) -> torch.Tensor:
        """Log-probs of the tokens selected by `score_mask`, as a flat [M] fp32 tensor.

        input_ids, attention_mask, score_mask: [N, T]. score_mask[n, t] = 1 scores token
        input_ids[n, t] given everything before it (so it must be 0 at t = 0). The hidden state
        at t-1 predicts token t: the shift that pitfall 5 is about. mm_token_type_ids (1 on image
        tokens) lets Qwen2-VL/2.5-VL compute the 3-D M-RoPE positions that generation used
        (pitfall 13); without it the model silently falls back to 1-D positions.
        """
        hf = unwrap_peft(self.model)
        extra = {"mm_token_type_ids": mm_token_type_ids} if mm_token_type_ids is not None else {}
        hidden = hf.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                          image_grid_thw=image_grid_thw, use_cache=False, **extra).last_hidden_state   # [N, T, H]
        select = score_mask[:, 1:].bool()                                                    # [N, T-1]
        return token_logprobs(hidden[:, :-1][select], hf.get_output_embeddings(), input_ids[:, 1:][select],
                              temperature=temperature, chunk_size=self.chunk_size)           # [M]


def scatter_logprobs(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put a flat [M] vector back at the 1-positions of a [S, C] mask (zeros elsewhere)."""
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    return out.masked_scatter(mask.bool(), flat)
