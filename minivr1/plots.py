"""Training curves as a picture: every training run draws `training_curves.png` in its folder when it
finishes, and this command redraws them for any run folder (finished, stopped, or still running):

    python -m minivr1.plots runs/toy/grpo [runs/toy/sft ...]

GRPO: reward, accuracy (and format), completion length (mean and max), the fraction truncated at the
stage's limit, and the KL to the reference, with the PTST stage boundaries as dashed lines. SFT: loss and
learning rate. One panel per metric over the steps of metrics.jsonl; noisy curves get a moving average.

matplotlib is in requirements.txt; where it is missing, a one-line note says how to get the pictures and
nothing else changes (training never fails for want of a plot).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

FILE = "training_curves.png"
GRPO_PANELS = ["reward", "accuracy", "len", "truncated", "kl"]
SFT_PANELS = ["loss", "lr"]
TITLES = {"reward": "reward (mean over completions)", "accuracy": "accuracy (and format)",
          "len": "completion length, tokens (mean, max)", "truncated": "truncated at the length limit",
          "kl": "KL to the reference", "loss": "loss (assistant tokens)", "lr": "learning rate"}
COMPANIONS = {"accuracy": "format", "len": "len_max"}          # drawn in the same panel, dashed


def read_rows(run_dir: str | Path) -> list[dict]:
    """The lines of run_dir/metrics.jsonl (a torn last line is skipped); FileNotFoundError if there is none."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file. Pass a run folder of train_sft.py or train_grpo.py")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def panels(rows: list[dict]) -> list[str]:
    """The metrics to draw, one panel each: GRPO's when the run logged rewards, else SFT's."""
    logged = {k for r in rows for k in r}
    return [k for k in (GRPO_PANELS if "reward" in logged else SFT_PANELS) if k in logged]


def stage_starts(rows: list[dict]) -> list[int]:
    """The first step of each PTST stage after the first (where a boundary is drawn)."""
    starts, last = [], None
    for r in rows:
        stage = r.get("stage")
        if last is not None and stage is not None and stage != last:
            starts.append(r["step"])
        last = stage if stage is not None else last
    return starts


def plot_run(run_dir: str | Path) -> Path | None:
    """Draw run_dir/training_curves.png and return its path; None (with a note) without matplotlib."""
    run_dir = Path(run_dir)
    rows = read_rows(run_dir)
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"note: no training curves for {run_dir}: matplotlib is not installed (pip install matplotlib; then "
              f"python -m minivr1.plots {run_dir})", file=sys.stderr, flush=True)
        return None
    names = panels(rows)
    if not names:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'}: no metric to draw yet")
    columns = min(3, len(names))
    lines = -(-len(names) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.0 * lines), layout="constrained")
    fig.suptitle(f"{run_dir}  ({'GRPO' if 'reward' in names else 'SFT'}, {len(rows)} logged steps)")
    for k, name in enumerate(names):
        ax = fig.add_subplot(lines, columns, k + 1)
        for key, style in [(name, "-"), (COMPANIONS.get(name), "--")]:
            points = [(r["step"], r[key]) for r in rows if key and isinstance(r.get(key), (int, float))]
            if not points:
                continue
            steps, values = zip(*points)
            noisy = "reward" in names and len(values) > 20
            ax.plot(steps, values, style, linewidth=0.8, alpha=0.35 if noisy else 1.0, color=f"C{k}",
                    label=key if key != name else None)
            if noisy:
                ax.plot(steps, _moving_average(values, max(2, len(values) // 20)), style, linewidth=1.6, color=f"C{k}")
        for start in stage_starts(rows):
            ax.axvline(start - 0.5, color="grey", linestyle=":", linewidth=1)
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_title(TITLES.get(name, name), fontsize=10)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    path = run_dir / FILE
    tmp = run_dir / f".tmp-{FILE}"
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(path)
    return path


def _moving_average(values, window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    from minivr1.cli import EXIT_USER_ERROR

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.jsonl")
    for run_dir in p.parse_args(argv).run_dirs:
        try:
            path = plot_run(run_dir)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        if path:
            print(path)


if __name__ == "__main__":
    main()
