"""PTST stages as data (minivr1/stages.py): parsing, the step -> stage map, errors and the budget warning."""
import warnings

import pytest

from minivr1.stages import Stage, parse_stages, stage_at


def test_parse_paper_stages():
    stages = parse_stages("4096x16:100,8192x8:100")
    assert stages == [Stage(4096, 16, 100, start=0), Stage(8192, 8, 100, start=100)]
    assert [str(s) for s in stages] == ["4096x16:100", "8192x8:100"]


def test_parse_three_stages_with_spaces():
    stages = parse_stages(" 24x4:2 , 48 x 2 : 3,48x2:1")
    assert [(s.max_completion_length, s.group_size, s.steps, s.start) for s in stages] == \
        [(24, 4, 2, 0), (48, 2, 3, 2), (48, 2, 1, 5)]


def test_stage_at_boundaries():
    stages = parse_stages("4096x16:100,8192x8:100")
    # steps are 0-based: 0..99 are stage 1, 100..199 stage 2
    assert stage_at(stages, 0) == (0, stages[0])
    assert stage_at(stages, 99) == (0, stages[0])
    assert stage_at(stages, 100) == (1, stages[1])
    assert stage_at(stages, 199) == (1, stages[1])
    # past the end: the last stage (a resumed run that asks for more steps keeps its setting)
    assert stage_at(stages, 200) == (1, stages[1])


def test_stage_at_one_step_stages():
    stages = parse_stages("8x4:1,16x2:1,16x2:1")
    assert [stage_at(stages, k)[0] for k in range(3)] == [0, 1, 2]
    assert [stages[k].start for k in range(3)] == [0, 1, 2]


@pytest.mark.parametrize("spec, bad", [
    ("4096x16:100,8192x8", "8192x8"),          # no steps
    ("4096x16:100,8192:100", "8192:100"),      # no G
    ("4096*16:100", "4096*16:100"),            # wrong separator
    ("4096x16:100,", ""),                      # trailing comma: an empty stage
    ("4096x-16:100", "4096x-16:100"),          # negative
    ("4096x16:1.5", "4096x16:1.5"),            # fractional steps
    ("abc", "abc"),
])
def test_malformed_stage_names_the_bad_part(spec, bad):
    with pytest.raises(ValueError) as e:
        parse_stages(spec)
    assert f"bad PTST stage {bad!r}" in str(e.value)
    assert "MAX_COMPLETION_LENxG:STEPS" in str(e.value)


@pytest.mark.parametrize("spec, bad, why", [
    ("4096x1:100,8192x8:100", "4096x1:100", "G >= 2"),     # a group of one has no advantage
    ("4096x16:0", "4096x16:0", "steps must be >= 1"),
    ("0x16:100", "0x16:100", "length"),
])
def test_out_of_range_stage_names_the_bad_part(spec, bad, why):
    with pytest.raises(ValueError) as e:
        parse_stages(spec)
    assert f"bad PTST stage {bad!r}" in str(e.value)
    assert why in str(e.value)


def test_warns_when_token_budget_changes():
    with pytest.warns(UserWarning, match=r"length x G is not constant \(\[65536, 81920\]\)"):
        parse_stages("4096x16:100,8192x10:100")


@pytest.mark.parametrize("spec", ["4096x16:100,8192x8:100", "24x4:2,48x2:2", "4096x16:100"])
def test_no_warning_when_token_budget_is_constant(spec):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_stages(spec)
