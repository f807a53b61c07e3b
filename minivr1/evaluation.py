"""Scoring responses and summarising a benchmark run: accuracy, format rate, reasoning length.

`score` turns one (problem, response) pair into a per-sample record; `summarize` turns the
records into the run's summary, including accuracy by reasoning-length bucket: the paper's
evidence that long reasoning is not better reasoning ("overthinking", Vision-R1 Sec. 3.2).
What is benchmark-specific (how an answer is found and judged, each benchmark's own metrics)
comes from minivr1.benchmarks; MathVista is the default.
"""
from __future__ import annotations

import statistics
from collections import defaultdict

from minivr1 import benchmarks, grader


def score(problem, response: str, n_tokens: int, benchmark=None, official: bool = False) -> dict:
    """The per-sample record written to predictions.jsonl.

    The answer is the last <answer> block (minivr1.grader); with `official` (the official prompt,
    which asks for no tags) a response without one is searched the benchmark's own way instead.
    The problem's benchmark fields (problem_version, seed, ...) go into the record for the metrics.
    """
    bench = benchmark or benchmarks.BENCHMARKS["mathvista"]
    parsed = grader.parse_response(response)
    answer = parsed.answer
    if answer is None and official and isinstance(response, str):
        answer = bench.find_answer(response, problem)
    return {"id": problem.id, "benchmark": bench.name, "prompt_style": "official" if official else "plain",
            "category": problem.category, "question_type": problem.question_type,
            "answer": problem.answer, "extracted": answer, "correct": bench.correct(answer, problem),
            "format_ok": parsed.format_ok, "length": n_tokens, "waits": grader.count_wait(response),
            **problem.meta, "response": response}


def _rate(records, key) -> float | None:
    """The fraction of records whose `key` is true; None (JSON null, not NaN) when there are none."""
    return sum(bool(r[key]) for r in records) / len(records) if records else None


def length_buckets(records: list[dict], n_buckets: int = 4) -> list[dict]:
    """Split records into up to `n_buckets` buckets of about equal count by length; accuracy of each.

    A length is never split between buckets (the answers of a model that runs every answer to the length
    limit would otherwise fill "64-64" buckets that differ only by sort order): each cut between equal-count
    buckets moves to the nearest place where the length changes, so ties can leave fewer buckets."""
    ordered = sorted(records, key=lambda r: r["length"])
    n = len(ordered)
    changes = [i for i in range(n + 1) if i in (0, n) or ordered[i - 1]["length"] != ordered[i]["length"]]
    cuts = sorted({min(changes, key=lambda c: (abs(c - b * n / n_buckets), -c)) for b in range(n_buckets + 1)})
    out = []
    for lo, hi in zip(cuts, cuts[1:]):
        chunk = ordered[lo:hi]
        out.append({"min_length": chunk[0]["length"], "max_length": chunk[-1]["length"], "n": len(chunk),
                    "accuracy": _rate(chunk, "correct")})
    return out


def bucket_label(bucket: dict) -> str:
    """'64' for a bucket of one length, else '1-63'."""
    lo, hi = bucket["min_length"], bucket["max_length"]
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def summarize(records: list[dict], length_unit: str = "tokens", benchmark=None) -> dict:
    """Accuracy overall and per category / question type, format rate, length statistics; then the
    benchmark's own metrics under "metrics" and its paper number as "score"."""
    if not records:
        raise ValueError("no records to summarise")
    lengths = [r["length"] for r in records]
    groups = {"category": defaultdict(list), "question_type": defaultdict(list)}
    for r in records:
        for key, g in groups.items():
            g[str(r.get(key))].append(r)
    summary = {
        "n": len(records),
        "accuracy": _rate(records, "correct"),
        "format_rate": _rate(records, "format_ok"),
        "accuracy_given_format": _rate([r for r in records if r["format_ok"]], "correct"),
        "mean_length": statistics.fmean(lengths),
        "median_length": statistics.median(lengths),
        "length_unit": length_unit,
        "mean_waits": statistics.fmean(r["waits"] for r in records),
        "per_category": {k: {"n": len(v), "accuracy": _rate(v, "correct")} for k, v in sorted(groups["category"].items())},
        "per_question_type": {k: {"n": len(v), "accuracy": _rate(v, "correct")}
                              for k, v in sorted(groups["question_type"].items())},
        "accuracy_by_length": length_buckets(records),
    }
    bench = benchmark or benchmarks.BENCHMARKS["mathvista"]
    summary.update(benchmark=bench.name, metrics=bench.metrics(records))
    summary.update(score=bench.score(summary), score_name=bench.score_name)
    return summary


def format_summary(summary: dict, title: str = "") -> str:
    """A short human-readable block for the terminal."""
    lines = [f"{title}n={summary['n']}  accuracy {summary['accuracy']:.1%}  format {summary['format_rate']:.1%}  "
             f"mean length {summary['mean_length']:.0f} {summary['length_unit']} (median {summary['median_length']:.0f})  "
             f"'Wait' per answer {summary['mean_waits']:.2f}"]
    for k, v in summary["per_category"].items():
        lines.append(f"  {k:<24} {v['accuracy']:.1%}  (n={v['n']})")
    metrics = summary.get("metrics") or {}
    headline = [f"{k} {_pct(v)}" for k, v in metrics.items() if isinstance(v, float) or v is None]
    if headline:
        lines.append("  " + "  ".join(headline))
    counts = [f"{k} {v}" for k, v in metrics.items() if isinstance(v, int) and not isinstance(v, bool)]
    if counts:
        lines.append("  " + ", ".join(counts))
    lines.append("  accuracy by length: " + ", ".join(
        f"{bucket_label(b)}: {b['accuracy']:.0%}" for b in summary["accuracy_by_length"]))
    return "\n".join(lines)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def comparison_table(summaries: dict[str, dict]) -> str:
    """A markdown table comparing runs: {name: summary} -> accuracy, format, length, 'Wait's."""
    rows = ["| model | accuracy | format | mean length (tokens) | 'Wait' per answer | accuracy by length (short -> long) |",
            "|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        buckets = " / ".join(f"{b['accuracy']:.0%}" for b in s["accuracy_by_length"])
        rows.append(f"| {name} | {s['accuracy']:.1%} | {s['format_rate']:.1%} | {s['mean_length']:.0f} | "
                    f"{s['mean_waits']:.2f} | {buckets} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(description="Compare evaluation runs: print a markdown table of their summary.json files.")
    p.add_argument("runs", nargs="+", help="NAME=PATH pairs, PATH an evaluate.py output dir or its summary.json")
    a = p.parse_args()
    summaries = {}
    for item in a.runs:
        name, _, path = item.partition("=")
        path = Path(path)
        summaries[name] = json.loads((path / "summary.json" if path.is_dir() else path).read_text())
    print(comparison_table(summaries))
