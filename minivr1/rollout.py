"""Rollouts: sampling completions from the policy, for GRPO and for evaluation.

`generate` takes a left-padded prompt batch (see `chat.prompt_batch`), samples with the KV
cache (transformers' `model.generate`), and returns the completions with their mask: 1 on every
token up to and including the first end-of-turn token, 0 after it (never `ids != pad_id`, which
breaks when pad == eos). Vision special tokens are suppressed: a sampled `<|image_pad|>` would
break the next forward ("image features and image tokens do not match"; docs/pitfalls.md).

GRPO asks a rollout *engine* for its completions, through one method:

    engine.generate(problems, G, max_new_tokens) -> Rollout      # G completions of each problem

`HFEngine` here is the reference: `model.generate` on every row. A faster engine plugs in behind
the same method without the training loop knowing (`minivr1/shared_prompt.py`: each group's prompt
encoded once; `minivr1/static_engine.py`: that, then a fixed-shape decode step over preallocated
KV buffers; a vLLM engine would be another). `make_engine` picks one by name (`--rollout`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from minivr1.chat import prompt_batch, repeat_images

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>"]


@dataclass
class Rollout:
    """G completions of each of N/G prompts; rows i*G .. i*G+G-1 belong to prompt i."""

    prompt_ids: torch.Tensor          # [N, P] left-padded prompt tokens
    prompt_mask: torch.Tensor         # [N, P]
    prompt_types: torch.Tensor | None # [N, P] mm_token_type_ids (1 on image tokens) if the processor gives them
    completion_ids: torch.Tensor      # [N, C] sampled tokens, padded after the first EOS
    completion_mask: torch.Tensor     # [N, C] 1 up to and including the first EOS
    truncated: torch.Tensor           # [N] bool: no EOS within the length limit
    texts: list[str]                  # decoded completions (special tokens dropped)
    group_size: int = 1               # G
    images: dict = field(default_factory=dict)   # pixel_values, image_grid_thw of each PROMPT, once
    images_per_prompt: list[int] = field(default_factory=list)

    def forward_inputs(self, rows: list[int]) -> dict:
        """The teacher-forced forward's inputs for the contiguous rows `rows`: prompt + completion
        tokens, `score_mask` on the completion tokens, and the images of each prompt the rows
        belong to once, with `group_sizes` (how many of the rows share each of those prompts)."""
        if rows != list(range(rows[0], rows[-1] + 1)):
            raise ValueError(f"rows must be a contiguous range, got {rows}")
        G = self.group_size
        prompts = sorted({r // G for r in rows})
        out = {"input_ids": torch.cat([self.prompt_ids[rows], self.completion_ids[rows]], 1),
               "attention_mask": torch.cat([self.prompt_mask[rows], self.completion_mask[rows]], 1),
               "score_mask": torch.cat([torch.zeros_like(self.prompt_mask[rows]), self.completion_mask[rows]], 1),
               "prompt_len": self.prompt_ids.shape[1],
               "group_sizes": [sum(r // G == k for r in rows) for k in prompts]}
        if self.prompt_types is not None:             # completions hold no image tokens
            out["mm_token_type_ids"] = torch.cat([self.prompt_types[rows], torch.zeros_like(self.completion_ids[rows])], 1)
        if self.images:
            from minivr1.chat import select_sequences
            out.update(select_sequences(self.images, prompts, self.images_per_prompt))
        return out


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


def sampling_kwargs(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float,
                    do_sample: bool = True) -> dict:
    """`model.generate` settings: explicit sampling that overrides the checkpoint's generation_config
    (Qwen2.5-VL-Instruct's sets top_k 1 and repetition_penalty 1.05; GRPO must sample from the
    distribution it scores), EOS and padding ids, vision tokens suppressed."""
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_ids(model, tokenizer),
                pad_token_id=tokenizer.pad_token_id, suppress_tokens=vision_token_ids(tokenizer), use_cache=True,
                repetition_penalty=1.0, **sampling)


def finish(completion: torch.Tensor, batch, tokenizer, eos: list[int], group_size: int = 1, images: dict | None = None,
           images_per_prompt: list[int] | None = None) -> Rollout:
    """A Rollout from sampled completion ids [N, C] and the prompt batch they continue."""
    mask, truncated = completion_mask(completion, eos)
    completion = torch.where(mask.bool(), completion, torch.full_like(completion, tokenizer.pad_token_id))
    texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
    return Rollout(batch["input_ids"], batch["attention_mask"], batch.get("mm_token_type_ids"), completion, mask,
                   truncated, texts, group_size, images or {}, images_per_prompt or [])


@torch.no_grad()
def generate(model, processor, batch, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             do_sample: bool = True, streamer=None, synced_gpus: bool = False) -> Rollout:
    """Sample one completion per row of `batch` with `model.generate`.

    synced_gpus=True (DeepSpeed ZeRO-3, whose forwards gather parameters with the other processes):
    every process keeps stepping until all have finished. Otherwise a process generates on its own
    and the model must hold whole parameters (see distributed.whole_parameters for FSDP2).
    """
    tok = processor.tokenizer
    kwargs = sampling_kwargs(model, tok, max_new_tokens, temperature, top_p, do_sample)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    P = batch["input_ids"].shape[1]
    completion = model.generate(**batch, streamer=streamer, synced_gpus=synced_gpus, **kwargs)[:, P:]
    return finish(completion, batch, tok, kwargs["eos_token_id"])


class HFEngine:
    """The reference rollout engine: the problems' prompts, each repeated G times, sampled by
    transformers' `model.generate` (`generate` above)."""

    name = "hf"

    def __init__(self, model, processor, temperature: float, top_p: float, system_prompt: str | None = None,
                 synced_gpus: bool = False):
        self.model, self.processor = model, processor
        self.temperature, self.top_p, self.system_prompt, self.synced_gpus = temperature, top_p, system_prompt, synced_gpus

    def prompts(self, problems):
        """The problems' prompt batch (each once) on the model's device, its images apart:
        (batch, images, images per prompt)."""
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in prompt_batch(self.processor, problems, self.system_prompt).items()}
        images = {k: batch.pop(k) for k in ("pixel_values", "image_grid_thw") if k in batch}
        return batch, images, [len(p.images) for p in problems]

    @torch.no_grad()
    def generate(self, problems, G: int, max_new_tokens: int) -> Rollout:
        batch, images, counts = self.prompts(problems)
        rows = {k: v.repeat_interleave(G, 0) for k, v in batch.items()}
        if images:
            rows.update(repeat_images(images, counts, [G] * len(problems)))
        with eval_mode(self.model):
            ro = generate(self.model, self.processor, rows, max_new_tokens, self.temperature, self.top_p,
                          synced_gpus=self.synced_gpus)
        ro.group_size, ro.images, ro.images_per_prompt = G, images, counts
        return ro


@contextmanager
def eval_mode(model):
    """The model in eval mode for the block (a training model with gradient checkpointing would turn
    the KV cache off), then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


ENGINES = ("hf", "shared_prefix", "static", "static_compiled")


def make_engine(name: str, model, processor, temperature: float, top_p: float, system_prompt: str | None = None,
                synced_gpus: bool = False):
    """The rollout engine `name` (one of ENGINES), or the nearest one that can run here: the faster
    engines need a model that holds whole parameters on this process, so under ZeRO-3 (synced_gpus)
    every name gives "hf"; "static" / "static_compiled" need a decoder `static_engine` can run and
    sampling settings it implements, else "shared_prefix" (which itself uses `generate` where it must)."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}: use one of {', '.join(ENGINES)}")
    if synced_gpus or name == "hf":
        return HFEngine(model, processor, temperature, top_p, system_prompt, synced_gpus)
    from minivr1.shared_prompt import SharedPrefixEngine
    if name.startswith("static"):
        from minivr1.static_engine import StaticCacheEngine, decoder_supported
        if decoder_supported(model):
            try:
                return StaticCacheEngine(model, processor, temperature, top_p, system_prompt,
                                         compile=name == "static_compiled")
            except NotImplementedError:     # a logits processor the static step does not implement
                pass
    return SharedPrefixEngine(model, processor, temperature, top_p, system_prompt)
