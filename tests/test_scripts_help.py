"""`--help` of every script and command-line module: it runs (exit 0, no model or data needed) and
documents every argument. The scripts' flags come from their `Args` dataclass, so each field must
appear as `--name` with its help text; the modules use plain argparse, so their options are listed.

All commands run in parallel (each pays ~2 s of imports), so the file takes a few seconds.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_sft.py", "train_grpo.py", "evaluate.py", "bridge.py"]
# python -m module --help: what each must mention (positional arguments, options, sub-commands)
MODULES = {
    "minivr1.toy": ["out_dir", "--n_train", "--n_eval", "--n_cold", "--seed", "--model_size", "--family"],
    "minivr1.tiny": ["out_dir", "--seed", "--family", "--params", "tiny", "small", "qwen2_5_vl", "sizes tiny, small, 3b, 7b",
                     "qwen3_vl", "sizes tiny, small, 4b, 8b", "qwen3_5", "sizes tiny, small, 4b, 9b", "idefics3"],
    "minivr1.models": ["merge", "ADAPTER_DIR", "OUT_DIR", "fsdp-classes"],
}


def _squash(text: str) -> str:
    """Whitespace removed: argparse re-wraps help text (and may break lines at hyphens)."""
    return re.sub(r"\s+", "", text)


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    commands = {s: [sys.executable, s, "--help"] for s in SCRIPTS}
    commands.update({m: [sys.executable, "-m", m, "--help"] for m in MODULES})
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, cmd in commands.items()}
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return results


def _args_class(script: str):
    module = importlib.import_module(script.removesuffix(".py"))
    return module.Args


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_documents_every_args_field(helps, script):
    result = helps[script]
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("usage:"), out[:200]
    cls = _args_class(script)
    fields, types = dataclasses.fields(cls), typing.get_type_hints(cls)
    assert len(fields) > 5
    flat = _squash(out)
    for f in fields:
        assert re.search(rf"--{f.name}\b", out), f"{script} --help does not mention --{f.name}"
        assert _squash(f.metadata["help"]) in flat, f"{script} --help lacks the help text of --{f.name}"
        if types[f.name] is bool:                    # --flag, --flag false, and --no_flag where on by default
            assert re.search(rf"--{f.name} \[\w+\]", out), f"{script}: bool field {f.name} takes no true/false"
            if f.default is True:
                assert f"--no_{f.name}" in out, f"{script}: bool field {f.name} has no --no_{f.name}"
    # the module docstring is the manual: --help starts with it (its first line, at least)
    first_line = sys.modules[script.removesuffix(".py")].__doc__.strip().splitlines()[0]
    assert first_line in out


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_help(helps, module):
    result = helps[module]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:")
    for word in MODULES[module]:
        assert word in result.stdout, f"python -m {module} --help does not mention {word}"
