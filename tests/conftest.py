"""Shared fixtures: a tiny randomly initialised Qwen2.5-VL (and one of every other family), and a
small toy dataset, built once per test session in a temporary directory (no model hub)."""
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Every family minivr1.tiny builds (cheap tests run on all), and the two the expensive tests (whole
# training runs) run on besides the default Qwen2.5-VL: the newest Qwen and the non-Qwen family.
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5", "idefics3")
TRAINING_FAMILIES = ("qwen3_vl", "idefics3")


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    from minivr1 import toy
    out = tmp_path_factory.mktemp("toy")
    toy.generate(out / "data", n_train=48, n_eval=12, n_cold=48, seed=0)
    return out


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family_dir(family): the tiny random model of `family`, built once per session."""
    from minivr1 import tiny

    built = {}

    def get(family: str):
        if family not in built:
            built[family] = tiny.build("tiny", tmp_path_factory.mktemp(family) / "base", seed=0, family=family)
        return built[family]
    return get


@pytest.fixture(scope="session")
def tiny_model_dir(family_dir):
    return family_dir("qwen2_5_vl")


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from minivr1 import models
    return models.load_processor(tiny_model_dir)


@pytest.fixture(scope="session")
def problems(toy_dir):
    """One RL problem of each question kind: different questions, so prompts of different lengths (left
    padding). A test module may define its own `problems` instead."""
    from minivr1 import data

    probs, _ = data.read_problems(toy_dir / "data" / "rl_train.jsonl")
    by_kind = {}
    for p in probs:
        by_kind.setdefault(p.category, []).append(p)
    return [by_kind["count"][0], by_kind["majority"][0], by_kind["total"][0]]


def make_eos_likely(model, processor, batch, max_new_tokens: int) -> None:
    """Make the end-of-turn token (the chat template's: <|im_end|>, <end_of_utterance>) likely in place,
    so sampled completions end at different lengths (a random model runs every completion to the limit,
    and then masks cannot tell aggregations apart): its LM-head row is put along the mean final hidden
    state of completions sampled from `batch`."""
    import torch

    from minivr1 import rollout
    from minivr1.chat import assistant_turn_tokens
    from minivr1.policy import final_hidden

    torch.manual_seed(0)
    ro = rollout.generate(model, processor, batch, max_new_tokens)
    types = batch.get("mm_token_type_ids")
    with torch.no_grad():
        hidden = final_hidden(model, torch.cat([ro.prompt_ids, ro.completion_ids], 1),
                              torch.cat([ro.prompt_mask, ro.completion_mask], 1), batch.get("pixel_values"),
                              batch.get("image_grid_thw"),
                              None if types is None else torch.cat([types, torch.zeros_like(ro.completion_ids)], 1)
                              )[:, ro.prompt_ids.shape[1]:]
        direction = hidden.reshape(-1, hidden.shape[-1]).mean(0)
        eos = assistant_turn_tokens(processor)[1]
        model.get_output_embeddings().weight[eos] = direction / direction.norm()


# Keys under which a Hugging Face JSON file names a class that loaders will look up (auto_map: remote code).
CLASS_KEYS = ("processor_class", "image_processor_type", "video_processor_type", "feature_extractor_type",
              "tokenizer_class", "architectures", "auto_map")


def named_classes(directory) -> list[tuple[str, str, str]]:
    """(file, key, class name) for every class a JSON file of the checkpoint names."""
    import json
    from pathlib import Path

    found = []

    def walk(value, file):
        if isinstance(value, dict):
            for k, v in value.items():
                if k in CLASS_KEYS:
                    for name in ([v] if isinstance(v, str) else list(v.values()) if isinstance(v, dict) else v or []):
                        found.append((file, k, name))
                walk(v, file)
        elif isinstance(value, list):
            for v in value:
                walk(v, file)

    for path in sorted(Path(directory).rglob("*.json")):
        walk(json.loads(path.read_text()), path.name)
    return found


def assert_standard_checkpoint(directory, family: str = "qwen2_5_vl") -> None:
    """A checkpoint the serving stack can read: every class its files name is one transformers defines
    (no class of ours, no remote code), and its processor files are those transformers writes for a
    standard checkpoint of `family`: the processor class the family's hub checkpoints name, and image
    (and video) processor settings computed by transformers' own classes from the saved settings, not
    written out by hand here."""
    import json
    from pathlib import Path

    import transformers

    directory = Path(directory)
    names = named_classes(directory)
    foreign = [(f, k, n) for f, k, n in names if k == "auto_map" or not hasattr(transformers, n)]
    assert not foreign, f"{directory}: classes transformers does not define, or remote code: {foreign}"
    processor_class = {"qwen2_5_vl": transformers.Qwen2_5_VLProcessor, "qwen3_vl": transformers.Qwen3VLProcessor,
                       "qwen3_5": transformers.Qwen3VLProcessor, "idefics3": transformers.Idefics3Processor}[family].__name__
    assert ("tokenizer_config.json", "processor_class", processor_class) in names
    assert (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file()
    if family == "idefics3":              # transformers' own processor, saved by itself: one processor_config.json
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        saved = json.loads((directory / "processor_config.json").read_text())
        settings = {k: saved["image_processor"][k] for k in ("size", "max_image_size", "do_image_splitting",
                                                              "image_mean", "image_std")}
        written = json.loads(Idefics3ImageProcessorPil(**settings).to_json_string())
        assert saved == {"image_processor": written, "image_seq_len": saved["image_seq_len"],
                         "processor_class": processor_class}
        assert not (directory / "preprocessor_config.json").exists()
        return
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    saved = json.loads((directory / "preprocessor_config.json").read_text())
    settings = {k: saved[k] for k in ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                      "image_std")}
    written = json.loads(Qwen2VLImageProcessorPil(**settings).to_json_string())     # as transformers writes it
    assert saved == {**written, "processor_class": processor_class}
    video = directory / "video_preprocessor_config.json"
    if family == "qwen2_5_vl":            # the hub's Qwen2.5-VL layout: the video processor is built from the above
        assert not video.exists()
    else:                                 # Qwen3-VL / Qwen3.5 checkpoints name their own video processor
        saved_video = json.loads(video.read_text())
        assert saved_video["video_processor_type"] == transformers.Qwen3VLVideoProcessor.__name__
        assert saved_video["processor_class"] == processor_class
        assert {k: saved_video[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                            "image_std")} == {k: settings[k] for k in settings if k != "size"}
