"""The accelerate configs in configs/accelerate/ are ones accelerate 1.15 accepts and that do what their
comments say, checked without GPUs: each file parses (no unknown keys, at the top or inside
fsdp_config / deepspeed_config); `accelerate launch`'s own validation turns it into the environment
it would hand the training processes; and from that environment accelerate builds the FSDP or
DeepSpeed plugin the scripts' Accelerator would get. Two mistakes these caught: an FSDP class list
naming a class the model does not have (accelerate refuses it; the configs now name none and take the
model's own, for every family), and DeepSpeed configs with no
integer micro-batch size (accelerate.prepare refuses them when no DataLoader is prepared, which is
how the scripts call it)."""
from pathlib import Path

import pytest
import torch

from minivr1 import tiny
from minivr1.policy import TokenLogprobs
from conftest import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def launch_env(path: Path, *extra: str):
    """(args, env) that `accelerate launch --config_file path [extra] train_sft.py` would use."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), *extra, "train_sft.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:      # as accelerate's launch_command does before the DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


@pytest.fixture
def launched(monkeypatch):
    """Put a config's launch environment into os.environ (undone after the test)."""
    def apply(name: str, *extra: str):
        args, env = launch_env(ROOT / "configs" / "accelerate" / name, *extra)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return args
    return apply


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_with_known_keys(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))                 # raises on unknown top-level keys
    known = {a.dest for a in launch_command_parser()._actions}
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key in getattr(config, section) or {}:
            name = key if key.startswith(prefix) else prefix + key
            assert name in known, f"{path.name}: {section}.{key} is not an accelerate launch option (ignored silently)"
    launch_env(path)                                          # accelerate launch's validation passes
    ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
    if ds_file:
        assert (ROOT / ds_file).is_file(), f"{path.name}: {ds_file} missing (paths are relative to the repo root)"


@pytest.mark.parametrize("name, offload", [("fsdp.yaml", False), ("fsdp_offload.yaml", True)])
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_wraps_every_decoder_layer_and_vision_block(name, offload, family, launched):
    """The configs name no layer classes: accelerate takes the model's own `_no_split_modules`, which
    policy.TokenLogprobs passes on, so the same file shards every family by its decoder layers and
    vision blocks (Idefics3 declares its vision attention, not its vision layers)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import CPUOffloadPolicy

    launched(name)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) == offload
    with torch.device("meta"):
        hf = tiny.model_class(family)(tiny.build_config("tiny", tiny.build_tokenizer(family=family), family))
    policy = TokenLogprobs(hf)              # the module the scripts hand to accelerator.prepare
    wrap = fsdp2_prepare_auto_wrap_policy(plugin, policy)     # raises on a class the model lacks
    wrapped = [m for m in policy.modules() if wrap(m)]
    units = {"qwen2_5_vl": ("Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"),
             "qwen3_vl": ("Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"),
             "qwen3_5": ("Qwen3_5DecoderLayer", "Qwen3_5VisionBlock"),
             "idefics3": ("LlamaDecoderLayer", "Idefics3VisionAttention")}[family]
    layers = [m for m in policy.modules() if type(m).__name__ in units]
    decoder, vision = hf.config.text_config.num_hidden_layers, 2      # the tiny models: 2 vision blocks
    assert wrapped == layers and len(layers) == decoder + vision and set(policy._no_split_modules) == set(units)


@pytest.mark.parametrize("name, stage", [("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_deepspeed_config_can_be_prepared_without_a_dataloader(name, stage, launched):
    from accelerate.utils import DeepSpeedPlugin

    launched(name)
    plugin = DeepSpeedPlugin()              # also runs accelerate's checks of a DeepSpeed JSON file
    assert plugin.zero_stage == stage and plugin.zero3_init_flag == (stage == 3)
    # accelerate.prepare() with no DataLoader raises unless the micro-batch size is an integer, and
    # with a module that has no `config` (TokenLogprobs) unless these sizes are given
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        assert not plugin.is_auto(f"zero_optimization.{key}")
    # filled from the script's Accelerator: bf16 on a GPU, the SFT accumulation count
    assert plugin.is_auto("bf16.enabled") and plugin.is_auto("gradient_accumulation_steps")


def test_multinode_launch_lines(launched):
    args = launched("multinode.yaml", "--machine_rank", "1", "--main_process_ip", "10.1.2.3")
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    assert "10.1.2.3" in (getattr(args, "master_addr", None), getattr(args, "rdzv_endpoint", "").split(":")[0])
