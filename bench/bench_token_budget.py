"""Micro-batches by token budget (--micro_batch_tokens) against a fixed number of completions (--micro_batch_size),
on the toy task: the logged `t_update` (reference log-probs + policy forward/backward + optimizer step) of the same
GRPO steps, in wall and process CPU time, and the padded tokens the log-prob forwards ran.

The comparison is at the same memory bound. A fixed number of completions per micro-batch must be chosen so that the
worst case fits: every completion at the run's longest limit, with the longest prompt; for a budget of B padded
tokens that is B // (longest prompt + longest limit) completions. The token budget packs to B whatever the lengths.

Each variant runs `train_grpo.main` in a fresh subprocess with one torch thread (--threads), the order alternated
over --repeats. The learning rate is 0, so both variants roll out exactly the same completions at every step (the
seeds are the same and the weights never move) and do the same update work on them; only the micro-batching differs.
CPU time is the process's own (time.process_time) over the same interval as `t_update`: robust to other jobs on a
shared machine, unlike the wall time.

    bash scripts/toy_pipeline.sh        # or its first steps: the toy data and the SFT model in runs/toy
    .venv/bin/python bench/bench_token_budget.py                       # the table in docs/benchmarks.md
    .venv/bin/python bench/bench_token_budget.py --quick --model DIR --data FILE     # a few tiny steps (tests)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/toy/sft/final", help="the starting model (the toy pipeline's SFT model)")
    p.add_argument("--data", default="runs/toy/data/rl_train.jsonl", help="RL problems")
    p.add_argument("--stages", default="96x8:4,192x4:4",
                   help="PTST stages of each run (the toy preset's, shortened); the first step of each stage is untimed")
    p.add_argument("--prompts_per_step", type=int, default=8, help="prompts per step (the toy preset's)")
    p.add_argument("--budgets", default="2048,4096",
                   help="token budgets, comma-separated; each against the fixed count with the same worst case")
    p.add_argument("--micro_batch_size", type=int, default=0,
                   help="compare every budget with this fixed count instead (e.g. the toy preset's 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (pinned)")
    p.add_argument("--repeats", type=int, default=2, help="runs per variant, alternating the order")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="2 short stages, 1 repeat, one budget (for tests)")
    p.add_argument("--worker", help=argparse.SUPPRESS)          # internal: one run, its JSON spec
    a = p.parse_args(argv)
    if a.quick:
        a.stages, a.repeats, a.budgets, a.prompts_per_step = "16x2:2,24x2:2", 1, "256", 2
    return a


def worker(spec: dict) -> dict:
    """One run of train_grpo.main; per timed step: wall and CPU seconds of t_update, micro-batches, padded tokens."""
    import torch

    torch.set_num_threads(spec["threads"])
    import train_grpo
    from minivr1 import distributed
    from minivr1.policy import TokenLogprobs

    clock, micro, padded = [], [], []

    class Clock:                     # train_grpo's time.time(): 3 calls a step (start, after rollout, after update)
        @staticmethod
        def time():
            clock.append((time.perf_counter(), time.process_time()))
            return clock[-1][0]

    real_forward, real_start = TokenLogprobs.forward, distributed.start_accumulation

    def forward(self, input_ids, attention_mask, *args, **kwargs):
        live = attention_mask.bool().any(0).nonzero() if self.trim_padding else None
        width = int(live[-1]) - int(live[0]) + 1 if live is not None else attention_mask.shape[1]
        padded.append((len(clock) // 3, input_ids.shape[0] * width))      # (step, tokens): update-phase forwards
        return real_forward(self, input_ids, attention_mask, *args, **kwargs)

    def start_accumulation(accelerator, n_micro):
        micro.append(n_micro)
        return real_start(accelerator, n_micro)

    train_grpo.time = Clock
    TokenLogprobs.forward, distributed.start_accumulation = forward, start_accumulation
    out = Path(spec["out"])
    args = train_grpo.Args(model=spec["model"], data=spec["data"], output_dir=str(out), mode="full",
                           freeze_vision=False, stages=spec["stages"], prompts_per_step=spec["prompts_per_step"],
                           micro_batch_size=spec["micro_batch_size"], micro_batch_tokens=spec["budget"],
                           learning_rate=0.0, beta=0.01, reward="hfrrf", save_steps=0, sample_every=0, resume=None)
    train_grpo.main(args)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = []
    for i, m in enumerate(metrics):
        (_, _), (w1, c1), (w2, c2) = clock[3 * i:3 * i + 3]
        steps.append({"stage": m["stage"], "t_update": m["t_update"], "wall": w2 - w1, "cpu": c2 - c1,
                      "micro_batches": micro[i], "padded_tokens": sum(n for k, n in padded if k == i),
                      "len": m["len"], "reward": m["reward"]})
    return {"budget": spec["budget"], "steps": steps}


def run(spec: dict, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "out": str(Path(tmp) / "run"), "threads": threads}
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        proc = subprocess.run([sys.executable, __file__, "--worker", str(path)], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def longest_prompt(model: str, data: str) -> int:
    """Tokens of the longest prompt of the data set (image tokens included), as the rollout encodes it."""
    from minivr1 import data as data_module, models
    from minivr1.chat import prompt_batch

    problems, _ = data_module.read_problems(data)
    processor = models.load_processor(model)
    return max(int(prompt_batch(processor, problems[i:i + 256])["attention_mask"].sum(1).max())
               for i in range(0, len(problems), 256))


def main(a) -> None:
    from minivr1.stages import parse_stages

    stages = parse_stages(a.stages)
    worst = longest_prompt(a.model, a.data) + max(s.max_completion_length for s in stages)
    # (name, micro_batch_size, micro_batch_tokens) per variant: each budget, and the fixed count with its worst case
    def fixed(b):
        return a.micro_batch_size or max(1, b // worst)
    variants = [v for b in map(int, a.budgets.split(",")) for v in
                [(f"{fixed(b)} completions", fixed(b), 0), (f"{b} tokens, sorted", 8, b)]]
    variants = list(dict((v[0], v) for v in variants).values())     # one fixed run when --micro_batch_size is given
    base = dict(model=a.model, data=a.data, stages=a.stages, prompts_per_step=a.prompts_per_step)
    results = {v[0]: [] for v in variants}
    for r in range(a.repeats):
        for name, size, budget in (variants if r % 2 == 0 else variants[::-1]):
            results[name].append(run({**base, "micro_batch_size": size, "budget": budget}, a.threads))
    starts = {s.start for s in stages}

    def timed(name):                                       # every step but each stage's first, all repeats
        return [s for res in results[name] for i, s in enumerate(res["steps"]) if i not in starts]

    lines = [f"worst case: longest prompt + longest limit = {worst} tokens a completion", "",
             f"| stage | micro-batching{'' if a.micro_batch_size else ' (same worst case)'} | micro-batches / step | "
             "padded tokens / step | t_update wall | "
             "t_update CPU | CPU, tokens / fixed |", "|---|---|---|---|---|---|---|"]
    for stage in sorted({s["stage"] for s in timed(variants[0][0])}):
        for k, (name, _, budget) in enumerate(variants):
            ss = [s for s in timed(name) if s["stage"] == stage]
            cpu = statistics.mean(s["cpu"] for s in ss)
            fixed_name = next(v[0] for v in variants[k::-1] if not v[2])            # the fixed count before it
            fixed_cpu = statistics.mean(s["cpu"] for s in timed(fixed_name) if s["stage"] == stage)
            lines.append(f"| {stage} | {name} | {statistics.mean(s['micro_batches'] for s in ss):.1f} | "
                         f"{statistics.mean(s['padded_tokens'] for s in ss):,.0f} | "
                         f"{statistics.mean(s['wall'] for s in ss):.3f} s | {cpu:.3f} s | "
                         f"{f'{cpu / fixed_cpu:.2f}' if budget else ''} |")
    first = timed(variants[0][0])
    same = all(s["len"] == t["len"] for name, _, _ in variants for s, t in zip(first, timed(name)))
    print("\n".join(lines))
    print(f"\nsteps timed per variant: {len(first)}; same completions in every variant: {same}; "
          f"mean completion length {statistics.mean(s['len'] for s in first):.1f} tokens")
    if a.json:
        Path(a.json).write_text(json.dumps({"worst": worst, "results": results}, indent=1))


if __name__ == "__main__":
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
    else:
        main(args)
