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
