"""The benchmark scripts run end to end at tiny sizes on a CPU and print their tables (the real
measurements are in docs/benchmarks.md): bench/bench_logprob_memory.py --quick (small V and N, each
configuration in its own subprocess) and at one medium size where its memory bound is checked, and
bench/bench_gpu_step.py on the tiny model with a CPU."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def run(args, timeout=120) -> str:
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table_rows(text: str, first_header: str) -> list[list[str]]:
    """The body rows of the markdown table whose first header cell is `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_logprob_memory_quick(tmp_path):
    out = run(["bench/bench_logprob_memory.py", "--quick", "--threads", "1", "--json", tmp_path / "r.json"])
    rows = table_rows(out, "sequences x tokens")
    assert [r[0] for r in rows] == ["1 x 64", "4 x 128"]
    for r in rows:      # ours, checkpointed, plain: "<memory> MiB|GiB, <CPU seconds> s"; two memory ratios;
        assert all(re.fullmatch(r"\d+(\.\d+)? (MiB|GiB), \d+\.\d s", c) for c in r[3:6]), r
        assert all(re.fullmatch(r"\d+\.\dx", c) for c in r[6:8]), r
        assert all(re.fullmatch(r"\d+\.\d\d|-", c) for c in r[8:11]), r     # three CPU-time ratios
    results = json.loads((tmp_path / "r.json").read_text())
    assert {r["method"] for r in results} == {"ours", "checkpointed", "plain"}
    assert all(r["status"] == "ok" and r["finite"] and r["peak_reset"] for r in results)


def test_logprob_memory_is_under_two_and_a_half_chunks(tmp_path):
    """The hand-written backward's working memory stays <= 2.5 chunks of fp32 logits, where the previous
    checkpointed version needed ~4 (chunk 512 x V 32768: one chunk = 64 MiB, well above malloc's noise)."""
    out = run(["bench/bench_logprob_memory.py", "--vocab", 32768, "--hidden", 64, "--configs", "1x2048",
               "--chunk_sizes", 512, "--methods", "ours,checkpointed", "--threads", 1, "--json", tmp_path / "r.json"])
    chunk = 512 * 32768 * 4
    extra = {r["method"]: r["extra"] / chunk for r in json.loads((tmp_path / "r.json").read_text())}
    print(out, extra)
    assert extra["ours"] <= 2.5
    assert extra["checkpointed"] >= 3.5          # the measurement can see the difference


def test_gpu_step_runs_tiny_on_cpu(tmp_path):
    out = run(["bench/bench_gpu_step.py", "--size", "tiny", "--device", "cpu", "--completion_length", 16,
               "--group_size", 2, "--image_size", 56, "--modes", "lora,full", "--work_dir", tmp_path,
               "--rollout_options", "dynamic,static,minivr1_static", "--json", tmp_path / "r.json"])
    rows = table_rows(out, "trainer")
    assert [(r[0], r[1], r[2]) for r in rows] == [("minivr1", "lora", "sdpa"), ("minivr1", "full", "sdpa")]
    for r in rows:
        assert float(r[4]) > 0 and float(r[6]) > 0 and r[10] == "16", r     # rollout, update tok/s; full length
    options = table_rows(out, "cache")
    assert [r[0] for r in options] == ["dynamic", "static", "minivr1_static"] and all(float(r[1]) > 0 for r in options)
    results = json.loads((tmp_path / "r.json").read_text())
    assert all(r["status"] == "ok" and r["update_flops"] > 0 for r in results["ours"])
    assert results["P"] > results["patches"] // 4 > 0          # the prompt holds the image's tokens


def test_gpu_step_dtype_flag_on_cpu(tmp_path):
    """--dtype bf16 on a CPU (what lets the 3B architecture fit: tests/test_realsize.py): the checkpoint is
    built and trained in bf16."""
    run(["bench/bench_gpu_step.py", "--size", "tiny", "--device", "cpu", "--dtype", "bf16", "--completion_length", 4,
         "--group_size", 2, "--image_size", 56, "--modes", "lora", "--rollout_options", "", "--work_dir", tmp_path,
         "--json", tmp_path / "r.json"])
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["dtype"] == "bf16" and [r["status"] for r in results["ours"]] == ["ok"]
    config = json.loads((tmp_path / "model-tiny-cpu-bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_token_budget_bench_quick(tiny_model_dir, toy_dir, tmp_path):
    """bench/bench_token_budget.py --quick: both micro-batchings of the same steps, the table and its check that
    they saw the same completions (learning rate 0)."""
    out = run(["bench/bench_token_budget.py", "--quick", "--model", tiny_model_dir, "--data",
               toy_dir / "data" / "rl_train.jsonl", "--json", tmp_path / "r.json"], timeout=300)
    worst = json.loads((tmp_path / "r.json").read_text())["worst"]
    fixed = f"{256 // worst} completions"                          # the same worst case as the 256-token budget
    rows = table_rows(out, "stage")
    assert [(r[0], r[1]) for r in rows] == [("1", fixed), ("1", "256 tokens, sorted"),
                                            ("2", fixed), ("2", "256 tokens, sorted")]
    assert all(float(r[4].split()[0]) > 0 and float(r[5].split()[0]) > 0 for r in rows), rows   # wall, CPU seconds
    assert "same completions in every variant: True" in out
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert all(s["micro_batches"] >= 1 for s in results["256 tokens, sorted"][0]["steps"])
