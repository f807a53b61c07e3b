"""Everything that differs between one process, DDP, FSDP2 and DeepSpeed ZeRO, in one place.

The training scripts run unchanged under `python` and `accelerate launch`; where a backend needs
something done differently, they call a function here, and this module holds the `if`:

    make_accelerator     the Accelerator (gloo processes on a machine without a GPU)
    check_backend        start-up checks: what this backend cannot run, said before anything loads
    prepare_reference    the frozen KL reference placed like the policy (sharded under FSDP2 / ZeRO-3)
    whole_parameters     the policy's weights whole on every process for the rollout (FSDP2)
    generation_synced    whether generation must step in lock-step across processes (ZeRO-3)
    share_prompt_forward whether the log-prob forward may run a group's prompt once (not sharded)
    start_accumulation   make the next n micro-batches one optimizer step (n changes between stages)
    global_loss_scale    undo the backends' division of gradients by processes and micro-batches
    clip_gradients       clip and return the norm (DeepSpeed clips by itself)
    global_sums          add a dict of numbers over processes (one collective)
    any_process          one verdict on every process: true if a flag is true on any
    shutdown             free the model and end the process group (gloo aborts otherwise)
"""
from __future__ import annotations

import gc
from contextlib import contextmanager

import torch
from accelerate.utils import DistributedType


def make_accelerator(gradient_accumulation_steps: int = 1, mixed_precision: str = "auto"):
    """An Accelerator for one process (`python`) or many (`accelerate launch`, `torchrun`).

    On a machine with no GPU we pass cpu=True, which is what makes `torchrun --nproc_per_node 2`
    give two gloo processes with DDP. Mixed precision "auto" is bf16 on GPUs that support it,
    off on CPU.
    """
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(cpu=not cuda, mixed_precision=mixed_precision,
                       gradient_accumulation_steps=gradient_accumulation_steps)


def check_backend(accelerator) -> None:
    """What GRPO cannot run under this backend, said at start-up (before any model loads)."""
    from minivr1.cli import UserError

    if accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        raise UserError("GRPO under FSDP needs FSDP2 (the rollout gathers FSDP2 shards): set fsdp_version: 2 in the "
                        "accelerate config (configs/accelerate/fsdp.yaml does)")


def zero_stage(accelerator) -> int:
    """DeepSpeed's ZeRO stage, 0 when not under DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


def generation_synced(accelerator) -> bool:
    """ZeRO-3 gathers each layer's parameters at every forward, a collective: generation must then
    step in lock-step on every process (`generate(..., synced_gpus=True)`) until the last finishes."""
    return zero_stage(accelerator) == 3


def share_prompt_forward(accelerator, gradient_checkpointing: bool) -> bool:
    """Whether the log-prob forward may run a group's prompt once and reuse its KV cache: on one
    process and DDP. Not under FSDP / DeepSpeed (the prompt's second use would run each shard unit's
    hooks twice per forward: untested), nor with gradient checkpointing (it drops the cache)."""
    return not gradient_checkpointing and accelerator.distributed_type in (
        DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def prepare_reference(accelerator, module):
    """Place a frozen reference model (a TokenLogprobs, not trained) the way the policy is placed.

    FSDP2: sharded like the policy (the same shard units, mixed precision and offload, through
    accelerate's own `fsdp2_prepare_model`; under `fsdp_cpu_ram_efficient_loading` rank 0's weights
    are broadcast). DeepSpeed ZeRO-3: a DeepSpeed engine with the training config minus the
    optimizer, so its parameters are partitioned too. Otherwise (one process, DDP, ZeRO-1/2): whole,
    on this process's device; a forward of it then involves no other process.
    """
    module.eval().requires_grad_(False)
    if getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model
        return fsdp2_prepare_model(accelerator, module).eval()
    if zero_stage(accelerator) == 3:
        import copy

        import deepspeed
        ds_config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            ds_config.pop(key, None)
        engine, *_ = deepspeed.initialize(model=module, config=ds_config)
        engine.eval()                       # (DeepSpeedEngine.eval returns None, not the engine)
        return engine
    return module.to(accelerator.device)


@contextmanager
def whole_parameters(accelerator, policy):
    """Inside this block the prepared `policy`'s parameters are whole on every process, so the
    rollout can run on the unwrapped model as on one GPU, each process at its own pace.

    Only FSDP2 needs to act: its parameters live as shards, gathered by hooks around each shard
    unit's forward and freed after it. Here every unit gathers its parameters once and keeps them
    until the block ends (a rollout's thousands of forwards then need no collective, and processes
    may stop at different lengths); memory: the whole model, in the compute dtype, on every GPU
    for the rollout's duration. ZeRO-3 instead gathers layer by layer at every forward, so its
    generation must step in sync across processes (`generation_synced`).

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
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        divisor = accelerator.deepspeed_engine_wrapped.engine.gradient_accumulation_steps()
    else:
        divisor = accelerator.gradient_accumulation_steps
    return float(accelerator.num_processes * divisor)


def clip_gradients(accelerator, model, max_norm: float) -> float | None:
    """Clip the gradient norm to `max_norm` (0 = measure only) and return the norm before
    clipping; None where the backend clips by itself and reports nothing (DeepSpeed: its
    config's gradient_clipping)."""
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return None if norm is None else float(norm)


def global_sums(accelerator, values: dict[str, float], maxima: dict[str, float] | None = None) -> dict[str, float]:
    """`values` added over all processes (and `maxima` maxed), in one collective each."""
    keys, out = sorted(values), {}
    if keys:
        sums = accelerator.reduce(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                                               device=accelerator.device), "sum")
        out.update(zip(keys, sums.tolist()))
    if maxima:
        keys = sorted(maxima)
        highs = accelerator.reduce(torch.tensor([float(maxima[k]) for k in keys], dtype=torch.float64,
                                                device=accelerator.device), "max")
        out.update(zip(keys, highs.tolist()))
    return out


def any_process(accelerator, flag: bool) -> bool:
    """True on every process if `flag` is true on any (e.g. Ctrl-C pressed in one terminal)."""
    return bool(accelerator.reduce(torch.tensor(int(flag), device=accelerator.device), "max").item())


def shutdown(accelerator) -> None:
    """End a run: drop accelerate's references to the prepared model and optimizer (the caller has
    deleted its own), collect them, then end the process group. With gloo, tearing the group down
    while a DDP model is alive aborts at exit in a fraction of runs ("terminate called without an
    active exception"); freeing first made every run exit cleanly."""
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
