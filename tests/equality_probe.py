"""Runs train_sft.py and train_grpo.py (`main`, unchanged) one after another in one process, with GRPO
rollouts that do not depend on which process owns a prompt; tests/test_multiprocess_equality.py runs
it with one process (in-process) and with two (under torchrun) and compares the results.

Why the rollouts need help: each process seeds its sampler with seed + rank, and a prompt's
completions are drawn from a batch padded to that batch's longest prompt, so 1 and 2 processes
sample different completions and their weights could never be compared. Here the script's rollout
engine is wrapped by one (`SeededEngine`, through the engine seam: no line of the loop changes)
that samples each prompt's G completions on their own, with no left padding, from an RNG seeded by
(problem id, step), through the script's own engine. The same prompt then gets the same
completions whichever process owns it. Everything else (data split, rewards, advantages,
log-probs, loss, DDP, optimizer) is the script's.

    python tests/equality_probe.py SPEC.json                                    # one process
    torchrun --nproc_per_node 2 tests/equality_probe.py SPEC.json               # two

SPEC.json: {"records": DIR, "backend": "ddp" | "fsdp" | "zero2" | "zero3" (default ddp; tests/cpu_backends.py),
            "runs": [{"name": str, "script": "sft" | "grpo", "args": {Args fields},
                      "break": null | "local_denominators"}, ...]}
"local_denominators" is a deliberately broken run (a negative control): grpo_loss gets this
process's sequence and token counts instead of the global ones, the bug that a per-process token
mean would be. Written per GRPO run and process: DIR/NAME-rank{R}.json with, per step, the problem
ids this process rolled out and G.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # the repository root, for the scripts

import cpu_backends  # noqa: E402
import train_grpo  # noqa: E402
import train_sft  # noqa: E402
from minivr1 import grader  # noqa: E402
from minivr1.rollout import Rollout  # noqa: E402


def length_reward(text, answer, **meta):
    """Varies within groups on a random model: every step has a learning signal."""
    return float(len(text) % 3)


class SeededEngine:
    """A rollout engine around the script's own: each prompt's group sampled alone, seeded by problem id
    and step; records each step's problem ids and G."""

    def __init__(self, real, steps: list):
        self.real, self.steps, self.name = real, steps, f"seeded {real.name}"
        self.local_totals = None         # (sequences, tokens) of this process's rollout

    def generate(self, problems, G: int, max_new_tokens: int) -> Rollout:
        step = len(self.steps)
        self.steps.append({"ids": [p.id for p in problems], "G": G})
        parts = []
        for p in problems:
            torch.manual_seed(zlib.crc32(f"{p.id}/{step}".encode()))
            parts.append(self.real.generate([p], G, max_new_tokens))
        batch, images, counts = self.real.prompts(problems)               # the step's prompts, left-padded together
        C = max(r.completion_ids.shape[1] for r in parts)
        pad = self.real.processor.tokenizer.pad_token_id

        def right_pad(x, value):
            return torch.nn.functional.pad(x, (0, C - x.shape[1]), value=value)

        ro = Rollout(batch["input_ids"].repeat_interleave(G, 0), batch["attention_mask"].repeat_interleave(G, 0),
                     batch["mm_token_type_ids"].repeat_interleave(G, 0) if "mm_token_type_ids" in batch else None,
                     torch.cat([right_pad(r.completion_ids, pad) for r in parts]),
                     torch.cat([right_pad(r.completion_mask, 0) for r in parts]),
                     torch.cat([r.truncated for r in parts]), [t for r in parts for t in r.texts], G, images, counts)
        self.local_totals = (float(ro.completion_mask.shape[0]), float(ro.completion_mask.sum()))
        return ro


class SeededRollouts:
    """Puts a SeededEngine in place of the script's engine; optionally breaks the loss's denominators."""

    def __init__(self, break_denominators: bool = False):
        self.break_denominators = break_denominators
        self.steps = []                  # per step: {"ids": [...], "G": G}
        self.engine = None
        self.real_make_engine, self.real_loss = train_grpo.make_engine, train_grpo.grpo_loss

    def make_engine(self, *args, **kwargs):
        self.engine = SeededEngine(self.real_make_engine(*args, **kwargs), self.steps)
        return self.engine

    def grpo_loss(self, *args, **kwargs):
        if self.break_denominators:
            kwargs["total_seqs"], kwargs["total_tokens"] = self.engine.local_totals
        return self.real_loss(*args, **kwargs)


def reset_accelerate() -> None:
    """Let the next main() build a fresh Accelerator; the process group (if any) stays up."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(False)
    GradientState._reset_state()


def run_all(spec: dict, rank: int = 0) -> None:
    records = Path(spec["records"])
    for run in spec["runs"]:
        with pytest.MonkeyPatch.context() as mp:
            # keep the process group between runs; it is destroyed once at the end (see __main__)
            from accelerate import Accelerator
            mp.setattr(Accelerator, "end_training", lambda self: None)
            mp.setitem(grader.REWARDS, "length_mod3", length_reward)
            if run["script"] == "sft":
                train_sft.main(train_sft.Args(**run["args"]))
            else:
                probe = SeededRollouts(break_denominators=run.get("break") == "local_denominators")
                mp.setattr(train_grpo, "make_engine", probe.make_engine)
                mp.setattr(train_grpo, "grpo_loss", probe.grpo_loss)
                train_grpo.main(train_grpo.Args(**run["args"]))
                records.mkdir(parents=True, exist_ok=True)
                (records / f"{run['name']}-rank{rank}.json").write_text(json.dumps({"steps": probe.steps}))
        reset_accelerate()


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    cpu_backends.use(spec.get("backend", "ddp"))          # FSDP2 / ZeRO on CPU: see tests/cpu_backends.py
    run_all(spec, int(os.environ.get("RANK", "0")))
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
