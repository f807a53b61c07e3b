"""Logging of a run: a metrics file, optional tensorboard / wandb, and rank-0 printing.

Every run writes, in its out_dir:

    metrics.jsonl   one JSON object per `Tracker.log` call: {"step": 12, "reward": 0.41, ..., "time": ...}
    samples.jsonl   one JSON object per `Tracker.log_text` call (sample completions; created by the first)

Both are appended to (a resumed run continues the same files) and flushed after every line, so
a crash loses nothing that was logged. `pandas.read_json(path, lines=True)` reads them. A run
resumed from step N first drops the lines of later steps (`drop_after`): a killed run logged them
after its last checkpoint, and the resumed run logs those steps again.
With `report_to=["tensorboard"]` and/or `["wandb"]` the same values also go there; both
packages are optional and imported only when asked for.

Under several processes only the main one writes: pass `is_main=accelerator.is_main_process`;
elsewhere the Tracker does nothing (it still checks `report_to`, so a typo fails on every rank).
"""

from __future__ import annotations

import html
import json
import math
import numbers
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

REPORT_TO = ("none", "tensorboard", "wandb")

# Config keys whose values must never reach a tracker (wandb uploads its config).
_SECRET_KEY = re.compile(r"(api_?key|secret|password|passwd|(^|_)token)$", re.IGNORECASE)


def _parse_report_to(report_to: list[str] | str | None) -> list[str]:
    """`"none"`, `"tensorboard,wandb"`, `["wandb"]` -> a checked list without "none"."""
    items = report_to.split(",") if isinstance(report_to, str) else list(report_to or [])
    items = [s.strip() for s in items if s.strip()]
    unknown = [s for s in items if s not in REPORT_TO]
    if unknown:
        raise ValueError(f"report_to: unknown tracker(s) {unknown}; choose from {list(REPORT_TO)}")
    return [s for s in dict.fromkeys(items) if s != "none"]


def _scalar(value: Any) -> Any:
    """One-element tensors and numpy scalars -> python numbers, so they can be written as JSON."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()
        except (ValueError, RuntimeError):  # more than one element: leave it
            return value
    return value


def _redact(config: dict | None) -> dict:
    return {k: ("***" if _SECRET_KEY.search(str(k)) else v) for k, v in (config or {}).items()}


class Tracker:
    """Writes metrics and text samples to JSONL files and, optionally, tensorboard and wandb.

    Args:
        out_dir: the run directory (metrics.jsonl, samples.jsonl, tensorboard/ go there).
        report_to: "none", "tensorboard", "wandb", or a list / comma-separated string of them.
        config: the run's arguments (e.g. `dataclasses.asdict(args)`), shown by tensorboard and
            wandb; keys that look like secrets (`*token`, `*api_key`, `*secret`, `*password`)
            are replaced by "***".
        is_main: False on every process but the main one: then every method does nothing.
        run_name: the wandb run name (default: wandb's own).
    """

    def __init__(
        self,
        out_dir: str | Path,
        report_to: list[str] | str = "none",
        config: dict | None = None,
        is_main: bool = True,
        run_name: str | None = None,
    ):
        self.report_to = _parse_report_to(report_to)
        self.enabled = is_main
        self.out_dir = Path(out_dir)
        self._metrics = self._samples = self._tb = self._wandb = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        config = _redact(config)
        # Append mode: a resumed run continues the same file. buffering=1: line-buffered text.
        self._metrics = open(self.out_dir / "metrics.jsonl", "a", buffering=1)
        if "tensorboard" in self.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                msg = "--report_to tensorboard needs the tensorboard package: pip install tensorboard"
                raise ImportError(msg) from e
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
            if config:
                self._tb.add_text("config", _code_block(json.dumps(config, indent=2, default=str)), 0)
        if "wandb" in self.report_to:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("--report_to wandb needs the wandb package: pip install wandb") from e
            # The API key comes from `wandb login` / WANDB_API_KEY; we never read or pass it.
            self._wandb = wandb
            wandb.init(project="minivr1", name=run_name, config=config, dir=str(self.out_dir))

    def log(self, metrics: dict, step: int) -> None:
        """Records the scalars of one step (tensors and numpy numbers are converted)."""
        if not self.enabled:
            return
        metrics = {k: _scalar(v) for k, v in metrics.items()}
        record = {"step": step, **{k: v for k, v in metrics.items() if k != "step"}}
        record["time"] = round(time.time(), 3)  # wall clock, for throughput plots
        self._metrics.write(json.dumps(record, default=str) + "\n")
        self._metrics.flush()
        numeric = {k: v for k, v in metrics.items() if isinstance(v, numbers.Number) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def log_text(self, name: str, text: str, step: int) -> None:
        """Records a text sample (e.g. a completion with its reward) under `name`."""
        if not self.enabled:
            return
        if self._samples is None:
            self._samples = open(self.out_dir / "samples.jsonl", "a", buffering=1)
        self._samples.write(json.dumps({"step": step, "name": name, "text": text}) + "\n")
        self._samples.flush()
        if self._tb is not None:
            self._tb.add_text(name, _code_block(text), step)
        if self._wandb is not None:
            # <pre> keeps tags like <think> visible instead of being parsed as HTML.
            self._wandb.log({name: self._wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        """Closes the files and trackers; safe to call twice."""
        for f in (self._metrics, self._samples):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._metrics = self._samples = self._tb = self._wandb = None
        self.enabled = False

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drop_after(out_dir: str | Path, step: int, names=("metrics.jsonl", "samples.jsonl")) -> None:
    """Remove the lines of steps after `step` (and torn lines) from the run's JSONL files: what a killed run
    logged after the checkpoint a rerun resumes from, which the rerun logs again."""
    for name in names:
        path = Path(out_dir) / name
        if not path.is_file():
            continue
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                keep = int(json.loads(line)["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line + "\n")
            else:
                dropped += bool(line.strip())
        if dropped:
            tmp = path.with_name(f".tmp-{name}")
            tmp.write_text("".join(kept))
            os.replace(tmp, path)
            print0(f"{path}: dropped {dropped} lines of steps after {step} (logged after the checkpoint resumed from)")


def _code_block(text: str) -> str:
    """Tensorboard renders text as markdown: a code block shows it verbatim."""
    return "```\n" + text + "\n```"


def is_main_process() -> bool:
    """True on the main process: from accelerate's state once it exists, else the RANK env var."""
    state_module = sys.modules.get("accelerate.state")  # never import accelerate just to ask
    if state_module is not None and state_module.PartialState._shared_state:
        return state_module.PartialState().is_main_process
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    """`print` on the main process only (so N processes do not print every line N times)."""
    if is_main_process():
        print(*args, **kwargs)


def format_number(x: Any) -> str:
    """Readable numbers: 12 -> "12", 85.23 -> "85.2", 0.41 -> "0.41", 0.0031 -> "0.0031", 2e-6 -> "2e-06"."""
    x = _scalar(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Number):
        return str(x)
    if isinstance(x, numbers.Integral):
        return str(x)
    x = float(x)
    if math.isnan(x) or math.isinf(x) or x == 0:
        return "0" if x == 0 else str(x)
    if abs(x) >= 1000:
        return f"{x:.0f}"
    return f"{x:.3g}"  # 3 significant digits; exponent only below 1e-4


def format_metrics(metrics: dict, keys: list[str] | None = None) -> str:
    """One line for the console: "step 12 | reward 0.41 | acc 0.38 | len 85.2 | kl 0.0031".

    `keys` chooses and orders what is shown (missing ones are skipped); by default all of them,
    `step` first.
    """
    if keys is None:
        keys = ["step"] + [k for k in metrics if k != "step"]
    return " | ".join(f"{k} {format_number(metrics[k])}" for k in keys if k in metrics)


def progress_bar(iterable=None, **kwargs):
    """tqdm with a slower refresh when stderr is not a terminal (CI logs, `nohup`), so a log file
    gets a progress line every 30 s instead of thousands of carriage-return updates."""
    import sys

    from tqdm import tqdm

    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 30)
    return tqdm(iterable, **kwargs)
