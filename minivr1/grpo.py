"""The GRPO math as pure tensor functions: advantages, token logprobs, KL, masked means, the loss.

Paper: Vision-R1 (arXiv 2503.06749) Eq. 1-2, which is DeepSeekMath's GRPO. For a prompt q,
sample G completions o_1..o_G from pi_old, score them (rewards r_i), and maximise

    J = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i)
                                  - beta * D_KL(pi_theta || pi_ref)_it ]
    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
    A_i    = (r_i - mean(r)) / std(r)            (the same A_i for every token of o_i)

with eps = 0.2 and beta = 0.01. We minimise loss = -J. Everything here works in log space
(logp = log pi_theta, old_logp = log pi_old, ref_logp = log pi_ref) on [S, T] tensors:
S completions (S = B prompts x G), T completion positions, a 0/1 mask for real tokens.

Choices, each made on purpose:
1. Advantage std is the *population* std of the group (divide by G), not Bessel's (G-1).
   The G samples are the whole group we normalise, and [1,0,0,1] then gives A = +-1 exactly.
   verl/EasyR1 use torch.std (Bessel), which makes |A| smaller by sqrt((G-1)/G): 13% at G=4,
   3% at G=16, i.e. only a learning-rate rescaling. `unbiased=True` reproduces theirs.
2. Advantage eps = 1e-6 (as verl/EasyR1; TRL uses 1e-4). It only guards a *tiny* nonzero
   std. A zero std (all G rewards equal: no learning signal) gives A = 0 exactly via
   torch.where, never 0/eps noise or NaN (docs/pitfalls.md #1).
3. Log-ratios are clamped to +-20 before exp(), both in the k3 KL and in rho = pi/pi_old (as
   EasyR1), so exp() cannot overflow to inf when the policy drifts far on some token; beyond
   the clamp the gradient is 0 (exp(20) ~ 5e8 is far outside any clip range anyway).
4. Default aggregation is "seq_mean", the paper's equation: average each completion's
   per-token losses over its own tokens, then average over completions. EasyR1 (what the
   authors trained with) uses "token_mean" (DAPO): one average over all tokens of the batch,
   so long completions weigh more. Both are here; the trainer's argument picks one.
5. Masked (padding) positions contribute exactly 0 to loss and gradient: inputs are
   sanitised with torch.where (not x * mask, since NaN * 0 = NaN) before any arithmetic.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: far outside any clip range, far from fp32 overflow


# ----------------------------------------------------------------------------- advantages

def group_advantages(rewards: Tensor, G: int, eps: float = 1e-6, unbiased: bool = False) -> Tensor:
    """Group-relative advantages (Vision-R1 Eq. 2, DeepSeekMath): A_i = (r_i - mean_g) / (std_g + eps).

    rewards: [B*G], group-contiguous (rows i*G .. i*G+G-1 are prompt i's G completions).
    Returns [B*G] float. A group whose rewards are all equal gets A = 0 exactly.
    unbiased=False: population std (1/G); True: Bessel's 1/(G-1), as torch.std / verl / EasyR1.
    """
    if rewards.numel() % G != 0:
        raise ValueError(f"{rewards.numel()} rewards is not a whole number of groups of G={G}")
    r = rewards.float().view(-1, G)                                # (B, G)
    mean = r.mean(dim=1, keepdim=True)
    # (G == 1: Bessel is undefined; such a group is "all equal" below and gets A = 0 anyway.)
    std = r.std(dim=1, keepdim=True, correction=1 if unbiased and G > 1 else 0)
    # Test equality directly rather than std == 0: float error can make the std of equal
    # values come out as 1e-9, which would turn into a huge or noisy advantage.
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)                # (B, 1)
    adv = torch.where(flat, torch.zeros_like(r), (r - mean) / (std + eps))
    return adv.view(-1)


def zero_variance_fraction(rewards: Tensor, G: int) -> float:
    """Fraction of groups whose G rewards are all equal (A = 0: no learning signal; docs/pitfalls.md #1).

    rewards: [B*G] group-contiguous. Returns a python float in [0, 1].
    """
    r = rewards.view(-1, G)
    return (r == r[:, :1]).all(dim=1).float().mean().item()


# ----------------------------------------------------------------------------- masking

def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum of x where mask is true; x and mask broadcastable (e.g. both [S, T]).

    torch.where, not x * mask: a NaN or inf in a masked slot would survive a multiplication.
    """
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """mean of x over the positions where mask is true; an all-masked row gives 0, not NaN."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


# ----------------------------------------------------------------------------- KL

def kl_k3(logp: Tensor, ref_logp: Tensor, clamp: float = LOG_RATIO_CLAMP) -> Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref) (Schulman, "Approximating KL divergence").

    With x = ref_logp - logp = log(pi_ref / pi_theta), clamped to [-clamp, clamp]:
        k3 = exp(x) - x - 1   >= 0, unbiased for the KL under samples from pi_theta.
    Shapes: any, elementwise (typically [S, T]). Computed as expm1(x) - x, which is the same
    formula but stays >= 0 in floating point for tiny x (exp(x) - 1 would lose the x^2 term).
    """
    x = (ref_logp - logp).clamp(-clamp, clamp)
    return torch.expm1(x) - x


# ----------------------------------------------------------------------------- token logprobs

def selective_log_softmax(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target], the plain reference version (materialises fp32 logits).

    logits: [..., V]; targets: [...] token ids. Returns [...] fp32. For tests and benchmarks;
    training uses token_logprobs, which never holds all of [N, V] at once.
    """
    logp_all = F.log_softmax(logits.float(), dim=-1)
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class _LogSoftmaxAt(torch.autograd.Function):
    """logp_i = log softmax(logits_i / T)[target_i] for one chunk of rows, with a one-buffer backward.

    Forward:   logp_i = z_i,y_i - lse_i,   z = logits / T (fp32),  lse_i = log sum_j exp(z_ij)
    Backward:  d logp_i / d logits_ij = (1[j = y_i] - softmax(z_i)_j) / T
    so grad_logits = (onehot - softmax) * grad_logp / T, built in ONE [chunk, V] fp32 buffer in place
    (autograd's log_softmax + gather + division would hold ~4 such tensors at once).
    logits: [chunk, V] in the LM head's dtype; targets: [chunk]; returns [chunk] fp32.
    Saves only the logits (the caller's tensor, no copy) and lse [chunk].
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
        z = logits.to(torch.float32, copy=True).div_(temperature)                  # (chunk, V), the buffer
        z_target = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)                 # (chunk,)
        z_max = z.amax(dim=-1, keepdim=True)                                       # logsumexp in place:
        lse = z.sub_(z_max).exp_().sum(dim=-1).log_() + z_max.squeeze(-1)         # no second buffer
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        return z_target - lse

    @staticmethod
    def backward(ctx, grad_logp: Tensor):
        logits, targets, lse = ctx.saved_tensors
        T, dtype = ctx.temperature, logits.dtype
        g = logits.to(torch.float32, copy=True)                                    # (chunk, V), the buffer
        del logits                      # under the checkpoint this frees the recomputed logits early
        g.div_(T).sub_(lse.unsqueeze(-1)).exp_()                                   # softmax(z)
        scale = (grad_logp / T).unsqueeze(-1)                                      # (chunk, 1)
        g.mul_(-scale).scatter_add_(-1, targets.unsqueeze(-1), scale)              # (onehot - softmax) * grad / T
        return g.to(dtype), None, None


def token_logprobs(
    hidden: Tensor,
    lm_head: Callable[[Tensor], Tensor],
    targets: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> Tensor:
    """log pi(target | context) = log softmax(lm_head(hidden) / temperature)[target], in chunks.

    hidden: [N, H] (or [..., H]) the final hidden states at the positions that predict the
    targets (position t predicts token t+1: the caller does the shift); targets: [N] (or [...])
    token ids. Returns [N] (or [...]) fp32.

    temperature must be the sampling temperature (docs/pitfalls.md #6): the loss must score the
    completions under the same distribution they were drawn from.

    Memory (docs/pitfalls.md #9): full logits are N x V floats (V = 152K for Qwen), so we compute
    chunk_size rows at a time, upcast only that chunk to fp32, and keep just the [chunk] result.
    Under autograd each chunk runs inside a non-reentrant checkpoint, so its logits are
    recomputed in backward instead of saved, and the log-softmax has the hand-written backward
    of `_LogSoftmaxAt` (one fp32 buffer): peak ~1.5-2 chunks of [chunk, V] fp32 logits, measured
    in bench/bench_logprob_memory.py. The LM head itself is called as a module and autograd
    backpropagates through it (grad_hidden = g @ W, grad_W = g^T @ h, grad_bias = sum of g):
    whatever the head is (a Linear with or without bias, tied to the embeddings, wrapped by peft,
    sharded by FSDP / DeepSpeed, whose hooks fire on the call), its trainable parameters get
    their gradient and frozen ones get none.
    """
    lead_shape = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])                  # (N, H)
    targets = targets.reshape(-1)                                  # (N,)

    def chunk_logp(h: Tensor, tgt: Tensor) -> Tensor:
        return _LogSoftmaxAt.apply(lm_head(h), tgt, temperature)   # (chunk,) fp32

    use_ckpt = torch.is_grad_enabled()  # in no_grad (rollout, reference) nothing is saved anyway
    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, tgt = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if use_ckpt:
            out.append(checkpoint(chunk_logp, h, tgt, use_reentrant=False))
        else:
            out.append(chunk_logp(h, tgt))
    logp = torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
    return logp.view(lead_shape)


# ----------------------------------------------------------------------------- the loss

def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    adv: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    beta: float = 0.01,
    aggregation: str = "seq_mean",
    total_seqs: int | float | Tensor | None = None,
    total_tokens: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO loss with a k3 KL penalty, Vision-R1 Eq. 1 (DeepSeekMath), negated.

    Shapes: logp, old_logp, ref_logp, mask: [S, T]; adv: [S]. mask is 1 on the real completion
    tokens (up to and including the first EOS), 0 on padding. ref_logp may be None if beta == 0.

    Per token (s, t), with rho = exp(logp - old_logp):
        surrogate = min(rho * A_s, clip(rho, 1 - eps_low, 1 + eps_high) * A_s)
        l_st      = -(surrogate - beta * k3(logp, ref_logp))
    eps_high defaults to eps_low (the paper's symmetric clip); a larger eps_high is DAPO's
    "clip-higher". old_logp and ref_logp are constants: they are detached here.

    aggregation:
        "seq_mean"   (paper):        loss = sum_s [ sum_t l_st / n_s ] / total_seqs
        "token_mean" (EasyR1, DAPO): loss = sum_{s,t} l_st / total_tokens
    where n_s is sequence s's token count. total_seqs / total_tokens default to this call's S
    and mask.sum(). With gradient accumulation or several processes, pass the GLOBAL counts
    of the whole optimizer batch (all micro-batches, all ranks): then the micro-batch losses
    simply add up to the full-batch loss, and the gradient does not depend on how the batch
    was split (docs/pitfalls.md #4). Do not also divide by the number of accumulation steps.
    (Under DDP, which averages gradients over ranks, multiply by the world size.)

    Note: with one update per rollout, old_logp == logp.detach() so rho == 1 and the loss
    value is just -(average of A), ~0 since A has zero mean per group, yet the gradient is the
    full policy gradient, REINFORCE with the group mean as baseline (docs/pitfalls.md #7).

    Returns (loss, stats). stats are detached 0-dim fp32 tensors, summed over this call (not
    averaged) so the trainer can add them over micro-batches and ranks, then divide:
        tokens          number of unmasked tokens
        ratio_sum       sum of rho over tokens            (mean ratio = ratio_sum / tokens)
        approx_kl_sum   sum of (rho - 1) - log rho        (k3 of pi_old || pi_theta: how far this update
                                                           moved the policy; 0 when rho == 1)
        kl_sum          sum of k3 KL over tokens          (0 if ref_logp is None)
        clipped_tokens  tokens where the clip is active, i.e. zeroes the gradient:
                        A > 0 and rho > 1 + eps_high, or A < 0 and rho < 1 - eps_low
    """
    if aggregation not in ("seq_mean", "token_mean"):
        raise ValueError(f"aggregation must be 'seq_mean' or 'token_mean', got {aggregation!r}")
    if beta != 0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp")
    eps_high = eps_low if eps_high is None else eps_high
    mask = mask.bool()

    # Sanitise padding first, so garbage there cannot reach loss or gradient (NaN * 0 = NaN).
    def clean(x: Tensor) -> Tensor:
        return torch.where(mask, x.float(), torch.zeros((), device=x.device))

    logp = clean(logp)
    old_logp = clean(old_logp.detach())
    A = adv.detach().float().unsqueeze(-1)                         # (S, 1): one A per sequence

    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)                                   # (S, T)
    clipped_ratio = ratio.clamp(1 - eps_low, 1 + eps_high)
    surrogate = torch.minimum(ratio * A, clipped_ratio * A)        # (S, T)
    per_token = -surrogate

    if ref_logp is not None:
        kl = kl_k3(logp, clean(ref_logp.detach()))                 # (S, T), >= 0
        if beta != 0:
            per_token = per_token + beta * kl
    else:
        kl = torch.zeros_like(logp)

    tokens_per_seq = mask.sum(dim=-1)                              # (S,)
    if aggregation == "seq_mean":
        total_seqs = mask.shape[0] if total_seqs is None else total_seqs
        seq_loss = masked_sum(per_token, mask, dim=-1) / tokens_per_seq.clamp(min=1)
        loss = seq_loss.sum() / total_seqs
    else:
        total_tokens = tokens_per_seq.sum().clamp(min=1) if total_tokens is None else total_tokens
        loss = masked_sum(per_token, mask) / total_tokens

    with torch.no_grad():
        clip_active = ((A > 0) & (ratio > 1 + eps_high)) | ((A < 0) & (ratio < 1 - eps_low))
        stats = {
            "tokens": tokens_per_seq.sum().float(),
            "ratio_sum": masked_sum(ratio, mask),
            "approx_kl_sum": masked_sum(torch.expm1(log_ratio) - log_ratio, mask),
            "kl_sum": masked_sum(kl, mask),
            "clipped_tokens": (clip_active & mask).sum().float(),
        }
    return loss, stats
