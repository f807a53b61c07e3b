"""Cold-start SFT: teach a vision-language model the <think>/<answer> format and R1-style reasoning.

Vision-R1 stage 2 (paper Sec. 3.1): supervised fine-tuning on the cold-start data built by
modality bridging (Vision-R1-cold, LLaMA-Factory sharegpt format; see README "Data formats"),
which turns Qwen2.5-VL-7B-Instruct into Vision-R1-CI. Loss on assistant tokens only.

One GPU, LoRA (or --mode qlora for 4-bit):
    python train_sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --data vision_r1_cold.json \\
        --image_root images/ --output_dir runs/sft --mode lora
Several GPUs, full fine-tuning (the paper's setting) with DeepSpeed ZeRO-3 or FSDP:
    accelerate launch --config_file configs/accelerate/zero3.yaml train_sft.py \\
        --config configs/sft_paper.yaml --data vision_r1_cold.json --image_root images/
The toy task on a CPU (what `scripts/toy_pipeline.sh` runs):
    python train_sft.py --config configs/toy_sft.yaml

Resume: rerun the same command; it continues from output_dir's newest usable checkpoint (or pass
--resume PATH). A rerun with settings that change what is trained stops and names them (RESUME_MAY_CHANGE
lists those that may change); --overwrite deletes the previous run and starts over. Ctrl-C saves a
checkpoint and exits. training_curves.png (loss, learning rate) is drawn when the run finishes.

Departures from the paper's released config:
1. The loss is the mean over all assistant tokens of the global batch (every micro-batch and
   process), so it does not depend on how the batch is split; LLaMA-Factory averages per
   micro-batch.
2. Logits are never materialised for the whole sequence: the LM head runs in chunks over the
   label positions only (minivr1/policy.py), which is what makes 16K-token samples fit.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minivr1 import checkpoint, cli, data, distributed, models, plots, rundir, threads, training
from minivr1.chat import SFTCollator
from minivr1.config import arg, required
from minivr1.data import DEFAULT_MAX_PIXELS
from minivr1.policy import TokenLogprobs
from minivr1.tracking import Tracker, format_metrics, print0, progress_bar


@dataclass
class Args:
    # ---- model and data
    model: str = required("starting model: hub id or local dir")
    data: str = required("cold-start SFT data (sharegpt JSON/JSONL)")
    image_root: str | None = arg(None, "folder image paths are relative to (default: the data file's folder)")
    output_dir: str = required("run folder: checkpoints, metrics.jsonl, final/; rerun with the same one to resume")
    mode: str = arg("full", "full fine-tuning, LoRA, or 4-bit QLoRA", choices=["full", "lora", "qlora"])
    dtype: str = arg("auto", "weight dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    freeze_vision: bool = arg(True, "keep the vision tower frozen (the paper's SFT)")
    lora_r: int = arg(64, "LoRA rank (lora/qlora)")
    lora_alpha: int = arg(128, "LoRA alpha (lora/qlora)")
    lora_dropout: float = arg(0.05, "LoRA dropout (lora/qlora)")
    max_length: int = arg(16384, "tokens per conversation; longer ones are cut from the right, never into the prompt (paper: 16384)")
    max_pixels: int | None = arg(None, "cap on pixels per image for the processor (bounds image tokens); default: the processor's")
    max_image_pixels: int = arg(DEFAULT_MAX_PIXELS, "reject images larger than this many pixels")
    skip_bad_records: bool = arg(False, "skip malformed records (counted and reported) instead of stopping")
    trust_remote_code: bool = arg(False, "allow custom model code from the checkpoint (off: only transformers' own classes)")
    # ---- optimisation (paper: lr 5e-6, 2 epochs, global batch 32, 5% warmup, cosine)
    learning_rate: float = arg(5e-6, "peak learning rate (paper: 5e-6, full fine-tuning)")
    num_train_epochs: float = arg(2.0, "passes over the data (paper: 2); ignored if max_steps > 0")
    max_steps: int = arg(0, "optimizer steps to run; 0 = derive from num_train_epochs")
    per_device_batch_size: int = arg(1, "conversations per micro-batch on each process")
    gradient_accumulation_steps: int = arg(8, "micro-batches per optimizer step; global batch = per_device_batch_size x processes x this (paper: 32)")
    warmup_ratio: float = arg(0.05, "fraction of steps with linear warmup before cosine decay (paper: 0.05)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    optim: str = arg("adamw", "optimizer", choices=["adamw", "adamw_8bit"])
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0 = off)")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")
    logprob_chunk_size: int = arg(512, "label tokens per LM-head chunk (working memory ~2 x chunk x vocab x 4 bytes: 0.54 GiB at 512 with Qwen's vocabulary)")
    # ---- the run
    save_steps: int = arg(200, "checkpoint every N optimizer steps, and at the end (0 = only at the end)")
    keep_last: int = arg(2, "checkpoints to keep")
    resume: str | None = arg("auto", "'auto': from output_dir's newest usable checkpoint if any; a path; or none")
    overwrite: bool = arg(False, "delete the run already in output_dir (checkpoints, final/, metrics) and start over")
    logging_steps: int = arg(10, "log metrics every N optimizer steps")
    report_to: str = arg("none", "extra trackers: none, tensorboard, wandb (comma-separated); metrics.jsonl is always written")
    seed: int = arg(0, "random seed (data order, LoRA init)")


# What a rerun may change and still continue the run in output_dir: none of these changes what is trained
# (the split of the global batch into micro-batches and accumulation does not change the gradient, which is
# that of the global batch: "global_batch", a derived value, must match). Any other difference stops the rerun.
RESUME_MAY_CHANGE = ("output_dir", "resume", "overwrite", "save_steps", "keep_last", "logging_steps", "report_to",
                     "per_device_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
                     "logprob_chunk_size", "trust_remote_code", "skip_bad_records", "max_image_pixels")


def main(args: Args) -> Path:
    threads.set_cpu_threads()                  # on a CPU: one thread unless OMP_NUM_THREADS says otherwise
    accelerator = distributed.make_accelerator(args.gradient_accumulation_steps)
    torch.manual_seed(args.seed)
    out = rundir.claim(args.output_dir, args.overwrite, accelerator.is_main_process)    # ours alone: a lock

    # ---- data
    convs, report = data.read_sft(args.data, args.image_root, skip_bad=args.skip_bad_records,
                                  max_image_pixels=args.max_image_pixels)
    print0(report.summary())
    world, rank = accelerator.num_processes, accelerator.process_index
    micro, accum = args.per_device_batch_size, args.gradient_accumulation_steps
    global_batch = micro * world * accum
    steps_per_epoch = len(convs) // global_batch
    total_steps = args.max_steps or math.ceil(args.num_train_epochs * steps_per_epoch)
    if steps_per_epoch <= 0 or total_steps <= 0:
        raise cli.UserError(f"{len(convs)} conversations make no full global batch of {global_batch} "
                            f"(= {micro} x {world} processes x {accum} accumulation): lower the batch size")
    args.max_steps, args.num_train_epochs = total_steps, total_steps / steps_per_epoch     # args.json: what runs
    rundir.check_settings(out, args, RESUME_MAY_CHANGE, {"global_batch": global_batch, "records": len(convs),
                          "data_bytes": Path(args.data).stat().st_size}, args.resume, accelerator.is_main_process)
    processor = models.load_processor(args.model, args.max_pixels, args.trust_remote_code)
    collate = SFTCollator(processor, args.max_length)

    # ---- model, optimizer, schedule
    model = models.load_policy(args.model, args.mode, args.dtype, args.gradient_checkpointing, args.freeze_vision,
                               args.lora_r, args.lora_alpha, args.lora_dropout,
                               trust_remote_code=args.trust_remote_code)
    policy = TokenLogprobs(model, args.logprob_chunk_size)
    optimizer = training.build_optimizer(policy, args.learning_rate, args.weight_decay, args.optim)
    scheduler = training.cosine_schedule(optimizer, total_steps, args.warmup_ratio)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    # Each micro-batch's loss is divided by the global label-token count; the backends average gradients
    # over processes and divide by `accum`: this factor undoes both, so the gradient is exactly that of
    # the global token mean.
    loss_scale = distributed.global_loss_scale(accelerator)

    step = training.resume_step(accelerator, out, args.resume)
    tracker = Tracker(out, args.report_to, dataclasses.asdict(args), accelerator.is_main_process)
    print0(f"SFT: {len(convs)} conversations, global batch {global_batch} = {micro} x {world} processes x {accum} "
           f"accumulation, {total_steps} steps ({steps_per_epoch} per epoch)")

    # ---- loop: one optimizer step = `accum` micro-batches on every process
    stop = training.StopRequested()
    bar = progress_bar(total=total_steps, initial=step, desc="sft", disable=not accelerator.is_main_process)
    policy.train()
    t0, tokens_seen = time.time(), 0
    while step < total_steps:
        idx = training.batch_indices(len(convs), global_batch, step, args.seed, rank, world)
        micro_batches = [collate([convs[i] for i in idx[k * micro:(k + 1) * micro]]) for k in range(accum)]
        # The loss is a mean over the label tokens of the whole global batch: count them first.
        n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
        n_global = distributed.global_sums(accelerator, {"tokens": n_local})["tokens"]
        loss_sum = 0.0
        for b in micro_batches:
            with accelerator.accumulate(policy):
                b = {k: v.to(accelerator.device) for k, v in b.items()}
                score = (b["labels"] != -100).long()
                score[:, 0] = 0
                logp = policy(b["input_ids"], b["attention_mask"], score, b.get("pixel_values"), b.get("image_grid_thw"),
                              b.get("mm_token_type_ids"))
                loss = -logp.sum() / n_global
                training.check_finite("loss", loss.detach(), step + 1, out)
                loss_sum += loss.item()
                accelerator.backward(loss * loss_scale)
                grad_norm = training.optimizer_step(accelerator, policy, optimizer, args.max_grad_norm, step + 1, out)
        scheduler.step()
        step += 1
        tokens_seen += n_global
        bar.update(1)

        if step % args.logging_steps == 0 or step == total_steps:
            loss_avg = distributed.global_sums(accelerator, {"loss": loss_sum})["loss"]
            metrics = {"loss": loss_avg, "lr": scheduler.get_last_lr()[0], "epoch": step / max(1, steps_per_epoch),
                       "grad_norm": float("nan") if grad_norm is None else grad_norm,
                       "label_tokens_per_s": tokens_seen / (time.time() - t0)}
            tracker.log(metrics, step)
            bar.set_postfix(loss=f"{loss_avg:.3f}")
            if not bar.disable:
                bar.write(format_metrics({"step": step, **metrics}))
        stop_now = distributed.any_process(accelerator, stop.requested)
        if (args.save_steps and step % args.save_steps == 0) or step == total_steps or stop_now:
            checkpoint.save_checkpoint(accelerator, out, step, {"step": step}, policy, args.keep_last)
        if stop_now:
            print0(f"stopped at step {step}; rerun the same command to resume")
            break
    bar.close()
    stop.restore()
    tracker.close()

    # ---- final save: an ordinary HF directory (full weights or the LoRA adapter); the same teardown either way
    finished = step >= total_steps
    if finished:
        training.save_final(accelerator, policy, processor, out / "final", args.model)
        if accelerator.is_main_process:
            plots.plot_run(out)
    del policy, optimizer
    distributed.shutdown(accelerator)
    return out / "final" if finished else out


if __name__ == "__main__":
    cli.run(main, Args, __doc__)
