"""Peak memory and CPU time of token log-probs, forward AND backward, for Qwen's 151,936-token
vocabulary, three ways:
  ours          minivr1.grpo.token_logprobs: the LM head applied `chunk` rows at a time inside a
                non-reentrant checkpoint, the log-softmax with a hand-written backward that builds
                (onehot - softmax) in one fp32 buffer;
  checkpointed  the previous version of it (kept here as a yardstick): the same chunks and
                checkpoints, autograd's own log_softmax / gather backward;
  plain         the full-logits way: lm_head(hidden).float(), log_softmax, gather
                (minivr1.grpo.selective_log_softmax).

What runs: hidden states [N, H] (N = sequences x completion tokens) and an LM head [V, H], both
bf16 as in GPU training, both requiring gradients; log-probs of N random target tokens in fp32;
loss = their sum; backward. This is the part of a GRPO/SFT step whose memory grows with N x V.

What is counted: each configuration runs in a fresh subprocess. After the inputs, the LM-head
weight AND their gradient buffers (.grad, preallocated: every method needs them, and real training
holds them anyway) are allocated, the process's peak resident memory is reset
(/proc/self/clear_refs), and the table reports `extra` = peak RSS during forward + backward minus
the RSS at that point: the working memory of the log-prob computation alone. The [N, V] logits do
not depend on H, so the default H is small (256) to keep the CPU time reasonable; the H-dependent
buffers (hidden, weight and their grads) are in the baseline. One chunk's fp32 logits
([chunk, V] x 4 bytes) is the yardstick for the chunked methods. Time is the process's CPU time of
forward + backward with torch pinned to --threads threads (default 1: on a shared machine, more
threads mostly measure the other jobs), and the ratios compare methods measured in the same run.

Each child runs under an address-space limit (RLIMIT_AS, --mem_limit_gb beyond its start-up
size), so the plain version fails cleanly with an allocation error ("OOM (> N GiB)") instead of
taking the machine down.

    .venv/bin/python bench/bench_logprob_memory.py                    # the table in docs/benchmarks.md (~30 min, 1 thread)
    .venv/bin/python bench/bench_logprob_memory.py --quick            # tiny V and N, seconds (tests)
    .venv/bin/python bench/bench_logprob_memory.py --configs 16x4096 --methods ours --chunk_sizes 512
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 1024 ** 3
QUICK = dict(vocab=4096, hidden=32, configs="1x64,4x128", chunk_sizes="64", mem_limit_gb=4.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (Qwen2/2.5: 151936)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size H (7B: 3584); the logits' memory does not depend on it")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="dtype of hidden states and LM head")
    p.add_argument("--configs", default="1x1024,4x1024,2x4096,4x4096,16x4096",
                   help="comma-separated SEQUENCESxTOKENS (N = their product rows)")
    p.add_argument("--methods", default="ours,checkpointed,plain", help="comma-separated: ours, checkpointed, plain")
    p.add_argument("--chunk_sizes", default="512", help="comma-separated chunk sizes of the chunked methods (scripts' default: 512)")
    p.add_argument("--mem_limit_gb", type=float, default=16.0,
                   help="address-space limit per run, GiB beyond the child's start-up size (capped at 75%% of the memory "
                        "available when the run starts, so other processes on the machine keep theirs)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--quick", action="store_true", help=f"tiny sizes for a smoke test: {QUICK}")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------- the previous version

def checkpointed_token_logprobs(hidden, lm_head, targets, temperature: float = 1.0, chunk_size: int = 1024):
    """minivr1.grpo.token_logprobs before its hand-written backward (the yardstick): each chunk in a
    non-reentrant checkpoint, autograd's own backward of log_softmax + gather, which holds ~4 [chunk, V]
    fp32 tensors at once (the recomputed logits, gather's zero-filled gradient, logsumexp's, their sum)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    def chunk_logp(h, tgt):
        logits = lm_head(h).float() / temperature                  # (chunk, V) fp32
        return logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)

    out = [checkpoint(chunk_logp, hidden[i:i + chunk_size], targets[i:i + chunk_size], use_reentrant=False)
           for i in range(0, hidden.shape[0], chunk_size)]
    return torch.cat(out)


# ----------------------------------------------------------------------------- child (one measurement)

def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def run_child(spec: dict) -> dict:
    import resource

    import torch

    from minivr1.grpo import selective_log_softmax, token_logprobs

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["dtype"]]
    N, H, V = spec["rows"], spec["hidden"], spec["vocab"]

    def logprobs(hidden, lm_head, targets):
        if spec["method"] == "ours":
            return token_logprobs(hidden, lm_head, targets, chunk_size=spec["chunk_size"])
        if spec["method"] == "checkpointed":
            return checkpointed_token_logprobs(hidden, lm_head, targets, chunk_size=spec["chunk_size"])
        return selective_log_softmax(lm_head(hidden), targets)

    # warm-up on a tiny problem: one-time costs (lazy imports, autograd threads, kernel set-up) are
    # not the computation's memory
    small = torch.nn.Linear(H, 64, bias=False, dtype=dtype)
    logprobs(torch.randn(4, H, dtype=dtype, requires_grad=True), small, torch.randint(64, (4,))).sum().backward()
    del small
    lm_head = torch.nn.Linear(H, V, bias=False, dtype=dtype)
    torch.nn.init.normal_(lm_head.weight, std=H ** -0.5)
    hidden = torch.randn(N, H, dtype=dtype).requires_grad_()
    targets = torch.randint(V, (N,))
    hidden.grad, lm_head.weight.grad = torch.zeros_like(hidden), torch.zeros_like(lm_head.weight)

    baseline = _status_kb("VmRSS") * 1024
    try:
        Path("/proc/self/clear_refs").write_text("5")          # reset the peak-RSS mark (VmHWM)
        reset = True
    except OSError:
        reset = False                                           # then the peak includes start-up
    limit = _status_kb("VmSize") * 1024 + int(spec["mem_limit_gb"] * GiB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        logp = logprobs(hidden, lm_head, targets)
        logp.sum().backward()
        status = "ok"
    except (MemoryError, RuntimeError) as e:                    # torch: "DefaultCPUAllocator: can't allocate memory"
        if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        status = "oom"
        logp = None
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    peak = _status_kb("VmHWM") * 1024 if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"status": status, "seconds": seconds, "cpu_seconds": cpu_seconds, "extra": peak - baseline, "baseline": baseline,
            "inputs": sum(t.numel() * t.element_size() for t in (hidden, hidden.grad, lm_head.weight, lm_head.weight.grad)),
            "peak_reset": reset, "finite": None if logp is None else bool(torch.isfinite(logp).all())}


# ----------------------------------------------------------------------------- parent (the table)

def available_bytes() -> int:
    m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    return int(m.group(1)) * 1024 if m else 8 * GiB


def measure(spec: dict, timeout: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    # killed (e.g. by the kernel's OOM killer) or an allocation failure outside the try
    oom = proc.returncode < 0 or "alloc" in proc.stderr.lower() or "memory" in proc.stderr.lower()
    return {"status": "oom" if oom else "error", "error": proc.stderr[-2000:]}


def fmt_gb(b: float) -> str:
    return f"{b / GiB:.2f} GiB" if b >= 0.1 * GiB else f"{b / 2 ** 20:.0f} MiB"


def cell(r: dict, limit_gb: float) -> str:
    if r["status"] == "ok":
        return f"{fmt_gb(r['extra'])}, {r['cpu_seconds']:.1f} s"
    if r["status"] == "oom":
        return f"OOM (> {limit_gb:g} GiB)"
    return r["status"]


def time_ratio(a: dict | None, b: dict | None) -> str:
    """CPU time of a / CPU time of b, both measured in this run ("-" where either did not finish)."""
    if not a or not b or a["status"] != "ok" or b["status"] != "ok" or b["cpu_seconds"] <= 0:
        return "-"
    return f"{a['cpu_seconds'] / b['cpu_seconds']:.2f}"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return []

    def limit_now() -> float:
        return float(f"{min(args.mem_limit_gb, 0.75 * available_bytes() / GiB):.1f}")
    configs = [tuple(int(x) for x in c.lower().split("x")) for c in args.configs.split(",")]
    methods = args.methods.split(",")
    chunks = [int(c) for c in args.chunk_sizes.split(",")]
    chunked = [(m, c) for c in chunks for m in ("ours", "checkpointed") if m in methods]
    columns = chunked + ([("plain", None)] if "plain" in methods else [])
    V, H = args.vocab, args.hidden
    bytes_per = 2 if args.dtype == "bf16" else 4

    print(f"token log-probs, forward + backward: V = {V}, H = {H}, {args.dtype} hidden/LM head, fp32 log-softmax; "
          f"{args.threads} threads; memory limit per run {args.mem_limit_gb:g} GiB (or 75% of what is available then)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{available_bytes() / GiB:.1f} GiB available; python {platform.python_version()}")
    print(f"inputs + weights + their grads (baseline, not counted): LM head {fmt_gb(2 * V * H * bytes_per)} with grad; "
          f"hidden {bytes_per * 2 * H} B/row with grad")
    print(f"'extra' = peak RSS during forward+backward above the baseline; one chunk's fp32 logits = chunk x V x 4 B "
          f"({', '.join(f'{c}: {fmt_gb(c * V * 4)}' for c in chunks)}); times are process CPU seconds")
    time_columns = [((m, c), ("plain", None)) for m, c in chunked if "plain" in methods] + \
        [(("ours", c), ("checkpointed", c)) for c in chunks if {"ours", "checkpointed"} <= set(methods)]

    def name(m, c):
        return m if c is None else f"{m} {c}"
    header = ["sequences x tokens", "rows N", "full fp32 logits"] + \
        [f"{name(m, c)}: extra, CPU time" for m, c in columns] + \
        [f"{name(m, c)} / one chunk" for m, c in chunked] + \
        [f"time {name(*a)} / {name(*b)}" for a, b in time_columns]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    results = []
    for seqs, tokens in configs:
        N = seqs * tokens
        row, measured = [f"{seqs} x {tokens}", str(N), fmt_gb(N * V * 4)], {}
        for method, chunk in columns:
            spec = dict(method=method, chunk_size=chunk or 0, rows=N, hidden=H, vocab=V, dtype=args.dtype,
                        threads=args.threads, mem_limit_gb=limit_now())
            r = measured[method, chunk] = measure(spec, args.timeout)
            results.append({**spec, "sequences": seqs, "tokens": tokens, **r})
            row.append(cell(r, spec["mem_limit_gb"]))
        for method, chunk in chunked:
            r = measured[method, chunk]
            row.append(f"{r['extra'] / (min(chunk, N) * V * 4):.1f}x" if r["status"] == "ok" else "-")
        row += [time_ratio(measured[a], measured[b]) for a, b in time_columns]
        print("| " + " | ".join(row) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
