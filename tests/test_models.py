"""Loading modes on the tiny model: full, LoRA, QLoRA (4-bit on CPU), adapter merge and export."""
import pytest
import torch

from minivr1 import models


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no local folder"):
        models.load_policy(tmp_path / "nope" / "final", mode="full")
    with pytest.raises(FileNotFoundError, match="no local folder"):
        models.load_processor("runs/does/not/exist")


def test_a_mistyped_local_path_fails_at_once(tmp_path, monkeypatch):
    """Issue: `--model toy/grpo` (meant: runs/toy/grpo) has the shape of a hub id, so it failed only after ~50 s
    of trying the model hub. Now a name that is neither a local folder nor in the hub cache fails at once
    offline; online, the hub is asked once, briefly, and its answer (or silence) is in the message."""
    import time

    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    t0 = time.time()
    with pytest.raises(FileNotFoundError, match=r"no local folder 'toy/grpo'.*not in the hub cache"):
        models.load_processor("toy/grpo")                         # tests run with HF_HUB_OFFLINE=1
    assert time.time() - t0 < 5
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no local folder 'runs/grpo'"):
        models.check_source("runs/grpo")                          # a local folder's path: never a hub id

    monkeypatch.setattr(models, "hub_offline", lambda: False)
    asked = []

    class NotFound(huggingface_hub.errors.RepositoryNotFoundError):
        def __init__(self):                                       # as the hub client raises it on a 404
            Exception.__init__(self, "404 Client Error: Repository Not Found")

    def missing(repo_id, timeout=None):
        asked.append((repo_id, timeout))
        raise NotFound()

    monkeypatch.setattr(huggingface_hub, "model_info", missing)
    with pytest.raises(FileNotFoundError, match=r"no local folder 'toy/grpo', and no model 'toy/grpo' on the hub"):
        models.check_source("toy/grpo")
    assert asked and asked[0][1] <= 10

    def unreachable(repo_id, timeout=None):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(FileNotFoundError, match=r"no local folder 'toy/grpo'.*hub .*could not be reached"):
        models.check_source("toy/grpo")
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo_id, timeout=None: object())
    models.check_source("toy/grpo")                               # a hub model: found


def test_full_mode_freezes_the_vision_tower_by_default(tiny_model_dir):
    names = trainable(models.load_policy(tiny_model_dir, mode="full", dtype="fp32"))
    assert names and not any(n.startswith("model.visual") for n in names)
    assert any(n.startswith("model.visual") for n in
               trainable(models.load_policy(tiny_model_dir, mode="full", dtype="fp32", freeze_vision=False)))


def test_lora_trains_only_language_model_adapters(tiny_model_dir):
    model = models.load_policy(tiny_model_dir, mode="lora", dtype="fp32", lora_r=4, lora_alpha=8)
    names = trainable(model)
    assert names and all("lora_" in n for n in names)
    assert all("language_model" in n for n in names)          # none in the vision tower


def test_qlora_keeps_vision_tower_unquantized_and_trains(tiny_model_dir, processor, toy_dir):
    import bitsandbytes as bnb  # noqa: F401
    from minivr1 import data
    from minivr1.chat import SFTCollator

    model = models.load_policy(tiny_model_dir, mode="qlora", lora_r=4, lora_alpha=8)
    linear4 = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert linear4 and not any("visual" in n for n in linear4)
    convs, _ = data.read_sft(toy_dir / "data" / "cold_start.json")
    batch = SFTCollator(processor, 512)(convs[:2])
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and torch.isfinite(loss)


def test_adapter_dir_loads_merged_and_exports(tiny_model_dir, tmp_path):
    lora = models.load_policy(tiny_model_dir, mode="lora", dtype="fp32", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    lora.save_pretrained(tmp_path / "adapter")
    models.load_processor(tiny_model_dir).save_pretrained(tmp_path / "adapter")
    assert models.adapter_base(tmp_path / "adapter") == str(tiny_model_dir)

    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        want = lora.eval()(input_ids=ids).logits
        merged = models.load_for_inference(tmp_path / "adapter", dtype="fp32", device="cpu")
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        out = models.merge_adapter(tmp_path / "adapter", tmp_path / "merged", dtype="fp32")
        assert not (out / "adapter_config.json").exists()      # a plain checkpoint
        plain = models.load_for_inference(out, dtype="fp32", device="cpu")
        torch.testing.assert_close(plain(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_tiny_build_writes_a_standard_checkpoint(tiny_model_dir):
    """Issue: checkpoints named a processor class only minivr1 defines, so AutoProcessor (transformers
    serve, vLLM) fell back to the tokenizer and silently dropped every image."""
    from conftest import assert_standard_checkpoint
    assert_standard_checkpoint(tiny_model_dir)


def test_merged_export_is_standard_and_keeps_the_source_processor_files(tiny_model_dir, tmp_path):
    """merge writes a standard directory whose processor files are the base model's, byte for byte."""
    from conftest import assert_standard_checkpoint

    lora = models.load_policy(tiny_model_dir, mode="lora", dtype="fp32", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    lora.save_pretrained(tmp_path / "adapter")
    models.save_processor(models.load_processor(tiny_model_dir), tmp_path / "adapter", source=tiny_model_dir)
    out = models.merge_adapter(tmp_path / "adapter", tmp_path / "merged", dtype="fp32")
    assert_standard_checkpoint(out)
    for name in ("preprocessor_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_our_loader_still_opens_standard_checkpoints_without_torchvision(tiny_model_dir, toy_dir):
    """The PIL fallback is an internal detail: it loads the standard files and gives image tokens."""
    import importlib.util

    from minivr1 import data
    from minivr1.chat import prompt_batch

    assert importlib.util.find_spec("torchvision") is None      # the situation this test is about
    processor = models.load_processor(tiny_model_dir)
    problems, _ = data.read_problems(toy_dir / "data" / "eval.jsonl")
    batch = prompt_batch(processor, problems[:2])
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [16, 16]
