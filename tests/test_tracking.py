"""Tests for minivr1.tracking: JSONL files, no-op on other ranks, trackers, console formatting."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from minivr1.tracking import Tracker, format_metrics, format_number, print0


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_written_flushed_and_appended_on_resume(tmp_path):
    tracker = Tracker(tmp_path, config={"lr": 1e-5})
    tracker.log({"reward": torch.tensor(0.5), "acc": np.float32(0.25), "n": 3}, step=1)
    # Flushed at once: readable before close (a crash right now would lose nothing).
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["reward"] == 0.5
    tracker.log({"reward": 0.75}, step=2)
    tracker.close()
    tracker.close()  # closing twice is fine

    with Tracker(tmp_path) as resumed:  # a resumed run appends
        resumed.log({"reward": 1.0}, step=3)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["acc"] == 0.25 and rows[0]["n"] == 3 and isinstance(rows[0]["time"], float)
    assert list(rows[0])[0] == "step"


def test_log_text_goes_to_samples_jsonl(tmp_path):
    with Tracker(tmp_path) as tracker:
        tracker.log_text("completion", "<think>2+2</think><answer>4</answer>", step=5)
    assert read_jsonl(tmp_path / "samples.jsonl") == [
        {"step": 5, "name": "completion", "text": "<think>2+2</think><answer>4</answer>"}
    ]


def test_non_main_process_is_a_noop(tmp_path):
    tracker = Tracker(tmp_path / "run", report_to="tensorboard,wandb", is_main=False)
    tracker.log({"reward": 1.0}, step=1)
    tracker.log_text("x", "y", step=1)
    tracker.close()
    assert not (tmp_path / "run").exists()  # not even the directory; and no tracker imported


@pytest.mark.parametrize("report_to", ["tensorbord", ["wandb", "mlflow"]])
def test_unknown_report_to_is_a_clear_error(tmp_path, report_to):
    with pytest.raises(ValueError, match="unknown tracker.*choose from"):
        Tracker(tmp_path, report_to=report_to)
    with pytest.raises(ValueError):  # on every rank, so a typo never passes silently
        Tracker(tmp_path, report_to=report_to, is_main=False)


def test_missing_packages_say_what_to_install(tmp_path, monkeypatch):
    # A None entry in sys.modules makes `import` raise ImportError, as if the package were absent.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        Tracker(tmp_path, report_to="tensorboard")
    with pytest.raises(ImportError, match="pip install wandb"):
        Tracker(tmp_path, report_to=["wandb"])


def test_tensorboard_and_wandb_receive_values_without_secrets(tmp_path, monkeypatch):
    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("tb_dir", log_dir))

        def add_scalar(self, k, v, step):
            calls.append(("tb_scalar", k, v, step))

        def add_text(self, k, text, step):
            calls.append(("tb_text", k, text, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("tb_close",))

    fake_tb = types.ModuleType("torch.utils.tensorboard")
    fake_tb.SummaryWriter = FakeWriter
    fake_wandb = types.ModuleType("wandb")
    fake_wandb.init = lambda **kw: calls.append(("wandb_init", kw))
    fake_wandb.log = lambda data, step: calls.append(("wandb_log", data, step))
    fake_wandb.Html = lambda s: ("html", s)
    fake_wandb.finish = lambda: calls.append(("wandb_finish",))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_tb)
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)

    config = {"lr": 1e-5, "hub_token": "hf_SECRET", "wandb_api_key": "SECRET", "max_new_tokens": 64}
    with Tracker(tmp_path, report_to=["tensorboard", "wandb"], config=config, run_name="r1") as tracker:
        tracker.log({"reward": 0.5, "note": "text is not a scalar"}, step=3)
        tracker.log_text("sample", "<answer>4</answer>", step=3)

    assert "SECRET" not in repr(calls)
    init = next(c[1] for c in calls if c[0] == "wandb_init")
    assert init["project"] == "minivr1" and init["name"] == "r1"
    assert init["config"]["max_new_tokens"] == 64 and init["config"]["hub_token"] == "***"
    assert ("tb_scalar", "reward", 0.5, 3) in calls
    assert ("wandb_log", {"reward": 0.5}, 3) in calls
    assert ("wandb_log", {"sample": ("html", "<pre>&lt;answer&gt;4&lt;/answer&gt;</pre>")}, 3) in calls
    assert any(c[0] == "tb_text" and c[1] == "sample" and "<answer>4</answer>" in c[2] for c in calls)
    assert ("tb_close",) in calls and ("wandb_finish",) in calls


@pytest.mark.parametrize(
    "x, text",
    [(12, "12"), (85.23, "85.2"), (0.41, "0.41"), (0.0031, "0.0031"), (0.000012, "1.2e-05"),
     (0.0, "0"), (1234.56, "1235"), (-0.5, "-0.5"), (True, "True"), (torch.tensor(0.25), "0.25"),
     (float("nan"), "nan"), ("abc", "abc")],
)  # fmt: skip
def test_format_number(x, text):
    assert format_number(x) == text


def test_format_metrics():
    m = {"reward": 0.41, "acc": 0.375, "len": 85.23, "kl": 0.0031, "step": 12}
    assert format_metrics(m) == "step 12 | reward 0.41 | acc 0.375 | len 85.2 | kl 0.0031"
    assert format_metrics(m, keys=["step", "kl", "missing"]) == "step 12 | kl 0.0031"


def test_print0_reads_rank_before_accelerate_starts(capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "accelerate.state", raising=False)  # as if accelerate were not in use
    monkeypatch.setenv("RANK", "1")
    print0("hidden")
    monkeypatch.setenv("RANK", "0")
    print0("shown", end="!")
    assert capsys.readouterr().out == "shown!"


def test_print0_uses_accelerate_state_once_initialised(capsys, monkeypatch):
    from accelerate.state import AcceleratorState, PartialState

    was_initialised = bool(PartialState._shared_state)
    PartialState(cpu=True)  # a single process: the main one, whatever a stale RANK says
    monkeypatch.setenv("RANK", "1")
    print0("shown")
    assert capsys.readouterr().out == "shown\n"
    if not was_initialised:
        AcceleratorState._reset_state(True)
