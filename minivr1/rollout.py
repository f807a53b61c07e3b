"""Batched generation shared by GRPO rollouts and evaluation.

`generate` takes a left-padded prompt batch (see `chat.prompt_batch`), samples with the KV
cache, and returns the completions with their mask: 1 on every token up to and including the
first end-of-turn token, 0 after it (never `ids != pad_id`, which breaks when pad == eos).
Vision special tokens are suppressed: a sampled `<|image_pad|>` would break the next forward
("image features and image tokens do not match", pitfall 10).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>"]


@dataclass
class Rollout:
    prompt_ids: torch.Tensor          # [N, P] left-padded prompt tokens
    prompt_mask: torch.Tensor         # [N, P]
    prompt_types: torch.Tensor | None # [N, P] mm_token_type_ids (1 on image tokens) if the processor gives them
    completion_ids: torch.Tensor      # [N, C] sampled tokens, padded after the first EOS
    completion_mask: torch.Tensor     # [N, C] 1 up to and including the first EOS
    truncated: torch.Tensor           # [N] bool: no EOS within the length limit
    texts: list[str]                  # decoded completions (special tokens dropped)


def vision_token_ids(tokenizer) -> list[int]:
    unk = tokenizer.unk_token_id
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return sorted({i for i in ids if i is not None and i != unk})


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return sorted(set(ids + [tokenizer.eos_token_id] + ([im_end] if im_end is not None else [])) - {None})


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, C] mask covering tokens up to and including the first EOS, and [N] truncated flags."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    # number of EOS strictly before each position: positions after the first EOS have >= 1
    eos_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return (eos_before == 0).long(), ~is_eos.any(dim=1)


@torch.no_grad()
def generate(model, processor, batch, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             do_sample: bool = True, streamer=None) -> Rollout:
    """Sample one completion per row of `batch` (already repeated G times per prompt for GRPO)."""
    tok = processor.tokenizer
    eos = eos_token_ids(model, tok)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                         suppress_tokens=vision_token_ids(tok), use_cache=True, streamer=streamer, **sampling)
    P = batch["input_ids"].shape[1]
    completion = out[:, P:]
    mask, truncated = completion_mask(completion, eos)
    completion = torch.where(mask.bool(), completion, torch.full_like(completion, tok.pad_token_id))
    texts = tok.batch_decode(completion, skip_special_tokens=True)
    return Rollout(batch["input_ids"], batch["attention_mask"], batch.get("mm_token_type_ids"), completion, mask,
                   truncated, texts)
