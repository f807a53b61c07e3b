"""The README, the scripts' --help and the toy pipeline agree with the code (issue 11).

Every command of ours that the README, the toy pipeline or a script's --help shows parses into that script's
arguments (so none omits a required one such as --data, none holds a placeholder like `...`); help texts keep
their examples' line breaks and show each default once; the times stated for the same thing agree; a
CPU-only machine has its own install line on the first screen.
"""
from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from minivr1 import config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SCRIPTS = ["train_sft.py", "train_grpo.py", "evaluate.py", "bridge.py"]


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, re.S)


def commands(text: str) -> list[str]:
    """Shell lines with their continuations joined (a trailing backslash, or a doubled one in a docstring)."""
    return [line.strip() for line in re.sub(r"\\\\?\n", " ", text).splitlines() if line.strip()]


def script_calls(text: str, where: str) -> list[tuple[str, str, list[str]]]:
    """(where, script, argv) for each command in `text` that runs one of SCRIPTS."""
    found = []
    for line in commands(text):
        if not re.match(r"(\S*python3?|accelerate|\$PY)\s", line):        # a command, not prose that names one
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i, word in enumerate(words):
            if Path(word).name in SCRIPTS and (i == 0 or words[i - 1] in ("python", "python3", "$PY")
                                              or words[i - 1].endswith(("python", ".yaml", "launch"))):
                found.append((where, Path(word).name, words[i + 1:]))
                break
    return found


def all_calls():
    calls = [c for block in bash_blocks(README) for c in script_calls(block, "README.md")]
    for doc in sorted((ROOT / "docs").glob("*.md")):
        calls += [c for block in bash_blocks(doc.read_text()) for c in script_calls(block, f"docs/{doc.name}")]
    calls += script_calls((ROOT / "scripts" / "toy_pipeline.sh").read_text(), "scripts/toy_pipeline.sh")
    for script in SCRIPTS:
        calls += script_calls(ast.get_docstring(ast.parse((ROOT / script).read_text()), clean=False),
                              f"{script} docstring")
    return calls


def test_there_are_commands_to_check():
    scripts = {script for _, script, _ in all_calls()}
    assert scripts == set(SCRIPTS) and len(all_calls()) > 20


@pytest.mark.parametrize("where, script, argv", all_calls(), ids=lambda v: v if isinstance(v, str) else None)
def test_each_shown_command_parses(where, script, argv, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)                              # presets are named relative to the repository
    args_class = importlib.import_module(script.removesuffix(".py")).Args
    try:
        config.parse_args(args_class, argv)
    except SystemExit:
        error = capsys.readouterr().err.strip().splitlines()[-1]
        pytest.fail(f"{where}: `{script} {' '.join(argv)}` does not parse: {error}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_examples_keep_their_line_breaks(script):
    """A backslash at the end of a docstring line joins it to the next one unless doubled (evaluate.py's did)."""
    source = (ROOT / script).read_text()
    node = ast.parse(source).body[0].value
    raw = ast.get_source_segment(source, node)
    doc = importlib.import_module(script.removesuffix(".py")).__doc__
    assert doc.count("\n") == raw.count("\n"), f"{script}: a line of the docstring ends in a single backslash"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_each_default_once(script):
    """Each option with a default shows it, once: not hidden by a help text that says "default" for another
    reason, and not said twice as "(paper: 0.95) (default: 0.95)"."""
    module = importlib.import_module(script.removesuffix(".py"))
    parser = config.make_parser(module.Args, module.__doc__)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.default in (None, False) or action.dest in ("help", "config"):
            continue
        text = " ".join(formatter._expand_help(action).split())
        assert str(action.default) in text, f"{script} {action.option_strings[0]}: the default is not shown: {text}"
        paper = re.search(r"\(paper: ([^)]*)\)", text)
        assert not (paper and f"(default: {paper.group(1)})" in text), f"{script} {action.option_strings[0]}: {text}"


def _minutes(text: str, what: str) -> str:
    m = re.search(rf"{what}.*?about ([\d-]+) minutes", text, re.S)
    assert m, f"no 'about N minutes' after {what!r}"
    return m.group(1)


def test_stated_times_agree():
    first = bash_blocks(README)[0]
    header = (ROOT / "scripts" / "toy_pipeline.sh").read_text().split("\nset ")[0]
    assert _minutes(first, "run the whole recipe") == _minutes(header, "on a CPU")
    tests_section = README.split("## Tests")[1]
    assert _minutes(first, "run the tests") == _minutes(tests_section, "on CPU with the tiny model")


def test_a_cpu_only_machine_has_its_own_install_line():
    """Issue: on a CPU-only machine `pip install -r requirements.txt` fetches torch's CUDA build and ~2.4 GB of
    nvidia packages. requirements-cpu.txt takes torch from PyTorch's CPU wheel index and everything else from
    requirements.txt; the README's first screen says which file to use."""
    cpu = (ROOT / "requirements-cpu.txt").read_text()
    assert re.search(r"^--(extra-)?index-url https://download\.pytorch\.org/whl/cpu$", cpu, re.M)
    assert re.search(r"^-r requirements\.txt$", cpu, re.M)
    first = bash_blocks(README)[0]
    assert "-r requirements-cpu.txt" in first and "-r requirements.txt" in first
    assert README.index("```bash") < 1500                  # on the first screen
