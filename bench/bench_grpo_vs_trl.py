"""Time one GRPO step of minivr1 (train_grpo.py) against TRL's GRPOTrainer, same model, data and work.

Both trainers run, one after the other and each in a fresh subprocess, on the same randomly
initialised tiny Qwen2.5-VL (minivr1.tiny) and the same toy RL problems (minivr1.toy), with the
same per-step work: P prompts x G completions sampled (temperature 1, no top-k / top-p / min-p,
the same vision tokens suppressed) up to the same max completion length, the same reward
(HFRRF), group-std advantages, one reference forward (beta > 0, a frozen copy of the starting
model), one policy forward + backward over all P*G completions in one micro-batch, one AdamW step
(constant learning rate, grad-norm clip 1.0), full fine-tuning of every weight, fp32, no
gradient checkpointing, num_iterations 1. TRL's defaults that differ are set explicitly
(loss_type "grpo" = per-sequence mean like our `seq_mean`, beta, scale_rewards "group", top_k 0,
constant learning rate, ...). The prompt text is checked to be the same.

Time per step is wall clock between the ends of consecutive steps (everything a step does:
data, rollout, rewards, logprobs, update, logging), averaged over --steps steps after --warmup
untimed ones, pooled over --repeats runs (alternating which trainer goes first); the process's
CPU time over the same steps is shown too (it suffers less when other jobs share the machine).
Breakdown: ours from its metrics.jsonl (t_rollout, t_update); TRL's by timing its own methods from
a subclass (timers only, no extra work): rollout = `_generate` (prompt processing + generate +
decode), logprobs+update = reference log-probs + everything from the end of `_prepare_inputs` to
the end of the optimizer step. --baseline DIR adds a column for another checkout of ours.

    .venv/bin/pip install -r bench/requirements.txt     # TRL, benchmark-only
    .venv/bin/python bench/bench_grpo_vs_trl.py          # defaults: ~3 minutes on 2 CPU cores
    .venv/bin/python bench/bench_grpo_vs_trl.py --quick  # tiny model, a few tiny steps (tests)
    .venv/bin/python bench/bench_grpo_vs_trl.py --no-trl # ours only (no TRL needed)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUICK = dict(size="tiny", prompts_per_step=2, num_generations=2, max_completion_length=8, steps=2, warmup=1,
             n_problems=8, repeats=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=["tiny", "small"],
                   help="random Qwen2.5-VL from minivr1.tiny (small ~4M params, tiny ~0.3M)")
    p.add_argument("--prompts_per_step", "-P", type=int, default=2, help="prompts per step P")
    p.add_argument("--num_generations", "-G", type=int, default=8, help="completions per prompt G (P*G per step)")
    p.add_argument("--max_completion_length", "-L", type=int, default=64, help="completion token limit")
    p.add_argument("--steps", type=int, default=8, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (>= 1)")
    p.add_argument("--beta", type=float, default=0.01, help="KL coefficient, both trainers (paper: 0.01)")
    p.add_argument("--learning_rate", type=float, default=1e-6, help="constant learning rate, both trainers")
    p.add_argument("--n_problems", type=int, default=64, help="toy RL problems generated")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in each run (default 1: on a shared 2-core machine, OpenMP spin-waiting "
                        "with 2 threads made steps several times slower and erratic; 0 = torch's default)")
    p.add_argument("--repeats", type=int, default=2,
                   help="run the pair this many times, alternating which goes first; means pool all timed steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", default=None, help="where data, model and runs go (default: a temp dir, deleted)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--no-trl", dest="no_trl", action="store_true", help="run ours only (TRL not needed)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, P=2 G=2 L=8, 1 warmup + 2 timed steps, 1 repeat (for tests; overrides those "
                        "flags)")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="also time train_grpo.py + minivr1 from another checkout DIR (e.g. `git worktree add "
                        "/tmp/base HEAD~3`) as a 'baseline' column: a before/after of our own changes")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)   # internal: one timed run
    p.add_argument("--code_root", help=argparse.SUPPRESS)
    p.add_argument("--setup_dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    if a.warmup < 1 or a.steps < 1:
        p.error("--warmup and --steps must be >= 1 (a step's time is measured from the end of the previous one)")
    return a


# ---------------------------------------------------------------------------------------------- setup

def setup(a, work: Path) -> dict:
    """Toy problems and a random model, shared by all runs; returns the prompts' token counts."""
    from minivr1 import data, models, tiny, toy
    from minivr1.chat import prompt_batch
    toy.generate(work / "data", n_train=a.n_problems, n_eval=0, n_cold=0, seed=a.seed)
    tiny.build(a.size, work / "model", seed=a.seed)
    problems, _ = data.read_problems(work / "data" / "rl_train.jsonl")
    batch = prompt_batch(models.load_processor(work / "model"), problems)
    lengths = batch["attention_mask"].sum(1)
    return {"prompt_tokens_min": int(lengths.min()), "prompt_tokens_max": int(lengths.max()),
            "image_tokens": int(batch["mm_token_type_ids"][0].sum()) if "mm_token_type_ids" in batch else None}


def _threads(a):
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------- ours

def run_ours(a, setup_dir: Path) -> dict:
    threads = _threads(a)
    import train_grpo

    stamps = []                               # (wall, process CPU) when each step logs its metrics

    class StampingTracker(train_grpo.Tracker):
        def log(self, metrics, step):
            stamps.append((time.perf_counter(), time.process_time()))
            super().log(metrics, step)

    train_grpo.Tracker = StampingTracker      # a timer only: the step itself is the script's
    out = setup_dir / "runs" / f"ours-{time.time_ns()}"
    total = a.warmup + a.steps
    train_grpo.main(train_grpo.Args(
        model=str(setup_dir / "model"), data=str(setup_dir / "data" / "rl_train.jsonl"), output_dir=str(out),
        mode="full", freeze_vision=False, dtype="fp32", gradient_checkpointing=False,
        stages=f"{a.max_completion_length}x{a.num_generations}:{total}",
        prompts_per_step=a.prompts_per_step, micro_batch_size=a.prompts_per_step * a.num_generations,
        num_iterations=1, learning_rate=a.learning_rate, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=a.beta, epsilon=0.2, loss_aggregation="seq_mean", temperature=1.0, top_p=1.0, reward="hfrrf",
        system_prompt="none", save_steps=0, sample_every=0, resume=None, report_to="none", seed=a.seed))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "t_rollout" in r]
    if len(rows) != total or len(stamps) != total:
        raise RuntimeError(f"expected {total} steps, got {len(rows)} metrics lines and {len(stamps)} log calls")
    steps = []
    for (w0, c0), (w1, c1), r in list(zip(stamps, stamps[1:], rows[1:]))[a.warmup - 1:]:
        wall = w1 - w0
        steps.append({"wall": wall, "cpu": c1 - c0, "rollout": r["t_rollout"], "update": r["t_update"],
                      "other": wall - r["t_rollout"] - r["t_update"], "len": r["len"]})
    return {"name": "ours", "code": str(Path(train_grpo.__file__).resolve().parent), "threads": threads, "steps": steps}


# ---------------------------------------------------------------------------------------------- TRL

def run_trl(a, setup_dir: Path) -> dict:
    threads = _threads(a)
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages

    from minivr1 import data, grader, models
    from minivr1.chat import problem_messages
    from minivr1.rollout import media_token_ids

    model_dir = str(setup_dir / "model")
    processor = models.load_processor(model_dir)
    problems, _ = data.read_problems(setup_dir / "data" / "rl_train.jsonl")
    rows = []
    for p in problems:
        if len(p.images) != 1 or not p.question.startswith("<image>") or p.question.count("<image>") != 1:
            raise ValueError(f"{p.id}: expected one image placed before the text (the toy task's layout)")
        rows.append({"prompt": [{"role": "user", "content": p.question[len("<image>"):]}],
                     "image": p.images[0].load(), "answer": p.answer, "answer_type": p.answer_type or ""})
    # The same prompt text as ours (chat template, image placement, no system prompt).
    mine = processor.apply_chat_template(problem_messages(problems[0].question, 1), add_generation_prompt=True,
                                         tokenize=False)
    theirs = processor.apply_chat_template(prepare_multimodal_messages(rows[0]["prompt"], [rows[0]["image"]]),
                                           add_generation_prompt=True, tokenize=False)
    if mine != theirs:
        raise RuntimeError(f"prompts differ:\nours: {mine!r}\nTRL:  {theirs!r}")
    dataset = Dataset.from_list(rows)

    def hfrrf(completions, answer, answer_type, **kwargs):
        return [grader.hfrrf_reward(c[0]["content"], gold, answer_type=t or None)
                for c, gold, t in zip(completions, answer, answer_type)]

    clock = {"rollout": 0.0, "logprobs": 0.0, "prepared": None}

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with timers around its own methods; nothing else changes."""

        def _generate(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return super()._generate(*args, **kwargs)
            finally:
                clock["rollout"] += time.perf_counter() - t

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            if torch.is_grad_enabled():          # the training forward: part of the update
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
            t = time.perf_counter()
            try:
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
            finally:
                clock["logprobs"] += time.perf_counter() - t

        def _prepare_inputs(self, *args, **kwargs):
            try:
                return super()._prepare_inputs(*args, **kwargs)
            finally:
                clock["prepared"] = time.perf_counter()

    steps = []

    class StepTimer(TrainerCallback):
        trainer = None                        # set once the trainer exists: its logged metrics hold the lengths

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()
            clock.update(rollout=0.0, logprobs=0.0, prepared=None)

        def on_step_end(self, args, state, control, **kw):
            end = time.perf_counter()
            metrics = self.trainer._metrics["train"]
            lens = metrics.get("completions/mean_length") or [float("nan")]
            update = end - clock["prepared"] + clock["logprobs"] if clock["prepared"] else float("nan")
            steps.append({"core": end - self.begin, "rollout": clock["rollout"], "update": update,
                          "len": lens[-1], "end": end, "cpu_end": time.process_time()})

    config = GRPOConfig(
        output_dir=str(setup_dir / "runs" / f"trl-{time.time_ns()}"), use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        per_device_train_batch_size=a.prompts_per_step * a.num_generations, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=a.num_generations, max_completion_length=a.max_completion_length,
        max_steps=a.warmup + a.steps, learning_rate=a.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=a.beta, num_iterations=1, epsilon=0.2, loss_type="grpo",
        scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
        generation_kwargs={"suppress_tokens": media_token_ids(processor)}, disable_dropout=True,
        mask_truncated_completions=False, report_to="none", logging_strategy="no", save_strategy="no",
        disable_tqdm=True, log_completions=False, remove_unused_columns=False, dataloader_num_workers=0,
        seed=a.seed)
    timer = StepTimer()
    timer.trainer = TimedGRPOTrainer(model=model_dir, reward_funcs=[hfrrf], args=config, train_dataset=dataset,
                                     processing_class=processor, callbacks=[timer])
    timer.trainer.train()
    out = []
    for prev, s in zip(steps[a.warmup - 1:], steps[a.warmup:]):
        wall = s["end"] - prev["end"]
        out.append({"wall": wall, "cpu": s["cpu_end"] - prev["cpu_end"], "core": s["core"], "rollout": s["rollout"],
                    "update": s["update"], "other": wall - s["rollout"] - s["update"], "len": s["len"]})
    return {"name": "TRL", "threads": threads, "steps": out}


# ---------------------------------------------------------------------------------------------- report

def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "peft", "trl", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def summarise(run: dict) -> dict:
    s = run["steps"]

    def mean(k):
        vals = [x[k] for x in s if k in x]
        return statistics.fmean(vals) if vals else None

    out = {k: mean(k) for k in ("wall", "cpu", "core", "rollout", "update", "other", "len")}
    out["wall_stdev"] = statistics.stdev([x["wall"] for x in s]) if len(s) > 1 else 0.0
    out["n"] = len(s)
    return out


def ratio_line(results: dict, a: str, b: str) -> str:
    return (f"ratio {a}/{b} (time per step): {results[a]['wall'] / results[b]['wall']:.2f}; "
            f"CPU time per step: {results[a]['cpu'] / results[b]['cpu']:.2f}")


def table(a, results: dict, info: dict) -> str:
    def f(v, unit="s"):
        return "-" if v is None else (f"{v:.3f} {unit}" if unit == "s" else f"{v:.1f}")

    names = list(results)
    rows = [("time/step (wall)", "wall", "s"), ("  rollout", "rollout", "s"), ("  logprobs+update", "update", "s"),
            ("  other", "other", "s"), ("CPU time/step (process)", "cpu", "s"),
            ("mean completion length", "len", "tok")]
    head = f"{'per step (mean)':26s}" + "".join(f"{n:>14s}" for n in names)
    lines = [f"GRPO step, {a.size} model: P={a.prompts_per_step} prompts x G={a.num_generations} completions, "
             f"max {a.max_completion_length} tokens, beta {a.beta}, num_iterations 1, "
             f"{results[names[0]]['n']} timed steps after {a.warmup} warmup",
             f"prompts: {info['prompts']['prompt_tokens_min']}-{info['prompts']['prompt_tokens_max']} tokens "
             f"({info['prompts']['image_tokens']} of them image tokens; no system prompt: the chat template's "
             f"default one)",
             f"machine: {info['machine']['cpu']}, {info['machine']['usable_cpus']} usable CPUs, no GPU; "
             f"torch threads {info['threads']}; load avg (1 min) before: {info['machine']['loadavg_1m']}",
             "versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v), "", head]
    for label, key, unit in rows:
        lines.append(f"{label:26s}" + "".join(f"{f(results[n][key], unit):>14s}" for n in names))
    lines.append(f"{'  (stdev of time/step)':26s}" + "".join(f"{f(results[n]['wall_stdev']):>14s}" for n in names))
    if "TRL" in results:
        lines.append(f"{'TRL step_begin->step_end':26s}" + "".join(
            f"{f(results['TRL']['core']) if n == 'TRL' else '':>14s}" for n in names))
        ratio = results["ours"]["wall"] / results["TRL"]["wall"]
        cpu_ratio = results["ours"]["cpu"] / results["TRL"]["cpu"]
        lines += ["", f"ratio ours/TRL (time per step): {ratio:.2f}  "
                      f"({'meets' if ratio <= 0.7 else 'misses'} the target <= 0.70); "
                      f"CPU time per step: {cpu_ratio:.2f}"]
        if "baseline" in results:
            lines.append(ratio_line(results, "baseline", "TRL"))
    if "baseline" in results:
        lines.append(ratio_line(results, "ours", "baseline"))
    return "\n".join(lines)


SETTINGS = ("size", "prompts_per_step", "num_generations", "max_completion_length", "steps", "warmup", "beta",
            "learning_rate", "n_problems", "threads", "seed")


def worker(a) -> None:
    """One timed run in this (fresh) process, with the parent's settings from setup_dir/settings.json."""
    for k, v in json.loads((Path(a.setup_dir) / "settings.json").read_text()).items():
        setattr(a, k, v)
    if a.code_root:                           # the baseline checkout's train_grpo and minivr1
        sys.path.insert(0, str(Path(a.code_root).resolve()))
    result = (run_ours if a.worker == "ours" else run_trl)(a, Path(a.setup_dir))
    Path(a.out).write_text(json.dumps(result))


def spawn(which: str, setup_dir: Path, code_root: str | None = None) -> dict:
    out = setup_dir / f"result-{which}-{time.time_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", which, "--setup_dir", str(setup_dir),
           "--out", str(out)] + (["--code_root", code_root] if code_root else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    print(f"--- running {which}{f' from {code_root}' if code_root else ''} ...", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-6000:])
        raise SystemExit(f"the {which} run failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return {}
    if not a.no_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("TRL is not installed: `pip install -r bench/requirements.txt`, or pass --no-trl")
    info = {"machine": machine(), "versions": versions()}
    tmp = None
    work = Path(a.work_dir) if a.work_dir else Path(tmp := tempfile.mkdtemp(prefix="bench_grpo_"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        print(f"--- building the toy data and a random {a.size} Qwen2.5-VL in {work} ...", flush=True)
        info["prompts"] = setup(a, work)
        (work / "settings.json").write_text(json.dumps({k: getattr(a, k) for k in SETTINGS}))
        order = ["ours"] + (["baseline"] if a.baseline else []) + ([] if a.no_trl else ["TRL"])
        runs = {name: [] for name in order}
        for r in range(a.repeats):            # alternate the order: slow drifts of the machine hit all alike
            for name in (order if r % 2 == 0 else order[::-1]):
                runs[name].append(spawn("trl" if name == "TRL" else "ours", work,
                                        a.baseline if name == "baseline" else None))
        results = {name: summarise({"steps": [s for run in runs[name] for s in run["steps"]]}) for name in order}
        info["threads"] = runs["ours"][0]["threads"]
        text = table(a, results, info)
        print("\n" + text)
        report = {"args": {k: v for k, v in vars(a).items() if k not in ("worker", "setup_dir", "out", "code_root")},
                  "info": info, "results": results, "runs": runs, "table": text}
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))
        return report
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
