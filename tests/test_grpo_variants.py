"""Unit tests of the options beside the paper (minivr1/grpo_variants.py, training.token_budget_micro_batches,
minivr1/dynamic_sampling.py), each against numbers derived by hand in the test."""
import math

import pytest
import torch

from minivr1 import grpo_variants as variants
from minivr1.dynamic_sampling import DynamicSampling
from minivr1.grpo import group_advantages, grpo_loss
from minivr1.rollout import Rollout
from minivr1.training import token_budget_micro_batches

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- step 2: informative groups

def test_informative_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0] + [0.1 * 3] * 4)   # 0.3 is not exact in float
    assert variants.informative_groups(rewards, G=4).tolist() == [True, False, False]


# ----------------------------------------------------------------------------- step 3: overlong penalty

def test_overlong_penalty_hand_values():
    # L = 10, buffer 4: no penalty up to 10 - 4 = 6 tokens, then -(len - 6) / 4, -1 at the limit
    lengths = torch.tensor([3, 6, 7, 9, 10])
    torch.testing.assert_close(variants.overlong_penalty(lengths, 10, 4), torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0]))
    torch.testing.assert_close(variants.overlong_penalty(lengths, 10, 4, factor=0.5),
                               torch.tensor([0.0, 0.0, -0.125, -0.375, -0.5]))
    assert (variants.overlong_penalty(lengths, 10, 0) == 0).all()              # off


# ----------------------------------------------------------------------------- step 4: advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 3.0])      # G = 4: three groups


def test_unscaled_advantages_are_reward_minus_group_mean():
    # group means 0.5, 2, 0.75; no division (Dr.GRPO)
    want = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.75, -0.75, -0.75, 2.25]
    torch.testing.assert_close(variants.scaled_advantages(REWARDS, 4, "none"), torch.tensor(want))


def test_batch_scaled_advantages_divide_by_the_std_of_all_rewards():
    # all 12 rewards: sum 13, sum of squares 27: population variance 27/12 - (13/12)^2 = 155/144, std sqrt(155)/12
    # A = (r - group mean) * 12 / sqrt(155): 0.5 -> 6/sqrt(155) = 0.4819316, 2.25 -> 27/sqrt(155) = 2.1686920
    adv = variants.scaled_advantages(REWARDS, 4, "batch")
    want = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.75, -0.75, -0.75, 2.25]) * 12 / math.sqrt(155)
    torch.testing.assert_close(adv, want, atol=1e-5, rtol=0)
    assert adv[0].item() == pytest.approx(0.4819316, abs=1e-5) and adv[-1].item() == pytest.approx(2.1686920, abs=1e-5)
    assert (adv[4:8] == 0).all()                                               # zero-variance group: exactly 0


def test_batch_std_is_over_every_process():
    """Two processes holding groups {1, 2} and {3}: with the sums added over both (as distributed.global_sums does),
    each gets the advantages one process holding all three gets; with its own sums only, not."""
    whole = variants.scaled_advantages(REWARDS, 4, "batch")
    parts = REWARDS[:8], REWARDS[8:]

    def sums(r):
        return {"n": r.numel(), "sum": float(r.sum()), "sum_sq": float((r * r).sum())}

    for mine, other in [(parts[0], parts[1]), (parts[1], parts[0])]:
        added = variants.scaled_advantages(mine, 4, "batch",
                                           global_sums=lambda d, o=other: {k: d[k] + sums(o)[k] for k in d})
        want = whole[:8] if mine is parts[0] else whole[8:]
        torch.testing.assert_close(added, want)
        assert not torch.allclose(variants.scaled_advantages(mine, 4, "batch"), want)


def test_scaled_advantages_equal_rewards_give_exactly_zero():
    rewards = torch.full((8,), 0.1) * 3
    for scale in ("batch", "none"):
        assert (variants.scaled_advantages(rewards, 4, scale) == 0).all()
    with pytest.raises(ValueError):
        variants.scaled_advantages(REWARDS, 4, "group")                        # the paper's: grpo.group_advantages


# ----------------------------------------------------------------------------- step 6: mask, denominators, GSPO

def test_mask_truncated():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    truncated = torch.tensor([True, False, False])
    got = variants.mask_truncated(mask, truncated)
    assert got.tolist() == [[0, 0, 0], [1, 1, 0], [1, 1, 1]] and got.dtype == mask.dtype


def _hand_example():
    """The batch of test_grpo_math.py::test_grpo_loss_hand_computed: per-token losses (beta 0.1, eps 0.2)
    seq 1 [-0.9693147, -1.2 (clipped), -1], seq 2 [+1, +0.9, pad]; d l / d logp seq 1 [-1.1, 0, -1], seq 2 [1, 0.9, 0]."""
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    old = torch.full((2, 3), -1.0)
    logp = (old + torch.tensor([[0.0, math.log(1.5), 0.0], [0.0, math.log(0.9), float("nan")]])).requires_grad_(True)
    ref = logp.detach() + torch.tensor([[LN2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    return logp, old, ref, torch.tensor([1.0, -1.0]), mask


def test_dr_grpo_loss_hand_computed():
    """Dr.GRPO: sum of every per-token loss / (sequences x L). With L = 4: (-3.1693147 + 1.9) / (2 x 4) = -0.1586643;
    the gradient of each token is its d l / d logp over 8, whatever its sequence's length."""
    logp, old, ref, adv, mask = _hand_example()
    kwargs = variants.loss_normalisers("dr_grpo", total_seqs=2, total_tokens=5, max_len=4)
    assert kwargs == {"aggregation": "token_mean", "total_seqs": 2, "total_tokens": 8}
    loss, stats = grpo_loss(logp, old, ref, adv, mask, eps_low=0.2, beta=0.1, **kwargs)
    loss.backward()
    assert loss.item() == pytest.approx(-0.1586643, abs=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.1, 0.0, -1.0], [1.0, 0.9, 0.0]]) / 8, atol=1e-6, rtol=0)
    assert stats["tokens"].item() == 5                       # the logged token count is still the real one
    for name in ("seq_mean", "token_mean"):                  # the paper's and EasyR1's pass through unchanged
        assert variants.loss_normalisers(name, 2, 5, 4) == {"aggregation": name, "total_seqs": 2, "total_tokens": 5}


def test_gspo_loss_hand_computed():
    """GSPO on 2 sequences, eps 0.2, beta 0, seq_mean. old_logp = -1; logp - old:
        seq 1 [0, ln 1.5, 0]  -> s_1 = exp(ln 1.5 / 3) = 1.5^(1/3) = 1.1447142, inside [0.8, 1.2]
        seq 2 [ln 0.5, 0, pad] -> s_2 = exp(ln 0.5 / 2) = 0.7071068 < 0.8
    A = [+1, -1]: seq 1's term -s_1 A = -1.1447142 (unclipped); seq 2's -min(-0.7071068, -0.8) = 0.8 (clipped: constant)
    loss = (-1.1447142 + 0.8) / 2 = -0.1723571
    gradient: seq 1, d(-s_1)/d logp_t = -s_1 / 3 for each of its 3 tokens, / 2 sequences = -0.1907857; seq 2: 0.
    The per-token ratio decides otherwise: it clips seq 1's second token (rho 1.5) and leaves seq 2's second (rho 1) live.
    """
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    old = torch.full((2, 3), -1.0)
    logp = (old + torch.tensor([[0.0, math.log(1.5), 0.0], [math.log(0.5), 0.0, float("nan")]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = variants.gspo_loss(logp, old, None, adv, mask, eps_low=0.2, beta=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(-0.1723571, abs=1e-6)
    s1 = 1.5 ** (1 / 3)
    torch.testing.assert_close(logp.grad, torch.tensor([[-s1 / 6] * 3, [0.0, 0.0, 0.0]]), atol=1e-6, rtol=0)
    assert stats["clipped_tokens"].item() == 2                              # seq 2's two tokens
    assert stats["ratio_sum"].item() == pytest.approx(3 * s1 + 2 * 0.5 ** 0.5, abs=1e-5)

    token, _ = grpo_loss(logp, old, None, adv, mask, eps_low=0.2, beta=0.0)
    (token_grad,) = torch.autograd.grad(token, logp)
    assert token_grad[0, 1] == 0 and token_grad[1, 1] != 0


def test_gspo_equals_the_sequence_formula_and_keeps_the_true_kl():
    """Against the paper's formula written out directly (s_i = exp(mean_t log-ratio), clip per sequence), with
    random off-policy log-probs, a KL term and both clip sides active; and equal to grpo_loss when on-policy."""
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 2, 4, 5])[:, None]
    logp = (-torch.rand(4, 6, generator=g) * 2).requires_grad_(True)
    old = logp.detach() + torch.randn(4, 6, generator=g) * 0.3
    ref = logp.detach() + torch.randn(4, 6, generator=g) * 0.5
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])
    loss, stats = variants.gspo_loss(logp, old, ref, adv, mask, eps_low=0.05, eps_high=0.08, beta=0.1)
    (grad,) = torch.autograd.grad(loss, logp)

    s = torch.exp(torch.where(mask, logp - old, 0).sum(-1) / mask.sum(-1))
    surrogate = torch.minimum(s * adv, s.clamp(0.95, 1.08) * adv)
    x = ref - logp
    k3 = torch.where(mask, torch.expm1(x) - x, 0).sum(-1) / mask.sum(-1)
    direct = (-surrogate + 0.1 * k3).mean()
    (direct_grad,) = torch.autograd.grad(direct, logp)
    assert ((s < 0.95) | (s > 1.08)).any() and ((s > 0.95) & (s < 1.08)).any()     # precondition: both cases
    torch.testing.assert_close(loss, direct)
    torch.testing.assert_close(grad, direct_grad)
    _, token_stats = grpo_loss(logp, old, ref, adv, mask, beta=0.1)
    torch.testing.assert_close(stats["kl_sum"], token_stats["kl_sum"])             # KL of the true log-probs

    on_policy = [f(logp, logp.detach(), ref, adv, mask, beta=0.1) for f in (variants.gspo_loss, grpo_loss)]
    torch.testing.assert_close(on_policy[0][0], on_policy[1][0])


# ----------------------------------------------------------------------------- step 5: token-budget micro-batches

def test_token_budget_micro_batches_hand_example():
    """prompt lengths [5, 5, 5, 5, 6, 6], completion lengths [10, 2, 3, 10, 1, 4] (totals 15, 7, 8, 15, 7, 10),
    budget 32 tokens. Longest first: rows 0, 3 (15), 5 (10), 2 (8), 1, 4 (7).
      [0]: 1 x 15; + 3: 2 x (5 + 10) = 30 <= 32          -> [0, 3]
      + 5: 3 x (6 + 10) = 48 > 32: new run [5]; + 2: 2 x (6 + 4) = 20; + 1: 3 x 10 = 30; + 4: 4 x 10 = 40 > 32
                                                         -> [5, 2, 1], then [4]
    Padded tokens: 30 + 30 + 7 = 67, against 6 x (6 + 10) = 96 for one micro-batch of all six."""
    P, C = [5, 5, 5, 5, 6, 6], [10, 2, 3, 10, 1, 4]
    assert token_budget_micro_batches(P, C, 32) == [[0, 3], [1, 2, 5], [4]]
    # count 4: the costliest with 2+ rows (30, the first of two) is halved; count 5: then [5, 2, 1] (30) -> [5], [2, 1]
    assert token_budget_micro_batches(P, C, 32, count=4) == [[0], [3], [1, 2, 5], [4]]
    assert token_budget_micro_batches(P, C, 32, count=5) == [[0], [3], [5], [1, 2], [4]]
    assert token_budget_micro_batches(P, C, 12) == [[0], [3], [5], [2], [1], [4]]      # rows over the budget: alone
    with pytest.raises(ValueError):
        token_budget_micro_batches(P, C, 32, count=7)


# ----------------------------------------------------------------------------- step 2: dynamic sampling

class Problem:
    def __init__(self, id):
        self.id = id


class FakeEngine:
    """Rollouts with no model: prompt widths differ between calls (so concatenation pads); each row's text names
    its problem."""

    name = "fake"

    def __init__(self):
        self.calls = []

    def generate(self, problems, G, max_new_tokens):
        self.calls.append([p.id for p in problems])
        N, P, C = len(problems) * G, 2 + len(self.calls), 3
        ids = torch.arange(N * P).view(N, P)
        return Rollout(ids, torch.ones(N, P, dtype=torch.long), None, torch.arange(N * C).view(N, C) + 1000,
                       torch.ones(N, C, dtype=torch.long), torch.zeros(N, dtype=torch.bool),
                       [f"{p.id}/{j}" for p in problems for j in range(G)], G)


def id_rewards(flat_ids):
    """Rewards that differ within a group only for problems whose id is in flat_ids."""
    def rewards(ro, problems, G, L):
        return torch.tensor([float(j) if p.id in flat_ids else 1.0 for p in problems for j in range(G)])
    return rewards


DATASET = [Problem(f"p{i}") for i in range(12)]


def test_dynamic_sampling_keeps_informative_groups_and_draws_more():
    engine = FakeEngine()
    informative = {"p0", "p2"} | {p.id for p in DATASET[4:]}               # p1, p3 give all-equal rewards
    sampler = DynamicSampling(engine, id_rewards(informative), DATASET, max_extra_rollouts=3, pad_id=-1)
    ro = sampler.generate(DATASET[:4], 2, 8)
    assert len(engine.calls) == 2 and engine.calls[0] == ["p0", "p1", "p2", "p3"]
    assert not set(engine.calls[1]) & {"p0", "p1", "p2", "p3"}             # fresh prompts
    kept = [p.id for p in ro.problems]
    assert kept[:2] == ["p0", "p2"] and len(kept) == 4 and all(k in informative for k in kept)
    assert ro.texts == [f"{k}/{j}" for k in kept for j in range(2)]        # rows follow their problems
    assert ro.sampling == {"sampled_groups": 8, "dropped_groups": 2}
    # the concatenation padded the first round's narrower prompts on the left, with a 0 mask
    assert ro.prompt_ids.shape[1] == 4 and (ro.prompt_mask[:4, :1] == 0).all() and (ro.prompt_ids[:4, 0] == -1).all()
    drawn = sampler.draw(DATASET[:4], 1, 4, {"p0", "p1", "p2", "p3"})       # the draw is a function of its key
    assert [p.id for p in drawn] == engine.calls[1]
    again = DynamicSampling(FakeEngine(), id_rewards(informative), DATASET, 3, -1)
    assert [p.id for p in again.generate(DATASET[:4], 2, 8).problems] == kept


def test_dynamic_sampling_fills_with_dropped_groups_at_the_bound():
    engine = FakeEngine()
    sampler = DynamicSampling(engine, id_rewards({"p1"}), DATASET, max_extra_rollouts=2, pad_id=0)
    ro = sampler.generate(DATASET[:4], 2, 8)
    assert len(engine.calls) == 3                                           # the step's rollout + 2 extra
    assert [p.id for p in ro.problems] == ["p1", "p0", "p2", "p3"]         # the informative one, then the first dropped
    assert ro.sampling == {"sampled_groups": 12, "dropped_groups": 8}
    all_good = DynamicSampling(engine, id_rewards({p.id for p in DATASET}), DATASET, 2, 0).generate(DATASET[:4], 2, 8)
    assert all_good.sampling == {"sampled_groups": 4, "dropped_groups": 0} and all_good.prompt_ids.shape[1] == 6


def test_dynamic_sampling_rounds_follow_every_process():
    """A process already full samples another round when another process still lacks groups (any_process says so):
    the processes make the same number of rollouts, and it keeps its own first groups."""
    engine = FakeEngine()
    asked = []

    def other_process_lacks(flag):
        asked.append(flag)
        return len(asked) < 2                                               # the other process needs one extra round
    sampler = DynamicSampling(engine, id_rewards({p.id for p in DATASET}), DATASET, 5, 0, any_process=other_process_lacks)
    ro = sampler.generate(DATASET[:4], 2, 8)
    assert asked == [False, False] and len(engine.calls) == 2
    assert [p.id for p in ro.problems] == ["p0", "p1", "p2", "p3"] and ro.sampling["dropped_groups"] == 0
