"""Shared fixtures: a tiny randomly initialised Qwen2.5-VL and a small toy dataset, built once
per test session in a temporary directory (no model hub)."""
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    from minivr1 import toy
    out = tmp_path_factory.mktemp("toy")
    toy.generate(out / "data", n_train=48, n_eval=12, n_cold=48, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from minivr1 import tiny
    return tiny.build("tiny", tmp_path_factory.mktemp("tiny") / "base", seed=0)


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from minivr1 import models
    return models.load_processor(tiny_model_dir)


def make_eos_likely(model, processor, batch, max_new_tokens: int) -> None:
    """Make <|im_end|> likely in place, so sampled completions end at different lengths (a random
    model runs every completion to the limit, and then masks cannot tell aggregations apart): its
    LM-head row is put along the mean final hidden state of completions sampled from `batch`."""
    import torch

    from minivr1 import rollout

    torch.manual_seed(0)
    ro = rollout.generate(model, processor, batch, max_new_tokens)
    with torch.no_grad():
        hidden = model.model(input_ids=torch.cat([ro.prompt_ids, ro.completion_ids], 1),
                             attention_mask=torch.cat([ro.prompt_mask, ro.completion_mask], 1),
                             pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                             mm_token_type_ids=torch.cat([ro.prompt_types, torch.zeros_like(ro.completion_ids)], 1)
                             ).last_hidden_state[:, ro.prompt_ids.shape[1]:]
        direction = hidden.reshape(-1, hidden.shape[-1]).mean(0)
        eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
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


def assert_standard_checkpoint(directory) -> None:
    """A checkpoint the serving stack can read: every class its files name is one transformers defines
    (no class of ours, no remote code), and its processor files are those transformers writes for a
    standard Qwen2.5-VL: the expected image-processor fields are computed by transformers' own class
    from the saved settings, not written out by hand here."""
    import json
    from pathlib import Path

    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    directory = Path(directory)
    names = named_classes(directory)
    foreign = [(f, k, n) for f, k, n in names if k == "auto_map" or not hasattr(transformers, n)]
    assert not foreign, f"{directory}: classes transformers does not define, or remote code: {foreign}"
    processor_class = transformers.Qwen2_5_VLProcessor.__name__
    assert ("tokenizer_config.json", "processor_class", processor_class) in names
    saved = json.loads((directory / "preprocessor_config.json").read_text())
    settings = {k: saved[k] for k in ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                      "image_std")}
    written = json.loads(Qwen2VLImageProcessorPil(**settings).to_json_string())     # as transformers writes it
    expected = {**written, "processor_class": processor_class}
    assert saved == expected
    assert (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file()
