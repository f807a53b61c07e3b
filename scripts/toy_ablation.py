"""Vision-R1's ablation in miniature, on the toy task: Zero, CI, Long, fixed short limit, PTST (2 and 3 stages).

    python scripts/toy_ablation.py            # task v2, 3 seeds: 15 min 13 s on 2 idle CPU cores (measured)
    python scripts/toy_ablation.py --quick    # 1 seed, half the GRPO steps, 240 eval problems: 7 min 50 s (measured)
    python scripts/toy_ablation.py --task v1  # the original toy task, 3 seeds: 12 min 20 s (measured)
    (the plots need matplotlib, which requirements.txt installs; without it they are skipped)

Runs go `--jobs` at a time (default 2, one thread each), each as soon as the model it starts from is
ready; a rerun with the same settings keeps every finished run and redoes the rest.

Every run is the project's own scripts with a preset from configs/ (the same commands the README
shows), so this file only orchestrates and summarises:

    CI      cold-start SFT only                                 configs/toy_v2_sft.yaml (v1: toy_sft.yaml)
    Zero    GRPO from the toy "instruct" model, no cold start,  configs/toy_instruct_sft.yaml +
            R1-Zero system prompt, format + result reward 1:1    configs/toy_grpo_zero.yaml
    Long    GRPO from CI at one long limit, 192 x 4             configs/toy_grpo_long.yaml
    Fixed   GRPO from CI at the short limit, 96 x 8             configs/toy_grpo_fixed.yaml
    PTST    GRPO from CI, 96 x 8 then 192 x 4                   configs/toy_grpo_ptst.yaml
    PTST-3  GRPO from CI, 96 x 8, 128 x 6, then 192 x 4          configs/toy_grpo_ptst3.yaml

All GRPO runs have the same steps and the same rollout budget per step (prompts x G x limit =
8 x 768). Each GRPO method runs once per seed; every model is evaluated with the paper's
sampling (T 0.6, top_p 0.95) once per seed. The hypothesis for task v2 was written down before
any of these runs: docs/ablation/hypothesis-v2.md. Writes OUT/results.md, OUT/results.json and
OUT/*.png: accuracy overall and per difficulty level, reasoning length per level, how often the
worked steps and loops appear, truncation, and the completion tokens each method generated.

Completion tokens are summed from each run's metrics.jsonl: the trainer logs `completion_tokens`, the
tokens a step generated (end tokens included). For runs made before it logged that, they are
estimated as len (the step's mean completion length) x prompts_per_step x G of the step's stage.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
METHODS = {  # name: (start model, preset, system prompt for evaluation)
    "Zero": ("instruct", "configs/toy_grpo_zero.yaml", "r1_zero"),
    "Long": ("sft", "configs/toy_grpo_long.yaml", None),
    "Fixed": ("sft", "configs/toy_grpo_fixed.yaml", None),
    "PTST": ("sft", "configs/toy_grpo_ptst.yaml", None),
    "PTST-3": ("sft", "configs/toy_grpo_ptst3.yaml", None),
}
FLAGS = {"CI": ("yes", "no", "no"), "Zero": ("no", "yes", "no"), "Long": ("yes", "yes", "no"),
         "Fixed": ("yes", "yes", "no (short limit)"), "PTST": ("yes", "yes", "2 stages"),
         "PTST-3": ("yes", "yes", "3 stages")}
SFT_CONFIG = {"v1": "configs/toy_sft.yaml", "v2": "configs/toy_v2_sft.yaml"}
QUICK = {"seeds": [0], "steps": 100, "eval_limit": 240}     # 240 = 80 problems per level (levels cycle)
# The toy traces' own sentences (minivr1/toy.py: PLAN, LOOPS): this script imports nothing of the package.
STEPS_MARK = "Let me go through the colors one by one."
LOOP_LINE = re.compile(r"^(?:Wait, let me recount|Hmm, let me count) the (?:red|green|blue|yellow) shapes", re.M)


def run(cmd: list[str], log: Path, threads: int) -> None:
    """Run one stage as a subprocess (the same command a user would type); its output to `log`."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    status = "ok" if done.returncode == 0 else f"FAILED (exit {done.returncode}, see {log})"
    print(f"  {time.time() - t0:6.0f}s  {' '.join(cmd[1:3])} ... -> {status}", flush=True)
    if done.returncode:
        raise SystemExit(f"stage failed: {' '.join(cmd)}\nlog: {log}")


@dataclass
class Job:
    name: str
    cmd: list[str]
    done: Path                                   # exists once the job's output is complete
    deps: list[str] = field(default_factory=list)


def run_jobs(jobs: list[Job], parallel: int, threads: int, logs: Path) -> None:
    """Run every job once its dependencies are done, `parallel` at a time, in list order among
    the ready ones; a job whose output already exists (a rerun) is skipped."""
    pending, running, finished = list(jobs), {}, set()
    with ThreadPoolExecutor(parallel) as pool:
        while pending or running:
            for job in list(pending):
                if len(running) == parallel:
                    break
                if all(d in finished for d in job.deps):
                    pending.remove(job)
                    if job.done.exists():
                        print(f"  {'':6}   {job.name}: done before, skipped", flush=True)
                        finished.add(job.name)
                    else:
                        running[pool.submit(run, job.cmd, logs / f"{job.name}.log", threads)] = job.name
            if not running:
                if pending:
                    raise SystemExit(f"no job can start: {[j.name for j in pending]} wait for jobs that do not exist")
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()                  # a failed stage stops the ablation (run raises)
                finished.add(running.pop(future))


def evaluate(out: Path, model: Path, run_dir: Path, seed: int, system_prompt: str | None, limit: int) -> list[str]:
    """The evaluate.py command for one model and seed."""
    cmd = [PY, "evaluate.py", "--config", "configs/toy_eval.yaml", "--model", str(model), "--data",
           str(out / "data" / "eval.jsonl"), "--output_dir", str(run_dir), "--seed", str(seed)]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd + (["--system_prompt", system_prompt] if system_prompt else [])


def read_yaml_key(path: Path, key: str):
    """One top-level scalar of a preset (`key: value`), without a YAML dependency."""
    for line in path.read_text().splitlines():
        if line.startswith(f"{key}:"):
            value = line.split(":", 1)[1].split("#")[0].strip().strip('"').strip("'")
            return int(value) if value.isdigit() else value
    raise KeyError(f"{path}: no {key}")


def stage_spec(preset: Path, steps: int = 0) -> str:
    """The preset's PTST stages, or the same stages with `steps` split evenly when overridden."""
    spec = read_yaml_key(preset, "stages")
    if not steps:
        return spec
    parts = spec.split(",")
    per = [steps // len(parts) + (i < steps % len(parts)) for i in range(len(parts))]
    return ",".join(p.split(":")[0] + f":{n}" for p, n in zip(parts, per))


def completion_tokens(metrics: list[dict], spec: str, prompts_per_step: int) -> list[int]:
    """Completion tokens generated at each step: the logged count if there is one, else
    len (the mean completion length of the step) x prompts_per_step x G of the step's stage."""
    groups = [int(part.split(":")[0].split("x")[1]) for part in spec.split(",")]
    out = []
    for m in metrics:
        if "completion_tokens" in m:
            out.append(int(m["completion_tokens"]))
        else:
            out.append(round(m["len"] * prompts_per_step * groups[m["stage"] - 1]))
    return out


def level_stats(predictions: list[dict], levels: dict[str, int], eval_limit: int) -> dict:
    """Per difficulty level: accuracy, mean length, how often the worked steps, a loop and a cut-off
    (an answer as long as the evaluation limit) appear."""
    by = {}
    for p in predictions:
        by.setdefault(levels[p["id"]], []).append(p)
    out = {}
    for level, recs in sorted(by.items()):
        n = len(recs)
        worked = [r["correct"] for r in recs if STEPS_MARK in r["response"]]
        short = [r["correct"] for r in recs if STEPS_MARK not in r["response"]]
        out[str(level)] = {
            "n": n,
            "accuracy": sum(r["correct"] for r in recs) / n,
            "mean_length": statistics.fmean(r["length"] for r in recs),
            "steps": len(worked) / n,
            "accuracy_steps": sum(worked) / len(worked) if worked else None,        # answers with worked steps
            "accuracy_no_steps": sum(short) / len(short) if short else None,       # ... and without
            "loops": sum(bool(LOOP_LINE.search(r["response"])) for r in recs) / n,
            "truncated": sum(r["length"] >= eval_limit for r in recs) / n,
        }
    return out


def _mean_std(values: list) -> tuple:
    """Mean and population std over seeds, of the seeds that have a value ((None, None) if none has)."""
    values = [v for v in values if v is not None]
    return (statistics.fmean(values), statistics.pstdev(values)) if values else (None, None)


def summarise(out: Path, seeds: list[int], names: list[str], steps: int = 0) -> dict:
    """Mean and spread over seeds of each method's evaluation summary, per level too, and the
    GRPO runs' training truncation and completion tokens."""
    levels = {r["id"]: r.get("level", 1) for r in map(json.loads, (out / "data" / "eval.jsonl").read_text().splitlines())}
    eval_limit = read_yaml_key(ROOT / "configs" / "toy_eval.yaml", "max_new_tokens")
    rows = {}
    for name in names:
        runs = [json.loads((out / f"eval-{name}-s{s}" / "summary.json").read_text()) for s in seeds]
        agg = {key: _mean_std([r[key] for r in runs]) for key in ("accuracy", "format_rate", "mean_length", "mean_waits")}
        buckets = [r["accuracy_by_length"] for r in runs]
        agg["by_length"] = [(statistics.fmean(b[i]["accuracy"] for b in buckets),
                             min(b[i]["min_length"] for b in buckets), max(b[i]["max_length"] for b in buckets))
                            for i in range(min(len(b) for b in buckets))]
        per_seed = [level_stats([json.loads(line) for line in
                                 (out / f"eval-{name}-s{s}" / "predictions.jsonl").read_text().splitlines()],
                                levels, eval_limit) for s in seeds]
        agg["levels"] = {lv: {k: _mean_std([p[lv][k] for p in per_seed]) for k in per_seed[0][lv] if k != "n"}
                         | {"n": per_seed[0][lv]["n"]} for lv in per_seed[0]}
        if name in METHODS:
            preset = ROOT / METHODS[name][1]
            spec, prompts = stage_spec(preset, steps), read_yaml_key(preset, "prompts_per_step")
            tokens, trunc = [], []
            for s in seeds:
                metrics = [json.loads(line) for line in (out / f"grpo-{name}-s{s}" / "metrics.jsonl").read_text().splitlines()]
                tokens.append(sum(completion_tokens(metrics, spec, prompts)))
                trunc.append(statistics.fmean(m["truncated"] for m in metrics[-20:]))
            agg["completion_tokens"] = _mean_std(tokens)
            agg["train_truncated_last20"] = _mean_std(trunc)
        rows[name] = agg
    return rows


def table(rows: dict, seeds: list[int]) -> str:
    lines = [f"| method | cold start | GRPO | PTST | accuracy | format | mean length | 'Wait' per answer | "
             f"accuracy by length quartile (short -> long) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        acc, fmt, length, waits = (r[k] for k in ("accuracy", "format_rate", "mean_length", "mean_waits"))
        by_len = " / ".join(f"{a:.0%}" for a, _, _ in r["by_length"])
        lines.append(f"| {name} | {' | '.join(FLAGS[name])} | {acc[0]:.1%} ± {acc[1]:.1%} | {fmt[0]:.1%} | "
                     f"{length[0]:.0f} ± {length[1]:.0f} | {waits[0]:.2f} | {by_len} |")
    lines.append(f"\nMean ± population std over seeds {seeds}; 'accuracy by length' averages each seed's quartiles.")
    return "\n".join(lines)


def _pct(value, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def level_table(rows: dict) -> str:
    """Accuracy and length per difficulty level; then how each method reasons, and what its GRPO run cost."""
    levels = sorted({lv for r in rows.values() for lv in r["levels"]})
    hard = [lv for lv in levels if lv != "1"]
    head = ["method"] + [f"accuracy L{lv}" for lv in levels] + [f"length L{lv}" for lv in levels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        L = r["levels"]
        lines.append(f"| {name} | " + " | ".join(
            [f"{_pct(L[lv]['accuracy'][0], 1)} ± {_pct(L[lv]['accuracy'][1], 1)}" for lv in levels]
            + [f"{L[lv]['mean_length'][0]:.0f}" for lv in levels]) + " |")
    head = (["method"] + [f"worked steps L{lv}" for lv in hard]
            + [f"accuracy with / without steps L{lv}" for lv in hard]
            + ["loops", "cut off (eval)", "truncated (GRPO, last 20 steps)", "completion tokens (GRPO)"])
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        L = r["levels"]
        n_all = sum(L[lv]["n"] for lv in levels)

        def pooled(key):                   # mean over levels, weighted by their problem counts
            return sum(L[lv][key][0] * L[lv]["n"] for lv in levels) / n_all

        cells = ([_pct(L[lv]["steps"][0]) for lv in hard]
                 + [f"{_pct(L[lv]['accuracy_steps'][0])} / {_pct(L[lv]['accuracy_no_steps'][0])}" for lv in hard]
                 + [_pct(pooled("loops"), 1), _pct(pooled("truncated"), 1)])
        if "completion_tokens" in r:
            cells += [_pct(r["train_truncated_last20"][0], 1), f"{r['completion_tokens'][0] / 1e6:.2f}M"]
        else:
            cells += ["-", "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("\nPer level: mean ± population std over seeds. 'worked steps': answers that go through the colours "
                 "one by one; 'loops': answers with a recounting loop; 'cut off': answers as long as the evaluation "
                 "limit. Completion tokens: generated in all GRPO steps (each step's `completion_tokens` in metrics.jsonl).")
    return "\n".join(lines)


def plots(out: Path, seeds: list[int], rows: dict, steps: int = 0) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): skipping the plots")
        return []
    written = []
    runs = {name: [[json.loads(line) for line in (out / f"grpo-{name}-s{s}" / "metrics.jsonl").read_text().splitlines()]
                   for s in seeds] for name in METHODS}

    def smooth(values, k=10):                                # moving average over k steps
        return [statistics.fmean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, per_seed in runs.items():
        steps_axis = [m["step"] for m in per_seed[0]]
        for ax, key, label in zip(axes, ("reward", "accuracy", "len"), ("reward", "accuracy (T=1)", "completion length")):
            mean = [statistics.fmean(run[i][key] for run in per_seed) for i in range(len(steps_axis))]
            line, = ax.plot(steps_axis, smooth(mean), label=name)
            ax.set_xlabel("step"), ax.set_ylabel(label)
            for m_prev, m in zip(per_seed[0], per_seed[0][1:]):
                if m["stage"] != m_prev["stage"]:
                    ax.axvline(m["step"] - 0.5, color=line.get_color(), linestyle="--", linewidth=1)
    axes[0].legend()
    fig.suptitle("GRPO on the toy task (mean over seeds, 10-step moving average; dashed: PTST stage boundaries)")
    fig.tight_layout()
    written.append(out / "training_curves.png")
    fig.savefig(written[-1], dpi=100)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, per_seed in runs.items():
        preset = ROOT / METHODS[name][1]
        spec, prompts = stage_spec(preset, steps), read_yaml_key(preset, "prompts_per_step")
        cumulative = []
        for run_metrics in per_seed:
            total, xs = 0, []
            for t in completion_tokens(run_metrics, spec, prompts):
                total += t
                xs.append(total / 1e6)
            cumulative.append(xs)
        x = [statistics.fmean(c[i] for c in cumulative) for i in range(len(cumulative[0]))]
        y = smooth([statistics.fmean(run[i]["accuracy"] for run in per_seed) for i in range(len(x))])
        line, = ax.plot(x, y, label=f"{name} (training, T=1)")
        ax.plot([x[-1]], [rows[name]["accuracy"][0]], marker="o", color=line.get_color())
    ax.set_xlabel("cumulative completion tokens generated in GRPO (millions)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy against rollout tokens (dots: held-out accuracy at T=0.6)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "accuracy_vs_tokens.png")
    fig.savefig(written[-1], dpi=100)

    levels = sorted({lv for r in rows.values() for lv in r["levels"]})
    if len(levels) > 1:
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(rows)
        for k, (name, r) in enumerate(rows.items()):
            ax.bar([i + k * width for i in range(len(levels))], [r["levels"][lv]["accuracy"][0] for lv in levels],
                   width, yerr=[r["levels"][lv]["accuracy"][1] for lv in levels], label=name)
        ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(levels))], [f"level {lv}" for lv in levels])
        ax.set_ylabel("accuracy (T=0.6)"), ax.legend(fontsize=8)
        ax.set_title("Held-out accuracy per difficulty level (mean ± std over seeds)")
        fig.tight_layout()
        written.append(out / "accuracy_by_level.png")
        fig.savefig(written[-1], dpi=100)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("CI", "Long", "PTST"):
        recs = [json.loads(line) for s in seeds
                for line in (out / f"eval-{name}-s{s}" / "predictions.jsonl").read_text().splitlines()]
        edges = list(range(0, 330, 30))
        xs, ys = [], []
        for lo, hi in zip(edges, edges[1:]):
            inside = [r["correct"] for r in recs if lo <= r["length"] < hi]
            if len(inside) >= 10:
                xs.append((lo + hi) / 2), ys.append(sum(inside) / len(inside))
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("reasoning length (tokens)"), ax.set_ylabel("accuracy"), ax.legend()
    ax.set_title("Accuracy against reasoning length\n(bins of 30 tokens with at least 10 answers)", fontsize=11)
    fig.tight_layout()
    written.append(out / "accuracy_vs_length.png")
    fig.savefig(written[-1], dpi=100)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation", help="output directory")
    p.add_argument("--task", default="v2", choices=list(SFT_CONFIG), help="toy task (python -m minivr1.toy --task)")
    p.add_argument("--seeds", type=int, nargs="+", help="GRPO and evaluation seeds (default 0 1 2; --quick: 0)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with cores/jobs threads)")
    p.add_argument("--steps", type=int, default=None,
                   help="GRPO steps of every method, split evenly over its stages (default: the presets' 200; --quick: 100)")
    p.add_argument("--eval_limit", type=int, default=None,
                   help="evaluate on the first N held-out problems (default: all 500; --quick: 240)")
    p.add_argument("--quick", action="store_true",
                   help="one seed, 100 GRPO steps, 240 evaluation problems: the whole pipeline in ~10 minutes")
    a = p.parse_args()
    defaults = QUICK if a.quick else {"seeds": [0, 1, 2], "steps": 0, "eval_limit": 0}
    seeds = a.seeds or defaults["seeds"]
    steps = defaults["steps"] if a.steps is None else a.steps
    eval_limit = defaults["eval_limit"] if a.eval_limit is None else a.eval_limit
    out = Path(a.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // a.jobs)
    t0 = time.time()

    settings = {"task": a.task, "steps": steps, "eval_limit": eval_limit}
    saved = out / "settings.json"
    if saved.exists() and json.loads(saved.read_text()) != settings:
        raise SystemExit(f"{out} holds runs made with {saved.read_text().strip()}, not {settings}: "
                         f"use another --out (a rerun with the same settings resumes: finished runs are kept)")
    saved.write_text(json.dumps(settings) + "\n")

    jobs = [Job("toy", [PY, "-m", "minivr1.toy", str(out), "--model_size", "tiny", "--task", a.task],
                out / "base" / "config.json")]
    for cfg, data, name in ((SFT_CONFIG[a.task], "cold_start.json", "sft"),
                            ("configs/toy_instruct_sft.yaml", "instruct.json", "instruct")):
        jobs.append(Job(name, [PY, "train_sft.py", "--config", cfg, "--model", str(out / "base"),
                               "--data", str(out / "data" / data), "--output_dir", str(out / name)],
                        out / name / "final" / "config.json", ["toy"]))
    grpo, evals = [], [Job("eval-CI-s%d" % s, evaluate(out, out / "sft" / "final", out / f"eval-CI-s{s}", s, None,
                                                        eval_limit), out / f"eval-CI-s{s}" / "summary.json", ["sft"])
                       for s in seeds]
    for seed in seeds:
        for name, (start, preset, system) in METHODS.items():
            run_dir = out / f"grpo-{name}-s{seed}"
            cmd = [PY, "train_grpo.py", "--config", preset, "--model", str(out / start / "final"),
                   "--data", str(out / "data" / "rl_train.jsonl"), "--output_dir", str(run_dir),
                   "--seed", str(seed), "--save_steps", "0"]
            if steps:
                cmd += ["--stages", stage_spec(ROOT / preset, steps)]
            grpo.append(Job(run_dir.name, cmd, run_dir / "final" / "config.json", [start]))
            evals.append(Job(f"eval-{name}-s{seed}",
                             evaluate(out, run_dir / "final", out / f"eval-{name}-s{seed}", seed, system, eval_limit),
                             out / f"eval-{name}-s{seed}" / "summary.json", [run_dir.name]))
    grpo.sort(key=lambda j: j.deps != ["instruct"])      # Zero first: it needs only the quick instruct SFT
    print(f"== task {a.task}: data, cold-start SFT (CI), the instruct model, GRPO ({', '.join(METHODS)}) x seeds "
          f"{seeds}, evaluation; {a.jobs} at a time, each when what it starts from is ready")
    run_jobs(jobs + grpo + evals, a.jobs, threads, logs)

    rows = summarise(out, seeds, ["CI", *METHODS], steps)
    text = table(rows, seeds) + "\n\n" + level_table(rows)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    written = plots(out, seeds, rows, steps)
    print(text)
    print(f"\nwrote {out / 'results.md'}" + "".join(f", {w}" for w in written) + f" in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
