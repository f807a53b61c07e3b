"""Rollouts: sampling completions from the policy, for GRPO and for evaluation.

`generate` takes a left-padded prompt batch (see `chat.prompt_batch`), samples with the KV
cache (transformers' `model.generate`), and returns the completions with their mask: 1 on every
token up to and including the first end-of-turn token, 0 after it (never `ids != pad_id`, which
breaks when pad == eos). The end-of-turn token is the chat template's (`chat.assistant_turn_tokens`).
Image tokens are suppressed, every token the processor places for an image (`media_token_ids`:
Qwen's `<|image_pad|>`, `<|vision_start|>`, ...; SmolVLM's `<image>`, `<fake_token_around_image>`,
...): a sampled one would break the next forward ("image features and image tokens do not match";
docs/pitfalls.md).

GRPO asks a rollout *engine* for its completions, through one method:

    engine.generate(problems, G, max_new_tokens) -> Rollout      # G completions of each problem

`HFEngine` here is the reference: `model.generate` on every row. A faster engine plugs in behind
the same method without the training loop knowing (`minivr1/shared_prompt.py`: each group's prompt
encoded once; `minivr1/static_engine.py`: that, then a fixed-shape decode step over preallocated
KV buffers; a vLLM engine would be another). `make_engine` picks one by name (`--rollout`).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from minivr1.chat import IMAGE_KEYS, assistant_turn_tokens, prompt_batch, repeat_images


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
    images: dict = field(default_factory=dict)   # the images (chat.IMAGE_KEYS) of each PROMPT, once
    images_per_prompt: list[int] = field(default_factory=list)
    problems: list | None = None      # the problems of the groups, when the engine chose them (--dynamic_sampling)
    sampling: dict = field(default_factory=dict)  # counts the engine reports for the step's log (summed over processes)

    def forward_inputs(self, rows: list[int]) -> dict:
        """The teacher-forced forward's inputs for rows `rows` (ascending, so each group's rows are
        consecutive; e.g. a contiguous range): prompt + completion tokens, `score_mask` on the
        completion tokens, and the images of each prompt the rows belong to once, with `group_sizes`
        (how many of the rows share each of those prompts)."""
        if any(a >= b for a, b in zip(rows, rows[1:])):
            raise ValueError(f"rows must be in ascending order, got {rows}")
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

    def groups(self, idx: list[int]) -> "Rollout":
        """The rollout of groups `idx`, in that order: their G rows each, their prompts' images."""
        from minivr1.chat import select_sequences

        G = self.group_size
        rows = [k * G + j for k in idx for j in range(G)]
        return Rollout(self.prompt_ids[rows], self.prompt_mask[rows],
                       None if self.prompt_types is None else self.prompt_types[rows], self.completion_ids[rows],
                       self.completion_mask[rows], self.truncated[rows], [self.texts[r] for r in rows], G,
                       select_sequences(self.images, idx, self.images_per_prompt) if self.images else {},
                       [self.images_per_prompt[k] for k in idx] if self.images_per_prompt else [])

    @staticmethod
    def cat(parts: list["Rollout"], pad_id: int) -> "Rollout":
        """The groups of `parts` (same G) as one rollout, in order: prompts left-padded and completions
        right-padded to the widest (padding is masked: the forward's numbers do not depend on it)."""
        P = max(p.prompt_ids.shape[1] for p in parts)
        C = max(p.completion_ids.shape[1] for p in parts)

        def pad(key, width, value, left):
            xs = [getattr(p, key) for p in parts]
            return torch.cat([torch.nn.functional.pad(x, (width - x.shape[1], 0) if left else (0, width - x.shape[1]),
                                                      value=value) for x in xs])

        images = {k: torch.cat([p.images[k] for p in parts]) for k in parts[0].images}
        return Rollout(pad("prompt_ids", P, pad_id, True), pad("prompt_mask", P, 0, True),
                       None if parts[0].prompt_types is None else pad("prompt_types", P, 0, True),
                       pad("completion_ids", C, pad_id, False), pad("completion_mask", C, 0, False),
                       torch.cat([p.truncated for p in parts]), [t for p in parts for t in p.texts],
                       parts[0].group_size, images, [n for p in parts for n in p.images_per_prompt])


_MEDIA_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def media_token_ids(processor) -> list[int]:
    """Token ids only the processor may place: its declared image / video tokens, and every added token
    its output holds for one image that the same text without the image does not (the image's framing:
    Qwen's `<|vision_start|>` `<|vision_end|>`; Idefics3's `<fake_token_around_image>`, `<global-img>`)."""
    if processor not in _MEDIA_IDS:
        from PIL import Image

        tok = processor.tokenizer
        text = {"type": "text", "text": "Hi"}
        with_image = processor.apply_chat_template([{"role": "user", "content": [text, {"type": "image"}]}], tokenize=False)
        without = processor.apply_chat_template([{"role": "user", "content": [text]}], tokenize=False)
        added = set(tok.get_added_vocab().values())
        ids = set(processor(text=[with_image], images=[Image.new("RGB", (56, 56))])["input_ids"][0])
        ids -= set(processor(text=[without])["input_ids"][0])
        declared = [getattr(processor, name, None) for name in ("image_token", "video_token")]
        ids |= {tok.convert_tokens_to_ids(t) for t in declared if isinstance(t, str)}
        _MEDIA_IDS[processor] = sorted((ids & added) - {None, tok.unk_token_id})
    return _MEDIA_IDS[processor]


def eos_token_ids(model, processor) -> list[int]:
    """The ids that end a completion: the checkpoint's generation_config EOS, the tokenizer's EOS, and the
    chat template's end-of-turn token. `processor` may be a text model's tokenizer."""
    tok = getattr(processor, "tokenizer", processor)
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    end = [assistant_turn_tokens(processor)[1]] if tok.chat_template or getattr(processor, "chat_template", None) else []
    return sorted(set(ids + [tok.eos_token_id] + end) - {None})


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, C] mask covering tokens up to and including the first EOS, and [N] truncated flags."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    # number of EOS strictly before each position: positions after the first EOS have >= 1
    eos_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return (eos_before == 0).long(), ~is_eos.any(dim=1)


def sampling_kwargs(model, processor, max_new_tokens: int, temperature: float, top_p: float,
                    do_sample: bool = True) -> dict:
    """`model.generate` settings: explicit sampling that overrides the checkpoint's generation_config
    (Qwen2.5-VL-Instruct's sets top_k 1 and repetition_penalty 1.05; GRPO must sample from the
    distribution it scores), EOS and padding ids, image tokens suppressed."""
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_ids(model, processor),
                pad_token_id=processor.tokenizer.pad_token_id, suppress_tokens=media_token_ids(processor), use_cache=True,
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
    kwargs = sampling_kwargs(model, processor, max_new_tokens, temperature, top_p, do_sample)
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
        images = {k: batch.pop(k) for k in IMAGE_KEYS if k in batch}
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
    the KV cache off), then back in the mode it was in. bitsandbytes' 4-bit layers stay in training mode:
    on a CPU, a 4-bit layer's forward in eval mode repacks its weights for CPU inference, a layout
    training cannot use afterwards (and their mode changes nothing else: RL runs without dropout)."""
    was_training = model.training
    model.eval()
    for layer in _four_bit_layers(model):
        layer.train()
    try:
        yield
    finally:
        model.train(was_training)


def _four_bit_layers(model) -> list:
    import sys

    if "bitsandbytes" not in sys.modules:        # nothing is 4-bit unless bitsandbytes was imported
        return []
    from bitsandbytes.nn import Linear4bit
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


ENGINES = ("hf", "shared_prefix", "static", "static_compiled")


def make_engine(name: str, model, processor, temperature: float, top_p: float, system_prompt: str | None = None,
                synced_gpus: bool = False):
    """The rollout engine `name` (one of ENGINES), or the nearest one that can run here: the faster
    engines need a model that holds whole parameters on this process, so under ZeRO-3 (synced_gpus)
    every name gives "hf", and so does a model family they do not support (`shared_prompt.supports`);
    "static" / "static_compiled" need a decoder `static_engine` can run and sampling settings it
    implements, else "shared_prefix" (which itself uses `generate` where it must)."""
    from minivr1.shared_prompt import SharedPrefixEngine, supports

    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}: use one of {', '.join(ENGINES)}")
    if synced_gpus or name == "hf" or not supports(model):
        return HFEngine(model, processor, temperature, top_p, system_prompt, synced_gpus)
    if name.startswith("static"):
        from minivr1.static_engine import StaticCacheEngine, decoder_supported
        if decoder_supported(model):
            try:
                return StaticCacheEngine(model, processor, temperature, top_p, system_prompt,
                                         compile=name == "static_compiled")
            except NotImplementedError:     # a logits processor the static step does not implement
                pass
    return SharedPrefixEngine(model, processor, temperature, top_p, system_prompt)
