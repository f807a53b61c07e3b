"""The rollout engines alone, against HF `generate`, on the same model, prompts and seed (CPU time).

Engines (minivr1.rollout.make_engine): `hf` (`model.generate` on every row, the reference),
`shared_prefix` (each prompt prefilled once), `static` (that, then the static-cache decode loop:
train_grpo.py's default) and `static_compiled` (its step compiled by torch.compile). Each engine
samples the same P prompts x G completions from the same seed, in one process, `--repeats` times
in alternating order (A B C D, D C B A, ...); the table gives each engine's mean CPU time per
rollout and its ratio to `hf`, whether its tokens equal `hf`'s, and, for `static_compiled`, the
first call (which compiles) apart from the others. The model and prompts are bench_grpo_vs_trl.py's
(`--shape`: toy, or vision_r1 = Qwen's real vocabulary and a 448x448 image, ~400-token prompts).
Random weights rarely emit the end token, so at vision_r1 every completion runs the full length.

    .venv/bin/python bench/bench_rollout.py --shape vision_r1 -L 512 --json runs/bench-rollout.json
    .venv/bin/python bench/bench_rollout.py --quick          # tiny model, a few tokens (tests)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
ENGINES = "hf,shared_prefix,static,static_compiled"


def load_grpo_bench():
    spec = importlib.util.spec_from_file_location("bench_grpo_vs_trl", Path(__file__).with_name("bench_grpo_vs_trl.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="vision_r1", choices=["toy", "vision_r1"])
    p.add_argument("--size", default="small", choices=["tiny", "small"])
    p.add_argument("--prompts", "-P", type=int, default=1, help="prompts per rollout")
    p.add_argument("--group_size", "-G", type=int, default=4, help="completions per prompt")
    p.add_argument("--max_new_tokens", "-L", type=int, default=512)
    p.add_argument("--engines", default=ENGINES, help=f"comma-separated, from {ENGINES}")
    p.add_argument("--repeats", type=int, default=2, help="timed rollouts per engine (alternating order)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", default=None, help="where the model and data go (reused if built; default: a temp dir)")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="toy shape, tiny model, 8 tokens, 1 repeat, no compile (tests)")
    a = p.parse_args(argv)
    if a.quick:
        a.shape, a.size, a.max_new_tokens, a.repeats, a.prompts, a.group_size = "toy", "tiny", 8, 1, 2, 2
        a.engines = "hf,shared_prefix,static"
    a.engines = [e for e in a.engines.split(",") if e]
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    # a cold compile, as on a fresh machine: inductor's on-disk caches in a new folder (its C++ builds run
    # in worker processes, outside this process's CPU time: the first call's wall time is what it cost)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_rollout_inductor_"))
    import torch

    from minivr1 import data, models
    from minivr1.rollout import make_engine

    if a.threads:
        torch.set_num_threads(a.threads)
    grpo_bench = load_grpo_bench()
    tmp = None
    work = Path(a.work_dir) if a.work_dir else Path(tmp := tempfile.mkdtemp(prefix="bench_rollout_"))
    try:
        if not (work / "model" / "config.json").is_file():
            setup = argparse.Namespace(shape=a.shape, size=a.size, n_problems=max(a.prompts, 8), seed=a.seed)
            grpo_bench.setup(setup, work)
        processor = models.load_processor(work / "model")
        problems = data.read_problems(work / "data" / "rl_train.jsonl")[0][:a.prompts]
        model = models.load_for_inference(work / "model", dtype="fp32")
        engines = {name: make_engine(name, model, processor, 1.0, 1.0) for name in a.engines}
        times = {name: [] for name in a.engines}
        first, tokens, P = {}, {}, None

        def rollout(name):
            torch.manual_seed(a.seed)
            c, w = time.process_time(), time.perf_counter()
            ro = engines[name].generate(problems, a.group_size, a.max_new_tokens)
            return time.process_time() - c, time.perf_counter() - w, ro

        for name in a.engines:                         # untimed: the compiled engine compiles here
            if name == "static_compiled":
                cpu, wall, ro = rollout(name)
                first[name] = {"cpu": cpu, "wall": wall}
        for r in range(a.repeats):
            for name in (a.engines if r % 2 == 0 else a.engines[::-1]):
                cpu, wall, ro = rollout(name)
                times[name].append({"cpu": cpu, "wall": wall})
                tokens[name], P = ro.completion_ids, ro.prompt_ids.shape[1]
        mean = {name: statistics.fmean(t["cpu"] for t in times[name]) for name in a.engines}
        ref = mean.get("hf")
        wall = {name: statistics.fmean(t["wall"] for t in times[name]) for name in a.engines}
        lines = [f"rollout engines, {a.shape} shape, {a.size} model: {a.prompts} prompt(s) x G={a.group_size}, "
                 f"{a.max_new_tokens} new tokens, prompt {P} tokens, {a.repeats} timed rollouts each, "
                 f"torch threads {torch.get_num_threads()}, load avg before {os.getloadavg()[0]:.1f}", "",
                 "| engine | CPU s / rollout | / hf | same tokens as hf | wall s / rollout | first call (compiles): "
                 "wall s |", "|---|---|---|---|---|---|"]
        for name in a.engines:
            same = "-" if "hf" not in tokens else ("yes" if torch.equal(tokens[name], tokens["hf"]) else "no")
            ratio = f"{mean[name] / ref:.2f}" if ref else "-"
            compile_wall = f"{first[name]['wall']:.1f}" if name in first else "-"
            lines.append(f"| {name} | {mean[name]:.2f} | {ratio} | {same} | {wall[name]:.2f} | {compile_wall} |")
        text = "\n".join(lines)
        print(text)
        report = {"args": vars(a), "times": times, "first_call": first, "mean_cpu": mean, "prompt_tokens": P,
                  "table": text}
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))
        return report
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
