"""minivr1.plots: every training run draws its curves when it finishes; `python -m minivr1.plots RUN_DIR` redraws
them; without matplotlib, a one-line note instead of an error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minivr1 import plots

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(run, rows):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def grpo_rows():
    return [{"step": s, "stage": 1 if s <= 3 else 2, "reward": s / 10, "accuracy": s / 12, "format": 1.0,
             "len": 40 + s, "len_max": 60 + s, "truncated": 0.5 / s, "kl": 0.001 * s, "lr": 1e-4} for s in range(1, 7)]


def sft_rows():
    return [{"step": s, "loss": 2.0 / s, "lr": 1e-3 * (1 - s / 10), "epoch": s / 4, "grad_norm": 1.0} for s in range(1, 9)]


def test_curves_of_a_grpo_and_an_sft_run(tmp_path):
    pytest.importorskip("matplotlib")
    for name, rows, panels in [("grpo", grpo_rows(), ["reward", "accuracy", "len", "truncated", "kl"]),
                               ("sft", sft_rows(), ["loss", "lr"])]:
        run = write_metrics(tmp_path / name, rows)
        path = plots.plot_run(run)
        assert path == run / "training_curves.png" and path.read_bytes().startswith(PNG)
        assert plots.panels(rows) == panels
    assert plots.stage_starts(grpo_rows()) == [4]          # the PTST boundary is drawn before step 4
    assert plots.stage_starts(sft_rows()) == []


def test_without_matplotlib_a_note_instead_of_an_error(tmp_path, monkeypatch, capsys):
    run = write_metrics(tmp_path / "run", sft_rows())
    for name in [m for m in sys.modules if m.startswith("matplotlib.")] + ["matplotlib", "matplotlib.figure"]:
        monkeypatch.setitem(sys.modules, name, None)         # import matplotlib now fails, as when not installed
    assert plots.plot_run(run) is None
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (run / "training_curves.png").exists()


def test_a_run_without_metrics_is_one_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "minivr1.plots", str(tmp_path / "nothing")], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and "metrics.jsonl" in p.stderr
    assert "Traceback" not in p.stderr


def test_the_command_redraws_a_run(tmp_path):
    run = write_metrics(tmp_path / "run", grpo_rows())
    p = subprocess.run([sys.executable, "-m", "minivr1.plots", str(run)], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert p.returncode == 0, p.stderr
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install matplotlib" in p.stderr
    else:
        assert (run / "training_curves.png").read_bytes().startswith(PNG) and str(run / "training_curves.png") in p.stdout
