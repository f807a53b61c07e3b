"""How many CPU threads torch uses in this process: one rule, applied once at start-up by every script.

torch's default is one thread per core. Two things make that a poor default for minivr1 on a CPU:
  * reproducibility: the thread count changes the order of floating-point sums, and so, after many
    steps, the results (the toy pipeline gives 63.6% -> 71.6% with one thread, 60.0% -> 70.0% with
    two). A fixed count makes a run repeat whatever the machine's core count and load (a CPU of
    another kind may still differ a little: its floating-point kernels can differ);
  * a shared machine: on a small CPU that other jobs also use, torch's OpenMP threads wait for each
    other (a toy GRPO step took 7.8-14.9 s with torch's default two threads on a busy 2-core machine,
    against 1.1-1.5 s with one; docs/benchmarks.md).
The price on an idle machine: the toy pipeline took 3 min 50 s with one thread, 2 min 54 s with two
(an idle 2-core CPU).

The rule (`set_cpu_threads`):
  1. OMP_NUM_THREADS set: it is obeyed, nothing changes (the user chose; `torchrun` and `accelerate
     launch` set it to 1 when they start several processes on one machine);
  2. a CUDA GPU present: torch's default (the CPU only feeds the GPU);
  3. otherwise one thread.

Change it with `OMP_NUM_THREADS=N python train_grpo.py ...` (e.g. for a real-size model on a big CPU).
"""
from __future__ import annotations

import os

CPU_THREADS = 1


def set_cpu_threads() -> int:
    """Apply the rule (module docstring) to torch in this process; return the thread count in use."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(CPU_THREADS)
    return torch.get_num_threads()
