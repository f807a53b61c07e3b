"""Tiny-model factory: randomly initialised vision-language checkpoints built with no model hub.

`build(size, out_dir, family=...)` writes an ordinary Hugging Face directory of that family
(config, safetensors weights, tokenizer, image processor, chat template) that
`minivr1.models.load_policy` opens exactly like a downloaded checkpoint. The tokenizer is a
byte-level BPE trained here on the toy task's text, with the family's own special tokens; the
image processor is the family's PIL implementation (no torchvision).

Families (`FAMILIES`) and sizes (`SIZES[family]`):
    qwen2_5_vl  Qwen2.5-VL, the paper's model (the default)    tiny, small, 3b, 7b
    qwen3_vl    Qwen3-VL (DeepStack vision features)           tiny, small, 4b, 8b
    qwen3_5     Qwen3.5, multimodal (hybrid Gated DeltaNet /   tiny, small, 4b, 9b
                full-attention language model)
    idefics3    Idefics3 = SmolVLM (v1) checkpoints: SigLIP    tiny, small
                vision, pixel shuffle, a Llama language model

    tiny      ~0.2-0.3M params: unit tests
    small     ~4M params: demos, the toy task's runs, CPU benchmarks
    3b ... 9b the real architectures (config.json values of the released checkpoints, real
              vocabulary size, random weights) for GPU memory and speed measurements; on a 24 GiB
              CPU machine only Qwen2.5-VL's 3b, in bf16 (`pytest -m realsize`). There is no
              Qwen3-VL-3B: its ~3B size is Qwen3-VL-4B (and Qwen3.5-4B).
              `python -m minivr1.tiny SIZE OUT --family F --params` counts their parameters on
              the meta device (nothing is allocated).
"""
from __future__ import annotations

from pathlib import Path

import torch

FORMAT_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# Qwen's special tokens (Qwen2.5-VL, Qwen3-VL and Qwen3.5 use the same names).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

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

# Qwen3-VL-Instruct's template, images only: as Qwen2-VL's but with no default system prompt.
# (Qwen3-VL-Thinking's and Qwen3.5's templates also open "<think>\n" in the generation prompt;
# README "Model families" says what that changes.)
QWEN3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}",
    "")

# Idefics3 / SmolVLM's chat template (HuggingFaceTB/SmolVLM-*-Instruct): "User:<image>question<end_of_utterance>\n
# Assistant: answer<end_of_utterance>\n"; the processor expands each <image> to the image's tokens, framed by
# <fake_token_around_image> and <global-img>.
IDEFICS3_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                           "<image>", "<global-img>"]
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

FAMILIES = {
    "qwen2_5_vl": "Qwen2.5-VL (the paper's model)",
    "qwen3_vl": "Qwen3-VL",
    "qwen3_5": "Qwen3.5 (multimodal)",
    "idefics3": "Idefics3 / SmolVLM v1 (non-Qwen: SigLIP + pixel shuffle + Llama)",
}

# Qwen2.5-VL. text: hidden, intermediate, layers, heads, kv heads, mrope sections (sum = head_dim / 2)
# vision: depth, hidden, heads, intermediate
QWEN2_5_VL_SIZES = {
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
SIZES = QWEN2_5_VL_SIZES          # the default family's (kept under its old name)

# Qwen3-VL: head_dim is explicit; interleaved M-RoPE; DeepStack (vision features of some blocks added to the first
# decoder layers). The tiny models use 14-px patches (the released ones 16) so a 112 px toy image is 8x8 patches.
QWEN3_VL_SIZES = {
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3]),
                 vision=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, deepstack_visual_indexes=[0],
                             patch_size=14, num_position_embeddings=64)),
    "small": dict(text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, mrope_section=[8, 12, 12]),
                  vision=dict(depth=4, hidden_size=128, num_heads=4, intermediate_size=256,
                              deepstack_visual_indexes=[1, 3], patch_size=14, num_position_embeddings=64)),
    # Real architectures: Qwen3-VL-4B-Instruct and Qwen3-VL-8B-Instruct config.json values.
    "4b": dict(text=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20], vocab_size=151936),
               vision=dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096,
                           deepstack_visual_indexes=[5, 11, 17], patch_size=16, num_position_embeddings=2304),
               tie_word_embeddings=True),
    "8b": dict(text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20], vocab_size=151936),
               vision=dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304,
                           deepstack_visual_indexes=[8, 16, 24], patch_size=16, num_position_embeddings=2304)),
}

# Qwen3.5: three Gated DeltaNet (linear attention) layers, then one gated full-attention layer; rotary on a quarter of
# head_dim (M-RoPE sections sum to head_dim / 8). Its vision tower is Qwen3-VL's without DeepStack.
QWEN3_5_SIZES = {
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, mrope_section=[2, 1, 1], linear_num_key_heads=2,
                           linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16),
                 vision=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=14,
                             num_position_embeddings=64)),
    "small": dict(text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=64, mrope_section=[4, 2, 2], linear_num_key_heads=4,
                            linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32),
                  vision=dict(depth=4, hidden_size=128, num_heads=4, intermediate_size=256, patch_size=14,
                              num_position_embeddings=64)),
    # Real architectures: Qwen3.5-4B and Qwen3.5-9B (language-model values from their config.json; the 4B's vision
    # tower and tied embeddings as the other ~4B Qwen models': README "Model families").
    "4b": dict(text=dict(hidden_size=2560, intermediate_size=9216, num_hidden_layers=32, num_attention_heads=16,
                         num_key_value_heads=4, head_dim=256, mrope_section=[11, 11, 10], linear_num_key_heads=16,
                         linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                         vocab_size=248320),
               vision=dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096, patch_size=16,
                           num_position_embeddings=2304),
               tie_word_embeddings=True),
    "9b": dict(text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=16,
                         num_key_value_heads=4, head_dim=256, mrope_section=[11, 11, 10], linear_num_key_heads=16,
                         linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
                         vocab_size=248320),
               vision=dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, patch_size=16,
                           num_position_embeddings=2304)),
}

# Idefics3 / SmolVLM: a SigLIP vision encoder on image_size px images, a pixel shuffle by scale_factor and a linear
# connector, a Llama language model. 112 px, 14-px patches, scale 2: 16 image tokens, as the Qwen toys.
IDEFICS3_SIZES = {
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2),
                 vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)),
    "small": dict(text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2),
                  vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)),
}

FAMILY_SIZES = {"qwen2_5_vl": QWEN2_5_VL_SIZES, "qwen3_vl": QWEN3_VL_SIZES, "qwen3_5": QWEN3_5_SIZES,
                "idefics3": IDEFICS3_SIZES}


def build_tokenizer(vocab_size: int = 1024, texts: list[str] | None = None, family: str = "qwen2_5_vl"):
    """Train a byte-level BPE on the toy task's text; the family's special tokens keep their roles."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from minivr1 import toy

    specials, eos, template = {
        "qwen2_5_vl": (SPECIAL_TOKENS, "<|im_end|>", CHAT_TEMPLATE),
        "qwen3_vl": (SPECIAL_TOKENS, "<|im_end|>", QWEN3_CHAT_TEMPLATE),
        "qwen3_5": (SPECIAL_TOKENS, "<|im_end|>", QWEN3_CHAT_TEMPLATE),
        "idefics3": (IDEFICS3_SPECIAL_TOKENS, "<end_of_utterance>", IDEFICS3_CHAT_TEMPLATE),
    }[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts if texts is not None else toy.corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>",
                                        padding_side="left", chat_template=template)
    # Registered as special so decoding with skip_special_tokens keeps nothing of the chat framing,
    # while the format tags stay ordinary (they are part of the answer text).
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.add_tokens(FORMAT_TOKENS)        # single tokens, but not "special": decoding keeps them
    return tokenizer


def build_image_processor(family: str = "qwen2_5_vl"):
    """The family's PIL image processor, sized so a 112x112 toy image is 16 image tokens."""
    if family == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        # one 112 px image, not split into tiles (the released checkpoints split big images into 364/512 px tiles)
        return Idefics3ImageProcessorPil(size={"longest_edge": 112}, max_image_size={"longest_edge": 112},
                                         do_image_splitting=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # 112x112 (the toy image) -> 8x8 patches of 14 px -> 16 tokens after the 2x2 merge.
    extra = {} if family == "qwen2_5_vl" else dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)    # Qwen3's values
    return Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14,
                                    temporal_patch_size=2, merge_size=2, **extra)


def _qwen_token_ids(tokenizer) -> dict:
    return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}


def build_config(size: str, tokenizer, family: str = "qwen2_5_vl"):
    """The transformers config of a `family` model of `size` (token ids from `tokenizer`)."""
    if family not in FAMILY_SIZES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(FAMILY_SIZES)}")
    if size not in FAMILY_SIZES[family]:
        raise ValueError(f"unknown {family} size {size!r}; choose one of {list(FAMILY_SIZES[family])}")
    return {"qwen2_5_vl": _qwen2_5_vl_config, "qwen3_vl": _qwen3_config, "qwen3_5": _qwen3_config,
            "idefics3": _idefics3_config}[family](FAMILY_SIZES[family][size], tokenizer, family)


def _qwen2_5_vl_config(spec: dict, tokenizer, family: str):
    from transformers import Qwen2_5_VLConfig

    spec = dict(spec)
    vision = spec.pop("vision")
    mrope = spec.pop("mrope_section")
    vocab = spec.pop("vocab_size", None) or len(tokenizer)
    tie = spec.pop("tie_word_embeddings", False)
    text_config = dict(spec, vocab_size=vocab, max_position_embeddings=32768, rope_theta=1_000_000.0,
                       rope_scaling={"type": "mrope", "mrope_section": mrope}, tie_word_embeddings=tie,
                       bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision_config = dict(vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         in_chans=3, out_hidden_size=vision.get("out_hidden_size", spec["hidden_size"]))
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=tie,
                            **_qwen_token_ids(tokenizer))


def _qwen3_config(spec: dict, tokenizer, family: str):
    from transformers import Qwen3_5Config, Qwen3VLConfig

    text = dict(spec["text"])
    mrope = text.pop("mrope_section")
    tie = spec.get("tie_word_embeddings", False)
    rope = dict(rope_type="default", mrope_section=mrope, mrope_interleaved=True,
                rope_theta=5_000_000.0 if family == "qwen3_vl" else 10_000_000.0)
    if family == "qwen3_5":
        rope["partial_rotary_factor"] = 0.25
    text_config = dict(text, vocab_size=text.get("vocab_size") or len(tokenizer), max_position_embeddings=32768,
                       rope_parameters=rope, tie_word_embeddings=tie, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    vision_config = dict(spec["vision"], spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                         out_hidden_size=text["hidden_size"])
    config_class = Qwen3VLConfig if family == "qwen3_vl" else Qwen3_5Config
    return config_class(text_config=text_config, vision_config=vision_config, tie_word_embeddings=tie,
                        **_qwen_token_ids(tokenizer))


def _idefics3_config(spec: dict, tokenizer, family: str):
    from transformers import Idefics3Config

    ids = dict(bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"), eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    text_config = dict(spec["text"], model_type="llama", vocab_size=len(tokenizer), max_position_embeddings=4096,
                       rope_theta=100_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, **ids)
    vision_config = dict(spec["vision"], image_size=112, patch_size=14)
    return Idefics3Config(text_config=text_config, vision_config=vision_config, scale_factor=2,
                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)


def model_class(family: str):
    """The family's image-text-to-text model class."""
    import transformers
    return getattr(transformers, {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                  "qwen3_vl": "Qwen3VLForConditionalGeneration",
                                  "qwen3_5": "Qwen3_5ForConditionalGeneration",
                                  "idefics3": "Idefics3ForConditionalGeneration"}[family])


def build_processor(family: str, tokenizer=None):
    """The family's processor around the tiny tokenizer: transformers' own class where it builds without
    torchvision (Idefics3), else minivr1's image-only stand-in, which `save_processor` writes as the standard one."""
    from minivr1.models import image_only_processor

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(family=family)
    if family == "idefics3":
        from transformers import Idefics3Processor
        return Idefics3Processor(build_image_processor(family), tokenizer, image_seq_len=16,
                                 chat_template=tokenizer.chat_template)
    return image_only_processor(family, build_image_processor(family), tokenizer, tokenizer.chat_template)


def build(size: str, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
          family: str = "qwen2_5_vl", texts: list[str] | None = None) -> Path:
    """Build a randomly initialised `family` model of `size` and save it (with its processor) to `out_dir`;
    its tokenizer is trained on `texts` (default: the original toy task's, `toy.corpus()`)."""
    from minivr1.checkpoint import share_modes
    from minivr1.models import quiet_deepspeed_on_cpu, save_processor

    out = Path(out_dir)
    quiet_deepspeed_on_cpu()                          # transformers' save imports DeepSpeed, which says it found no GPU
    tokenizer = build_tokenizer(texts=texts, family=family)
    config = build_config(size, tokenizer, family)
    torch.manual_seed(seed)
    model = model_class(family)(config).to(dtype)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    save_processor(build_processor(family, tokenizer), out)
    share_modes(out)                                  # safetensors writes its file 0600
    return out


def parameter_count(size: str, family: str = "qwen2_5_vl") -> int:
    """Parameters of a `family` model of `size`, counted on the meta device (nothing is allocated; tied
    embeddings count once)."""
    config = build_config(size, build_tokenizer(family=family), family)
    with torch.device("meta"):
        model = model_class(family)(config)
    return sum(p.numel() for p in model.parameters())


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
    from minivr1.checkpoint import share_modes
    share_modes(out)                                  # safetensors writes its file 0600
    return out


if __name__ == "__main__":
    import argparse

    families = "\n".join(f"  {name:<11} {title}: sizes {', '.join(FAMILY_SIZES[name])}" for name, title in FAMILIES.items())
    p = argparse.ArgumentParser(
        description="Build a randomly initialised vision-language checkpoint of one family (no hub).",
        epilog=f"families:\n{families}\n\ntiny: unit tests; small: demos; the others: the released architectures "
               "(random weights) for GPU measurements.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("size", help="tiny, small, or a real size of the family (see below)")
    p.add_argument("out_dir", nargs="?", help="directory to write the checkpoint (config, weights, tokenizer, processor) to")
    p.add_argument("--family", default="qwen2_5_vl", choices=list(FAMILIES), help="model family (default qwen2_5_vl)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--params", action="store_true", help="only print the parameter count (meta device, nothing built)")
    a = p.parse_args()
    if a.size not in FAMILY_SIZES[a.family]:
        p.error(f"{a.family} has sizes {', '.join(FAMILY_SIZES[a.family])}, not {a.size!r}")
    if a.params:
        print(f"{a.family} {a.size}: {parameter_count(a.size, a.family):,} parameters")
    elif not a.out_dir:
        p.error("out_dir is required (or pass --params)")
    else:
        print(build(a.size, a.out_dir, a.seed, family=a.family))
