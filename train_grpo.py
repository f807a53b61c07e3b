"""GRPO with Progressive Thinking Suppression Training (PTST): Vision-R1 stage 3.

Each step of the loop in `main`, numbered as in the code:
  1. take this process's prompts (image + question), whole groups;
  2. roll out G completions per prompt with the current policy;
  3. score them: HFRRF, 1 iff format and answer are right (--reward zero: format + result 1:1);
  4. group-normalised advantages A = (r - mean) / (std + eps), exactly 0 for zero-variance groups;
  5. old-policy and reference log-probs, without gradients;
  6. loss = -[min(rho A, clip(rho, 1-eps, 1+eps_high) A) - beta KL_k3(pi || pi_ref)] over
     completion tokens (minivr1/grpo.py), per micro-batch;
  7. optimizer step(s) (num_iterations updates per rollout);
  8. log one line; checkpoint.
PTST (paper Sec. 3.2) is the list --stages "LENxG:STEPS,...": the completion limit grows and the
group size shrinks stage by stage (paper: 4096x16:100,8192x8:100). A completion cut off at its
stage's limit has no </answer>, so HFRRF gives it 0: early stages reward short, correct reasoning.

One GPU, LoRA on the SFT model (the reference is the SFT model: adapter disabled):
    python train_grpo.py --config configs/grpo_lora_1gpu.yaml --model runs/sft/final --data vision_r1_rl.parquet
Several GPUs, full fine-tuning (the paper's setting):
    accelerate launch --config_file configs/accelerate/fsdp.yaml train_grpo.py --config configs/grpo_vision_r1.yaml \\
        --model runs/sft/final --data vision_r1_rl.parquet
The toy task on a CPU:
    python train_grpo.py --config configs/toy_grpo_ptst.yaml

Resume: rerun the same command (continues from output_dir's newest usable checkpoint); Ctrl-C saves. A rerun
with settings that change results stops and names them (RESUME_MAY_CHANGE lists those that may change; more
PTST steps after those already run continue the training); --overwrite deletes the run and starts over.
training_curves.png (reward, accuracy, length, truncation, KL; stage boundaries marked) is drawn at the end.

Choices where the paper is silent or departs from it (docs/walkthrough.md explains each):
1. Loss aggregation: per-sequence mean, then mean over sequences (the paper's equation);
   --loss_aggregation token_mean gives EasyR1's. Denominators count the whole batch (all
   micro-batches, all processes), so the gradient does not depend on how the batch is split.
2. Advantage std: population std of the group, eps 1e-6.
3. KL: k3 estimator in the loss (not the reward), log-ratio clamped to +-20.
4. Reference: with LoRA the adapter-disabled model (the SFT model, merged in at load); with full
   fine-tuning a second, frozen load of the starting model, placed like the policy
   (distributed.prepare_reference). Kept across PTST stages (not reset).
5. One optimizer step per rollout by default (--num_iterations 1): the ratio is 1 and the clip
   inactive at the update, so the loss value is ~0 while its gradient is the policy gradient.
   With more, the learning-rate schedule (--warmup_steps) counts optimizer steps.
6. Each process rolls out and scores whole groups; only logging scalars cross processes.

Options beside the paper, all off so that the defaults are the paper's (README "Options beside the paper";
minivr1/grpo_variants.py): --dynamic_sampling, --overlong_buffer, --mask_truncated_completions, --scale_rewards,
--loss_aggregation dr_grpo, --importance_sampling_level sequence, --micro_batch_tokens. They are chosen once before
the loop and called at its seams (the rollout engine, score, the advantage and loss functions, the micro-batching).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from minivr1 import checkpoint, cli, data, distributed, grader, models, plots, rundir, threads, training
from minivr1 import grpo_variants as variants
from minivr1.chat import R1_ZERO_SYSTEM_PROMPT
from minivr1.config import arg, required
from minivr1.dynamic_sampling import DynamicSampling
from minivr1.grpo import group_advantages, grpo_loss, zero_variance_fraction
from minivr1.policy import Reference, TokenLogprobs, completion_logprobs
from minivr1.rollout import make_engine
from minivr1.stages import resolve_stages, stage_at
from minivr1.tracking import Tracker, format_metrics, print0, progress_bar


@dataclass
class Args:
    # ---- model and data
    model: str = required("starting model: hub id, checkpoint dir, or LoRA adapter dir (merged in first)")
    data: str = required("RL problems: Vision-R1-rl / geometry3k parquet or JSONL, or MathVista-style")
    image_root: str | None = arg(None, "folder image paths are relative to (default: the data file's folder)")
    output_dir: str = required("run folder: checkpoints, metrics.jsonl, samples.jsonl, final/; rerun with the same "
                               "one to resume")
    mode: str = arg("lora", "full fine-tuning, LoRA, or 4-bit QLoRA", choices=["full", "lora", "qlora"])
    dtype: str = arg("auto", "weight dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    freeze_vision: bool = arg(True, "keep the vision tower frozen")
    lora_r: int = arg(64, "LoRA rank")
    lora_alpha: int = arg(128, "LoRA alpha")
    max_pixels: int | None = arg(None, "cap on pixels per image (never truncate prompts: shrink images)")
    system_prompt: str = arg("none", "'none' (Vision-R1), 'r1_zero' (the Zero baseline's prompt), or a literal prompt")
    skip_bad_records: bool = arg(False, "skip malformed records (counted and reported) instead of stopping")
    trust_remote_code: bool = arg(False, "allow custom model code from the checkpoint")
    # ---- PTST stages: --stages, or one stage with TRL's three names (not both)
    stages: str | None = arg(None, "PTST stages 'LENxG:STEPS,...' (default: the paper's 4096x16:100,8192x8:100)")
    max_completion_length: int | None = arg(None, "one stage: completion token limit (default 4096)")
    num_generations: int | None = arg(None, "one stage: group size G, completions per prompt (default 16)")
    max_steps: int | None = arg(None, "one stage: steps (default 100)")
    # ---- the GRPO objective (paper Eq. 1; TRL's names)
    beta: float = arg(0.01, "KL coefficient (paper: 1e-2); 0 = no reference model")
    epsilon: float = arg(0.2, "clip range: rho in [1-epsilon, 1+epsilon_high] (paper: 0.2)")
    epsilon_high: float | None = arg(None, "upper clip (DAPO's clip-higher); default: epsilon")
    loss_aggregation: str = arg("seq_mean", "seq_mean (the paper's), token_mean (EasyR1/DAPO), or dr_grpo (Dr.GRPO: "
                                            "token sum / (completions x max length)); TRL's loss_type grpo/dapo/dr_grpo",
                                choices=["seq_mean", "token_mean", "dr_grpo"])
    scale_rewards: str = arg("group", "advantage scale: group std (the paper's), batch std, or none (Dr.GRPO)",
                             choices=["group", "batch", "none"])
    importance_sampling_level: str = arg("token", "ratio per token (the paper's) or per sequence (GSPO: length-normalised "
                                                  "sequence ratio; set its clip range with --epsilon/--epsilon_high)",
                                         choices=["token", "sequence"])
    mask_truncated_completions: bool = arg(False, "leave completions cut off at the length limit out of the loss (DAPO)")
    overlong_buffer: int = arg(0, "DAPO's soft overlong punishment: a penalty growing linearly to -overlong_penalty_factor "
                                  "over the last N tokens before the stage's limit, added to the reward (0 = off)")
    overlong_penalty_factor: float = arg(1.0, "the overlong penalty at the limit (DAPO: 1.0)")
    dynamic_sampling: bool = arg(False, "DAPO: train only on groups whose rewards differ, sampling more prompts to fill "
                                        "the step (each process its own share)")
    max_extra_rollouts: int = arg(4, "dynamic sampling: at most this many extra rollouts of a batch of prompts per step; "
                                     "then the step is filled with dropped groups")
    reward: str = arg("hfrrf", "hfrrf, zero (format + result 1:1), format, accuracy, or 'module:function'")
    temperature: float = arg(1.0, "sampling temperature; log-probs are computed at the same temperature")
    top_p: float = arg(1.0, "nucleus sampling (1.0 = off; anything else biases the ratio)")
    # ---- batches and optimisation
    prompts_per_step: int = arg(8, "PROMPTS per step over all processes (completions = this x G)")
    micro_batch_size: int = arg(8, "COMPLETIONS per forward/backward pass on each process")
    micro_batch_tokens: int = arg(0, "if > 0: micro-batches by padded TOKENS (prompt + completion) per forward/backward "
                                     "pass instead of micro_batch_size, completions sorted by length")
    num_iterations: int = arg(1, "policy updates per rollout (mu); >1 makes the ratio and clip active")
    learning_rate: float = arg(1e-6, "constant learning rate after warmup (EasyR1's default; the paper does not say)")
    warmup_steps: int = arg(0, "linear warmup, in optimizer steps (num_iterations per rollout step)")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    optim: str = arg("adamw", "optimizer", choices=["adamw", "adamw_8bit"])
    max_grad_norm: float = arg(1.0, "gradient clipping norm (0 = off)")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward to save memory")
    logprob_chunk_size: int = arg(512, "tokens per LM-head chunk (working memory ~2 x chunk x vocab x 4 bytes: 0.54 GiB at 512 with Qwen's vocabulary)")
    rollout: str = arg("static", "rollout engine, all with the same samples: hf (model.generate), shared_prefix (each "
                                 "prompt prefilled once), static (that + a static-cache decode loop), static_compiled "
                                 "(that, torch.compile'd; CUDA graphs on a GPU, untested)",
                       choices=["hf", "shared_prefix", "static", "static_compiled"])
    # ---- the run
    save_steps: int = arg(50, "checkpoint every N steps, and at every stage boundary (0: boundaries only)")
    keep_last: int = arg(2, "checkpoints to keep")
    resume: str | None = arg("auto", "'auto': from output_dir's newest usable checkpoint if any; a path; or none")
    overwrite: bool = arg(False, "delete the run already in output_dir (checkpoints, final/, metrics) and start over")
    sample_every: int = arg(10, "write a few sample completions to samples.jsonl every N steps")
    report_to: str = arg("none", "extra trackers: none, tensorboard, wandb; metrics.jsonl is always written")
    seed: int = arg(0, "random seed (data order, sampling)")


# What a rerun may change and still continue the run in output_dir: none of these changes what is computed
# (micro-batching does not change the gradient; both rollout engines give the same samples). The stages (and
# TRL's three single-stage flags) may change after the steps already run: the derived "ptst_stages" is checked
# step by step (rundir). Any other difference stops the rerun.
RESUME_MAY_CHANGE = ("output_dir", "resume", "overwrite", "save_steps", "keep_last", "sample_every", "report_to",
                     "micro_batch_size", "rollout", "gradient_checkpointing", "logprob_chunk_size", "trust_remote_code",
                     "skip_bad_records", "stages", "max_completion_length", "num_generations", "max_steps")


def main(args: Args) -> Path:
    threads.set_cpu_threads()                  # on a CPU: one thread unless OMP_NUM_THREADS says otherwise
    stages = resolve_stages(args.stages, args.max_completion_length, args.num_generations, args.max_steps)
    total_steps = sum(s.steps for s in stages)
    accelerator = distributed.make_accelerator()
    distributed.check_backend(accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.prompts_per_step % world:
        raise cli.UserError(f"--prompts_per_step {args.prompts_per_step} must divide by the {world} processes: "
                            "each owns whole groups")
    if args.overlong_buffer >= min(s.max_completion_length for s in stages):
        raise cli.UserError(f"--overlong_buffer {args.overlong_buffer} must be shorter than every stage's completion "
                            f"limit ({', '.join(str(s) for s in stages)})")
    # The same seed on every process while the model is built: a new LoRA's random init must be the same
    # everywhere (FSDP2 shards each process's own copy; only DDP and DeepSpeed broadcast rank 0's).
    torch.manual_seed(args.seed)
    reward_fn = grader.load_reward(args.reward)
    system_prompt = {"none": None, "r1_zero": R1_ZERO_SYSTEM_PROMPT}.get(args.system_prompt, args.system_prompt)
    out = rundir.claim(args.output_dir, args.overwrite, accelerator.is_main_process)    # ours alone: a lock

    # ---- data, policy, reference, optimizer, rollout engine
    problems, report = data.read_problems(args.data, args.image_root, skip_bad=args.skip_bad_records)
    print0(report.summary())
    rundir.check_settings(out, args, RESUME_MAY_CHANGE, {"ptst_stages": ",".join(map(str, stages)), "records":
                          len(problems), "data_bytes": Path(args.data).stat().st_size}, args.resume,
                          accelerator.is_main_process)
    processor = models.load_processor(args.model, args.max_pixels, args.trust_remote_code)
    model = models.load_policy(args.model, args.mode, args.dtype, args.gradient_checkpointing, args.freeze_vision,
                               args.lora_r, args.lora_alpha, lora_dropout=0.0, trust_remote_code=args.trust_remote_code)
    training.disable_dropout(model)
    share_prompt = args.rollout != "hf" and distributed.share_prompt_forward(accelerator, args.gradient_checkpointing)
    policy = TokenLogprobs(model, args.logprob_chunk_size, share_prompt, trim_padding=args.micro_batch_tokens > 0)
    optimizer = training.build_optimizer(policy, args.learning_rate, args.weight_decay, args.optim)
    scheduler = training.warmup_schedule(optimizer, args.warmup_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    frozen = None
    if args.beta > 0 and args.mode == "full":    # LoRA: the reference is the policy with its adapter disabled
        # A second load of the starting model, not a copy of `model`: under sharded loading a process
        # does not hold the whole model to copy.
        frozen = distributed.prepare_reference(accelerator, TokenLogprobs(
            models.load_policy(args.model, "full", args.dtype, trust_remote_code=args.trust_remote_code),
            args.logprob_chunk_size, share_prompt, trim_padding=args.micro_batch_tokens > 0))
    reference = Reference(policy, frozen, adapter_model=accelerator.unwrap_model(policy).model)
    engine = make_engine(args.rollout, accelerator.unwrap_model(policy).model, processor, args.temperature, args.top_p,
                         system_prompt, synced_gpus=distributed.generation_synced(accelerator))

    # Options beside the paper's defaults, each off unless asked for (README "Options beside the paper";
    # minivr1/grpo_variants.py): chosen once here, called by the loop at its seams.
    overlong = partial(variants.overlong_penalty, buffer=args.overlong_buffer, factor=args.overlong_penalty_factor)
    advantages = group_advantages if args.scale_rewards == "group" else partial(
        variants.scaled_advantages, scale_rewards=args.scale_rewards, global_sums=partial(distributed.global_sums, accelerator))
    loss_fn = grpo_loss if args.importance_sampling_level == "token" else variants.gspo_loss
    loss_mask = variants.mask_truncated if args.mask_truncated_completions else lambda mask, truncated: mask
    micro_batches = partial(token_budget_micro_batches, accelerator, budget=args.micro_batch_tokens) \
        if args.micro_batch_tokens else lambda ro: training.micro_batches(len(ro.texts), args.micro_batch_size)
    if args.dynamic_sampling:
        engine = DynamicSampling(engine, lambda r, probs, g, length: score(reward_fn, r, probs, g, length, overlong)["reward"],
                                 problems, args.max_extra_rollouts, processor.tokenizer.pad_token_id,
                                 partial(distributed.any_process, accelerator), args.seed)

    # Sampling draws from torch's global RNG: seed it per process, so ranks sample independently (rank 0
    # goes on from where the model build left the stream); a resume restores the saved RNG states.
    if rank:
        torch.manual_seed(args.seed + rank)
    step = training.resume_step(accelerator, out, args.resume)
    tracker = Tracker(out, args.report_to, dataclasses.asdict(args), accelerator.is_main_process)
    print0(f"GRPO: {len(problems)} problems, {args.prompts_per_step} prompts/step over {world} processes, stages "
           f"{' -> '.join(str(s) for s in stages)}, {total_steps} steps, reward {args.reward}, beta {args.beta}, "
           f"rollout {engine.name}")

    stop = training.StopRequested()
    bar = progress_bar(total=total_steps, initial=step, desc="grpo", disable=not accelerator.is_main_process)
    policy.train()
    while step < total_steps:
        stage_idx, stage = stage_at(stages, step)
        G, L = stage.group_size, stage.max_completion_length
        if step == stage.start and accelerator.is_main_process:
            bar.write(f"=== PTST stage {stage_idx + 1}/{len(stages)}: max completion length {L}, G = {G}, "
                      f"steps {stage.start + 1}-{stage.start + stage.steps} ===")
        t0 = time.time()

        # 1. this process's prompts: whole groups (the G completions of a prompt never leave it)
        batch = [problems[i] for i in training.batch_indices(len(problems), args.prompts_per_step, step, args.seed,
                                                             rank, world)]
        # 2. rollout: G completions per prompt, sampled by the current policy
        with distributed.whole_parameters(accelerator, policy):
            ro = engine.generate(batch, G, L)
        batch = ro.problems or batch            # --dynamic_sampling: other prompts' groups replace uninformative ones
        t_rollout = time.time() - t0

        # 3. rewards: pure functions of each completion's text (+ --overlong_buffer's length penalty, 0 by default);
        # 4. group-normalised advantages
        scores = score(reward_fn, ro, batch, G, L, overlong, step + 1)
        training.check_finite("reward", scores["reward"], step + 1, out)
        adv = advantages(scores["reward"], G).to(accelerator.device)

        # 5. old-policy and reference log-probs, once per rollout, before any update (per micro-batch)
        S, micro, mask = len(ro.texts), micro_batches(ro), loss_mask(ro.completion_mask, ro.truncated)
        old_logp = [completion_logprobs(policy, ro, rows, temperature=args.temperature, grad=False)
                    for rows in micro] if args.num_iterations > 1 else None
        ref_logp = [reference.logprobs(ro, rows, temperature=args.temperature) for rows in micro] if args.beta > 0 else None

        # 6-7. the loss over micro-batches, num_iterations optimizer steps. Its denominators count the whole
        # batch (every micro-batch, every process), so the gradient does not depend on how it is split.
        total = variants.loss_normalisers(args.loss_aggregation, max_len=L, **distributed.global_sums(
            accelerator, {"total_seqs": S, "total_tokens": mask.sum()}))
        sums = {"loss": 0.0, "grad_norm": 0.0, "updates": 0}
        for _ in range(args.num_iterations):
            distributed.start_accumulation(accelerator, len(micro))
            loss_scale = distributed.global_loss_scale(accelerator)
            for i, rows in enumerate(micro):
                with accelerator.accumulate(policy):
                    logp = completion_logprobs(policy, ro, rows, temperature=args.temperature, grad=True)
                    loss, stats = loss_fn(logp, old_logp[i] if old_logp is not None else logp.detach(),
                                          ref_logp[i] if ref_logp is not None else None, adv[rows], mask[rows],
                                          eps_low=args.epsilon, eps_high=args.epsilon_high, beta=args.beta, **total)
                    training.check_finite("loss", loss.detach(), step + 1, out)
                    accelerator.backward(loss * loss_scale)
                    grad_norm = training.optimizer_step(accelerator, policy, optimizer, args.max_grad_norm, step + 1, out)
                for k, v in {"loss": loss.item() / args.num_iterations, **stats}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            scheduler.step()                     # the schedule counts optimizer steps
            sums["grad_norm"] += math.nan if grad_norm is None else grad_norm
            sums["updates"] += 1
        step += 1
        t_update = time.time() - t0 - t_rollout

        # 8. one log line: sums over processes, then divided (groups never split across processes)
        lengths = ro.completion_mask.sum(1).float()
        sums.update(completions=S, groups=len(batch), reward=scores["reward"].sum(), reward_sq=(scores["reward"] ** 2).sum(),
                    correct=scores["correct"].sum(), format=scores["format"].sum(), completion_tokens=lengths.sum(),
                    truncated=ro.truncated.sum(), zero_var_groups=zero_variance_fraction(scores["reward"], G) * len(batch),
                    **ro.sampling)
        t = distributed.global_sums(accelerator, sums, maxima={"len_max": lengths.max()})
        metrics = {"stage": stage_idx + 1, **step_metrics(t), "lr": scheduler.get_last_lr()[0],
                   "t_rollout": t_rollout, "t_update": t_update,
                   "tok_per_s": t["completion_tokens"] / max(1e-9, t_rollout + t_update) / world}
        tracker.log(metrics, step)
        bar.update(1)
        if not bar.disable:
            bar.write(format_metrics({"step": step, **metrics}, ["step", "stage", "reward", "accuracy", "format", "len",
                                                                 "truncated", "zero_var", "kl", "clip", "grad_norm"]))
        if args.sample_every and step % args.sample_every == 0:
            for text, p, r in list(zip(ro.texts, [p for p in batch for _ in range(G)], scores["reward"].tolist()))[:2]:
                tracker.log_text("sample", f"[{p.id} gold={p.answer} reward={r}]\n{text}", step)
        stop_now = distributed.any_process(accelerator, stop.requested)
        if (args.save_steps and step % args.save_steps == 0) or step == stage.start + stage.steps or stop_now:
            checkpoint.save_checkpoint(accelerator, out, step, {"step": step, "stage": stage_idx + 1}, policy, args.keep_last)
        if stop_now:
            print0(f"stopped at step {step}; rerun the same command to resume")
            break
    bar.close()
    stop.restore()
    tracker.close()

    finished = step >= total_steps              # else stopped early: the checkpoint is the result
    if finished:
        training.save_final(accelerator, policy, processor, out / "final", args.model)
        if accelerator.is_main_process:
            plots.plot_run(out)
    del policy, optimizer, engine, reference
    distributed.shutdown(accelerator)
    return out / "final" if finished else out


def score(reward_fn, ro, problems: list, G: int, L: int, overlong, step: int = 0) -> dict[str, torch.Tensor]:
    """Each completion's reward, and (for the log) whether its answer is right and its format exact: [N] tensors;
    completion i answers problems[i // G]. The reward adds overlong(lengths, L), the --overlong_buffer penalty
    (grpo_variants.overlong_penalty: zeros when off). A reward that raises or returns no number is the user's to
    fix: grader.call_reward names the step, the reward and the value."""
    texts, golds = ro.texts, [p for p in problems for _ in range(G)]
    return {"reward": torch.tensor([grader.call_reward(reward_fn, t, p, step) for t, p in zip(texts, golds)])
            + overlong(ro.completion_mask.sum(1), L),
            "correct": torch.tensor([grader.accuracy_reward(t, p.answer, **p.grading_meta()) for t, p in zip(texts, golds)]),
            "format": torch.tensor([grader.format_reward(t) for t in texts])}


def token_budget_micro_batches(accelerator, ro, budget: int) -> list[list[int]]:
    """--micro_batch_tokens: the rollout's micro-batches by padded token count (training.token_budget_micro_batches),
    as many on every process as on the one that needs most (DDP needs the same number of backward passes)."""
    lengths = ro.prompt_mask.sum(1).tolist(), ro.completion_mask.sum(1).tolist()
    count = distributed.global_sums(accelerator, {}, maxima={"count": len(training.token_budget_micro_batches(
        *lengths, budget))})["count"]
    return training.token_budget_micro_batches(*lengths, budget, count=int(count))


def step_metrics(t: dict) -> dict:
    """The logged metrics from the step's sums over processes (README "Metrics" says what each means)."""
    n, tokens = t["completions"], max(1.0, t["tokens"])
    mean_reward = t["reward"] / n
    return {"reward": mean_reward, "reward_std": math.sqrt(max(0.0, t["reward_sq"] / n - mean_reward ** 2)),
            "accuracy": t["correct"] / n, "format": t["format"] / n, "len": t["completion_tokens"] / n,
            "completion_tokens": t["completion_tokens"],      # generated this step, all processes (compute spent)
            "len_max": t["len_max"], "truncated": t["truncated"] / n, "zero_var": t["zero_var_groups"] / t["groups"],
            "kl": t["kl_sum"] / tokens, "clip": t["clipped_tokens"] / tokens, "ratio": t["ratio_sum"] / tokens,
            "approx_kl": t["approx_kl_sum"] / tokens, "loss": t["loss"],
            "grad_norm": t["grad_norm"] / t["updates"],      # each process adds the same norm: the mean of the updates
            **{k: t[k] for k in ("sampled_groups", "dropped_groups") if k in t}}     # --dynamic_sampling


if __name__ == "__main__":
    cli.run(main, Args, __doc__)
