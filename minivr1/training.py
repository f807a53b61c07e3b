"""The parts of a training loop that are the same on one process and many: the optimizer and its
schedule, a resumable data order, the optimizer step with its NaN guard, a Ctrl-C guard, resuming,
and the final save. What differs between backends is in minivr1/distributed.py.
"""
from __future__ import annotations

import math
import signal

import torch


def build_optimizer(model, lr: float, weight_decay: float = 0.0, name: str = "adamw"):
    """AdamW over the trainable parameters ("adamw_8bit": bitsandbytes' 8-bit AdamW)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (check --mode and --freeze_vision)")
    if name == "adamw_8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}: use 'adamw' or 'adamw_8bit'")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float = 0.05, min_ratio: float = 0.0):
    """Linear warmup over `warmup_ratio` of the steps, then cosine decay to `min_ratio` x lr.

    Stepped once per optimizer step by the script itself (not passed to accelerator.prepare,
    whose wrapper would step it once per process), and registered for checkpointing.
    """
    warmup = max(1, round(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """A permutation of range(n) that depends only on (seed, epoch): resuming needs no saved order."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batch_indices(n: int, global_batch: int, index: int, seed: int, rank: int = 0, world: int = 1,
                  drop_last: bool = True) -> list[int]:
    """The dataset indices of global batch number `index` (0-based, counting across epochs) that
    belong to process `rank`: the global batch is cut into `world` contiguous shares.

    Data position = `index`, so a checkpoint only needs the step count to resume exactly.
    """
    per_epoch = n // global_batch if drop_last else math.ceil(n / global_batch)
    if per_epoch == 0:
        raise ValueError(f"{n} records are fewer than one global batch of {global_batch}; "
                         f"lower the batch size or the number of processes")
    epoch, k = divmod(index, per_epoch)
    order = epoch_order(n, epoch, seed)
    batch = order[k * global_batch:(k + 1) * global_batch]
    share = math.ceil(len(batch) / world)
    return batch[rank * share:(rank + 1) * share]


class StopRequested:
    """Turns Ctrl-C / SIGTERM into a flag the loop checks between steps, so the script can save a
    checkpoint and exit cleanly instead of dying mid-step. A second Ctrl-C exits at once."""

    def __init__(self):
        self.requested = False
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:           # not the main thread (e.g. inside a test runner thread)
                pass

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: finishing this step, saving a checkpoint, then exiting "
              "(press Ctrl-C again to quit without saving)", flush=True)

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_finite(name: str, value: torch.Tensor | float, step: int, out_dir=None) -> None:
    """Stop the run on NaN/inf instead of training on garbage. Called before the update, so the weights
    never take a non-finite step; the message says which checkpoint a rerun resumes from (FloatingPointError:
    one clean line from the scripts)."""
    v = torch.as_tensor(value)
    if torch.isfinite(v).all():
        return
    from minivr1 import checkpoint

    latest = checkpoint.latest_checkpoint(out_dir) if out_dir is not None else None
    where = (f"rerunning the same command resumes from the last checkpoint, {latest}, which is intact" if latest else
             "there is no checkpoint yet: rerunning starts from the beginning")
    raise FloatingPointError(f"step {step}: {name} is {v.flatten()[:4].tolist()} (not finite); the update was not "
                             f"applied. Lower the learning rate or check the data; {where}")


def disable_dropout(model) -> None:
    """RL needs the same distribution for sampling, old, new and reference log-probs (docs/pitfalls.md):
    dropout would make the ratio noisy even at the first step.

    Besides nn.Dropout modules, transformers' attention layers keep their rate as a float attribute
    `attention_dropout` (from the config) that they pass to the attention kernel in train mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def optimizer_step(accelerator, policy, optimizer, max_grad_norm: float, step: int, out_dir=None) -> float | None:
    """At the end of an accumulation (accelerate's `sync_gradients`): clip, check the gradient norm
    is finite (a finite loss can still have NaN gradients: the update must not happen), step, zero
    the gradients. Returns the norm before clipping (None mid-accumulation, or where the backend
    clips by itself)."""
    from minivr1 import distributed

    grad_norm = None
    if accelerator.sync_gradients:
        grad_norm = distributed.clip_gradients(accelerator, policy, max_grad_norm)
        if grad_norm is not None:
            check_finite("grad_norm", grad_norm, step, out_dir)
    optimizer.step()                    # accelerate skips it mid-accumulation
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def micro_batches(n: int, size: int) -> list[list[int]]:
    """Rows 0..n-1 as consecutive micro-batches of at most `size` rows."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def token_budget_micro_batches(prompt_lens: list[int], completion_lens: list[int], budget: int,
                               count: int = 0) -> list[list[int]]:
    """Micro-batches by padded token count instead of a number of rows (EasyR1's `dynamic_batching`, verl's
    `use_dynamic_bsz`): rows sorted longest first (prompt + completion tokens) and cut into runs whose padded
    size, rows x (longest prompt + longest completion of the run), stays within `budget` tokens; a row longer
    than the budget gets a micro-batch of its own. So a few completions at the limit share a micro-batch and
    the many short ones run together at their own width (policy.TokenLogprobs(trim_padding=True)), instead of
    every micro-batch padded to the longest row of the step.

    Then, while there are fewer than `count` micro-batches, the costliest one with 2+ rows is halved: every
    process must run the same number of forward/backward passes per step (DDP hangs otherwise, docs/pitfalls.md
    #16), so the caller passes the largest count over processes. Each micro-batch lists its rows in ascending
    order, so a group's rows stay consecutive (the shared-prompt forward needs it); a group may span several
    micro-batches. The gradient does not depend on the split (the loss's denominators are the whole batch's).
    """
    if count > len(prompt_lens):
        raise ValueError(f"cannot split {len(prompt_lens)} rows into {count} micro-batches")
    order = sorted(range(len(prompt_lens)), key=lambda i: -(prompt_lens[i] + completion_lens[i]))

    def cost(run):
        return len(run) * (max(prompt_lens[i] for i in run) + max(completion_lens[i] for i in run))

    runs: list[list[int]] = []
    for i in order:
        if runs and cost(runs[-1] + [i]) <= budget:
            runs[-1].append(i)
        else:
            runs.append([i])
    while len(runs) < count:
        k = max((k for k, run in enumerate(runs) if len(run) > 1), key=lambda k: cost(runs[k]))
        run = runs[k]
        runs[k:k + 1] = [run[:len(run) // 2], run[len(run) // 2:]]
    return [sorted(run) for run in runs]


def warmup_schedule(optimizer, warmup_steps: int):
    """Linear warmup over `warmup_steps` optimizer steps, then the constant learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def resume_step(accelerator, out_dir, resume: str | None) -> int:
    """Load the checkpoint `resume` names ("auto": out_dir's newest usable one, if any, see
    checkpoint.load_latest; None: none) into the prepared objects and return its step; 0 when starting
    fresh. The metrics and samples files then lose the lines of later steps (logged after that checkpoint
    by a run that was killed), so that a resumed run's files read as one run."""
    from pathlib import Path

    from minivr1 import checkpoint, tracking
    from minivr1.cli import UserError

    step = 0
    if resume == "auto":
        loaded = checkpoint.load_latest(accelerator, out_dir)
        if loaded is not None:
            ckpt, state = loaded
            step = state["step"]
            tracking.print0(f"resumed from {ckpt} at step {step}")
    elif resume:
        problems = checkpoint.verify(resume) if Path(resume).is_dir() else ["no such folder"]
        if problems:
            raise UserError(f"--resume {resume}: {'; '.join(problems)}. Pass another checkpoint, or --resume auto")
        step = checkpoint.load_checkpoint(accelerator, resume)["step"]
        tracking.print0(f"resumed from {resume} at step {step}")
    if accelerator.is_main_process:
        tracking.drop_after(out_dir, step)
    return step


def save_final(accelerator, policy, processor, final, source) -> None:
    """Save the trained policy as an ordinary HF directory (full weights, or the LoRA adapter) with
    its processor as a standard checkpoint carries it (`models.save_processor`; `source` is the
    starting model), so evaluate.py, transformers and vLLM open it directly. Every process calls
    it: under FSDP / ZeRO-3 the full state dict is gathered first."""
    from minivr1.checkpoint import share_modes
    from minivr1.models import processor_source, save_processor
    from minivr1.tracking import print0

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(policy).model        # the model inside TokenLogprobs
    state_dict = accelerator.get_state_dict(policy)
    if accelerator.is_main_process:
        if state_dict:    # keys of the wrapper are "model.<key of the inner model>"
            state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        unwrapped.save_pretrained(final, state_dict=state_dict or None, safe_serialization=True)
        save_processor(processor, final, source=processor_source(source))
        share_modes(final)                                    # weights as readable as the other files
        print0(f"saved {final}")
    accelerator.wait_for_everyone()
