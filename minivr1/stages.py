"""PTST stages as data: "4096x16:100,8192x8:100" = (max completion length x group size : steps).

Progressive Thinking Suppression Training (Vision-R1 Sec. 3.2) grows the completion limit and
shrinks the group size stage by stage, keeping length x G (the rollout token budget) constant.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

PAPER_STAGES = "4096x16:100,8192x8:100"

_STAGE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Stage:
    max_completion_length: int
    group_size: int
    steps: int
    start: int = 0                # global step index where the stage begins

    def __str__(self) -> str:
        return f"{self.max_completion_length}x{self.group_size}:{self.steps}"


def parse_stages(spec: str) -> list[Stage]:
    """Parse "LENxG:STEPS,..."; warns when LEN x G is not constant across stages."""
    stages, start = [], 0
    for part in spec.split(","):
        m = _STAGE.match(part)
        if not m:
            raise ValueError(f"bad PTST stage {part!r} in {spec!r}: expected MAX_COMPLETION_LENxG:STEPS, "
                             f"e.g. 4096x16:100")
        length, G, steps = map(int, m.groups())
        if length < 1 or G < 2 or steps < 1:
            raise ValueError(f"bad PTST stage {part!r}: length and steps must be >= 1 and G >= 2 "
                             f"(a group of one has no relative advantage)")
        stages.append(Stage(length, G, steps, start))
        start += steps
    budgets = {s.max_completion_length * s.group_size for s in stages}
    if len(budgets) > 1:
        warnings.warn(f"PTST stages {spec!r}: length x G is not constant ({sorted(budgets)}); the paper keeps "
                      f"the rollout token budget fixed across stages", stacklevel=2)
    return stages


def stage_at(stages: list[Stage], step: int) -> tuple[int, Stage]:
    """The (index, stage) that global step `step` (0-based) belongs to."""
    for i, s in enumerate(stages):
        if step < s.start + s.steps:
            return i, s
    return len(stages) - 1, stages[-1]


def resolve_stages(stages: str | None, max_completion_length: int | None = None, num_generations: int | None = None,
                   max_steps: int | None = None) -> list[Stage]:
    """The run's stages, said one way: `stages` ("LENxG:STEPS,...") or, for a single stage, TRL's three
    flags (the unset ones default to 4096, 16 and 100); neither: the paper's PTST. Both: an error,
    since one of them would be ignored."""
    from minivr1.config import ConfigError

    single = {"max_completion_length": max_completion_length, "num_generations": num_generations,
              "max_steps": max_steps}
    given = [f"--{k}" for k, v in single.items() if v is not None]
    if stages and given:
        raise ConfigError(f"{', '.join(given)} and --stages (from the command line or the --config preset) both set "
                          f"the stages, and one would be ignored: say it one way, e.g. --stages "
                          f"{max_completion_length or 4096}x{num_generations or 16}:{max_steps or 100} for one stage")
    if given:
        return parse_stages(f"{max_completion_length or 4096}x{num_generations or 16}:{max_steps or 100}")
    return parse_stages(stages or PAPER_STAGES)
