"""GRPO with Progressive Thinking Suppression Training (PTST): Vision-R1 stage 3.

Each step, read top to bottom in `main`:
  1. take a batch of prompts (image + question);
  2. roll out G completions per prompt with the current policy;
  3. score them: HFRRF, 1 iff format and answer are right (--reward zero: format + result 1:1);
  4. group-normalised advantages A = (r - mean) / (std + eps), exactly 0 for zero-variance groups;
  5. old-policy and reference log-probs, without gradients;
  6. loss = -[min(rho A, clip(rho, 1-eps, 1+eps_high) A) - beta KL_k3(pi || pi_ref)] over
     completion tokens (minivr1/grpo.py);
  7. optimizer step(s) over micro-batches (num_iterations updates per rollout);
  8. log one line.
PTST (paper Sec. 3.2) is the list --stages "LENxG:STEPS,...": the completion limit grows and the
group size shrinks stage by stage (paper: 4096x16:100,8192x8:100). A completion cut off at its
stage's limit has no </answer>, so HFRRF gives it 0: early stages reward short, correct reasoning.

One GPU, LoRA on the SFT model (the reference is the SFT model: adapter disabled):
    python train_grpo.py --config configs/grpo_vision_r1.yaml --model runs/sft/final --data vision_r1_rl.parquet
Several GPUs, full fine-tuning:
    accelerate launch --config_file configs/accelerate/fsdp.yaml train_grpo.py --config configs/grpo_vision_r1.yaml --mode full
The toy task on a CPU:
    python train_grpo.py --config configs/toy_grpo_ptst.yaml

Resume: rerun the same command (continues from output_dir/checkpoints/latest); Ctrl-C saves.

Choices where the paper is silent or departs from it (README "Walkthrough" explains each):
1. Loss aggregation: per-sequence mean, then mean over sequences (the paper's equation);
   --loss_aggregation token_mean gives EasyR1's. Denominators count the whole batch (all
   micro-batches, all processes), so the gradient does not depend on how the batch is split.
2. Advantage std: population std of the group, eps 1e-6.
3. KL: k3 estimator in the loss (not the reward), log-ratio clamped to +-20.
4. Reference: with LoRA the adapter-disabled model (the SFT model, merged in at load); with full
   fine-tuning a second, frozen load of the starting model, sharded like the policy under FSDP2 /
   ZeRO-3 (training.prepare_reference). Kept across PTST stages (not reset).
5. One optimizer step per rollout by default (--num_iterations 1): the ratio is 1 and the clip
   inactive at the update, so the loss value is ~0 while its gradient is the policy gradient.
6. Each process rolls out and scores whole groups; only logging scalars cross processes.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from minivr1 import checkpoint, config, data, grader, models, training
from minivr1.chat import R1_ZERO_SYSTEM_PROMPT, prompt_batch, select_sequences
from minivr1.grpo import group_advantages, grpo_loss, zero_variance_fraction
from minivr1.policy import TokenLogprobs, scatter_logprobs
from minivr1.rollout import generate
from minivr1.stages import parse_stages, stage_at
from minivr1.tracking import Tracker, format_metrics, print0, progress_bar


@dataclass
class Args:
    model: str = field(default="runs/toy/sft/final", metadata={"help": "starting model: hub id, full checkpoint dir, or LoRA adapter dir (merged in first)"})
    data: str = field(default="runs/toy/data/rl_train.jsonl", metadata={"help": "RL problems: Vision-R1-rl / geometry3k parquet or JSONL, or MathVista-style"})
    image_root: str | None = field(default=None, metadata={"help": "directory image paths are relative to (default: the data file's directory)"})
    output_dir: str = field(default="runs/toy/grpo", metadata={"help": "run directory: checkpoints, metrics.jsonl, samples.jsonl, final/"})
    mode: str = field(default="lora", metadata={"help": "full fine-tuning, LoRA, or 4-bit QLoRA", "choices": ["full", "lora", "qlora"]})
    stages: str = field(default="4096x16:100,8192x8:100", metadata={"help": "PTST stages 'MAX_COMPLETION_LENxG:STEPS,...' (paper: 4096x16:100,8192x8:100); empty = one stage of max_completion_length x num_generations for max_steps"})
    max_completion_length: int = field(default=4096, metadata={"help": "completion token limit when --stages is empty"})
    num_generations: int = field(default=16, metadata={"help": "group size G (completions per prompt) when --stages is empty"})
    max_steps: int = field(default=100, metadata={"help": "steps when --stages is empty"})
    prompts_per_step: int = field(default=8, metadata={"help": "PROMPTS per rollout step, summed over processes (completions = this x G); must divide by the number of processes"})
    micro_batch_size: int = field(default=8, metadata={"help": "COMPLETIONS per forward/backward pass on each process"})
    num_iterations: int = field(default=1, metadata={"help": "policy updates per rollout (mu); >1 makes the ratio and clip active"})
    learning_rate: float = field(default=1e-6, metadata={"help": "constant learning rate after warmup (EasyR1 default 1e-6; the paper does not say)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    optim: str = field(default="adamw", metadata={"help": "optimizer", "choices": ["adamw", "adamw_8bit"]})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 = off)"})
    beta: float = field(default=0.01, metadata={"help": "KL coefficient (paper: 1e-2); 0 = no reference model"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range: rho in [1-epsilon, 1+epsilon_high] (paper: 0.2)"})
    epsilon_high: float | None = field(default=None, metadata={"help": "upper clip (DAPO's clip-higher); default = epsilon"})
    loss_aggregation: str = field(default="seq_mean", metadata={"help": "seq_mean (paper's equation) or token_mean (EasyR1/DAPO)", "choices": ["seq_mean", "token_mean"]})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; log-probs are computed at the same temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1.0 = off; anything else biases the ratio)"})
    reward: str = field(default="hfrrf", metadata={"help": "reward: hfrrf (1 iff format and answer right), zero (format + result 1:1), format, accuracy, or your own as 'module:function' taking (completion_text, gold_answer, **meta) -> float"})
    system_prompt: str = field(default="none", metadata={"help": "'none' (Vision-R1), 'r1_zero' (the Zero baseline's R1-Zero prompt), or a literal prompt"})
    dtype: str = field(default="auto", metadata={"help": "weight dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward to save memory"})
    freeze_vision: bool = field(default=True, metadata={"help": "keep the vision tower frozen"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha"})
    logprob_chunk_size: int = field(default=512, metadata={"help": "completion tokens per LM-head chunk: working memory ~4 x chunk x vocab x 4 bytes (1.3 GB at 512 with Qwen's vocabulary)"})
    max_pixels: int | None = field(default=None, metadata={"help": "cap on pixels per image for the processor (never truncate prompts: shrink images)"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N steps (and at every stage boundary); 0 = stage boundaries only"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints to keep"})
    resume: str | None = field(default="auto", metadata={"help": "'auto' resumes from output_dir's latest checkpoint if any; a path resumes from it; none starts fresh"})
    sample_every: int = field(default=10, metadata={"help": "write a few sample completions to samples.jsonl every N steps"})
    report_to: str = field(default="none", metadata={"help": "extra trackers: none, tensorboard, wandb; metrics.jsonl is always written"})
    seed: int = field(default=0, metadata={"help": "random seed (data order, sampling)"})
    skip_bad_records: bool = field(default=False, metadata={"help": "skip malformed records (counted and reported) instead of stopping"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code from the checkpoint"})


def main(args: Args) -> Path:
    stages = parse_stages(args.stages) if args.stages else \
        parse_stages(f"{args.max_completion_length}x{args.num_generations}:{args.max_steps}")
    total_steps = sum(s.steps for s in stages)
    accelerator = training.make_accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.prompts_per_step % world:
        raise ValueError(f"--prompts_per_step {args.prompts_per_step} must divide by the {world} processes: each owns whole groups")
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError("GRPO under FSDP needs FSDP2 (the rollout gathers FSDP2 shards): set fsdp_version: 2 in "
                         "the accelerate config (configs/accelerate/fsdp.yaml does)")
    # The same seed on every process while the model is built: a new LoRA's random init must be the same
    # everywhere (FSDP2 shards each process's own copy; only DDP and DeepSpeed broadcast rank 0's).
    torch.manual_seed(args.seed)
    reward_fn = grader.load_reward(args.reward)
    system_prompt = {"none": None, "r1_zero": R1_ZERO_SYSTEM_PROMPT}.get(args.system_prompt, args.system_prompt)
    out = Path(args.output_dir)

    # ---- data, model, reference, optimizer ----
    problems, report = data.read_problems(args.data, args.image_root, skip_bad=args.skip_bad_records)
    print0(report.summary())
    processor = models.load_processor(args.model, args.max_pixels, args.trust_remote_code)
    model = models.load_policy(args.model, args.mode, args.dtype, args.gradient_checkpointing, args.freeze_vision,
                               args.lora_r, args.lora_alpha, lora_dropout=0.0, trust_remote_code=args.trust_remote_code)
    training.disable_dropout(model)
    policy = TokenLogprobs(model, args.logprob_chunk_size)
    optimizer = training.build_optimizer(policy, args.learning_rate, args.weight_decay, args.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    policy, optimizer = accelerator.prepare(policy, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    gen_model = accelerator.unwrap_model(policy).model   # generate() runs outside DDP's forward
    ref = None
    if args.beta > 0 and args.mode == "full":        # LoRA: the reference is the adapter-disabled model
        # A second load of the starting model, frozen and placed like the policy (sharded under FSDP2 /
        # ZeRO-3). Not a copy of `model`: under sharded loading (FSDP's cpu_ram_efficient_loading,
        # ZeRO-3's zero3_init_flag) a process does not hold the whole model to copy.
        ref_model = models.load_policy(args.model, "full", args.dtype, trust_remote_code=args.trust_remote_code)
        ref = training.prepare_reference(accelerator, TokenLogprobs(ref_model, args.logprob_chunk_size))

    # Sampling draws from torch's global RNG: seed it per process, so ranks sample independently (rank 0
    # goes on from where the model build left the stream); a resume restores the saved RNG states.
    if rank:
        torch.manual_seed(args.seed + rank)
    step = training.resume_step(accelerator, out, args.resume)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config.save_args(args, out / "args.json")
    tracker = Tracker(out, args.report_to, dataclasses.asdict(args), accelerator.is_main_process)
    print0(f"GRPO: {len(problems)} problems, {args.prompts_per_step} prompts/step over {world} processes, "
           f"stages {' -> '.join(str(s) for s in stages)}, {total_steps} steps, reward {args.reward}, beta {args.beta}")

    # Rollouts: under FSDP2 the policy's parameters are gathered whole for the rollout
    # (training.whole_parameters); under ZeRO-3 generate() gathers them layer by layer at every forward,
    # so all processes must step in sync until the last one finishes (synced_gpus).
    synced_gpus = training.zero_stage(accelerator) == 3
    # A group's G sequences share their prompt: the rollout prefills it once per group, and the log-prob
    # forwards run it once per group and reuse its KV cache (rollout.generate, TokenLogprobs docstrings):
    # the same numbers for less compute. The rollout's sharing needs a process-local model (not ZeRO-3);
    # the log-prob forwards' sharing is kept to one process and DDP (under FSDP / DeepSpeed the prompt's
    # second use would run each shard unit's hooks twice per forward: untested) and is off with gradient
    # checkpointing (it drops the cache).
    share_prompts = not synced_gpus
    share_prompts_in_forward = not args.gradient_checkpointing and accelerator.distributed_type in (
        DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)

    def logprobs(module, b, idx, no_grad: bool):
        """Log-probs [s, C] of the completion tokens of sequences `idx` under `module`."""
        mb = select_sequences(b, idx, images_per_seq)
        shared = {}
        if share_prompts_in_forward:    # idx is a contiguous range: its sequences of one problem are consecutive
            groups = [len(list(g)) for _, g in itertools.groupby(idx, key=lambda s: s // G)]
            firsts = [idx[i] for i in itertools.accumulate([0] + groups[:-1])]
            mb.update({k: v for k, v in select_sequences(b, firsts, images_per_seq).items()
                       if k in ("pixel_values", "image_grid_thw")})      # each group's images once
            shared = {"prompt_len": P, "group_sizes": groups}
        with torch.no_grad() if no_grad else nullcontext():
            flat = module(mb["input_ids"], mb["attention_mask"], mb["score_mask"], mb.get("pixel_values"),
                          mb.get("image_grid_thw"), mb.get("mm_token_type_ids"), temperature=args.temperature,
                          **shared)
        return scatter_logprobs(flat, mb["completion_mask"])

    stop = training.StopRequested()
    bar = progress_bar(total=total_steps, initial=step, desc="grpo", disable=not accelerator.is_main_process)
    policy.train()
    while step < total_steps:
        stage_idx, stage = stage_at(stages, step)
        G, L = stage.group_size, stage.max_completion_length
        if step == stage.start and accelerator.is_main_process:
            bar.write(f"=== PTST stage {stage_idx + 1}/{len(stages)}: max completion length {L}, G = {G}, "
                      f"steps {stage.start + 1}-{stage.start + stage.steps} ===")

        # 1. this process's prompts (whole groups: the G copies of a prompt never leave it)
        idx = training.batch_indices(len(problems), args.prompts_per_step, step, args.seed, rank, world)
        batch_problems = [problems[i] for i in idx]

        # 2. rollout: G completions per prompt, sampled by the current policy
        t0 = time.time()
        prompts = prompt_batch(processor, batch_problems, system_prompt, repeat=G)
        gen_model.eval()
        with training.whole_parameters(accelerator, policy):
            ro = generate(gen_model, processor, prompts, L, args.temperature, args.top_p,
                          group_size=G if share_prompts else 1, synced_gpus=synced_gpus)
        policy.train()
        t_rollout = time.time() - t0

        # 3. rewards (pure functions of the text), 4. group-normalised advantages
        golds = [p for p in batch_problems for _ in range(G)]
        rewards = torch.tensor([reward_fn(t, p.answer, **p.grading_meta()) for t, p in zip(ro.texts, golds)])
        correct = torch.tensor([grader.accuracy_reward(t, p.answer, **p.grading_meta()) for t, p in zip(ro.texts, golds)])
        fmt = torch.tensor([grader.format_reward(t) for t in ro.texts])
        training.check_finite("reward", rewards, step + 1)
        adv = group_advantages(rewards, G)

        # the teacher-forced batch: prompt + completion, scoring only completion tokens
        S, P = ro.completion_ids.shape[0], ro.prompt_ids.shape[1]
        b = {"input_ids": torch.cat([ro.prompt_ids, ro.completion_ids], 1),
             "attention_mask": torch.cat([ro.prompt_mask, ro.completion_mask], 1),
             "score_mask": torch.cat([torch.zeros_like(ro.prompt_mask), ro.completion_mask], 1),
             "completion_mask": ro.completion_mask}
        if "pixel_values" in prompts:
            b["pixel_values"], b["image_grid_thw"] = prompts["pixel_values"], prompts["image_grid_thw"]
        if ro.prompt_types is not None:       # completions hold no image tokens
            b["mm_token_type_ids"] = torch.cat([ro.prompt_types, torch.zeros_like(ro.completion_ids)], 1)
        images_per_seq = [len(p.images) for p in golds]
        b = {k: v.to(accelerator.device) for k, v in b.items()}
        adv = adv.to(accelerator.device)
        micro = [list(range(i, min(i + args.micro_batch_size, S))) for i in range(0, S, args.micro_batch_size)]

        # 5. old-policy and reference log-probs, once per rollout, before any update
        t1 = time.time()
        old_logp = torch.cat([logprobs(policy, b, m, True) for m in micro]) if args.num_iterations > 1 else None
        ref_logp = None
        if args.beta > 0:
            if ref is not None:
                ref_logp = torch.cat([logprobs(ref, b, m, True) for m in micro])
            else:
                with accelerator.unwrap_model(policy).model.disable_adapter():
                    ref_logp = torch.cat([logprobs(policy, b, m, True) for m in micro])

        # 6-7. num_iterations optimizer steps, each over all micro-batches of the rollout.
        # Denominators are global (all micro-batches and processes): the gradient is that of the
        # whole batch however it is split. The backends average gradients over processes and
        # divide by the accumulation count: `global_loss_scale` undoes both.
        totals = accelerator.reduce(torch.tensor([float(S), float(ro.completion_mask.sum())], device=accelerator.device), "sum")
        stats_sum = {}
        for _ in range(args.num_iterations):
            training.start_accumulation(accelerator, len(micro))
            scale = training.global_loss_scale(accelerator)
            for m in micro:
                with accelerator.accumulate(policy):
                    logp = logprobs(policy, b, m, False)
                    loss, stats = grpo_loss(logp, old_logp[m] if old_logp is not None else logp.detach(),
                                            ref_logp[m] if ref_logp is not None else None, adv[m],
                                            b["completion_mask"][m], eps_low=args.epsilon, eps_high=args.epsilon_high,
                                            beta=args.beta, aggregation=args.loss_aggregation,
                                            total_seqs=totals[0], total_tokens=totals[1])
                    training.check_finite("loss", loss.detach(), step + 1)
                    accelerator.backward(loss * scale)
                    if accelerator.sync_gradients:
                        grad_norm = training.clip_gradients(accelerator, policy, args.max_grad_norm)
                        if grad_norm is not None:   # a finite loss can still have NaN grads
                            training.check_finite("grad_norm", grad_norm, step + 1)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
                stats_sum["loss"] = stats_sum.get("loss", 0.0) + float(loss.detach()) / args.num_iterations
        scheduler.step()
        step += 1
        t_update = time.time() - t1

        # 8. one log line; metrics are summed over processes (groups never split across them)
        lengths = ro.completion_mask.sum(1).float()
        local = torch.tensor([rewards.sum(), (rewards ** 2).sum(), correct.sum(), fmt.sum(), lengths.sum(),
                              lengths.max(), ro.truncated.float().sum(), zero_variance_fraction(rewards, G) * len(idx),
                              stats_sum["kl_sum"], stats_sum["clipped_tokens"], stats_sum["tokens"], S, len(idx),
                              stats_sum["loss"]], device=accelerator.device, dtype=torch.float64)
        tot = accelerator.reduce(local, "sum")
        max_len = accelerator.reduce(lengths.max().to(accelerator.device), "max")
        n = tot[11].item()
        metrics = {"stage": stage_idx + 1, "reward": tot[0].item() / n,
                   "reward_std": math.sqrt(max(0.0, tot[1].item() / n - (tot[0].item() / n) ** 2)),
                   "accuracy": tot[2].item() / n, "format": tot[3].item() / n, "len": tot[4].item() / n,
                   "len_max": max_len.item(), "truncated": tot[6].item() / n, "zero_var": tot[7].item() / tot[12].item(),
                   "kl": tot[8].item() / max(1.0, tot[10].item()), "clip": tot[9].item() / max(1.0, tot[10].item()),
                   "loss": tot[13].item(), "grad_norm": float("nan") if grad_norm is None else grad_norm, "lr": scheduler.get_last_lr()[0],
                   "t_rollout": t_rollout, "t_update": t_update,
                   "tok_per_s": tot[4].item() / max(1e-9, t_rollout + t_update) / world}
        tracker.log(metrics, step)
        bar.update(1)
        if not bar.disable:
            bar.write(format_metrics({"step": step, **metrics}, ["step", "stage", "reward", "accuracy", "format", "len",
                                                                 "truncated", "zero_var", "kl", "clip", "grad_norm"]))
        if args.sample_every and step % args.sample_every == 0:
            for t, p, r in list(zip(ro.texts, golds, rewards.tolist()))[:2]:
                tracker.log_text("sample", f"[{p.id} gold={p.answer} reward={r}]\n{t}", step)

        boundary = step == stage.start + stage.steps
        stop_now = accelerator.reduce(torch.tensor(int(stop.requested), device=accelerator.device), "max").item()
        if (args.save_steps and step % args.save_steps == 0) or boundary or stop_now:
            checkpoint.save_checkpoint(accelerator, out, step, {"step": step, "stage": stage_idx + 1}, policy, args.keep_last)
        if stop_now:
            print0(f"stopped at step {step}; rerun the same command to resume")
            break
    bar.close()
    stop.restore()
    tracker.close()

    finished = step >= total_steps              # else stopped early: the checkpoint is the result
    if finished:
        final = out / "final"
        training.save_final(accelerator, policy, processor, final, args.model)
    accelerator.wait_for_everyone()
    # Free the DDP model and optimizer before the process group goes: with gloo, tearing it down
    # with them alive aborts at exit in a fraction of runs (cpu-stack.md). free_memory() drops
    # accelerate's own references to them and runs gc.collect().
    del policy, optimizer, gen_model
    accelerator.free_memory()
    accelerator.end_training()
    return final if finished else out


if __name__ == "__main__":
    main(config.parse_args(Args, description=__doc__))
