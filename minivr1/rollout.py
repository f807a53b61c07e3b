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

from minivr1.chat import select_sequences
from minivr1.models import unwrap_peft

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
             do_sample: bool = True, streamer=None, group_size: int = 1, synced_gpus: bool = False) -> Rollout:
    """Sample one completion per row of `batch` (already repeated G times per prompt for GRPO).

    group_size > 1 says the rows come in consecutive groups of that many copies of one prompt (text
    and images), as `prompt_batch(..., repeat=G)` makes them: each group's prompt is then prefilled
    once and its KV cache shared by the group's rows (`sample_shared_prompts`), with the same
    sampling as `model.generate`: the same tokens for the same seed. Without the M-RoPE inputs that
    path needs (image_grid_thw and mm_token_type_ids), or with a streamer, `model.generate` runs on
    all rows as for group_size 1.

    synced_gpus=True (DeepSpeed ZeRO-3, whose forwards gather parameters with the other processes):
    every process keeps stepping until all have finished, through `model.generate` (group_size is
    then ignored). Otherwise a process generates on its own and the model must hold whole
    parameters (see training.whole_parameters for FSDP2).
    """
    tok = processor.tokenizer
    eos = eos_token_ids(model, tok)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    # Explicit sampling settings override the checkpoint's generation_config (Qwen2.5-VL-Instruct's
    # sets top_k 1 and repetition_penalty 1.05): GRPO must sample from the distribution it scores.
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    sampling["repetition_penalty"] = 1.0
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                  suppress_tokens=vision_token_ids(tok), use_cache=True, **sampling)
    P = batch["input_ids"].shape[1]
    if group_size > 1 and do_sample and streamer is None and not synced_gpus and "image_grid_thw" in batch \
            and "mm_token_type_ids" in batch and hasattr(unwrap_peft(model).model, "get_rope_index"):
        completion = sample_shared_prompts(model, batch, group_size, **kwargs)
    else:
        completion = model.generate(**batch, streamer=streamer, synced_gpus=synced_gpus, **kwargs)[:, P:]
    mask, truncated = completion_mask(completion, eos)
    completion = torch.where(mask.bool(), completion, torch.full_like(completion, tok.pad_token_id))
    texts = tok.batch_decode(completion, skip_special_tokens=True)
    return Rollout(batch["input_ids"], batch["attention_mask"], batch.get("mm_token_type_ids"), completion, mask,
                   truncated, texts)


def sample_shared_prompts(model, batch, group_size: int, **generate_kwargs) -> torch.Tensor:
    """`model.generate(**batch, **generate_kwargs)[:, P:]` for a batch of groups of identical prompts,
    with each group's prompt encoded once: the completions [N, C].

    The decoding loop is transformers' `_sample` (do_sample=True): the logits processors
    `generate` would build for these arguments (suppressed tokens, temperature, top-p, and whatever
    the model's generation_config adds, e.g. a repetition penalty; built by transformers' own,
    private, helpers, hence the pinned version), softmax, one `torch.multinomial` draw per step for
    all rows, finished rows padded, a stop when all rows have ended or `max_new_tokens` is reached
    (EOS and length only: no stop strings or time limits); the same random draws. What differs:
    the prefill runs on one row per group and its KV cache is repeated G times, positions are
    passed explicitly (M-RoPE: generated tokens continue at the prompt's largest position + 1, as
    in `generate`), and none of generate's per-step bookkeeping for features not used here.
    """
    G = group_size
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    N, P = ids.shape
    if N % G:
        raise ValueError(f"{N} rows are not whole groups of {G}")
    image_starts = (types == 1) & (torch.nn.functional.pad(types, (1, 0))[:, :-1] != 1)
    images_per_row = image_starts.sum(1).tolist()
    firsts = list(range(0, N, G))
    lead = select_sequences(batch, firsts, images_per_row)                 # one row (and its images) per group
    again = select_sequences(lead, [i for i in range(N // G) for _ in range(G)], images_per_row[::G])
    if any(not torch.equal(again[k], batch[k]) for k in batch):
        raise ValueError(f"group_size {G}: the rows of a group are not copies of one prompt")

    hf = unwrap_peft(model)
    config, _ = hf._prepare_generation_config(None, **generate_kwargs)      # what generate() would use
    processors = hf._get_logits_processor(config, input_ids_seq_length=P, encoder_input_ids=ids, device=ids.device)
    eos = torch.tensor(config.eos_token_id, device=ids.device).flatten()
    pad = config.pad_token_id

    positions, _ = hf.model.get_rope_index(lead["input_ids"], lead["mm_token_type_ids"], lead["image_grid_thw"],
                                           attention_mask=lead["attention_mask"])     # [3, N/G, P]
    out = model(input_ids=lead["input_ids"], attention_mask=lead["attention_mask"], position_ids=positions,
                pixel_values=lead.get("pixel_values"), image_grid_thw=lead["image_grid_thw"], use_cache=True,
                logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(G)
    logits = out.logits[:, -1].float().repeat_interleave(G, 0)
    next_pos = (positions.amax(dim=(0, 2)) + 1).repeat_interleave(G)       # [N]: the first generated token's
    seqs, unfinished = ids, torch.ones(N, dtype=torch.long, device=ids.device)
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
