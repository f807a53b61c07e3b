"""DAPO's dynamic sampling (arXiv 2503.14476, Sec. 3.2) behind the rollout-engine seam: every step trains on its full
number of groups that carry a learning signal. Off by default (Vision-R1 does not use it): --dynamic_sampling.

A group whose G rewards are all equal has A = 0 for each of its completions: no policy gradient, while its tokens still
count in the loss's denominators (docs/pitfalls.md #1). As training goes on, more groups come out all right (or all
wrong) and the batch that teaches anything shrinks. DAPO samples more prompts and keeps only the groups whose rewards
differ (grpo_variants.informative_groups) until the batch is full; EasyR1 calls it `online_filtering`, verl
`filter_groups`.

`DynamicSampling(engine, ...)` is itself an engine. `generate(problems, G, L)` rolls out `problems` with the engine it
wraps, scores them (`rewards`: the loop's own step-3 rewards, overlong penalty included) and keeps the informative
groups; while it holds fewer than len(problems) of them it rolls out another batch of len(problems) prompts drawn from
the data set, at most `max_extra_rollouts` times a step. It returns exactly len(problems) groups, the Rollout saying
which problems they answer (`problems`) and what it cost (`sampling`: groups rolled out, groups dropped; logged).

Several processes. Each process fills its own quota from its own draws, so groups never cross processes (docs/pitfalls.md #3),
and returns exactly its quota, so every process runs the same number of micro-batches (docs/pitfalls.md #16): when the bound is
reached first, the quota is completed with dropped groups, in the order sampled (they then train as they would without
dynamic sampling, with A = 0, and show in `zero_var`). The processes agree on the number of extra rollouts (a round
happens while any process still lacks groups, and every process samples in it: one all-reduce a round), because under
ZeRO-3 generation is itself a collective; elsewhere a full process's extra round costs no wall time, since the step
waits for the slowest process anyway.

The extra prompts of round k are a seeded draw from the whole data set, keyed by the step's own prompts and k (never the
next steps' prompts): the data order stays a function of the step number, and a resumed run draws the same prompts.
"""
from __future__ import annotations

import zlib
from typing import Callable

import torch

from minivr1.grpo_variants import informative_groups
from minivr1.rollout import Rollout


class DynamicSampling:
    def __init__(self, engine, rewards: Callable, dataset: list, max_extra_rollouts: int, pad_id: int,
                 any_process: Callable[[bool], bool] = lambda flag: flag, seed: int = 0):
        """engine: the engine to wrap; rewards(rollout, problems, G, L) -> [N] rewards (the loop's); dataset: every
        problem, to draw extra prompts from; any_process(flag): True on every process if flag is on any
        (distributed.any_process; one process: the flag)."""
        self.engine, self.rewards, self.dataset = engine, rewards, dataset
        self.max_extra_rollouts, self.pad_id, self.any_process, self.seed = max_extra_rollouts, pad_id, any_process, seed
        self.name = f"{engine.name}, dynamic sampling"

    def generate(self, problems, G: int, max_new_tokens: int) -> Rollout:
        need, batch, extra = len(problems), list(problems), 0
        seen = {p.id for p in problems}
        informative, uninformative = [], []               # (rollout, group index, problem), in the order sampled
        while True:
            ro = self.engine.generate(batch, G, max_new_tokens)
            keep = informative_groups(self.rewards(ro, batch, G, max_new_tokens), G).tolist()
            for k, p in enumerate(batch):
                (informative if keep[k] else uninformative).append((ro, k, p))
            if extra == self.max_extra_rollouts or not self.any_process(len(informative) < need):
                break
            extra += 1
            batch = self.draw(problems, extra, need, seen)
        chosen = informative[:need]
        fill = need - len(chosen)                              # the bound was reached first: complete the quota
        chosen += uninformative[:fill]
        out = ro if extra == 0 and [k for _, k, _ in chosen] == list(range(need)) else \
            Rollout.cat([r.groups([k]) for r, k, _ in chosen], self.pad_id)
        out.problems = [p for _, _, p in chosen]
        out.sampling = {"sampled_groups": len(informative) + len(uninformative),
                        "dropped_groups": len(uninformative) - fill}
        return out

    def draw(self, problems, round_: int, n: int, seen: set) -> list:
        """n problems for extra round `round_`, none of `seen` while the data set has others: a draw seeded by the
        step's own problems and the round."""
        key = zlib.crc32(f"{self.seed}/{round_}/{'/'.join(p.id for p in problems)}".encode())
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(key)).tolist()
        fresh = [self.dataset[i] for i in order if self.dataset[i].id not in seen]
        out = (fresh + [self.dataset[i] for i in order])[:n]
        seen.update(p.id for p in out)
        return out
