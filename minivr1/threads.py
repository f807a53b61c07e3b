"""How many CPU threads torch uses in this process: one rule, applied once at start-up by every script.

torch's default is one thread per core. On a small CPU that other jobs also use, its OpenMP threads
then wait for each other: a toy GRPO step took 7.8-14.9 s with torch's default two threads on a busy
2-core machine, against 1.1-1.5 s with one (docs/benchmarks.md). The rule (`set_cpu_threads`):

  1. OMP_NUM_THREADS set: it is obeyed, nothing changes (the user chose; `torchrun` and
     `accelerate launch` set it to 1 when they start several processes on one machine);
  2. a CUDA GPU present: torch's default (the CPU only feeds the GPU);
  3. otherwise torch's default, capped by the CPUs the other jobs leave free: usable CPUs minus the
     1-minute load average (rounded), at least 1.

Change it with `OMP_NUM_THREADS=N python train_grpo.py ...`.
"""
from __future__ import annotations

import os
import sys


def cpu_threads(default: int, cpus: int, load: float) -> int:
    """Rule 3: torch's `default`, capped by the `cpus` minus the machine's `load`, at least 1."""
    return max(1, min(default, cpus - int(load + 0.5)))


def set_cpu_threads() -> int:
    """Apply the rule (module docstring) to torch in this process; return the thread count in use.
    Says so on stderr when it lowers torch's default."""
    import torch

    if "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available():
        return torch.get_num_threads()
    default = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = cpu_threads(default, cpus, load)
    if threads != default:
        torch.set_num_threads(threads)
        print(f"torch CPU threads: {threads} (not {default}: {cpus} CPUs, load average {load:.1f}; "
              f"set OMP_NUM_THREADS to choose)", file=sys.stderr, flush=True)
    return threads
