"""Runs train_sft.py and train_grpo.py (`main`, unchanged) one after another in one process, with GRPO
rollouts that do not depend on which process owns a prompt; tests/test_multiprocess_equality.py runs
it with one process (in-process) and with two (under torchrun) and compares the results.

Why the rollouts need help: each process seeds its sampler with seed + rank, and a prompt's
completions are drawn from a batch padded to that batch's longest prompt, so 1 and 2 processes
sample different completions and their weights could never be compared. Here the script's
`generate` is replaced by a wrapper that samples each prompt's G completions on their own: the
group's rows with their left padding removed, from an RNG seeded by (problem id, step), through the
script's own `generate`. The same prompt then gets the same completions whichever process owns it.
Everything else (data split, rewards, advantages, log-probs, loss, DDP, optimizer) is the script's.

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

import dataclasses
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
from minivr1.chat import select_sequences  # noqa: E402


def length_reward(text, answer, **meta):
    """Varies within groups on a random model: every step has a learning signal."""
    return float(len(text) % 3)


class SeededRollouts:
    """Wraps train_grpo's prompt_batch (to learn the step's problems) and generate (to sample each
    group alone, seeded by problem id and step); optionally breaks the loss's denominators."""

    def __init__(self, break_denominators: bool = False):
        self.break_denominators = break_denominators
        self.steps = []                  # per step: {"ids": [...], "G": G}
        self.problems, self.G = [], 0
        self.local_totals = None         # (sequences, tokens) of this process's rollout
        self.real_prompt_batch, self.real_generate = train_grpo.prompt_batch, train_grpo.generate
        self.real_loss = train_grpo.grpo_loss

    def prompt_batch(self, processor, problems, system_prompt=None, repeat=1):
        self.problems, self.G = list(problems), repeat
        self.steps.append({"ids": [p.id for p in problems], "G": repeat})
        return self.real_prompt_batch(processor, problems, system_prompt, repeat=repeat)

    def generate(self, model, processor, batch, *args, **kwargs):
        G, step = self.G, len(self.steps) - 1
        assert batch["input_ids"].shape[0] == len(self.problems) * G, "generate got rows that are not whole groups"
        images_per_seq = [len(p.images) for p in self.problems for _ in range(G)]
        parts = []
        for j, p in enumerate(self.problems):
            group = select_sequences(dict(batch), list(range(j * G, (j + 1) * G)), images_per_seq)
            first = int(group["attention_mask"].bool().any(0).nonzero()[0])       # drop the left padding
            group = {k: v[:, first:] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
                     for k, v in group.items()}
            torch.manual_seed(zlib.crc32(f"{p.id}/{step}".encode()))
            parts.append(self.real_generate(model, processor, group, *args, **kwargs))
        C = max(r.completion_ids.shape[1] for r in parts)
        pad = processor.tokenizer.pad_token_id

        def right_pad(x, value):
            return torch.nn.functional.pad(x, (0, C - x.shape[1]), value=value)

        device = parts[0].completion_ids.device
        ro = dataclasses.replace(
            parts[0],
            prompt_ids=batch["input_ids"].to(device), prompt_mask=batch["attention_mask"].to(device),
            prompt_types=batch["mm_token_type_ids"].to(device) if "mm_token_type_ids" in batch else None,
            completion_ids=torch.cat([right_pad(r.completion_ids, pad) for r in parts]),
            completion_mask=torch.cat([right_pad(r.completion_mask, 0) for r in parts]),
            truncated=torch.cat([r.truncated for r in parts]),
            texts=[t for r in parts for t in r.texts])
        self.local_totals = (float(ro.completion_mask.shape[0]), float(ro.completion_mask.sum()))
        return ro

    def grpo_loss(self, *args, **kwargs):
        if self.break_denominators:
            kwargs["total_seqs"], kwargs["total_tokens"] = self.local_totals
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
                mp.setattr(train_grpo, "prompt_batch", probe.prompt_batch)
                mp.setattr(train_grpo, "generate", probe.generate)
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
