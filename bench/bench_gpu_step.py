"""One GRPO step of PTST stage 1 (4096 new tokens x G = 16, one prompt with a typical image) on the
real Qwen2.5-VL-7B (or 3B) architecture with random weights: peak GPU memory, rollout and update
throughput, model-FLOPs utilisation; LoRA bf16, QLoRA 4-bit and full fine-tuning; sdpa and
flash-attn; HF generate's rollout options; TRL's GRPOTrainer on the same step as a yardstick.

Nothing is downloaded: the architecture comes from minivr1.tiny (Qwen2.5-VL-3B/7B config.json
values, real vocabulary size) with a small hub-free tokenizer; the weights are random, built once on
the device in --dtype (bf16 on a GPU, fp32 on a CPU unless told) and saved to --work_dir, so every
measurement loads them through the project's own loader. Random weights rarely emit the end token,
so every completion runs to the full 4096 tokens: the worst case the stage's length limit allows (a
trained model stops earlier).

What runs is the project's code, not a copy of it:
  * `ours`: train_grpo.main for --steps steps (default 1) on a one-problem data file, with
    `--stages 4096x16:1`, one prompt per step, --micro_batch_size completions per forward/backward,
    gradient checkpointing, beta 0.01 (LoRA: the reference is the adapter-disabled model; full:
    a frozen copy). Only two things are patched: the attention kernel (models.attn_implementation)
    and checkpoint saving, which ends the run instead of writing 7B of weights and optimizer state.
    The reward is the parity of the completion's length (random text scores 0 under HFRRF; this
    gives non-zero advantages; the work is the same either way). Times are the script's own
    t_rollout / t_update of the last step.
  * `rollout options`: the model as GRPO samples with it (LoRA-wrapped), the same call as
    minivr1.rollout.generate, with HF generate's dynamic cache, a static cache, and a static
    cache compiled with torch.compile (transformers compiles the forward itself for a static
    cache on a GPU; "static" sets disable_compile); and our own engines (minivr1/static_engine.py):
    `minivr1_static` (train_grpo.py's default rollout) and `minivr1_static_compiled` (its decode step
    compiled, captured as a CUDA graph on a GPU), whose first call (compiling) is reported apart.
  * `TRL` (--trl, if trl is importable): GRPOTrainer, LoRA via peft_config, the same model, prompt,
    G, length, micro-batching (per_device_train_batch_size = micro batch, accumulation = G / micro),
    beta, loss_type "grpo", gradient checkpointing; one optimizer step.
Each measurement runs in a fresh subprocess on a GPU (clean peak memory; an OOM ends only that
row), in-process on a CPU (--isolate / --no-isolate).

Definitions (also in docs/benchmarks.md):
  rollout tok/s   completion tokens generated / rollout seconds (all G sequences together)
  bound           memory-bandwidth bound of decoding: each step reads the weights the decoder uses
                  (decoder layers + LM head in bf16, not the embedding table) and the KV cache of
                  all G sequences at the mean context (prompt + C/2); tok/s bound = G / (bytes per
                  step / bandwidth). The bf16 bound for QLoRA too (bitsandbytes dequantizes to bf16)
  update tok/s    G x (prompt + completion) tokens / update seconds (reference log-probs, policy
                  forward + backward with recomputation, optimizer step)
  MFU             model FLOPs of the update / (update seconds x peak bf16 FLOP/s): forward
                  2 N T (decoder, all T tokens) + 2 N_head C (LM head on completion tokens only) +
                  causal attention 2 L d T^2 + vision 2 N_vis patches; backward 2x the forward's text
                  part when every weight trains (1x for LoRA: no weight gradients for the frozen
                  base); the reference forward counted once; recomputation NOT counted. (With
                  --no-gradient_checkpointing train_grpo runs each group's prompt once, sharing its
                  KV cache; the formula still counts all G prompts, so it then overstates the work.)

    .venv/bin/python bench/bench_gpu_step.py --size 7b --trl                  # one H100: everything
    .venv/bin/python bench/bench_gpu_step.py --size 3b --modes lora,full
    .venv/bin/python bench/bench_gpu_step.py --size tiny --device cpu --completion_length 16 --group_size 2   # smoke test
    .venv/bin/python bench/bench_gpu_step.py --size 3b --device cpu --dtype bf16 --modes lora --completion_length 8 \
        --group_size 2 --micro_batch_size 2 --no-gradient_checkpointing --rollout_options ''   # 3B on a CPU (pytest -m realsize)
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 1024 ** 3
# dense bf16 tensor-core peak (FLOP/s) and HBM bandwidth (bytes/s) by device name, first match wins
DEVICES = {"H100 PCIe": (756e12, 2.0e12), "H100 NVL": (835e12, 3.9e12), "H100": (989.4e12, 3.35e12),
           "H200": (989.4e12, 4.8e12), "A100": (312e12, 2.0e12)}
QUESTION = ("<image>As shown in the figure, AB is the diameter of circle O, C and D are points on the circle, "
            "and angle BAC = 36 degrees. Find the measure of angle ADC. Choices: (A) 36 (B) 44 (C) 54 (D) 64")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="7b", choices=["tiny", "small", "3b", "7b"], help="architecture (minivr1.tiny)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="dtype of the weights (default: bf16 on a GPU, fp32 on a CPU; the 3B architecture fits a "
                        "24 GiB CPU machine only in bf16: pytest -m realsize)")
    p.add_argument("--modes", default="lora,qlora,full", help="comma-separated: lora, qlora, full")
    p.add_argument("--attn", default=None, help="comma-separated attention kernels (default: sdpa, and flash_attention_2 if installed)")
    p.add_argument("--completion_length", type=int, default=4096, help="max new tokens (PTST stage 1: 4096)")
    p.add_argument("--group_size", type=int, default=16, help="G completions of the one prompt (stage 1: 16)")
    p.add_argument("--image_size", type=int, default=448, help="square image side in pixels (448 -> 256 image tokens)")
    p.add_argument("--micro_batch_size", type=int, default=4, help="COMPLETIONS per forward/backward")
    p.add_argument("--steps", type=int, default=1, help="GRPO steps per measurement (the last one is reported)")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument("--lora_alpha", type=int, default=128)
    p.add_argument("--beta", type=float, default=0.01)
    p.add_argument("--optim_full", default="adamw_8bit", choices=["adamw", "adamw_8bit"],
                   help="optimizer for full fine-tuning (8-bit AdamW is what lets 7B fit one 80 GB GPU at all)")
    p.add_argument("--logprob_chunk_size", type=int, default=1024)
    p.add_argument("--rollout_options", default=None,
                   help="comma-separated: dynamic, static, static_compiled (HF generate), minivr1_static, "
                        "minivr1_static_compiled (our engines) ('' = skip; default: all five on a GPU, dynamic,static "
                        "on a CPU)")
    p.add_argument("--option_tokens", type=int, default=None, help="new tokens for the rollout-option runs (default: completion_length)")
    p.add_argument("--trl", action="store_true", help="also run TRL's GRPOTrainer on the same step (needs trl)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one subprocess per measurement (default: on a GPU)")
    p.add_argument("--work_dir", default=None, help="where the random checkpoint and data go (reused if present)")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU (default: by GPU name)")
    p.add_argument("--bandwidth_tbs", type=float, default=None, help="memory bandwidth TB/s for the bound (default: by GPU name)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- setup

def build_checkpoint(size: str, out: Path, device: str, seed: int, dtype: str) -> Path:
    """A random Qwen2.5-VL of `size`, initialised on `device` in `dtype`, saved with its processor."""
    import torch
    from transformers import AutoModelForImageTextToText

    from minivr1 import tiny
    from minivr1.models import ImageOnlyQwenProcessor, save_processor

    if (out / "done").is_file():
        return out
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    tokenizer = tiny.build_tokenizer()
    config = tiny.build_config(size, tokenizer)
    torch.manual_seed(seed)
    with torch.device(device):      # built where it runs, in `dtype` from the start (no fp32 copy)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(out)
    save_processor(ImageOnlyQwenProcessor(tiny.build_image_processor(), tokenizer, chat_template=tiny.CHAT_TEMPLATE), out)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    (out / "done").write_text("ok")
    return out


def write_problem(out: Path, image_size: int, seed: int) -> Path:
    """One RL problem (the format train_grpo.py reads) with a random image_size x image_size picture."""
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(out / "image.png")
    path = out / "problems.jsonl"
    path.write_text(json.dumps({"id": "bench-0", "images": ["image.png"], "problem": QUESTION, "answer": "C"}) + "\n")
    return path


def parity_reward(text, answer, **meta):
    """Non-zero advantages on random text (HFRRF would give 0 to all): the work is the same."""
    return float(len(text) % 2)


def model_counts(model_dir: Path) -> dict:
    """Parameter counts by part and the shapes the FLOP and bandwidth formulas need (meta device)."""
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    named = dict(model.named_parameters(remove_duplicate=False))
    tc = config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return {"layers": sum(p.numel() for n, p in named.items() if ".layers." in n and "visual" not in n),
            "head": model.get_output_embeddings().weight.numel(),
            "vision": sum(p.numel() for n, p in named.items() if "visual" in n),
            "total": sum(p.numel() for p in model.parameters()),
            "n_layers": tc.num_hidden_layers, "attn_dim": tc.num_attention_heads * head_dim,
            "kv_bytes_per_token": tc.num_hidden_layers * 2 * tc.num_key_value_heads * head_dim * 2}


def update_flops(c: dict, mode: str, S: int, P: int, C: int, patches: int, beta: float) -> float:
    """Model FLOPs of one update (see the module docstring); recomputation not counted."""
    T = P + C
    text_fwd = 2 * c["layers"] * T + 2 * c["head"] * C + 2 * c["n_layers"] * c["attn_dim"] * T * T
    fwd = text_fwd + 2 * c["vision"] * patches
    bwd = 2 * text_fwd if mode == "full" else text_fwd + 2 * c["n_layers"] * c["attn_dim"] * T * T
    return S * (fwd + bwd + (fwd if beta > 0 else 0))


def rollout_bound(c: dict, S: int, P: int, C: int, bandwidth: float) -> float:
    """Tokens/s if every decode step only had to read the decoder's bf16 weights and the KV cache once.

    The same bf16 bound for QLoRA: bitsandbytes dequantizes each 4-bit weight to bf16 for batched
    decoding (more traffic than bf16, not less). LoRA's adapters (~2% of the weights at r=64) are
    left out."""
    weight_bytes = (c["layers"] + c["head"]) * 2
    kv_bytes = S * (P + C / 2) * c["kv_bytes_per_token"]
    return S * bandwidth / (weight_bytes + kv_bytes)


def device_specs(device: str, args) -> tuple[str, float | None, float | None]:
    import torch

    if device != "cuda":
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", None, None
    name = torch.cuda.get_device_name()
    peak, bw = next((v for k, v in DEVICES.items() if k in name), (None, None))
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak
    bw = args.bandwidth_tbs * 1e12 if args.bandwidth_tbs else bw
    return f"{name} ({torch.cuda.get_device_properties(0).total_memory / GiB:.0f} GiB)", peak, bw


# ---------------------------------------------------------------------------------------------- measurements

class _StepDone(Exception):
    pass


def _peak_memory(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / GiB
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB    # CPU: peak RSS of the process


def _reset_peak(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _is_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_ours(spec: dict) -> dict:
    """train_grpo.main for spec['steps'] steps; the metrics of the last one."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    import train_grpo
    from minivr1 import checkpoint, grader, models

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    real_attn, real_save = models.attn_implementation, checkpoint.save_checkpoint
    grader.REWARDS["bench_parity"] = parity_reward
    models.attn_implementation = lambda: spec["attn"]

    def stop(*args, **kwargs):          # reached after the last step has logged its metrics
        raise _StepDone

    checkpoint.save_checkpoint = stop
    out = Path(spec["work"]) / f"run-{spec['mode']}-{spec['attn']}-{time.time_ns()}"
    _reset_peak(spec["device"])
    result = {"status": "ok"}
    try:
        train_grpo.main(train_grpo.Args(
            model=spec["model"], data=spec["data"], output_dir=str(out), mode=spec["mode"],
            stages=f"{spec['C']}x{spec['G']}:{spec['steps']}", prompts_per_step=1, micro_batch_size=spec["micro"],
            dtype=spec["dtype"], gradient_checkpointing=spec["gc"],
            lora_r=spec["lora_r"], lora_alpha=spec["lora_alpha"], beta=spec["beta"], learning_rate=1e-6,
            optim=spec["optim_full"] if spec["mode"] == "full" else "adamw", reward="bench_parity",
            max_pixels=spec["max_pixels"], logprob_chunk_size=spec["chunk"], save_steps=0, sample_every=0,
            resume=None, seed=spec["seed"]))
        result = {"status": "error", "error": "train_grpo.main returned without reaching its checkpoint"}
    except _StepDone:
        pass
    except Exception as e:          # noqa: BLE001 - one failed configuration must not end the benchmark
        result = {"status": "oom" if _is_oom(e) else "error", "error": f"{type(e).__name__}: {str(e)[:500]}"}
    finally:
        models.attn_implementation, checkpoint.save_checkpoint = real_attn, real_save
        for s, h in handlers.items():
            signal.signal(s, h)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    result["peak_gib"] = _peak_memory(spec["device"])
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    if result["status"] == "ok":
        m = json.loads(lines[-1])
        result.update(t_rollout=m["t_rollout"], t_update=m["t_update"], len=m["len"], len_max=m["len_max"],
                      loss=m["loss"], grad_norm=m["grad_norm"])
    return result


def run_rollout_options(spec: dict) -> dict:
    """HF generate on the LoRA-wrapped policy, as minivr1.rollout.generate calls it, per cache option."""
    import torch

    from minivr1 import data, models, rollout
    from minivr1.chat import prompt_batch

    models_attn = models.attn_implementation
    models.attn_implementation = lambda: spec["attn"]
    try:
        model = models.load_policy(spec["model"], "lora", spec["dtype"],
                                   lora_r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0)
    finally:
        models.attn_implementation = models_attn
    model.to(spec["device"]).eval()
    processor = models.load_processor(spec["model"], spec["max_pixels"])
    problems, _ = data.read_problems(spec["data"])
    batch = prompt_batch(processor, problems[:1], repeat=spec["G"]).to(spec["device"])
    tok = processor.tokenizer
    common = dict(max_new_tokens=spec["option_tokens"], eos_token_id=rollout.eos_token_ids(model, processor),
                  pad_token_id=tok.pad_token_id, suppress_tokens=rollout.media_token_ids(processor), use_cache=True,
                  do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    options = {"dynamic": {}, "static": {"cache_implementation": "static", "disable_compile": True},
               "static_compiled": {"cache_implementation": "static"}}
    P = batch["input_ids"].shape[1]
    results = {}
    for name in spec["options"]:
        r = {"status": "ok"}
        try:
            runs = []
            engine = rollout.make_engine(name.removeprefix("minivr1_"), model, processor, 1.0, 1.0) \
                if name.startswith("minivr1_") else None
            for _ in range(2 if name.endswith("static_compiled") else 1):     # the first compiled call compiles
                _reset_peak(spec["device"])
                t = time.perf_counter()
                with torch.no_grad():
                    if engine is None:
                        out = model.generate(**batch, **common, **options[name])[:, P:]
                    else:
                        out = engine.generate(problems[:1], spec["G"], spec["option_tokens"]).completion_ids
                if spec["device"] == "cuda":
                    torch.cuda.synchronize()
                mask, _ = rollout.completion_mask(out, common["eos_token_id"])
                runs.append((time.perf_counter() - t, int(mask.sum())))
            r.update(seconds=runs[-1][0], tokens=runs[-1][1], first_call_s=runs[0][0],
                     peak_gib=_peak_memory(spec["device"]))
        except Exception as e:      # noqa: BLE001
            r = {"status": "oom" if _is_oom(e) else "error", "error": f"{type(e).__name__}: {str(e)[:500]}"}
        results[name] = r
    return {"status": "ok", "options": results}


def run_trl(spec: dict) -> dict:
    """TRL's GRPOTrainer, LoRA, on the same model / prompt / G / length / micro-batching; one step."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from minivr1 import data, models
    from minivr1.rollout import media_token_ids

    processor = models.load_processor(spec["model"], spec["max_pixels"])
    problem = data.read_problems(spec["data"])[0][0]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": problem.question.replace("<image>", "")}],
                                  "image": problem.images[0].load(), "answer": problem.answer}])
    clock = {"rollout": 0.0}

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return super()._generate(*args, **kwargs)
            finally:
                clock["rollout"] += time.perf_counter() - t

    class Lengths(TrainerCallback):
        """TRL clears its metrics when it logs: read the mean completion length at each step's end."""

        def on_step_end(self, args, state, control, **kwargs):
            clock["len"] = (trainer._metrics["train"].get("completions/mean_length") or [float("nan")])[-1]

    def parity(completions, **kwargs):
        return [parity_reward(c[0]["content"], None) for c in completions]

    cuda = spec["device"] == "cuda"
    G, micro = spec["G"], min(spec["micro"], spec["G"])
    config = GRPOConfig(
        output_dir=str(Path(spec["work"]) / f"trl-{time.time_ns()}"), use_cpu=not cuda, bf16=cuda, fp16=False,
        gradient_checkpointing=spec["gc"], gradient_checkpointing_kwargs={"use_reentrant": False},
        model_init_kwargs={"dtype": {"bf16": "bfloat16", "fp32": "float32"}[spec["dtype"]], "attn_implementation": spec["attn"]},
        per_device_train_batch_size=micro, gradient_accumulation_steps=G // micro, num_generations=G,
        max_completion_length=spec["C"], max_steps=spec["steps"], learning_rate=1e-6, lr_scheduler_type="constant",
        beta=spec["beta"], num_iterations=1, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        temperature=1.0, top_p=1.0, top_k=0, generation_kwargs={"suppress_tokens": media_token_ids(processor)},
        mask_truncated_completions=False, report_to="none", logging_strategy="no", save_strategy="no",
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, seed=spec["seed"])
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                      target_modules=models.lora_targets(models.meta_model(spec["model"])), task_type="CAUSAL_LM")
    try:
        trainer = TimedGRPOTrainer(model=spec["model"], reward_funcs=[parity], args=config, train_dataset=dataset,
                                   processing_class=processor, peft_config=lora, callbacks=[Lengths()])
        _reset_peak(spec["device"])
        t = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t
        return {"status": "ok", "t_step": total / spec["steps"], "t_rollout": clock["rollout"] / spec["steps"],
                "t_update": (total - clock["rollout"]) / spec["steps"], "len": clock.get("len", float("nan")),
                "peak_gib": _peak_memory(spec["device"])}
    except Exception as e:          # noqa: BLE001
        return {"status": "oom" if _is_oom(e) else "error", "error": f"{type(e).__name__}: {str(e)[:500]}",
                "peak_gib": _peak_memory(spec["device"])}


KINDS = {"ours": run_ours, "options": run_rollout_options, "trl": run_trl}


def measure(spec: dict, isolate: bool) -> dict:
    if not isolate:
        return KINDS[spec["kind"]](spec)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], cwd=ROOT, capture_output=True,
                          text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"status": "error", "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}


# ---------------------------------------------------------------------------------------------- report

def versions() -> str:
    import torch
    import transformers

    out = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for name in ("peft", "accelerate", "bitsandbytes", "flash_attn", "trl"):
        try:
            out.append(f"{name} {__import__(name).__version__}")
        except Exception:           # noqa: BLE001 - absent or broken optional package
            pass
    return ", ".join(out)


def gib(x) -> str:
    return f"{x:.1f} GiB" if x is not None else "-"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(KINDS[spec["kind"]](spec)), flush=True)
        return {}
    import torch

    from minivr1 import data, models
    from minivr1.chat import prompt_batch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    isolate = args.isolate if args.isolate is not None else device == "cuda"
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="minivr1-bench-"))
    machine, peak_flops, bandwidth = device_specs(device, args)
    attns = args.attn.split(",") if args.attn else ["sdpa"] + (["flash_attention_2"] if device == "cuda" and
                                                               models.attn_implementation() == "flash_attention_2" else [])
    modes = [m for m in args.modes.split(",") if m]
    options = args.rollout_options.split(",") if args.rollout_options is not None else \
        (["dynamic", "static", "static_compiled", "minivr1_static", "minivr1_static_compiled"] if device == "cuda"
         else ["dynamic", "static"])
    options = [o for o in options if o]
    G, C = args.group_size, args.completion_length

    t0 = time.perf_counter()
    model_dir = build_checkpoint(args.size, work / f"model-{args.size}-{device}-{dtype}", device, args.seed, dtype)
    t_build = time.perf_counter() - t0
    data_file = write_problem(work / "data", args.image_size, args.seed)
    max_pixels = args.image_size * args.image_size
    processor = models.load_processor(model_dir, max_pixels)
    prompt = prompt_batch(processor, data.read_problems(data_file)[0][:1])
    P, patches = prompt["input_ids"].shape[1], int(prompt["image_grid_thw"].prod(-1).sum())
    image_tokens = int((prompt["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
    counts = model_counts(model_dir)

    header = [f"GRPO step, PTST stage 1 shape: 1 prompt x G={G}, up to {C} new tokens; Qwen2.5-VL {args.size} "
              f"architecture, random weights ({counts['total'] / 1e9:.2f}B params; built and saved in {t_build:.0f} s)",
              f"prompt {P} tokens ({image_tokens} image tokens from a {args.image_size}x{args.image_size} image); "
              f"{dtype} weights; micro-batch {args.micro_batch_size} completions; gradient checkpointing "
              f"{args.gradient_checkpointing}; beta {args.beta}",
              f"device: {machine}; {versions()}"]
    print("\n".join(header), file=sys.stderr, flush=True)
    base = dict(model=str(model_dir), data=str(data_file), work=str(work), device=device, dtype=dtype, G=G, C=C,
                micro=args.micro_batch_size, steps=args.steps, gc=args.gradient_checkpointing, lora_r=args.lora_r,
                lora_alpha=args.lora_alpha, beta=args.beta, optim_full=args.optim_full, max_pixels=max_pixels,
                chunk=args.logprob_chunk_size, seed=args.seed)
    results = {"machine": machine, "versions": versions(), "args": vars(args), "dtype": dtype, "P": P,
               "patches": patches, "image_tokens": image_tokens, "t_build": t_build, "counts": counts, "ours": [], "options": {}, "trl": []}

    # The tables are printed at the end (in-process runs print their own logs meanwhile); each row
    # also goes to stderr as soon as it is measured.
    step_table = ["| trainer | mode | attention | peak memory | rollout tok/s | % of bound | update tok/s | MFU | "
                  "t_rollout | t_update | completion len |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def emit(table, line):
        table.append(line)
        print(line, file=sys.stderr, flush=True)

    def row(trainer, mode, attn, r):
        if r["status"] != "ok":
            emit(step_table, f"| {trainer} | {mode} | {attn} | {gib(r.get('peak_gib'))} | {r['status'].upper()}: "
                             f"{r.get('error', '')[:120]} | | | | | | |")
            return
        n_gen = r["len"] * G
        tok_rollout = n_gen / r["t_rollout"]
        bound = rollout_bound(counts, G, P, r["len"], bandwidth) if bandwidth else None
        tok_update = G * (P + r["len"]) / r["t_update"]
        flops = update_flops(counts, mode, G, P, round(r["len"]), patches, args.beta)
        mfu = flops / (r["t_update"] * peak_flops) if peak_flops else None
        r.update(rollout_tok_s=tok_rollout, bound_tok_s=bound, update_tok_s=tok_update, update_flops=flops, mfu=mfu)
        emit(step_table, f"| {trainer} | {mode} | {attn} | {gib(r['peak_gib'])} | {tok_rollout:.0f} | "
                         f"{f'{100 * tok_rollout / bound:.0f}% of {bound:.0f}' if bound else '-'} | {tok_update:.0f} | "
                         f"{f'{100 * mfu:.1f}%' if mfu is not None else '-'} | {r['t_rollout']:.1f} s | "
                         f"{r['t_update']:.1f} s | {r['len']:.0f} |")

    for mode in modes:
        for attn in attns:
            r = {"mode": mode, "attn": attn, **measure({**base, "kind": "ours", "mode": mode, "attn": attn}, isolate)}
            results["ours"].append(r)
            row("minivr1", mode, attn, r)
    if args.trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            emit(step_table, "| TRL GRPOTrainer | lora | - | not installed (pip install -r bench/requirements.txt) | | | | | | | |")
        else:
            for attn in attns:
                r = {"mode": "lora", "attn": attn, **measure({**base, "kind": "trl", "mode": "lora", "attn": attn}, isolate)}
                results["trl"].append(r)
                row("TRL GRPOTrainer", "lora", attn, r)

    option_table = []
    if options:
        n = args.option_tokens or C
        option_table += [f"rollout options: HF generate on the LoRA-wrapped policy, G={G}, {n} new tokens, {attns[0]}", "",
                         "| cache | tok/s | % of bound | seconds | first call (incl. compile) | peak memory |",
                         "|---|---|---|---|---|---|"]
        r = measure({**base, "kind": "options", "mode": "lora", "attn": attns[0], "options": options,
                     "option_tokens": n}, isolate)
        results["options"] = r.get("options", {"error": r.get("error")})
        for name in options:
            o = results["options"].get(name, {"status": "error", "error": r.get("error", "")})
            if o["status"] != "ok":
                emit(option_table, f"| {name} | {o['status'].upper()}: {o.get('error', '')[:120]} | | | | |")
                continue
            tok = o["tokens"] / o["seconds"]
            bound = rollout_bound(counts, G, P, o["tokens"] / G, bandwidth) if bandwidth else None
            o.update(tok_s=tok, bound_tok_s=bound)
            emit(option_table, f"| {name} | {tok:.0f} | {f'{100 * tok / bound:.0f}% of {bound:.0f}' if bound else '-'} | "
                               f"{o['seconds']:.1f} s | {o['first_call_s']:.1f} s | {gib(o['peak_gib'])} |")
    print("\n" + "\n".join(header))
    print("\n" + "\n".join(step_table))
    if option_table:
        print("\n" + "\n".join(option_table))
    if device != "cuda":
        print("\n(on a CPU, 'peak memory' is the peak RSS of the measuring process, cumulative when not isolated)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
