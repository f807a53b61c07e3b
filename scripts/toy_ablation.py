"""Vision-R1's ablation in miniature, on the toy task: Zero, CI, Long, fixed short limit, PTST.

    python scripts/toy_ablation.py                       # ~17 min on 2 CPU cores; --seeds 0 1 2
    (the plots need matplotlib, which requirements.txt installs; without it they are skipped)

Every run is the project's own scripts with a preset from configs/ (the same commands the README
shows), so this file only orchestrates and summarises:

    CI     cold-start SFT only                                  configs/toy_sft.yaml
    Zero   GRPO from the toy "instruct" model, no cold start,   configs/toy_instruct_sft.yaml +
           R1-Zero system prompt, format + result reward 1:1     configs/toy_grpo_zero.yaml
    Long   GRPO from CI at one long limit, 192 x 4              configs/toy_grpo_long.yaml
    Fixed  GRPO from CI at the short limit, 96 x 8              configs/toy_grpo_fixed.yaml
    PTST   GRPO from CI, 96 x 8 then 192 x 4                    configs/toy_grpo_ptst.yaml

All GRPO runs have the same steps and the same rollout token budget per step (prompts x G x
limit = 8 x 768). Each GRPO method runs once per seed; every model is evaluated with the
paper's sampling (T 0.6, top_p 0.95) once per seed. Writes OUT/results.md, OUT/results.json and
OUT/*.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
METHODS = {  # name: (start model, preset, system prompt for evaluation)
    "Zero": ("instruct", "configs/toy_grpo_zero.yaml", "r1_zero"),
    "Long": ("sft", "configs/toy_grpo_long.yaml", None),
    "Fixed": ("sft", "configs/toy_grpo_fixed.yaml", None),
    "PTST": ("sft", "configs/toy_grpo_ptst.yaml", None),
}


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


def evaluate(model: Path, out: Path, seed: int, system_prompt: str | None) -> list[str]:
    """The evaluate.py command for one model and seed."""
    cmd = [PY, "evaluate.py", "--config", "configs/toy_eval.yaml", "--model", str(model), "--data",
           str(OUT / "data" / "eval.jsonl"), "--output_dir", str(out), "--seed", str(seed)]
    return cmd + (["--system_prompt", system_prompt] if system_prompt else [])


def summarise(out: Path, seeds: list[int]) -> dict:
    """Mean and spread over seeds of each method's evaluation summary."""
    rows = {}
    for name in ["CI", *METHODS]:
        runs = [json.loads((out / f"eval-{name}-s{s}" / "summary.json").read_text()) for s in seeds]
        agg = {}
        for key in ("accuracy", "format_rate", "mean_length", "mean_waits"):
            values = [r[key] for r in runs]
            agg[key] = (statistics.fmean(values), statistics.pstdev(values))
        buckets = [r["accuracy_by_length"] for r in runs]
        agg["by_length"] = [(statistics.fmean(b[i]["accuracy"] for b in buckets),
                             min(b[i]["min_length"] for b in buckets), max(b[i]["max_length"] for b in buckets))
                            for i in range(min(len(b) for b in buckets))]
        rows[name] = agg
    return rows


def table(rows: dict, seeds: list[int]) -> str:
    flags = {"CI": ("yes", "no", "no"), "Zero": ("no", "yes", "no"), "Long": ("yes", "yes", "no"),
             "Fixed": ("yes", "yes", "no (short limit)"), "PTST": ("yes", "yes", "yes")}
    lines = [f"| method | cold start | GRPO | PTST | accuracy | format | mean length | 'Wait' per answer | "
             f"accuracy by length quartile (short -> long) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        acc, fmt, length, waits = (r[k] for k in ("accuracy", "format_rate", "mean_length", "mean_waits"))
        by_len = " / ".join(f"{a:.0%}" for a, _, _ in r["by_length"])
        lines.append(f"| {name} | {' | '.join(flags[name])} | {acc[0]:.1%} ± {acc[1]:.1%} | {fmt[0]:.1%} | "
                     f"{length[0]:.0f} ± {length[1]:.0f} | {waits[0]:.2f} | {by_len} |")
    lines.append(f"\nMean ± population std over seeds {seeds}; 'accuracy by length' averages each seed's quartiles.")
    return "\n".join(lines)


def plots(out: Path, seeds: list[int]) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): skipping the plots")
        return []
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in METHODS:
        per_seed = [[json.loads(l) for l in (out / f"grpo-{name}-s{s}" / "metrics.jsonl").read_text().splitlines()]
                    for s in seeds]
        steps = [m["step"] for m in per_seed[0]]
        for ax, key, label in zip(axes, ("reward", "accuracy", "len"), ("reward", "accuracy (T=1)", "completion length")):
            mean = [statistics.fmean(run[i][key] for run in per_seed) for i in range(len(steps))]
            k = 10                                           # moving average over 10 steps
            smooth = [statistics.fmean(mean[max(0, i - k + 1):i + 1]) for i in range(len(mean))]
            ax.plot(steps, smooth, label=name)
            ax.set_xlabel("step"), ax.set_ylabel(label)
        boundary = next((m["step"] for m in per_seed[0] if m["stage"] == 2), None) if name == "PTST" else None
        if boundary:
            for ax in axes:
                ax.axvline(boundary - 0.5, color="gray", linestyle="--", linewidth=1)
    axes[0].legend()
    fig.suptitle("GRPO on the toy task (mean over seeds, 10-step moving average; dashed: PTST stage boundary)")
    fig.tight_layout()
    written.append(out / "training_curves.png")
    fig.savefig(written[-1], dpi=100)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("CI", "PTST"):
        recs = [json.loads(l) for s in seeds for l in (out / f"eval-{name}-s{s}" / "predictions.jsonl").read_text().splitlines()]
        edges = list(range(0, 240, 30))
        xs, ys = [], []
        for lo, hi in zip(edges, edges[1:]):
            inside = [r["correct"] for r in recs if lo <= r["length"] < hi]
            if len(inside) >= 10:
                xs.append((lo + hi) / 2), ys.append(sum(inside) / len(inside))
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("reasoning length (tokens)"), ax.set_ylabel("accuracy"), ax.legend()
    ax.set_title("Accuracy against reasoning length (bins of 30 tokens, >= 10 answers)")
    fig.tight_layout()
    written.append(out / "accuracy_vs_length.png")
    fig.savefig(written[-1], dpi=100)
    return written


def main() -> None:
    global OUT
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ablation", help="output directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="GRPO and evaluation seeds")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with cores/jobs threads)")
    p.add_argument("--steps", type=int, default=0, help="override the GRPO steps of every method (0 = presets')")
    a = p.parse_args()
    OUT = Path(a.out).resolve()
    logs = OUT / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // a.jobs)
    t0 = time.time()

    print("== data and base model")
    if not (OUT / "base" / "config.json").exists():
        run([PY, "-m", "minivr1.toy", str(OUT), "--model_size", "tiny"], logs / "toy.log", os.cpu_count() or 2)
    print("== cold-start SFT (CI) and the toy instruct model, in parallel")
    sft = [[PY, "train_sft.py", "--config", cfg, "--model", str(OUT / "base"), "--data", str(OUT / "data" / data),
            "--output_dir", str(OUT / name)] for cfg, data, name in
           (("configs/toy_sft.yaml", "cold_start.json", "sft"), ("configs/toy_instruct_sft.yaml", "instruct.json", "instruct"))]
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda c: run(c, logs / f"{Path(c[-1]).name}.log", threads), sft))

    print("== GRPO: " + ", ".join(METHODS) + f" x seeds {a.seeds}")
    jobs = []
    for seed in a.seeds:
        for name, (start, preset, _) in METHODS.items():
            cmd = [PY, "train_grpo.py", "--config", preset, "--model", str(OUT / start / "final"),
                   "--data", str(OUT / "data" / "rl_train.jsonl"), "--output_dir", str(OUT / f"grpo-{name}-s{seed}"),
                   "--seed", str(seed), "--save_steps", "0"]
            if a.steps:
                import yaml
                spec = yaml.safe_load((ROOT / preset).read_text())["stages"].split(",")
                per = a.steps // len(spec)
                cmd += ["--stages", ",".join(s.split(":")[0] + f":{per}" for s in spec)]
            jobs.append((cmd, logs / f"grpo-{name}-s{seed}.log"))
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda j: run(j[0], j[1], threads), jobs))

    print("== evaluation")
    evals = []
    for seed in a.seeds:
        evals.append((evaluate(OUT / "sft" / "final", OUT / f"eval-CI-s{seed}", seed, None), f"eval-CI-s{seed}"))
        for name, (_, _, system) in METHODS.items():
            evals.append((evaluate(OUT / f"grpo-{name}-s{seed}" / "final", OUT / f"eval-{name}-s{seed}", seed, system), f"eval-{name}-s{seed}"))
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda e: run(e[0], logs / f"{e[1]}.log", threads), evals))

    rows = summarise(OUT, a.seeds)
    text = table(rows, a.seeds)
    (OUT / "results.md").write_text(text + "\n")
    (OUT / "results.json").write_text(json.dumps(rows, indent=2))
    written = plots(OUT, a.seeds)
    print(text)
    print(f"\nwrote {OUT / 'results.md'}" + "".join(f", {w}" for w in written) + f" in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
