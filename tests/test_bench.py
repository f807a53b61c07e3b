"""bench/bench_grpo_vs_trl.py at tiny size (its speed-up's correctness: tests/test_shared_prompt.py).

The benchmark runs as a subprocess (`--quick`: tiny model, 1 warmup + 2 timed steps). The
ours-only path (`--no-trl`) needs nothing beyond requirements.txt and always runs; the TRL path
needs bench/requirements.txt (`pip install -r bench/requirements.txt`) and is skipped without it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_grpo_vs_trl.py"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run_bench(*args, timeout=240):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table_row(out: str, label: str) -> list[str]:
    line = next((l for l in out.splitlines() if l.startswith(label)), None)
    assert line is not None, f"no {label!r} row in:\n{out}"
    return line[len(label):].split()


# ----------------------------------------------------------------------------- the benchmark script

def test_help():
    out = run_bench("--help", timeout=60)
    for flag in ["--size", "--prompts_per_step", "--num_generations", "--max_completion_length", "--steps",
                 "--warmup", "--beta", "--threads", "--repeats", "--no-trl", "--quick", "--json", "--baseline"]:
        assert flag in out


def test_quick_ours_only(tmp_path):
    """--no-trl, with this checkout also as the --baseline column (the before/after of our changes)."""
    out = run_bench("--quick", "--no-trl", "--baseline", str(ROOT), "--json", str(tmp_path / "r.json"))
    assert table_row(out, "per step (mean)") == ["ours", "baseline"]
    wall = table_row(out, "time/step (wall)")
    assert len(wall) == 4 and float(wall[0]) > 0 and float(wall[2]) > 0       # "0.123 s 0.120 s"
    assert all(float(x) > 0 for x in table_row(out, "mean completion length"))
    assert "ratio ours/baseline (time per step):" in out and "ratio ours/TRL" not in out
    report = json.loads((tmp_path / "r.json").read_text())
    steps = report["runs"]["ours"][0]["steps"]
    assert len(steps) == 2 and all(s["wall"] > 0 and s["cpu"] > 0 and s["rollout"] > 0 and s["update"] > 0
                                   for s in steps)
    assert report["runs"]["baseline"][0]["code"] == str(ROOT)


def test_quick_against_trl():
    pytest.importorskip("trl", reason="TRL is benchmark-only: pip install -r bench/requirements.txt")
    out = run_bench("--quick")
    assert table_row(out, "per step (mean)")[:2] == ["ours", "TRL"]
    wall = table_row(out, "time/step (wall)")
    assert len(wall) == 4 and float(wall[0]) > 0 and float(wall[2]) > 0
    lengths = table_row(out, "mean completion length")
    assert len(lengths) == 2 and all(float(x) > 0 for x in lengths)
    assert "ratio ours/TRL (time per step):" in out
