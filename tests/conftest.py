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
