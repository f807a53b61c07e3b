"""Loading a vision-language policy and its processor: full, LoRA, QLoRA, or a saved adapter.

    model = load_policy("Qwen/Qwen2.5-VL-7B-Instruct", mode="lora")      # hub id or local dir
    model = load_policy("runs/sft/final", mode="full")                   # a full checkpoint
    model = load_policy("runs/sft-lora/final", mode="lora")              # a saved LoRA adapter dir:
        # its base is loaded from adapter_config.json and the adapter merged into it first, so the
        # new LoRA (and the KL reference, "adapter disabled") starts from the SFT model.
    processor = load_processor(path)

Everything goes through the Auto classes, so any image-text-to-text checkpoint that
transformers knows loads; what minivr1 needs of a model it finds in the model itself: the
language model is `get_decoder()` (LoRA targets its linear layers; everything outside it but the
LM head is the vision side, frozen by default), FSDP's shard units are its `_no_split_modules`.
The families tested on CPU are those of `minivr1.tiny` (README "Model families").
`trust_remote_code` stays off unless the caller asks.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

# The files that hold a processor's configuration.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")

# Families whose standard processor needs torchvision (for its video part): the standard processor class, and the
# video processor class a standard checkpoint names (None: transformers builds it from preprocessor_config.json,
# the layout of the hub's Qwen2-VL / Qwen2.5-VL checkpoints). Without torchvision, `load_processor` builds an
# image-only stand-in from the same files. (Idefics3's processor has no video part and loads as is; SmolVLM2's
# needs torchvision and num2words and has no stand-in here.)
IMAGE_ONLY_STAND_INS = {"qwen2_vl": ("Qwen2VLProcessor", None), "qwen2_5_vl": ("Qwen2_5_VLProcessor", None),
                        "qwen3_vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
                        "qwen3_5": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor")}


@functools.cache
def _image_only_class(standard: str, standard_video: str | None = None):
    """The processor class `standard` (a Qwen-VL processor) without its video part, for machines without
    torchvision (which the video processor needs). An internal stand-in: `save_processor` writes the
    standard classes' names (`standard_class`, `standard_video_class`), never this one's."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(getattr(transformers, standard)):
        standard_class, standard_video_class = standard, standard_video

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            for kind, default in (("image", "<|image_pad|>"), ("video", "<|video_pad|>"),
                                  ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>")):
                token = getattr(tokenizer, f"{kind}_token", None) or default
                setattr(self, f"{kind}_token", token)
                setattr(self, f"{kind}_token_id", tokenizer.convert_tokens_to_ids(token))
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{standard}"
    return ImageOnlyProcessor


def image_only_processor(model_type: str, image_processor, tokenizer, chat_template: str | None = None):
    """The torchvision-free stand-in for the standard processor of `model_type` (see IMAGE_ONLY_STAND_INS)."""
    if model_type not in IMAGE_ONLY_STAND_INS:
        raise ValueError(f"no torchvision-free processor for model type {model_type!r} (minivr1 has them for "
                         f"{', '.join(IMAGE_ONLY_STAND_INS)}); install what its processor needs")
    return _image_only_class(*IMAGE_ONLY_STAND_INS[model_type])(image_processor, tokenizer, chat_template=chat_template)


def __getattr__(name):          # lazy: importing transformers costs seconds
    if name == "ImageOnlyQwenProcessor":          # Qwen2.5-VL's stand-in, under its old name
        return _image_only_class("Qwen2_5_VLProcessor")
    raise AttributeError(name)


def save_processor(processor, out_dir: str | Path, source: str | Path | None = None) -> None:
    """Write `processor` into the model directory `out_dir` the way a standard checkpoint of its family
    carries it, so AutoProcessor (`transformers serve`, vLLM) opens it with images.

    The source model's own processor files (`source`: the directory or hub id it was loaded from),
    when it has any, are copied unchanged. Otherwise, as for a tiny model we build: a standard
    processor saves itself; a torchvision-free stand-in writes its standard class's files, the layout
    of the hub's Qwen-VL checkpoints: the tokenizer files, `preprocessor_config.json` (the image
    processor's settings under transformers' standard class name, and `"processor_class"`, e.g.
    `Qwen2_5_VLProcessor`, from which transformers also builds Qwen2.5-VL's video processor), for
    Qwen3-VL / Qwen3.5 `video_preprocessor_config.json` naming `Qwen3VLVideoProcessor` with the image
    processor's patch settings, and the chat template. Never the name of our stand-in, which no other
    program can import.
    """
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    standard = getattr(processor, "standard_class", None)
    if standard is None:
        processor.save_pretrained(out)
    else:
        processor.tokenizer.save_pretrained(out)
        tokenizer_config = out / "tokenizer_config.json"          # it names the processor class too
        _write_json(tokenizer_config, {**json.loads(tokenizer_config.read_text()), "processor_class": standard})
        image = processor.image_processor.to_dict()
        _write_json(out / "preprocessor_config.json", {**image, "processor_class": standard})
        if processor.standard_video_class:
            keys = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
            _write_json(out / "video_preprocessor_config.json",
                        {**{k: image[k] for k in keys}, "video_processor_type": processor.standard_video_class,
                         "processor_class": standard})
        (out / "chat_template.jinja").write_text(processor.chat_template)
    found = [f for f in (_source_file(source, name) for name in PROCESSOR_FILES) if f is not None] if source else []
    if found:
        for name in PROCESSOR_FILES:        # the source's set of files, not a mix of theirs and ours
            (out / name).unlink(missing_ok=True)
        for f in found:
            shutil.copyfile(f, out / f.name)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _source_file(source: str | Path, name: str) -> Path | None:
    """`name` in the model `source` (a local directory, else the hub cache), or None."""
    local = Path(source) / name
    if Path(source).is_dir():
        return local if local.is_file() else None
    from transformers.utils import cached_file
    try:
        path = cached_file(str(source), name, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return Path(path) if path else None


def processor_source(path: str | Path) -> str | Path:
    """Where a model's processor files live: the model directory, or for a LoRA adapter directory
    saved without them, its base model."""
    if (Path(path) / "tokenizer_config.json").is_file():
        return path
    return adapter_base(path) or path


def quiet_deepspeed_on_cpu() -> None:
    """DeepSpeed, imported by accelerate and transformers on first use (a load, the first checkpoint), logs
    "Setting accelerator to CPU" when it finds no GPU, in the middle of a progress bar. On a machine without
    a GPU, name the CPU first (its DS_ACCELERATOR variable): the same choice, without the message."""
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def resolve_dtype(dtype: str) -> torch.dtype:
    """"auto" -> bf16 on a GPU that supports it, else fp32 (CPU bf16 matmuls are slow)."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": torch.float32, "float32": torch.float32}[dtype]


def attn_implementation() -> str:
    """flash-attn 2 when installed and on a GPU, else PyTorch's sdpa."""
    try:
        import flash_attn  # noqa: F401
        return "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    except ImportError:
        return "sdpa"


HUB_TIMEOUT = 10          # seconds to ask the hub whether a model exists (not the ~50 s of a load's retries)


def check_source(path: str | Path) -> None:
    """Fail at once, and clearly, on a model that is neither a local folder nor a hub model, instead of after
    the hub client's retries. A path that cannot be a hub id (it starts with ".", "/" or "~", has more or
    fewer than one "/", or its first part is a local folder) must be a local folder. An ORG/NAME string
    (`toy/grpo`: a hub id, or `runs/toy/grpo` mistyped) must be a local folder, in the hub cache, or (not
    offline) a model the hub knows: asked once, within HUB_TIMEOUT seconds."""
    text = str(path)
    if Path(text).expanduser().exists():
        return
    hint = ("Pass a checkpoint folder (e.g. runs/toy/sft/final, written by train_sft.py) or a hub id such as "
            "Qwen/Qwen2.5-VL-7B-Instruct")
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or Path(text.split("/")[0]).expanduser().is_dir():
        raise FileNotFoundError(f"model {text!r}: no local folder {text!r} (and not a hub id, ORG/NAME). {hint}")
    import huggingface_hub

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(text, "config.json"), str):
            return                                             # a hub model downloaded before
    except ValueError:                                         # not a valid repo id at all
        raise FileNotFoundError(f"model {text!r}: no local folder {text!r} (and not a hub id). {hint}") from None
    if hub_offline():
        raise FileNotFoundError(f"model {text!r}: no local folder {text!r}, and not in the hub cache (HF_HUB_OFFLINE "
                                f"is set: the hub is not asked). {hint}")
    try:
        huggingface_hub.model_info(text, timeout=HUB_TIMEOUT)
    except huggingface_hub.errors.GatedRepoError:
        return                                                 # it exists; loading says what access it needs
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"model {text!r}: no local folder {text!r}, and no model {text!r} on the hub (a "
                                f"private one needs `hf auth login`). {hint}") from None
    except Exception as e:  # noqa: BLE001 - no network, a proxy, a timeout: say so now rather than retry for a minute
        raise FileNotFoundError(f"model {text!r}: no local folder {text!r}; as a hub id, the hub could not be reached "
                                f"({type(e).__name__}). Check the path, or the connection (HF_ENDPOINT, proxies)") \
            from None


def hub_offline() -> bool:
    """Whether the hub client is told not to go online (HF_HUB_OFFLINE)."""
    import os

    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def adapter_base(path: str | Path) -> str | None:
    """The base model of a saved peft adapter directory, or None if `path` is not an adapter."""
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text())["base_model_name_or_path"]


def load_processor(path: str | Path, max_pixels: int | None = None, trust_remote_code: bool = False):
    """The model's processor, with left padding (batched generation) and an optional image-size cap.

    Falls back to an image-only stand-in of the family's processor, built from the same files, when
    AutoProcessor cannot build the standard one because it needs torchvision (the Qwen-VL families'
    video processors: IMAGE_ONLY_STAND_INS); for any other family the error is raised.
    """
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    check_source(path)
    model_path, path = adapter_base(path) or path, processor_source(path)
    processor, error = None, None
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, ValueError, OSError, TypeError) as e:
        error = e
    if processor is None or not hasattr(processor, "image_processor"):
        model_type = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code).model_type
        if model_type not in IMAGE_ONLY_STAND_INS:
            raise ValueError(f"{path}: transformers could not build the {model_type} processor with its image "
                             f"processor ({error or 'AutoProcessor returned ' + type(processor).__name__}); "
                             f"install what it needs") from error
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        processor = image_only_processor(model_type, Qwen2VLImageProcessorPil.from_pretrained(path), tokenizer,
                                         tokenizer.chat_template)
    if max_pixels is not None:
        cap_image_pixels(processor.image_processor, max_pixels)
    processor.tokenizer.padding_side = "left"
    return processor


def cap_image_pixels(image_processor, max_pixels: int) -> None:
    """Bound the pixels of each image the processor makes, the way its family sizes images: Qwen-VL resizes
    to at most `max_pixels` in area; Idefics3 / SmolVLM resize the longest side (then cut square tiles of
    `max_image_size`), so the longest side becomes the largest multiple of the tile within sqrt(max_pixels)."""
    size = getattr(image_processor, "size", None)
    if hasattr(image_processor, "max_image_size"):
        tile = image_processor.max_image_size["longest_edge"]
        image_processor.size = {"longest_edge": max(tile, int(max_pixels ** 0.5) // tile * tile)}
    elif hasattr(image_processor, "merge_size"):          # the Qwen-VL image processors
        image_processor.max_pixels = max_pixels
        if isinstance(size, dict):
            size["longest_edge"] = max_pixels
    else:
        raise ValueError(f"--max_pixels: minivr1 does not know how {type(image_processor).__name__} sizes images")


def language_model(model):
    """The language model (the decoder stack) inside a vision-language model, and its module path:
    what transformers' `get_decoder()` returns (`model.language_model` for the Qwen families,
    `model.text_model` for Idefics3)."""
    hf = unwrap_peft(model)
    decoder = hf.get_decoder()
    paths = {id(m): name for name, m in hf.named_modules()}
    if decoder is hf or decoder is getattr(hf, "model", None) or id(decoder) not in paths:
        raise ValueError(f"{type(hf).__name__}: cannot tell its language model from its vision tower "
                         f"(get_decoder() returns no submodule of its own)")
    return decoder, paths[id(decoder)]


def language_model_prefixes(model) -> tuple[str, ...]:
    """Parameter-name prefixes of the language side: the decoder stack and the LM head. Everything else
    (vision tower, projector / merger) is the vision side."""
    hf = unwrap_peft(model)
    _, path = language_model(hf)
    head = hf.get_output_embeddings()
    heads = [name for name, m in hf.named_modules() if m is head]
    return tuple(f"{p}." for p in [path, *heads[:1]])


def lora_targets(model) -> list[str]:
    """Module paths of every linear layer of the language model (none in the vision tower): the
    default LoRA targets, found in the model itself rather than by a family's module names."""
    decoder, path = language_model(model)
    return [f"{path}.{name}" for name, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)]


def non_language_modules(model) -> list[str]:
    """The top-most modules outside the language model (vision tower, projector, LM head): what 4-bit
    QLoRA leaves unquantized."""
    hf = unwrap_peft(model)
    decoder, _ = language_model(hf)
    out = []

    def walk(module, prefix):
        for name, child in module.named_children():
            if child is decoder:
                continue
            if any(m is decoder for m in child.modules()):
                walk(child, f"{prefix}{name}.")
            else:
                out.append(prefix + name)
    walk(hf, "")
    return out


def fsdp_wrap_classes(model) -> list[str]:
    """The layer classes FSDP shards as units: the model's own `_no_split_modules` (its decoder layers
    and vision blocks), which transformers gathers from every sub-model. configs/accelerate/fsdp.yaml
    names none: `policy.TokenLogprobs` hands these to accelerate."""
    return sorted(getattr(unwrap_peft(model), "_no_split_modules", None) or [])


def load_policy(path: str | Path, mode: str = "lora", dtype: str = "auto", gradient_checkpointing: bool = False,
                freeze_vision: bool = True, lora_r: int = 64, lora_alpha: int = 128, lora_dropout: float = 0.05,
                lora_target: str | list[str] | None = None, device_map=None, trust_remote_code: bool = False):
    """Load a model for training in one of three modes.

    mode "full":  every language-model weight trains (vision tower too unless `freeze_vision`).
    mode "lora":  a fresh LoRA (peft) on the language model; base weights frozen. If `path` is a
                  saved LoRA adapter, it is merged into its base first (so the starting point and
                  the KL reference are the adapted model, not the bare base).
    mode "qlora": as "lora" with the base in 4-bit NF4 (bitsandbytes); the vision tower and the
                  LM head stay unquantized.
    The language model is the model's `get_decoder()`; LoRA goes on its linear layers (`lora_targets`)
    unless `lora_target` (peft's target_modules: a regex or a list of names) says otherwise.
    """
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    if mode not in ("full", "lora", "qlora"):
        raise ValueError(f"mode must be 'full', 'lora' or 'qlora', got {mode!r}")
    check_source(path)
    quiet_deepspeed_on_cpu()
    torch_dtype = resolve_dtype(dtype)
    base, adapter = (adapter_base(path), path) if adapter_base(path) else (path, None)
    kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation(), trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if mode == "qlora":
        compute = torch_dtype if torch_dtype != torch.float32 or not torch.cuda.is_available() else torch.bfloat16
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            # full module paths (a short name such as "visual" is silently ignored, and training then fails),
            # found on a weightless copy of the model
            llm_int8_skip_modules=non_language_modules(meta_model(base, trust_remote_code)))
        kwargs.setdefault("device_map", {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu")
        if adapter is not None:
            raise ValueError(f"{path} is a LoRA adapter: merge it into a full checkpoint first with "
                             f"`python -m minivr1.models merge {path} OUT_DIR`, then train QLoRA on OUT_DIR")
    model = AutoModelForImageTextToText.from_pretrained(base, **kwargs)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if freeze_vision:
        language = language_model_prefixes(model)
        for name, p in model.named_parameters():
            if not name.startswith(language):
                p.requires_grad_(False)
    if gradient_checkpointing:
        # non-reentrant: works with LoRA without input grads and with ZeRO-3 (docs/pitfalls.md #15)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model
        if mode == "qlora":
            from peft import prepare_model_for_kbit_training
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            target_modules=lora_target or lora_targets(model), task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    return model


def meta_model(path, trust_remote_code: bool = False):
    """The model at `path` built on the meta device from its config: its module tree, no weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)


def load_for_inference(path: str | Path, dtype: str = "auto", device: str | None = None,
                       trust_remote_code: bool = False):
    """A model ready to generate: a full checkpoint dir / hub id, or a LoRA adapter dir on its base."""
    model = load_policy(path, mode="full", dtype=dtype, freeze_vision=False, trust_remote_code=trust_remote_code)
    model.eval().requires_grad_(False)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, dtype: str = "bf16") -> Path:
    """Merge a LoRA adapter into its base and save a plain HF checkpoint (transformers, vLLM)."""
    from minivr1.checkpoint import share_modes

    model = load_policy(adapter_dir, mode="full", dtype=dtype, freeze_vision=False)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_processor(load_processor(adapter_dir), out_dir, source=processor_source(adapter_dir))
    share_modes(out_dir)
    return Path(out_dir)


def unwrap_peft(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model for export; list a model's "
                                            "FSDP shard units.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge ADAPTER_DIR into its base and save a plain HF checkpoint in OUT_DIR")
    m.add_argument("adapter_dir")
    m.add_argument("out_dir")
    m.add_argument("--dtype", default="bf16", help="dtype of the saved weights (bf16, fp16, fp32)")
    f = sub.add_parser("fsdp-classes", help="the layer classes FSDP shards MODEL by (its _no_split_modules; read "
                                            "from its config, no weights loaded)")
    f.add_argument("model", help="hub id or checkpoint directory")
    a = p.parse_args()
    if a.cmd == "merge":
        print(merge_adapter(a.adapter_dir, a.out_dir, a.dtype))
    else:
        print(",".join(fsdp_wrap_classes(meta_model(adapter_base(a.model) or a.model))))
