"""Unit tests of minivr1.grpo against hand-computed values and, for the chunked log-probs, against plain autograd
(pitfall numbers refer to docs/pitfalls.md)."""

import math

import pytest
import torch

from minivr1.grpo import (
    group_advantages,
    grpo_loss,
    kl_k3,
    masked_mean,
    masked_sum,
    selective_log_softmax,
    token_logprobs,
    zero_variance_fraction,
)

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- advantages

def test_advantages_population_std_and_zero_variance_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, G=4)
    # group 1: mean 0.5, population std 0.5 -> (1 - 0.5) / 0.5 = +1, (0 - 0.5) / 0.5 = -1
    torch.testing.assert_close(adv[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    assert (adv[4:] == 0).all()            # exactly 0, not eps noise
    assert not torch.isnan(adv).any()


def test_advantages_unbiased_is_bessel():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = group_advantages(rewards, G=4, unbiased=True)
    std = math.sqrt((4 * 0.25) / 3)        # Bessel: sum of squares / (G - 1)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]) / std, atol=1e-5, rtol=0)


def test_advantages_equal_non_binary_rewards_are_exactly_zero():
    rewards = torch.full((6,), 0.1) * 3    # 0.3 is not exact in float: std could be tiny noise
    assert (group_advantages(rewards, G=3) == 0).all()
    assert (group_advantages(rewards, G=1, unbiased=True) == 0).all()   # G=1: Bessel std is NaN


def test_zero_variance_fraction():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert zero_variance_fraction(rewards, G=4) == 0.5
    with pytest.raises(ValueError):
        group_advantages(rewards, G=3)


# ----------------------------------------------------------------------------- masking

def test_masked_sum_and_mean_ignore_nan_in_masked_slots():
    x = torch.tensor([[1.0, 2.0, float("nan")], [float("inf"), 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert masked_sum(x, mask).item() == 12.0
    torch.testing.assert_close(masked_sum(x, mask, dim=-1), torch.tensor([3.0, 9.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 4.5]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0   # empty mask: 0, not NaN


# ----------------------------------------------------------------------------- KL

def test_kl_k3_hand_values():
    logp = torch.zeros(2)
    ref = torch.tensor([LN2, -LN2])          # ref_logp - logp = +ln2, -ln2
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([1 - LN2, 0.5 + LN2 - 1]))
    assert abs(kl_k3(logp, ref)[0].item() - 0.30685) < 1e-5
    assert abs(kl_k3(logp, ref)[1].item() - 0.19315) < 1e-5
    assert (kl_k3(ref, ref) == 0).all()


def test_kl_k3_never_negative_and_clamped():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10_000, generator=g) * s for s in (1e-6, 1e-3, 1.0, 10.0)])
    assert (kl_k3(torch.zeros_like(x), x) >= 0).all()
    huge = kl_k3(torch.tensor([0.0]), torch.tensor([1000.0]), clamp=20.0)
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge, torch.tensor([math.exp(20) - 21]))


# ----------------------------------------------------------------------------- clipping

def _grad_single(ratio: float, A: float, **kw) -> tuple[float, dict]:
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, stats = grpo_loss(logp, torch.zeros(1, 1), None, torch.tensor([A]), torch.ones(1, 1), beta=0.0, **kw)
    loss.backward()
    return logp.grad.item(), stats


@pytest.mark.parametrize("ratio, A, clipped", [(1.5, 1.0, True), (0.5, -1.0, True), (1.5, -1.0, False),
                                               (0.5, 1.0, False), (1.1, 1.0, False)])
def test_clip_zeroes_gradient_only_in_its_direction(ratio, A, clipped):
    grad, stats = _grad_single(ratio, A, eps_low=0.2)
    if clipped:
        assert grad == 0.0 and stats["clipped_tokens"].item() == 1
    else:   # d(-rho A)/dlogp = -rho A
        assert grad == pytest.approx(-ratio * A) and stats["clipped_tokens"].item() == 0


def test_eps_high_is_honoured():
    assert _grad_single(1.25, 1.0, eps_low=0.2)[0] == 0.0                        # symmetric: clipped
    assert _grad_single(1.25, 1.0, eps_low=0.2, eps_high=0.28)[0] == pytest.approx(-1.25)
    assert _grad_single(0.75, -1.0, eps_low=0.2, eps_high=0.28)[0] == 0.0        # low side still 0.8
    assert _grad_single(0.75, -1.0, eps_low=0.3, eps_high=0.28)[0] == pytest.approx(0.75)


# ----------------------------------------------------------------------------- the loss on a batch

def _batch(S=8, T=7, seed=0):
    """Random [S, T] logprobs with varied lengths (1..T), and advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, 7, 3, 5, 2, 6, 4, 7])[:S]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logp = -torch.rand(S, T, generator=g) * 3
    old = logp + torch.randn(S, T, generator=g) * 0.3          # ratios on both sides of the clip
    ref = logp + torch.randn(S, T, generator=g) * 0.5
    adv = torch.randn(S, generator=g)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
def test_masked_positions_contribute_exactly_zero(aggregation):
    logp, old, ref, adv, mask = _batch()
    results = []
    for garbage in (0.0, float("nan"), float("inf"), -1e30):
        lp = torch.where(mask, logp, garbage).requires_grad_(True)
        o, r = torch.where(mask, old, garbage), torch.where(mask, ref, -garbage)
        loss, stats = grpo_loss(lp, o, r, adv, mask, aggregation=aggregation)
        loss.backward()
        results.append((loss.detach(), lp.grad, stats))
    loss0, grad0, stats0 = results[0]
    assert (grad0[~mask] == 0).all()
    for loss, grad, stats in results[1:]:
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert torch.equal(loss, loss0) and torch.equal(grad, grad0)
        assert all(torch.equal(stats[k], stats0[k]) for k in stats0)


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
def test_one_update_per_rollout_equals_reinforce_with_baseline(aggregation):
    logp, _, _, adv, mask = _batch()
    logp.requires_grad_(True)
    loss, stats = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0, aggregation=aggregation)
    (grad,) = torch.autograd.grad(loss, logp)
    A = adv[:, None]
    if aggregation == "seq_mean":     # -1/S sum_s A_s mean_t logp_st
        ref_loss = -(A * torch.where(mask, logp, 0)).sum(-1).div(mask.sum(-1)).sum() / mask.shape[0]
    else:                             # -1/N sum_{s,t} A_s logp_st
        ref_loss = -(A * torch.where(mask, logp, 0)).sum() / mask.sum()
    (ref_grad,) = torch.autograd.grad(ref_loss, logp)
    torch.testing.assert_close(grad, ref_grad)
    assert stats["clipped_tokens"].item() == 0


def test_first_step_ratio_one_kl_zero():
    logp, _, _, adv, mask = _batch()
    loss, stats = grpo_loss(logp, logp.clone(), logp.clone(), adv, mask, beta=0.01)
    n = mask.sum().item()
    assert stats["tokens"].item() == n
    assert stats["ratio_sum"].item() == n                 # every ratio exactly 1
    assert stats["kl_sum"].item() == 0 and stats["clipped_tokens"].item() == 0 and stats["approx_kl_sum"].item() == 0
    # rho == 1, KL == 0: loss = -mean_s A_s (seq_mean)
    torch.testing.assert_close(loss, -adv.mean())


def test_grpo_loss_hand_computed():
    """The whole loss on 2 sequences x 3 tokens, every number derived by hand below.

    mask = [[1, 1, 1], [1, 1, 0]]       (sequence 2 has 2 tokens; its third slot is padding: NaN there)
    A    = [+1, -1], eps = 0.2, beta = 0.1
    old_logp = -1 everywhere; logp - old = [[0, ln 1.5, 0], [0, ln 0.9, pad]], so
    rho  = [[1, 1.5, 1], [1, 0.9, -]]
    ref_logp - logp = [[ln 2, 0, 0], [0, 0, -]], so k3 = [[2 - ln 2 - 1, 0, 0], [0, 0, -]] = [[0.306853, 0, 0], ...]

    per-token loss l = -min(rho A, clip(rho, 0.8, 1.2) A) + beta k3:
      seq 1 (A = +1): t1 -1 + 0.0306853 = -0.9693147
                      t2 rho = 1.5 is clipped to 1.2: min(1.5, 1.2) = 1.2 -> -1.2
                      t3 -1
                      sum -3.1693147, mean over its 3 tokens -1.0564382
      seq 2 (A = -1): t1 min(-1, -1) = -1 -> +1
                      t2 rho A = -0.9, clip(0.9) = 0.9 (inside the range) -> +0.9
                      sum 1.9, mean over its 2 tokens 0.95
    seq_mean   = (-1.0564382 + 0.95) / 2 = -0.0532191
    token_mean = (-3.1693147 + 1.9) / 5  = -0.2538629

    d l / d logp: the surrogate gives -rho A where unclipped and 0 where the clip is active (the min
    picks the constant); k3 = e^x - x - 1 with x = ref - logp gives d k3 / d logp = 1 - e^x, -1 at
    x = ln 2 (times beta: -0.1), 0 at x = 0:
      seq 1: [-1 - 0.1, 0, -1] = [-1.1, 0, -1];   seq 2: [+1, +0.9, 0]
    seq_mean divides sequence s by n_s x S: seq 1 by 6, seq 2 by 4; token_mean divides by 5.
    """
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    old = torch.full((2, 3), -1.0)
    logp = (old + torch.tensor([[0.0, math.log(1.5), 0.0], [0.0, math.log(0.9), float("nan")]])).requires_grad_(True)
    ref = logp.detach() + torch.tensor([[LN2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    expected = {
        "seq_mean": (-0.0532191, [[-1.1 / 6, 0.0, -1 / 6], [1 / 4, 0.9 / 4, 0.0]]),
        "token_mean": (-0.2538629, [[-1.1 / 5, 0.0, -1 / 5], [1 / 5, 0.9 / 5, 0.0]]),
    }
    for aggregation, (want_loss, want_grad) in expected.items():
        logp.grad = None
        loss, stats = grpo_loss(logp, old, ref, adv, mask, eps_low=0.2, beta=0.1, aggregation=aggregation)
        loss.backward()
        assert loss.item() == pytest.approx(want_loss, abs=1e-6), aggregation
        torch.testing.assert_close(logp.grad, torch.tensor(want_grad), atol=1e-6, rtol=0)
        assert stats["tokens"].item() == 5 and stats["clipped_tokens"].item() == 1
        assert stats["ratio_sum"].item() == pytest.approx(1 + 1.5 + 1 + 1 + 0.9)
        assert stats["kl_sum"].item() == pytest.approx(1 - LN2)
        # (rho - 1) - ln rho: 0.5 - ln 1.5 = 0.0945349 and -0.1 - ln 0.9 = 0.0053605
        assert stats["approx_kl_sum"].item() == pytest.approx(0.0998954, abs=1e-6)


def test_kl_term_adds_beta_times_k3():
    logp, old, ref, adv, mask = _batch()
    l0, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.0, aggregation="token_mean")
    l1, stats = grpo_loss(logp, old, ref, adv, mask, beta=0.5, aggregation="token_mean")
    torch.testing.assert_close(l1 - l0, 0.5 * stats["kl_sum"] / stats["tokens"])
    with pytest.raises(ValueError):
        grpo_loss(logp, old, None, adv, mask, beta=0.01)


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
def test_micro_batch_split_gives_same_loss_and_gradient(aggregation):
    logp, old, ref, adv, mask = _batch()
    totals = dict(total_seqs=mask.shape[0], total_tokens=mask.sum())
    results = []
    for n_micro in (1, 2, 4):
        lp = logp.clone().requires_grad_(True)
        total = 0.0
        for idx in torch.arange(8).chunk(n_micro):
            loss, _ = grpo_loss(lp[idx], old[idx], ref[idx], adv[idx], mask[idx],
                                aggregation=aggregation, **totals)
            loss.backward()                  # gradients accumulate in lp.grad, as in training
            total = total + loss.detach()
        results.append((total, lp.grad))
    for total, grad in results[1:]:
        torch.testing.assert_close(total, results[0][0])
        torch.testing.assert_close(grad, results[0][1])


# ----------------------------------------------------------------------------- token logprobs

class RowCountingHead(torch.nn.Module):
    """An lm_head that records the largest number of rows it was ever called with."""

    def __init__(self, H, V):
        super().__init__()
        self.linear = torch.nn.Linear(H, V)
        self.max_rows = 0

    def forward(self, h):
        self.max_rows = max(self.max_rows, h.shape[0])
        return self.linear(h)


@pytest.mark.parametrize("chunk_size", [3, 10, 64])
def test_token_logprobs_matches_reference_values_and_gradients(chunk_size):
    torch.manual_seed(0)
    N, H, V, T = 10, 8, 50, 0.7
    head = RowCountingHead(H, V)
    hidden = torch.randn(N, H, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    weights = torch.randn(N)                 # a non-uniform upstream gradient

    ref = selective_log_softmax(head(hidden) / T, targets)
    ref_grads = torch.autograd.grad((ref * weights).sum(), [hidden, head.linear.weight, head.linear.bias])

    head.max_rows = 0
    out = token_logprobs(hidden, head, targets, temperature=T, chunk_size=chunk_size)
    assert out.shape == (N,) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad((out * weights).sum(), [hidden, head.linear.weight, head.linear.bias])
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)
    assert head.max_rows <= chunk_size       # forward and checkpoint recompute alike

    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(hidden, head, targets, T, chunk_size), ref.detach())


def test_token_logprobs_does_not_save_logits_for_backward():
    """Every tensor autograd saves outside the checkpoints must be smaller than one [chunk, V]."""
    torch.manual_seed(0)
    N, H, V, chunk = 64, 8, 1000, 16
    head = torch.nn.Linear(H, V)
    hidden = torch.randn(N, H, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_logprobs(hidden, head, torch.randint(0, V, (N,)), chunk_size=chunk)
    assert max(saved, default=0) < chunk * V
    out.sum().backward()
    assert hidden.grad is not None and head.weight.grad is not None


def reference_logprobs_and_grads(hidden, head, targets, T, weights, params):
    """Plain autograd through the previous implementation's math: fp32 upcast, / T, log_softmax, gather."""
    ref = selective_log_softmax(head(hidden).float() / T, targets)
    return ref, torch.autograd.grad((ref * weights).sum(), [hidden, *params])


@pytest.mark.parametrize("dtype, tol", [
    (torch.float32, dict(rtol=1.3e-6, atol=1e-5)),
    # bf16 head: both ways round the same fp32 gradient of the logits to bf16 before the head's matmuls;
    # what differs is the weight gradient, summed over chunks in bf16 here, in one matmul in the reference
    (torch.bfloat16, dict(rtol=1.6e-2, atol=1e-2)),
])
def test_token_logprobs_gradient_equals_autograd(dtype, tol):
    """The hand-written backward gives autograd's gradients: several chunks with a ragged last one
    (23 rows in chunks of 8: 8, 8, 7), temperature != 1, a head with a bias, a non-uniform upstream gradient."""
    torch.manual_seed(0)
    N, H, V, T, chunk = 23, 16, 300, 0.6, 8
    head = torch.nn.Linear(H, V, dtype=dtype)
    hidden = (3 * torch.randn(N, H)).to(dtype).requires_grad_()    # logits of a few units: peaked softmaxes
    targets = torch.randint(0, V, (N,))
    weights = torch.randn(N)
    params = [head.weight, head.bias]
    ref, ref_grads = reference_logprobs_and_grads(hidden, head, targets, T, weights, params)

    out = token_logprobs(hidden, head, targets, temperature=T, chunk_size=chunk)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1.3e-6, atol=1e-5)   # fp32 arithmetic on the same logits
    grads = torch.autograd.grad((out * weights).sum(), [hidden, *params])
    for name, g, rg in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert g.dtype == dtype
        scale = rg.float().abs().max()
        torch.testing.assert_close(g.float() / scale, rg.float() / scale, **tol, msg=lambda m: f"{name}: {m}")


def test_token_logprobs_gradient_hand_computed():
    """One row, V = 3, T = 2, no bias: logits z = W h = [2, 0, -2] / T = [1, 0, -1]; target 0.
    softmax = e^[1,0,-1] / (e + 1 + 1/e) = [0.6652, 0.2447, 0.0900];
    d logp / d logits = (onehot - softmax) / T = [0.1674, -0.1224, -0.0450];
    grad_h = that @ W, grad_W = that^T h."""
    head = torch.nn.Linear(1, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [0.0], [-1.0]]))
    hidden = torch.tensor([[2.0]], requires_grad=True)
    out = token_logprobs(hidden, head, torch.tensor([0]), temperature=2.0)
    p = torch.tensor([math.e, 1.0, 1 / math.e]) / (math.e + 1 + 1 / math.e)
    torch.testing.assert_close(out, torch.log(p[:1]))
    out.sum().backward()
    d_logits = (torch.tensor([1.0, 0.0, 0.0]) - p) / 2.0
    torch.testing.assert_close(head.weight.grad, d_logits.view(3, 1) * 2.0)
    torch.testing.assert_close(hidden.grad, (d_logits @ head.weight.detach()).view(1, 1))


def test_token_logprobs_frozen_head_gets_no_gradient():
    """LoRA leaves the LM head frozen: no weight gradient, the hidden states' gradient unchanged."""
    torch.manual_seed(0)
    N, H, V, T = 10, 8, 50, 1.3
    head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    hidden = torch.randn(N, H, requires_grad=True)
    targets, weights = torch.randint(0, V, (N,)), torch.randn(N)
    _, (ref_grad,) = reference_logprobs_and_grads(hidden, head, targets, T, weights, [])
    (token_logprobs(hidden, head, targets, T, chunk_size=4) * weights).sum().backward()
    assert head.weight.grad is None
    torch.testing.assert_close(hidden.grad, ref_grad)


def test_token_logprobs_tied_head_gets_both_gradients():
    """A head tied to the input embeddings (Qwen2.5-VL-3B): its weight gets the embedding's gradient
    plus the log-probs' gradient, as with plain autograd."""
    torch.manual_seed(0)
    N, H, V, T = 10, 8, 50, 0.7
    embed = torch.nn.Embedding(V, H)
    head = torch.nn.Linear(H, V, bias=False)
    head.weight = embed.weight
    ids, targets, weights = torch.randint(0, V, (N,)), torch.randint(0, V, (N,)), torch.randn(N)

    def loss(logprobs):
        hidden = torch.tanh(embed(ids))
        return (logprobs(hidden) * weights).sum()

    ref_grad, = torch.autograd.grad(loss(lambda h: selective_log_softmax(head(h).float() / T, targets)), [embed.weight])
    grad, = torch.autograd.grad(loss(lambda h: token_logprobs(h, head, targets, T, chunk_size=3)), [embed.weight])
    torch.testing.assert_close(grad, ref_grad)


def test_token_logprobs_peft_wrapped_head_trains_its_adapter():
    """A peft-wrapped head (LoRA on lm_head): the adapter's A and B get autograd's gradients, the frozen
    base weight none; the head is called as a module, so the wrapper's own forward runs."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    N, H, V, T = 10, 8, 50, 0.7

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(H, V)

        def forward(self, h):
            return self.lm_head(h)

    model = get_peft_model(LM(), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False))
    head = model.base_model.model.lm_head
    adapter = [p for n, p in head.named_parameters() if "lora_" in n]
    assert len(adapter) == 2 and not head.base_layer.weight.requires_grad
    hidden = torch.randn(N, H, requires_grad=True)
    targets, weights = torch.randint(0, V, (N,)), torch.randn(N)
    _, ref_grads = reference_logprobs_and_grads(hidden, head, targets, T, weights, adapter)
    (token_logprobs(hidden, head, targets, T, chunk_size=3) * weights).sum().backward()
    for p, rg in zip([hidden, *adapter], ref_grads):
        torch.testing.assert_close(p.grad, rg)
    assert head.base_layer.weight.grad is None
