"""Training-loop plumbing shared by train_sft.py and train_grpo.py: the accelerator, the
optimizer and schedule, a resumable data order, and a Ctrl-C guard.
"""
from __future__ import annotations

import math
import signal
from contextlib import contextmanager

import torch


def make_accelerator(gradient_accumulation_steps: int = 1, mixed_precision: str = "auto"):
    """An Accelerator for one process (`python`) or many (`accelerate launch`, `torchrun`).

    On a machine with no GPU we pass cpu=True, which is what makes `torchrun --nproc_per_node 2`
    give two gloo processes with DDP (cpu-stack.md). Mixed precision "auto" is bf16 on GPUs that
    support it, off on CPU.
    """
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(cpu=not cuda, mixed_precision=mixed_precision,
                       gradient_accumulation_steps=gradient_accumulation_steps)


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


def check_finite(name: str, value: torch.Tensor | float, step: int) -> None:
    """Stop the run on NaN/inf instead of training on garbage."""
    v = torch.as_tensor(value)
    if not torch.isfinite(v).all():
        raise FloatingPointError(
            f"step {step}: {name} is {v.flatten()[:4].tolist()} (not finite). The last checkpoint is intact; "
            f"lower the learning rate, check the data, or resume with --resume from the last checkpoint")


def start_accumulation(accelerator, n_micro: int) -> None:
    """Make the next `n_micro` calls of `accelerator.accumulate` one optimizer step.

    GRPO's micro-batch count can change between PTST stages (group size changes), so we set it
    per step and reset accelerate's counter, instead of fixing it when the Accelerator is built.
    (DeepSpeed's engine keeps the accumulation count it was built with; `global_loss_scale`
    accounts for that.)
    """
    accelerator.gradient_accumulation_steps = n_micro
    accelerator.step = 0


def global_loss_scale(accelerator) -> float:
    """The factor to multiply each micro-batch's loss by before `accelerator.backward`, when the losses
    are already normalised by the whole global batch (every micro-batch of every process): then the
    gradient that reaches the optimizer is exactly the global loss's, however the batch is split.

    Two divisions happen behind the scenes and this undoes both: the backends average gradients
    over processes (DDP, FSDP and DeepSpeed alike): x world size; and each micro-batch's loss is
    divided by the accumulation count, by accelerate (`accelerator.gradient_accumulation_steps`) or,
    under DeepSpeed, by the engine, with the count the engine was built with (its config's
    `gradient_accumulation_steps`), which is not the count `start_accumulation` sets later.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        divisor = accelerator.deepspeed_engine_wrapped.engine.gradient_accumulation_steps()
    else:
        divisor = accelerator.gradient_accumulation_steps
    return float(accelerator.num_processes * divisor)


def prepare_reference(accelerator, module):
    """Place a frozen reference model (a TokenLogprobs, not trained) the way the policy is placed.

    FSDP2: sharded like the policy (the same shard units, mixed precision and offload, through
    accelerate's own `fsdp2_prepare_model`; under `fsdp_cpu_ram_efficient_loading` rank 0's weights
    are broadcast). DeepSpeed ZeRO-3: a DeepSpeed engine with the training config minus the
    optimizer, so its parameters are partitioned too. Otherwise (one process, DDP, ZeRO-1/2): whole,
    on this process's device; a forward of it then involves no other process.
    """
    from accelerate.utils import DistributedType

    module.eval().requires_grad_(False)
    if getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model
        return fsdp2_prepare_model(accelerator, module).eval()
    if accelerator.distributed_type == DistributedType.DEEPSPEED and zero_stage(accelerator) == 3:
        import copy

        import deepspeed
        ds_config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            ds_config.pop(key, None)
        engine, *_ = deepspeed.initialize(model=module, config=ds_config)
        engine.eval()                       # (DeepSpeedEngine.eval returns None, not the engine)
        return engine
    return module.to(accelerator.device)


def zero_stage(accelerator) -> int:
    """DeepSpeed's ZeRO stage, 0 when not under DeepSpeed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


@contextmanager
def whole_parameters(accelerator, policy):
    """Inside this block the prepared `policy`'s parameters are whole on every process, so
    `generate()` can run on the unwrapped model as on one GPU, each process at its own pace.

    Only FSDP2 needs to act: its parameters live as shards, gathered by hooks around each shard
    unit's forward and freed after it. Here every unit gathers its parameters once and keeps them
    until the block ends (a rollout's thousands of forwards then need no collective, and processes
    may stop at different lengths); memory: the whole model, in the compute dtype, on every GPU
    for the rollout's duration. ZeRO-3 instead gathers layer by layer at every forward, so its
    generation must step in sync across processes (`generate(..., synced_gpus=True)`).

    FSDP2 internals used (torch is pinned): the root state's `_lazy_init` (the root must claim
    rootness before any unit runs a forward of its own) and each parameter group's
    `post_forward_mesh_info` (None = keep gathered after a forward; `set_reshard_after_forward`
    writes the same field but cannot restore the per-unit choices accelerate made).
    """
    if not getattr(accelerator, "is_fsdp2", False):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    policy._get_fsdp_state()._lazy_init()
    saved = []
    for unit in units:
        for group in unit._get_fsdp_state()._fsdp_param_groups:
            saved.append((group, group.post_forward_mesh_info))
            group.post_forward_mesh_info = None
        unit.unshard()
    try:
        yield
    finally:
        for group, info in saved:
            group.post_forward_mesh_info = info
        for unit in units:
            unit.reshard()


def disable_dropout(model) -> None:
    """RL needs the same distribution for sampling, old, new and reference log-probs (pitfall 6):
    dropout would make the ratio noisy even at the first step.

    Besides nn.Dropout modules, transformers' attention layers keep their rate as a float attribute
    `attention_dropout` (from the config) that they pass to the attention kernel in train mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def clip_gradients(accelerator, model, max_norm: float) -> float | None:
    """Clip the gradient norm to `max_norm` (0 = measure only) and return the norm before
    clipping; None where the backend clips by itself and reports nothing (DeepSpeed: its
    config's gradient_clipping)."""
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return None if norm is None else float(norm)


def resume_step(accelerator, out_dir, resume: str | None) -> int:
    """Load the checkpoint `resume` names ("auto": out_dir's latest, if any; None: none) into the
    prepared objects and return its step; 0 when starting fresh."""
    from pathlib import Path

    from minivr1 import checkpoint
    from minivr1.tracking import print0

    ckpt = checkpoint.latest_checkpoint(out_dir) if resume == "auto" else (Path(resume) if resume else None)
    if ckpt is None:
        return 0
    step = checkpoint.load_checkpoint(accelerator, ckpt)["step"]
    print0(f"resumed from {ckpt} at step {step}")
    return step


def save_final(accelerator, policy, processor, final, source) -> None:
    """Save the trained policy as an ordinary HF directory (full weights, or the LoRA adapter) with
    its processor as a standard checkpoint carries it (`models.save_processor`; `source` is the
    starting model), so evaluate.py, transformers and vLLM open it directly. Every process calls
    it: under FSDP / ZeRO-3 the full state dict is gathered first."""
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
        print0(f"saved {final}")
    accelerator.wait_for_everyone()
