"""FSDP2 and DeepSpeed ZeRO on a CPU, for the multi-process tests.

accelerate runs FSDP and DeepSpeed only on accelerators: on a machine without a GPU it builds a
plain multi-CPU (DDP over gloo) state whatever the config says. Both backends themselves run on a
CPU over gloo (torch's `fully_shard`; DeepSpeed's CPU accelerator), so `use(backend)` makes the
scripts' `distributed.make_accelerator` return an Accelerator in that state:

    fsdp   an Accelerator built as usual, then switched to FSDP with fsdp.yaml's sharding (FSDP2,
           the model's own layer classes as shard units, reshard after forward) but fp32 and without
           cpu_ram_efficient_loading (every process loads the whole model); `prepare` then shards
           with `fully_shard` for real.
    zero2  DeepSpeed with configs/accelerate/ds_zero2.json, over a gloo process group.
    zero3  the same with ds_zero3.json and zero3_init_flag (weights partitioned at load), as
           configs/accelerate/zero3.yaml.
    ddp    nothing changed (the scripts' own CPU path).

So the scripts' code paths for these backends (sharded state dicts, gathered rollouts, the sharded
reference, DeepSpeed's loss scaling and checkpointing) run as they would on GPUs. What this does
not cover: NCCL, bf16 mixed precision (the CPU runs are fp32), CPU offload, and speed.
"""
from __future__ import annotations

import os
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
BACKENDS = ("ddp", "fsdp", "zero2", "zero3")


def use(backend: str) -> None:
    """Route every later `distributed.make_accelerator()` in this process through `backend`."""
    from minivr1 import distributed

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: one of {BACKENDS}")
    if backend == "ddp":
        return
    real = distributed.make_accelerator

    def make_accelerator(gradient_accumulation_steps: int = 1, mixed_precision: str = "auto"):
        if backend == "fsdp":
            return _fsdp(real(gradient_accumulation_steps, "no"))
        return _deepspeed(int(backend[-1]), gradient_accumulation_steps)

    distributed.make_accelerator = make_accelerator


def _fsdp(accelerator):
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    assert accelerator.is_fsdp2
    return accelerator


def _deepspeed(stage: int, gradient_accumulation_steps: int):
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")          # accelerate would pick NCCL, or no process group without a GPU
    plugin = DeepSpeedPlugin(hf_ds_config=str(CONFIGS / f"ds_zero{stage}.json"), zero3_init_flag=stage == 3)
    return Accelerator(cpu=False, mixed_precision="no", gradient_accumulation_steps=gradient_accumulation_steps,
                       deepspeed_plugin=plugin)
