"""Every model family minivr1.tiny builds, on CPU (README "Model families").

Cheap checks run on all of them (FAMILIES): the factory writes a standard checkpoint of the family
(`python -m minivr1.tiny --help` lists them: test_scripts_help.py), its processor saves and reloads
as the family's own, LoRA and the frozen vision side are found in the model itself, the chat
template's turn tokens and the image tokens are the family's. Whole training runs (SFT and GRPO
with full fine-tuning and LoRA, exact resume, save -> reload) run on TRAINING_FAMILIES (Qwen3-VL and
the non-Qwen Idefics3); Qwen2.5-VL's are in test_sft.py / test_grpo_train.py. Elsewhere, per family:
generation vs teacher-forced log-probs (test_rollout.py), the shared-prompt speed-ups or their
fallback (test_shared_prompt.py), FSDP units (test_accelerate_configs.py), the real sizes' parameter
counts (test_configs.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import train_grpo
import train_sft
from minivr1 import data, grader, models, rollout, tiny
from minivr1.chat import assistant_turn_tokens, prompt_batch, without_pixel_mask
from conftest import FAMILIES, TRAINING_FAMILIES, assert_standard_checkpoint

# What each family's own checkpoints use (their chat templates and processors), written out here as the spec.
TURNS = {"qwen2_5_vl": ("<|im_start|>assistant\n", "<|im_end|>"), "qwen3_vl": ("<|im_start|>assistant\n", "<|im_end|>"),
         "qwen3_5": ("<|im_start|>assistant\n", "<|im_end|>"), "idefics3": ("Assistant:", "<end_of_utterance>")}
QWEN_MEDIA = {"<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"}
MEDIA = {"qwen2_5_vl": QWEN_MEDIA, "qwen3_vl": QWEN_MEDIA, "qwen3_5": QWEN_MEDIA,
         "idefics3": {"<fake_token_around_image>", "<image>", "<global-img>"}}


@pytest.fixture(autouse=True)
def _reset_accelerate_after():
    yield
    AcceleratorState._reset_state(True)       # each main() builds its own Accelerator


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads (test_grpo_train.py says why)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def problems(toy_dir):
    probs, _ = data.read_problems(toy_dir / "data" / "rl_train.jsonl")
    return probs[:3]


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- the factory and the files

@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_build_is_a_standard_checkpoint_of_its_family(family, family_dir):
    directory = family_dir(family)
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [tiny.model_class(family).__name__]
    assert_standard_checkpoint(directory, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_saves_as_its_family_and_reloads(family, family_dir, problems, tmp_path):
    """load -> save_processor -> load: the family's standard files, and the same model inputs."""
    processor = models.load_processor(family_dir(family))
    models.save_processor(processor, tmp_path)
    assert_standard_checkpoint(tmp_path, family)
    shutil.copy(family_dir(family) / "config.json", tmp_path)           # the model type, for the loader
    want, got = prompt_batch(processor, problems), prompt_batch(models.load_processor(tmp_path), problems)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("family", FAMILIES)
def test_turn_and_image_tokens_are_the_familys(family, family_dir):
    processor = models.load_processor(family_dir(family))
    tok = processor.tokenizer
    header, end = assistant_turn_tokens(processor)
    assert (tok.decode(header), tok.convert_ids_to_tokens(end)) == TURNS[family]
    assert set(tok.convert_ids_to_tokens(rollout.media_token_ids(processor))) == MEDIA[family]
    model = models.load_for_inference(family_dir(family), dtype="fp32")
    assert rollout.eos_token_ids(model, processor) == [end]


# ----------------------------------------------------------------------------- language model and vision side

@pytest.mark.parametrize("family", FAMILIES)
def test_lora_and_freezing_follow_the_models_own_language_model(family, family_dir):
    """LoRA goes on every linear layer of the language model (`get_decoder()`) and nowhere else; full
    fine-tuning freezes everything outside it but the LM head (vision tower and projector)."""
    directory = family_dir(family)
    model = models.load_policy(directory, mode="full", dtype="fp32")
    decoder, path = models.language_model(model)
    linears = {f"{path}.{n}" for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(models.lora_targets(model)) == linears and len(linears) >= 7 * 2
    vision = [m for m in models.non_language_modules(model) if m != "lm_head"]
    assert vision and models.non_language_modules(model)[-1] == "lm_head"
    vision_params = {n for n, _ in model.named_parameters() if n.startswith(tuple(f"{v}." for v in vision))}
    assert vision_params and not vision_params & trainable(model)
    assert trainable(model) == {n for n, _ in model.named_parameters()} - vision_params
    assert vision_params <= trainable(models.load_policy(directory, mode="full", dtype="fp32", freeze_vision=False))

    lora = models.load_policy(directory, mode="lora", dtype="fp32", lora_r=4, lora_alpha=8)
    adapted = {n.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for n in trainable(lora)}
    assert all("lora_" in n for n in trainable(lora)) and adapted == linears


def test_qlora_leaves_the_non_language_modules_unquantized(family_dir):
    """4-bit QLoRA on a non-Qwen family: the skip list comes from the model (vision tower, connector, LM head)."""
    import bitsandbytes as bnb  # noqa: F401

    model = models.load_policy(family_dir("idefics3"), mode="qlora", lora_r=4, lora_alpha=8)
    linear4 = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert linear4 and all(".text_model." in n for n in linear4)


# ----------------------------------------------------------------------------- image inputs

def test_pixel_mask_is_dropped_only_where_it_says_nothing(family_dir, toy_dir):
    """Idefics3 pads a sequence's images to [images, C, H, W] and returns pixel_attention_mask; minivr1 drops it
    after checking it is what the model assumes without it (all 1 on real images, all 0 on padding images)."""
    processor = models.load_processor(family_dir("idefics3"))
    image = data.read_problems(toy_dir / "data" / "rl_train.jsonl")[0][0].images[0].load()
    text = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}] * n}], tokenize=False)
            for n in (1, 2)]
    enc = processor(text=text, images=[[image], [image, image]], return_tensors="pt", padding=True)
    assert enc["pixel_values"].shape[:2] == (2, 2) and not enc["pixel_attention_mask"][0, 1].any()   # a padding image
    assert "pixel_attention_mask" not in without_pixel_mask(enc)
    enc["pixel_attention_mask"][0, 0, :, -1] = 0                              # padding inside a real image
    with pytest.raises(ValueError, match="padding inside an image"):
        without_pixel_mask(enc)


def test_max_pixels_caps_images_each_familys_way(family_dir, problems):
    qwen = models.load_processor(family_dir("qwen3_vl"), max_pixels=56 * 56)
    image_id = qwen.tokenizer.convert_tokens_to_ids(qwen.image_token)
    assert (prompt_batch(qwen, problems[:1])["input_ids"] == image_id).sum() == 4        # 16 without the cap
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    smolvlm = Idefics3ImageProcessorPil(size={"longest_edge": 2048}, max_image_size={"longest_edge": 512})
    models.cap_image_pixels(smolvlm, 1_003_520)                 # 1001 px -> the largest multiple of the 512 px tile
    assert smolvlm.size == {"longest_edge": 512}


# ----------------------------------------------------------------------------- whole runs (two families)

def _cold(toy_dir, path: Path, n: int = 4) -> Path:
    path.write_text(json.dumps(json.loads((toy_dir / "data" / "cold_start.json").read_text())[:n]))
    return path


def _weights(directory: Path) -> dict:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", TRAINING_FAMILIES)
def test_sft_trains_resumes_exactly_and_saves_a_reloadable_checkpoint(family, family_dir, toy_dir, tmp_path):
    """Full fine-tuning, 3 steps; the same run resumed from its step-1 checkpoint ends with the same weights;
    final/ is a standard checkpoint of the family that loads back, with the vision side untouched."""
    base = dict(model=str(family_dir(family)), data=str(_cold(toy_dir, tmp_path / "cold.json")),
                image_root=str(toy_dir / "data"), max_length=256, per_device_batch_size=2, gradient_accumulation_steps=1,
                learning_rate=1e-2, logging_steps=1, save_steps=1, keep_last=0, dtype="fp32", max_steps=3)
    final = train_sft.main(train_sft.Args(**base, output_dir=str(tmp_path / "a")))
    AcceleratorState._reset_state(True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-0000001", tmp_path / "b" / "checkpoints" / "step-0000001")
    resumed = train_sft.main(train_sft.Args(**base, output_dir=str(tmp_path / "b")))
    losses = [m["loss"] for m in _metrics(tmp_path / "a")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert [m["loss"] for m in _metrics(tmp_path / "b")] == losses[1:]
    a, b = _weights(final), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert_standard_checkpoint(final, family)
    trained = models.load_for_inference(final, dtype="fp32")
    start = models.load_for_inference(family_dir(family), dtype="fp32").state_dict()
    vision = tuple(f"{m}." for m in models.non_language_modules(trained) if m != "lm_head")
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and not any(k.startswith(vision) for k in changed)
    assert models.load_processor(final).tokenizer.convert_tokens_to_ids("<think>") is not None


def _length_reward(text, answer, **meta):
    return float(len(text) % 3)                      # varies within groups even on a random model


@pytest.mark.parametrize("family", TRAINING_FAMILIES)
def test_grpo_full_and_lora_steps_and_exact_resume(family, family_dir, toy_dir, tmp_path, monkeypatch):
    """GRPO with full fine-tuning (2 steps, then resumed from step 1: the same metrics and weights) and with
    LoRA (1 step: the adapter trains and final/ is a standard checkpoint of the family)."""
    monkeypatch.setitem(grader.REWARDS, "length_mod3", _length_reward)
    base = dict(model=str(family_dir(family)), data=str(toy_dir / "data" / "rl_train.jsonl"), stages="16x4:2",
                prompts_per_step=2, micro_batch_size=8, learning_rate=1e-3, beta=0.04, reward="length_mod3",
                save_steps=1, sample_every=0, seed=0, mode="full")
    train_grpo.main(train_grpo.Args(**base, output_dir=str(tmp_path / "a")))
    AcceleratorState._reset_state(True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-0000001", tmp_path / "b" / "checkpoints" / "step-0000001")
    train_grpo.main(train_grpo.Args(**base, output_dir=str(tmp_path / "b")))
    AcceleratorState._reset_state(True)
    drop = {"t_rollout", "t_update", "tok_per_s", "time"}
    straight = [{k: v for k, v in m.items() if k not in drop} for m in _metrics(tmp_path / "a")]
    assert [{k: v for k, v in m.items() if k not in drop} for m in _metrics(tmp_path / "b")] == straight[1:]
    assert straight[0]["kl"] < 1e-10 and straight[1]["kl"] > 0 and all(m["grad_norm"] > 0 for m in straight)
    a, b = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_standard_checkpoint(tmp_path / "a" / "final", family)

    lora = train_grpo.main(train_grpo.Args(**{**base, "mode": "lora", "lora_r": 4, "lora_alpha": 8,
                                              "stages": "16x4:1"}, output_dir=str(tmp_path / "lora")))
    adapter = load_file(lora / "adapter_model.safetensors")
    assert all("lora_" in k for k in adapter) and any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert_standard_checkpoint(lora, family)
    models.load_for_inference(lora, dtype="fp32")                 # the adapter merges into its base
