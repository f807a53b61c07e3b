"""Chat messages and model inputs: SFT batches (loss on assistant tokens only) and prompt batches.

The chat template comes with the model's processor; we only arrange messages (every content as a
list of typed parts, the form every family's template reads). A text's `<image>` placeholders
mark where its images go; images without placeholders are put before the text of the first user
turn (LLaMA-Factory's convention). What a family's template writes around an assistant turn (its
header and end-of-turn token) is read off the template's own rendering (`assistant_turn_tokens`),
never assumed from Qwen's.
"""
from __future__ import annotations

import itertools

import torch

IMAGE_PLACEHOLDER = "<image>"

# The processor outputs that carry images, in one of two layouts (`select_sequences`).
IMAGE_KEYS = ("pixel_values", "image_grid_thw")

# DeepSeek-R1-Zero's system prompt, adapted to images; used by the Vision-R1-Zero baseline only
# (Vision-R1 itself adds no system prompt in RL, and SFT uses the template's default).
R1_ZERO_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question about an image, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then provides the user "
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>"
)


def user_content(text: str, n_images: int) -> list[dict]:
    """Split `text` at `<image>` placeholders into image and text parts (images first if none)."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 == 0:
        parts = [{"type": "image"} for _ in range(n_images)]
        return parts + ([{"type": "text", "text": text}] if text else [])
    if len(pieces) - 1 != n_images:
        raise ValueError(f"text has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders but {n_images} images")
    parts = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def conversation_messages(messages: list[dict], n_images: int) -> list[dict]:
    """Messages with string contents -> template messages; images go to the user turns' placeholders."""
    counts = [m["content"].count(IMAGE_PLACEHOLDER) if m["role"] == "user" else 0 for m in messages]
    unplaced = n_images - sum(counts)
    out, first_user = [], True
    for m, k in zip(messages, counts):
        if m["role"] != "user":
            out.append({"role": m["role"], "content": [{"type": "text", "text": m["content"]}]})
            continue
        extra = unplaced if first_user else 0
        first_user = False
        content = user_content(m["content"], k) if k else user_content(m["content"], 0)
        out.append({"role": "user", "content": [{"type": "image"}] * extra + content})
    return out


def problem_messages(question: str, n_images: int, system_prompt: str | None = None) -> list[dict]:
    """The prompt for one problem: an optional system turn, then the user turn with its images."""
    msgs = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    return msgs + [{"role": "user", "content": user_content(question, n_images)}]


def prompt_batch(processor, problems, system_prompt: str | None = None, repeat: int = 1):
    """Tokenised, left-padded prompts for generation, each problem repeated `repeat` times in a row.

    Each problem is processed once; its rows and its pixel_values block are then repeated in place
    (`select_sequences`), so each sequence's block stays next to its own image_grid_thw rows, in
    order (docs/pitfalls.md #12). The same tensors as processing the repeated list, without redoing the images.
    Returns the processor's BatchFeature: input_ids, attention_mask, the images (IMAGE_KEYS), and
    mm_token_type_ids for the families whose processor gives them (M-RoPE).
    """
    texts, images, counts = [], [], []
    for p in problems:
        imgs = [ref.load() for ref in p.images]
        texts.append(processor.apply_chat_template(problem_messages(p.question, len(imgs), system_prompt),
                                                   add_generation_prompt=True, tokenize=False))
        images.extend(imgs)
        counts.append(len(imgs))
    processor.tokenizer.padding_side = "left"
    batch = without_pixel_mask(processor(text=texts, images=images or None, return_tensors="pt", padding=True))
    if repeat > 1:
        batch = type(batch)(select_sequences(batch, [i for i in range(len(problems)) for _ in range(repeat)], counts))
    return batch


class SFTCollator:
    """Cold-start SFT batches: the full conversation, labels = -100 everywhere except assistant turns.

    An assistant turn's label span is its content plus the token that closes it (Qwen's
    `<|im_end|>`, SmolVLM's `<end_of_utterance>`: `assistant_turn_tokens`), so the model learns to
    stop. Sequences longer than `max_length` are cut from the right; a cut that would reach into
    the prompt (and its image tokens) is an error, never a silent truncation.
    """

    def __init__(self, processor, max_length: int = 4096):
        self.processor, self.max_length = processor, max_length
        tok = processor.tokenizer
        self.header, self.end_id = assistant_turn_tokens(processor)
        self.image_id = tok.convert_tokens_to_ids(processor.image_token)
        self.pad_id = tok.pad_token_id

    def assistant_mask(self, ids: list[int]) -> list[bool]:
        mask, h, i, inside = [False] * len(ids), len(self.header), 0, False
        while i < len(ids):
            if not inside and ids[i:i + h] == self.header:
                inside, i = True, i + h
                continue
            if inside:
                mask[i] = True
                if ids[i] == self.end_id:
                    inside = False
            i += 1
        return mask

    def __call__(self, conversations) -> dict:
        texts, images = [], []
        for conv in conversations:
            imgs = [ref.load() for ref in conv.images]
            msgs = conversation_messages(conv.messages, len(imgs))
            texts.append(self.processor.apply_chat_template(msgs, tokenize=False))
            images.extend(imgs)
        enc = without_pixel_mask(self.processor(text=texts, images=images or None, return_tensors="pt", padding=True))
        rows, labels, types = [], [], []
        for k, (ids, keep) in enumerate(zip(enc["input_ids"], enc["attention_mask"])):
            ids = ids[keep.bool()].tolist()
            # 1 on image tokens: the M-RoPE families need these to give image tokens their 3-D positions
            types.append([int(t == self.image_id) for t in ids])
            mask = self.assistant_mask(ids)
            if not any(mask) and any(m["role"] == "assistant" for m in conversations[k].messages):
                raise ValueError(f"record {conversations[k].id}: no assistant turn found: the chat template's "
                                 f"assistant header {self.processor.tokenizer.decode(self.header)!r} does not "
                                 f"appear in the tokenised conversation")
            if len(ids) > self.max_length:
                if not any(mask[:self.max_length]):
                    prompt_len = mask.index(True) if any(mask) else len(ids)
                    raise ValueError(f"record {conversations[k].id}: the prompt alone is {prompt_len} tokens, more "
                                     f"than max_length={self.max_length}; raise --max_length or shrink the images "
                                     f"(--max_pixels)")
                if self.image_id in ids[self.max_length:]:
                    # the image's pixels would stay in the batch without its tokens: the forward fails
                    raise ValueError(f"record {conversations[k].id}: max_length={self.max_length} cuts off an image of "
                                     f"a later user turn ({len(ids)} tokens in all); raise --max_length")
                ids, mask = ids[:self.max_length], mask[:self.max_length]
            rows.append(ids)
            labels.append([t if m else -100 for t, m in zip(ids, mask)])
            types[-1] = types[-1][:len(ids)]
        T = max(len(r) for r in rows)
        # right padding for training; padded positions are masked out and carry label -100
        batch = {
            "input_ids": torch.tensor([r + [self.pad_id] * (T - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows]),
            "labels": torch.tensor([l + [-100] * (T - len(l)) for l in labels]),
        }
        if "mm_token_type_ids" in enc:
            batch["mm_token_type_ids"] = torch.tensor([t + [0] * (T - len(t)) for t in types])
        for key in IMAGE_KEYS:
            if key in enc:
                batch[key] = enc[key]
        return batch


def _render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text for messages with string contents (parts for a processor's template)."""
    if hasattr(processor, "tokenizer"):
        messages = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    return processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def assistant_turn_tokens(processor) -> tuple[list[int], int]:
    """(header ids, end id) of an assistant turn, read off the chat template's own rendering: the header
    is its generation prompt (Qwen: `<|im_start|>assistant\n`; SmolVLM: `Assistant:`), the end the first
    special token after an assistant message's text (`<|im_end|>`; `<end_of_utterance>`). `processor` may
    also be a text model's tokenizer (string contents)."""
    tok = getattr(processor, "tokenizer", processor)
    user = [{"role": "user", "content": "Hi"}]
    plain, prompt = _render(processor, user), _render(processor, user, add_generation_prompt=True)
    if not prompt.startswith(plain) or prompt == plain:
        raise ValueError("the chat template's generation prompt is not a suffix of the rendered conversation: "
                         "minivr1 cannot tell where an assistant turn starts")
    marker = "minivr1 assistant text"
    full = _render(processor, user + [{"role": "assistant", "content": marker}])
    tail = tok.encode(full[full.rindex(marker) + len(marker):], add_special_tokens=False)
    special = set(tok.all_special_ids)
    ends = [t for t in tail if t in special]
    if not ends:
        raise ValueError(f"the chat template closes an assistant turn with no special token ({tok.decode(tail)!r}): "
                         "minivr1 cannot tell where it ends")
    return tok.encode(prompt[len(plain):], add_special_tokens=False), ends[0]


def without_pixel_mask(enc):
    """The processor's output without `pixel_attention_mask` (Idefics3 / SmolVLM), once checked redundant.

    Those processors pad each sequence's images to [images, C, H, W]; the mask marks real pixels.
    Their image processors resize every image (or tile) to the full square, so the mask is all 1 on
    real images and all 0 on the all-zero padding images, which is exactly what the model assumes
    when it is absent. So the images of every family are IMAGE_KEYS alone, through SFT, rollouts
    and the log-prob forward; a mask that says anything else is an error, never dropped.
    """
    if "pixel_attention_mask" not in enc:
        return enc
    mask, pixels = enc["pixel_attention_mask"].bool(), enc["pixel_values"]
    real = pixels.flatten(2).ne(0).any(-1)                                  # [N, images]: not a padding image
    if not torch.equal(mask.flatten(2).all(-1), real) or mask.flatten(2).any(-1).ne(real).any():
        raise ValueError("pixel_attention_mask marks padding inside an image: this image processor setting is not "
                         "supported (minivr1 passes no pixel mask to the model)")
    return type(enc)({k: v for k, v in enc.items() if k != "pixel_attention_mask"})


def select_sequences(batch: dict, idx: list[int], images_per_seq: list[int]) -> dict:
    """Rows `idx` of a processed batch, with their own images, in either layout:

    patches (the Qwen families): pixel_values is the concatenation of every image's patches in
        sequence order and image_grid_thw has one row per image, so picking sequences means picking
        their blocks (docs/pitfalls.md #12: a wrong slice pairs an image with another sequence's tokens);
    per sequence (Idefics3 / SmolVLM): pixel_values [N, images, C, H, W], one row per sequence
        (all-zero images pad a row), picked like any other row.
    """
    out = {k: v[idx] for k, v in batch.items() if k not in IMAGE_KEYS}
    if "pixel_values" in batch and "image_grid_thw" not in batch:
        if batch["pixel_values"].dim() != 5:
            raise ValueError(f"pixel_values of shape {tuple(batch['pixel_values'].shape)} without image_grid_thw: "
                             "an image layout minivr1 does not know (patches + grid, or [N, images, C, H, W])")
        out["pixel_values"] = batch["pixel_values"][idx]
    elif "pixel_values" in batch:
        grid = batch["image_grid_thw"]
        first_image = [0] + list(itertools.accumulate(images_per_seq))           # image index per sequence
        patches = grid.prod(-1).tolist()
        first_patch = [0] + list(itertools.accumulate(patches))                  # patch row per image
        images = [i for s in idx for i in range(first_image[s], first_image[s + 1])]
        rows = [r for i in images for r in range(first_patch[i], first_patch[i + 1])]
        out["pixel_values"] = batch["pixel_values"][rows]
        out["image_grid_thw"] = grid[images]
    return out


def repeat_images(images: dict, images_per_prompt: list[int], times: list[int]) -> dict:
    """pixel_values / image_grid_thw with prompt k's image block repeated times[k] times, in order:
    the images of a batch whose rows repeat each prompt (a GRPO group's G rows share one prompt)."""
    return select_sequences(images, [k for k, n in enumerate(times) for _ in range(n)], images_per_prompt)
