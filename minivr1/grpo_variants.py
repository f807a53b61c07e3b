"""Options beside the paper's GRPO, as pure tensor functions: what EasyR1, verl and TRL offer, each OFF by default.

Vision-R1 uses none of these; minivr1/grpo.py is the paper's math and stays so. Each function here gives its equation,
its source and its tensor shapes, and has a hand-computed test (tests/test_grpo_variants.py). train_grpo.py picks them
once at set-up and calls them at the loop's existing seams (README "Options beside the paper" has the table of names):

    step 3, the reward      overlong_penalty     --overlong_buffer N                  DAPO's soft overlong punishment
    step 4, advantages      scaled_advantages    --scale_rewards batch | none         batch std (PPO-Lite); Dr.GRPO
    step 6, the loss mask   mask_truncated       --mask_truncated_completions         DAPO's overlong filtering
    step 6, denominators    loss_normalisers     --loss_aggregation dr_grpo           Dr.GRPO's constant normaliser
    step 6, the loss        gspo_loss            --importance_sampling_level sequence GSPO's sequence-level ratio
    step 2, the rollout     informative_groups   --dynamic_sampling                   DAPO (the engine: dynamic_sampling.py)

(Step 5's --micro_batch_tokens, micro-batches by token budget, is batching, not math: training.token_budget_micro_batches.)
Shapes as in grpo.py: S completions (B prompts x G, group-contiguous), T completion positions, 0/1 masks.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from minivr1.grpo import grpo_loss, masked_mean


# ----------------------------------------------------------------------------- step 2: which groups carry a signal

def informative_groups(rewards: Tensor, G: int) -> Tensor:
    """[B] bool: True for each group whose G rewards are NOT all equal (DAPO's dynamic sampling keeps only these).

    DAPO (arXiv 2503.14476, Sec. 3.2) trains under the constraint 0 < |{o_i : o_i is correct}| < G: a group all right or
    all wrong has A = 0 for every completion (grpo.group_advantages) and no policy gradient. With any reward, "not all
    equal" is the same test. rewards: [B*G], group-contiguous.
    """
    r = rewards.view(-1, G)
    return ~(r == r[:, :1]).all(dim=1)


# ----------------------------------------------------------------------------- step 3: the reward

def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, Sec. 3.4), added to the reward:

        R_length(o) = 0                                        if |o| <= L - buffer
                    = -factor * (|o| - (L - buffer)) / buffer  if L - buffer < |o| <= L

    a penalty growing linearly from 0 to -factor over the last `buffer` tokens before the limit L (the stage's max
    completion length; DAPO: L = 20480, buffer 4096, factor 1; verl's `overlong_buffer.penalty_factor`). A completion
    cut off at L gets -factor on top of its reward. lengths: [N] completion token counts (the end token included);
    returns [N] float32. buffer = 0: all zeros (off).
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    over = (lengths.float() - (max_len - buffer)) / buffer
    return -factor * over.clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- step 4: advantages

def scaled_advantages(rewards: Tensor, G: int, scale_rewards: str, eps: float = 1e-6,
                      global_sums: Callable[[dict], dict] = lambda sums: sums) -> Tensor:
    """Group-relative advantages with another scale than the paper's group std (TRL's `scale_rewards`):

        "batch":  A_i = (r_i - mean_g) / (std_batch + eps)   std over every reward of the step (all groups, all
                  processes), population std as in grpo.group_advantages (PPO-Lite, arXiv 2508.08221; TRL "batch")
        "none":   A_i = r_i - mean_g                         no division (Dr.GRPO, arXiv 2503.20783: the group
                  std weighs too-easy and too-hard prompts up, a question-level difficulty bias)

    rewards: [B*G] group-contiguous; returns [B*G] float. A group whose rewards are all equal gets A = 0 exactly, as in
    grpo.group_advantages. `global_sums` adds a dict of numbers over processes (distributed.global_sums); the default,
    one process, returns it unchanged. "group" is the paper's: grpo.group_advantages.
    """
    if scale_rewards not in ("batch", "none"):
        raise ValueError(f"scale_rewards must be 'batch' or 'none' here (the paper's 'group' is grpo.group_advantages), "
                         f"got {scale_rewards!r}")
    if rewards.numel() % G != 0:
        raise ValueError(f"{rewards.numel()} rewards is not a whole number of groups of G={G}")
    r = rewards.float().view(-1, G)                                # (B, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_rewards == "batch":
        t = global_sums({"n": r.numel(), "sum": float(r.sum()), "sum_sq": float((r * r).sum())})
        mean = t["sum"] / t["n"]
        centred = centred / (math.sqrt(max(0.0, t["sum_sq"] / t["n"] - mean * mean)) + eps)
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(r), centred).view(-1)


# ----------------------------------------------------------------------------- step 6: the loss

def mask_truncated(completion_mask: Tensor, truncated: Tensor) -> Tensor:
    """The loss mask without the completions cut off at the length limit (DAPO's "overlong filtering", Sec. 3.4;
    TRL's `mask_truncated_completions`): [N, C] completion_mask with the rows where `truncated` [N] is True zeroed.

    A truncated completion is not wrong, only unfinished; under HFRRF it scores 0 and, with A < 0, is pushed down like
    a wrong answer. Masked, it adds nothing to the loss or its token count; it still counts in its group's advantage
    statistics and, for seq_mean, in the number of sequences (as in TRL).
    """
    return completion_mask * (~truncated.bool()).unsqueeze(-1).to(completion_mask.dtype)


def loss_normalisers(aggregation: str, total_seqs: float, total_tokens: float, max_len: int) -> dict:
    """grpo_loss's aggregation and denominators for `aggregation` (the whole batch's counts: all micro-batches, all
    processes). "seq_mean" and "token_mean" are grpo_loss's own; "dr_grpo" is Dr.GRPO's constant normaliser
    (arXiv 2503.20783; TRL loss_type "dr_grpo"; verl loss_agg_mode "seq-mean-token-sum-norm"):

        loss = sum_{s,t} l_st / (total_seqs x L)

    every token weighs the same whatever its completion's length (seq_mean gives a short completion's tokens more
    weight) and however many tokens the batch holds (token_mean's denominator moves with the lengths). L is the
    stage's max completion length (TRL's max_completion_length), so it is grpo_loss's token_mean with
    total_tokens = total_seqs x L. Under PTST each stage has its own L: a token of stage 2 (8K) weighs half one of
    stage 1 (4K). Returns the keyword arguments for grpo_loss.
    """
    if aggregation == "dr_grpo":
        return {"aggregation": "token_mean", "total_seqs": total_seqs, "total_tokens": total_seqs * max_len}
    return {"aggregation": aggregation, "total_seqs": total_seqs, "total_tokens": total_tokens}


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """log s_i = 1/|o_i| sum_t (logp_it - old_logp_it): the length-normalised log-ratio of whole completions (GSPO's
    importance ratio in log space). logp, old_logp, mask: [S, T]; returns [S] (0 for a row with no tokens)."""
    return masked_mean(logp.float() - old_logp.float(), mask, dim=-1)


def gspo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor | None, adv: Tensor, mask: Tensor,
              **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (arXiv 2507.18071): the clipped objective with one importance ratio per completion instead of per token,

        s_i = (pi_theta(o_i | q) / pi_old(o_i | q)) ^ (1/|o_i|) = exp(1/|o_i| sum_t (logp_it - old_logp_it))
        J   = 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)

    with its own, much smaller clip range (the paper: eps_low 3e-4, eps_high 4e-4; configs/grpo_gspo.yaml). Computed
    as the paper's GSPO-token form: every token of o_i gets the ratio sg[s_i] * pi_theta(o_it) / sg[pi_theta(o_it)],
    whose value is s_i and whose gradient is s_i * grad log pi_theta(o_it); averaged over each completion's tokens
    (aggregation "seq_mean") that is exactly GSPO's loss and gradient. It is handed to grpo_loss as the old log-probs
    that make grpo_loss's per-token log-ratio equal log s_i:

        old'_it = sg[logp_it] - sg[log s_i]     so   logp_it - old'_it = log s_i  (value), gradient of logp_it

    Everything else is grpo_loss's, with the same arguments (kwargs): the KL term against ref_logp (per token, with
    the true logp), the aggregation, padding sanitised, and the stats (`ratio_sum` adds s_i once per token,
    `clipped_tokens` counts the tokens of clipped completions). Shapes as grpo_loss. With one update per rollout
    (old == logp) s_i = 1 and it equals grpo_loss exactly: GSPO differs only once the policy moves off the sampler.
    """
    log_s = sequence_log_ratio(logp.detach(), old_logp.detach(), mask)               # (S,)
    old_for_sequence = logp.detach() - log_s.unsqueeze(-1)                           # (S, T)
    return grpo_loss(logp, old_for_sequence, ref_logp, adv, mask, **kwargs)
