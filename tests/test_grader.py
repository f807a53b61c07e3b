"""Table-driven tests of the response format, answer extraction, equivalence and rewards."""

import time

import pytest

from minivr1 import grader

from minivr1.grader import (
    REWARDS,
    Parsed,
    accuracy_reward,
    count_wait,
    extract_answer,
    format_reward,
    hfrrf_reward,
    is_equivalent,
    parse_response,
    zero_reward,
)

GOOD = "<think>2 + 3 = 5</think><answer>5</answer>"
RELEASED = "<think> The image shows a triangle. Wait, check again. </think><answer> Final Answer:C </answer>"
CHOICES = ["3", "4", "5", "6"]  # gold option "5" is C


# ----------------------------------------------------------------------------- format

@pytest.mark.parametrize(
    "text, think, answer, ok",
    [
        (GOOD, "2 + 3 = 5", "5", True),
        ("  \n<think>a</think>\n\n<answer> 5 </answer>\n", "a", "5", True),  # whitespace around
        (GOOD + "<|im_end|>", "2 + 3 = 5", "5", True),  # trailing end token tolerated
        (GOOD + "\n<|endoftext|>\n", "2 + 3 = 5", "5", True),
        ("<think></think><answer>5</answer>", "", "5", True),  # empty think is allowed
        (RELEASED, "The image shows a triangle. Wait, check again.", "C", True),
        ("<think>a</think><answer>\\boxed{5}</answer>", "a", "5", True),
        # --- format failures
        ("<think>a</think><answer>4</answer><answer>5</answer>", "a", "5", False),  # two answers: last wins
        ("<think>a</think><think>b</think><answer>5</answer>", "a", "5", False),  # second think
        ("<think>a</think> The answer is 5.", "a", None, False),  # answer outside the tags
        ("<think>a</think>5<answer>5</answer>", "a", "5", False),  # text between the blocks
        ("<think>a</think><answer>5</answer> because", "a", "5", False),  # text after the answer
        ("<think>a ... cut off at the length limit", None, None, False),  # unterminated think
        ("<think>a</think><answer>5", "a", None, False),  # missing </answer>
        ("<think>a</think><answer>  </answer>", "a", None, False),  # empty answer
        ("<think>a</think><answer>Final Answer:</answer>", "a", None, False),  # empty after prefix
        ("<think>a</think><answer>5 <think>b</think></answer>", "a", "5 <think>b</think>", False),
        ("<think>a</think><answer><answer>5</answer></answer>", "a", "5", False),  # nested tags
        ("<answer>5</answer><think>a</think>", "a", "5", False),  # wrong order
        ("x<think>a</think><answer>5</answer>", "a", "5", False),  # text before the think
        ("<answer>5</answer>", None, "5", False),  # no think
        ("", None, None, False),
        ("<|im_end|>", None, None, False),
    ],
)
def test_parse_response(text, think, answer, ok):
    assert parse_response(text) == Parsed(think, answer, ok)
    assert format_reward(text) == float(ok)


@pytest.mark.parametrize(
    "text, answer",
    [
        ("<answer>5</answer>", "5"),
        ("<answer> Final Answer:C </answer>", "C"),
        ("<answer>Final answer: 12</answer>", "12"),
        ("<answer>FINAL ANSWER : x+1</answer>", "x+1"),
        ("<answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
        ("<answer>\\boxed{1} and \\boxed{2}</answer>", "\\boxed{1} and \\boxed{2}"),  # not one box
        ("<answer>a</answer> text <answer>b</answer>", "b"),  # the last complete block
        ("<answer>a</answer><answer>b", "a"),  # the last *complete* block
        ("The answer is 5", None),
        ("</answer>5<answer>", None),
        ("\\boxed{5}", None),  # no guessing from free text
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "text, n",
    [("Wait, no. Wait! wait Waiting await Wait", 3), ("", 0), ("Wait" * 3, 0), ("(Wait)", 1)],
)
def test_count_wait(text, n):
    assert count_wait(text) == n


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize(
    "pred, gold",
    [
        # integers, signs, units, separators
        ("7", "7"), ("7.0", "7"), ("+7", "7"), ("7 cm", "7"), ("7cm", "7 cm"), ("1,000", "1000"),
        ("-3", "-3"), ("5 m^2", "5"), ("30 degrees", "30"),
        # floats, fractions, percent
        ("0.5", "1/2"), ("\\frac{1}{2}", "0.5"), ("\\dfrac12", "0.5"), ("\\tfrac{1}{2}", "1/2"),
        ("0.33333", "1/3"), ("50%", "50"), ("50\\%", "50"), ("0", "0.0"),
        # LaTeX and expressions
        ("\\sqrt{2}", "2^{1/2}"), ("2\\sqrt{3}", "\\sqrt{12}"), ("\\pi/2", "\\frac{\\pi}{2}"),
        ("3\\pi", "3*pi"), ("2^{10}", "1024"), ("2**10", "1024"), ("(1+2)*3", "9"),
        ("\\left(1+2\\right)\\cdot 3", "9"), ("2\\times 3", "6"), ("\\sqrt[3]{8}", "2"),
        ("30^\\circ", "30"), ("30^{\\circ}", "30"), ("30°", "30"), ("3.1416", "\\pi"), ("√2", "\\sqrt{2}"),
        ("x+1", "1+x"), ("(x+1)^2", "x^2+2x+1"), ("\\frac{x}{2}", "0.5x"), ("2(a+b)", "2a+2b"),
        ("x = 3", "3"), ("y=2x+1", "1+2x"),
        # wrappers and text
        ("\\boxed{5}", "5"), ("$5$", "5"), ("Final Answer: 5", "5"), ("5.", "5"),
        ("Yes", "yes"), ("NO.", "no"), ("New  York", "new york"),
    ],
)
def test_equivalent(pred, gold):
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("8", "7"), ("7.001", "7"), ("10001", "10000"),  # integer golds need exact answers
        ("0.33", "1/3"), ("50%", "0.5"), ("-7", "7"), ("2x", "2"), ("x+1", "x+2"), ("x", "y"),
        ("12 15", "180"), ("1.2.3", "0.36"), ("yes", "no"), ("Yes, it is", "yes"), ("1/0", "1"), ("0/0", "0"),
        ("", "5"), (None, "5"), ("5", ""),
        # adversarial: refused or just False, never executed, never hanging
        ("9^9^9^9", "1"), ("9^{9^{9^{9}}}", "0"), ("2^{100000}", "0"), ("((2^{1000})^{1000})^{1000}", "0"),
        ("(" * 60 + "1" + ")" * 60, "1"), ("-" * 150 + "1", "1"), ("1+" * 150 + "1", "151"),
        ("__import__('os').system('echo hi')", "0"), ("__import__('os')", "__import__('os')x"),
        ("lambda: 1", "1"), ("x_1", "x"), ("\\int_0^1 x dx", "0.5"), ("1" * 300, "1" * 299),
    ],
)
def test_not_equivalent(pred, gold):
    assert not is_equivalent(pred, gold)


@pytest.mark.parametrize(
    "pred, gold, precision, expected",
    [
        ("1.23", "1.2", 1, True), ("1.26", "1.2", 1, False), ("\\sqrt{2}", "1.41", 2, True),
        ("1.414", "1.41", 2.0, True), ("3.14159", "3.14", 2, True), ("3.2", "3.14", 2, False),
        ("1.2", "1.2", float("nan"), True),  # NaN precision (a dataset's missing value) is ignored
    ],
)
def test_precision(pred, gold, precision, expected):
    assert is_equivalent(pred, gold, answer_type="float", precision=precision) is expected


@pytest.mark.parametrize(
    "pred, expected",
    [
        ("C", True), ("(C)", True), ("C.", True), ("C) 5", True), ("C: five", True), ("Option C", True),
        ("option (C)", True), ("c", True), ("[C]", True), ("5", True), ("5.0", True), ("Final Answer:C", True),
        ("B", False), ("(D)", False), ("E", False), ("6", False), ("A cat", False), ("", False), ("C D", False),
    ],
)
@pytest.mark.parametrize("gold", ["5", "C"])  # MathVista stores the option text; others a letter
def test_multiple_choice(pred, expected, gold):
    assert is_equivalent(pred, gold, choices=CHOICES) is expected


def test_multiple_choice_text_options():
    choices = ["A red circle", "a blue square", "Neither"]
    assert is_equivalent("a blue  square", "a blue square", choices=choices)
    assert is_equivalent("B", "a blue square", choices=choices)
    assert is_equivalent("neither.", "C", choices=choices)
    assert not is_equivalent("A", "a blue square", choices=choices)


@pytest.mark.parametrize(
    "pred, gold, expected",
    [("[1, 2]", "1,2", True), ("1, 2", "[1,2]", True), ("[2, 1]", "[1, 2]", False), ("[1]", "[1, 2]", False),
     ("(0.5, 3)", "[1/2, 3]", True)],
)
def test_list(pred, gold, expected):
    assert is_equivalent(pred, gold, answer_type="list") is expected


# ----------------------------------------------------------------------------- rewards

@pytest.mark.parametrize(
    "text, gold, meta, fmt, acc",
    [
        (GOOD, "5", {}, 1.0, 1.0),
        (GOOD, "6", {}, 1.0, 0.0),
        (RELEASED, "5", {"choices": CHOICES, "question_type": "multi_choice", "unit": None}, 1.0, 1.0),
        (RELEASED, "C", {"choices": CHOICES}, 1.0, 1.0),
        (RELEASED, "6", {"choices": CHOICES}, 1.0, 0.0),
        ("<think>a</think><answer>4</answer><answer>5</answer>", "5", {}, 0.0, 1.0),  # right, bad format
        ("<think>a</think><answer>5", "5", {}, 0.0, 0.0),  # cut off at the length limit
        ("<think>a</think>5", "5", {}, 0.0, 0.0),
        ("<think>a</think><answer>1.23</answer>", "1.2", {"answer_type": "float", "precision": 1}, 1.0, 1.0),
    ],
)
def test_rewards(text, gold, meta, fmt, acc):
    assert format_reward(text) == fmt
    assert accuracy_reward(text, gold, **meta) == acc
    assert hfrrf_reward(text, gold, **meta) == fmt * acc  # 1 iff format AND answer are right
    assert zero_reward(text, gold, **meta) == 0.5 * fmt + 0.5 * acc
    assert REWARDS["hfrrf"] is hfrrf_reward and REWARDS["zero"] is zero_reward


# ----------------------------------------------------------------------------- adversarial sizes

MB = 1_000_000
HUGE = [
    "<think>" + "a" * (5 * MB),  # unterminated think
    "<think>x</think><answer>" + "5" * MB,  # missing </answer>
    "<answer>" * MB,
    "</answer>" * (MB // 2),
    "<answer></answer>" * (MB // 10),
    "<think>" + "Wait " * (MB // 5) + "</think><answer>" + " " * MB + "x" + "</answer>",
    "<think>a</think><answer>Final Answer:" + " " * MB + "\\boxed{" + "{" * MB + "</answer>",
    "<think>a</think><answer>\\boxed{" + "{" * MB + "}</answer>",
    "<think>a</think><answer>option" + " " * MB + "xy</answer>",
    "<think>a</think><answer>(" + " " * MB + "C)x</answer>",
    "<think>a</think><answer>" + "1+" * MB + "1</answer>",
    "<think>a</think><answer>" + "(" * MB + "</answer><|im_end|>" * 100,
]


@pytest.mark.parametrize("i", range(len(HUGE)))
def test_megabyte_inputs_are_fast(i):
    text = HUGE[i]
    calls = [
        lambda: parse_response(text),
        lambda: count_wait(text),
        lambda: format_reward(text),
        *[lambda r=r: r(text, "5", choices=CHOICES) for r in (accuracy_reward, hfrrf_reward, zero_reward)],
        lambda: accuracy_reward(text, "x+1", answer_type="list"),
        lambda: is_equivalent(text, "5", choices=CHOICES),
        lambda: is_equivalent(text, "x+1"),
    ]
    for call in calls:
        t0 = time.perf_counter()
        call()
        assert time.perf_counter() - t0 < 1.0  # linear scans only: no regex backtracking


def test_overflowing_values_are_not_equal():
    # both sides overflow a float at every sample point: inf == inf must not make them equal
    assert not is_equivalent("x^{1000}-y^{1000}", "(x+1)^{1000}")
    assert not is_equivalent("(10^{300})^{3}", "(10^{300})^{3}+1")
    assert is_equivalent("(10^{300})^{3}", "10^{900}")  # exact values compare exactly


def test_hard_math_is_bounded_in_time():
    t0 = time.perf_counter()
    for pred in ["9^9^9^9", "(2^{1000}\\pi)^{1000}", "2^{999}^{999}", "\\sqrt{" * 40 + "2" + "}" * 40,
                 "(x+1)^{1000}", "x^{1000}-y^{1000}", "\\frac" * 60 + "1" * 61]:
        is_equivalent(pred, "(x+1)^{1000}")
    for pred in ["option" + " " * 9000 + "xy", "(" * 9000, "C)" + " " * 9000 + "x", "1+" * 4900 + "1"]:
        is_equivalent(pred, "C", choices=CHOICES)  # just under MAX_ANSWER_CHARS
        is_equivalent(pred, "x+1", answer_type="list")
    assert time.perf_counter() - t0 < 2.0
    assert is_equivalent("(" * 45 + "2" + ")" * 45, "2")  # deep but within MAX_DEPTH
    assert is_equivalent("\\sqrt{" * 3 + "256" + "}" * 3, "2")


def test_load_reward_by_name_and_import_path():
    assert grader.load_reward("hfrrf") is grader.hfrrf_reward
    assert grader.load_reward("minivr1.grader:format_reward") is grader.format_reward
    with pytest.raises(ValueError, match="unknown reward"):
        grader.load_reward("nope")
    with pytest.raises(ValueError, match="no function"):
        grader.load_reward("minivr1.grader:nope")


@pytest.mark.parametrize("name", sorted(grader.REWARDS))
def test_every_reward_takes_the_trainers_arguments(name):
    # train_grpo calls reward_fn(text, answer, **problem.grading_meta())
    value = grader.REWARDS[name]("<think>x</think><answer>3</answer>", "3", choices=None, answer_type="integer",
                                 precision=None)
    assert value == 1.0


def test_parse_math_is_the_bounded_parser_for_the_benchmarks():
    import sympy

    assert grader.parse_math("\\frac{\\sqrt{12}}{2}") == sympy.sqrt(3)
    assert grader.parse_math("2x + 1") == 2 * sympy.Symbol("x") + 1
    for rejected in ("9^9^9", "__import__('os')", "1" * 300, "\\sin 30"):
        assert grader.parse_math(rejected) is None
    assert grader.parse_math("1+1", deadline=time.monotonic() - 1) is None   # past its deadline: not evaluated
