"""Tiny-model factory: randomly initialised Qwen2.5-VL checkpoints built with no model hub.

`build(size, out_dir)` writes an ordinary Hugging Face directory (config, safetensors weights,
tokenizer, image processor, chat template) that `minivr1.models.load_policy` opens exactly like
a downloaded checkpoint. The tokenizer is a byte-level BPE trained here on the toy task's text,
with Qwen's special tokens; the image processor is Qwen2-VL's PIL implementation (no
torchvision).

Sizes:
    tiny      ~0.3M params: unit tests
    small     ~4M params: demos, the toy task's runs, CPU benchmarks
    3b, 7b    the real Qwen2.5-VL-3B/7B architectures (real vocabulary size, random weights) for
              GPU memory and speed measurements; too big for a CPU.
"""
from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
FORMAT_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# Qwen2-VL's chat template, images only: a default system prompt when none is given, and one
# <|vision_start|><|image_pad|><|vision_end|> per image part (the processor expands <|image_pad|>
# to the image's token count).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# text: hidden, intermediate, layers, heads, kv heads, mrope sections (sum = head_dim / 2)
# vision: depth, hidden, heads, intermediate
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, mrope_section=[2, 3, 3],
                 vision=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, fullatt_block_indexes=[1])),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[8, 12, 12],
                  vision=dict(depth=4, hidden_size=128, num_heads=4, intermediate_size=256, fullatt_block_indexes=[1, 3])),
    # Real architectures (Qwen2.5-VL-3B/7B-Instruct config.json values).
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, mrope_section=[16, 24, 24], vocab_size=151936, tie_word_embeddings=True,
               vision=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=2048,
                           fullatt_block_indexes=[7, 15, 23, 31])),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, mrope_section=[16, 24, 24], vocab_size=152064,
               vision=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                           fullatt_block_indexes=[7, 15, 23, 31])),
}


def build_tokenizer(vocab_size: int = 1024, texts: list[str] | None = None):
    """Train a byte-level BPE on the toy task's text; Qwen's special tokens keep Qwen's roles."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from minivr1 import toy

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts if texts is not None else toy.corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left", chat_template=CHAT_TEMPLATE)
    # Registered as special so decoding with skip_special_tokens keeps nothing of the chat framing,
    # while the format tags stay ordinary (they are part of the answer text).
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.add_tokens(FORMAT_TOKENS)        # single tokens, but not "special": decoding keeps them
    return tokenizer


def build_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # 112x112 (the toy image) -> 8x8 patches of 14 px -> 16 tokens after the 2x2 merge.
    return Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14,
                                    temporal_patch_size=2, merge_size=2)


def build_config(size: str, tokenizer):
    from transformers import Qwen2_5_VLConfig

    spec = dict(SIZES[size])
    vision = spec.pop("vision")
    mrope = spec.pop("mrope_section")
    vocab = spec.pop("vocab_size", None) or len(tokenizer)
    tie = spec.pop("tie_word_embeddings", False)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text_config = dict(spec, vocab_size=vocab, max_position_embeddings=32768, rope_theta=1_000_000.0,
                       rope_scaling={"type": "mrope", "mrope_section": mrope}, tie_word_embeddings=tie,
                       bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision_config = dict(vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         in_chans=3, out_hidden_size=vision.get("out_hidden_size", spec["hidden_size"]))
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=tie,
                            **ids)


def build(size: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Build a randomly initialised Qwen2.5-VL of `size` and save it (with processor) to `out_dir`."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from minivr1.checkpoint import share_modes
    from minivr1.models import ImageOnlyQwenProcessor, quiet_deepspeed_on_cpu, save_processor

    if size not in SIZES:
        raise ValueError(f"unknown tiny-model size {size!r}; choose one of {sorted(SIZES)}")
    out = Path(out_dir)
    quiet_deepspeed_on_cpu()                          # transformers' save imports DeepSpeed, which says it found no GPU
    tokenizer = build_tokenizer()
    config = build_config(size, tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(dtype)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    save_processor(ImageOnlyQwenProcessor(build_image_processor(), tokenizer, chat_template=CHAT_TEMPLATE), out)
    share_modes(out)                                  # safetensors writes its file 0600
    return out


def build_text(out_dir: str | Path, seed: int = 0, hidden_size: int = 64, num_hidden_layers: int = 2) -> Path:
    """A randomly initialised Qwen2 text-only model with the tiny tokenizer (its chat template too):
    the text-only reasoner of modality bridging (`bridge.py --reasoner_backend causal_lm` locally, or
    served by vLLM, which serves text models on a CPU)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Build a randomly initialised Qwen2.5-VL checkpoint (no hub).")
    p.add_argument("size", choices=sorted(SIZES), help="tiny (unit tests), small (demos), 3b or 7b (real architectures, GPU)")
    p.add_argument("out_dir", help="directory to write the checkpoint (config, weights, tokenizer, processor) to")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    a = p.parse_args()
    print(build(a.size, a.out_dir, a.seed))
