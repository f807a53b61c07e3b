"""Script arguments: one dataclass per script, parsed by transformers' `HfArgumentParser` (as TRL's,
open-r1's and LLaMA-Factory's scripts are), plus YAML presets.

    @dataclass
    class Args:
        learning_rate: float = arg(1e-6, "peak learning rate")
        freeze_vision: bool = arg(True, "keep the vision tower frozen")
        optim: str = arg("adamw", "optimizer", choices=["adamw", "adamw_8bit"])

    args = parse_args(Args, description=__doc__)

Priority, lowest first: the dataclass defaults, `--config preset.yaml` (a mapping `field_name:
value`, checked key by key), then command-line flags. Booleans: `--freeze_vision`,
`--freeze_vision false`, `--no_freeze_vision`. `X | None` string fields take `none` for None.
A field declared `required(help)` has no default: a flag or the preset must give it (the data, the
model and the output folder: no silent toy defaults outside the toy's presets).
Every field must have help text (`arg(default, help)`): building the parser fails otherwise, so
the `--help` test catches an undocumented hyperparameter. `save_args` writes a run's exact
arguments as JSON.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from minivr1.cli import UserError

T = TypeVar("T")
NONE_STRINGS = ("none", "None", "null")


class ConfigError(UserError, ValueError):
    """A preset file or value that cannot be used; the message names the file and the key."""


def arg(default: Any, help: str, **argparse_kwargs) -> Any:
    """A dataclass field with its default and its --help text, on one line (e.g. choices=[...])."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default),
                                 metadata={"help": help, **argparse_kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


def required(help: str, **argparse_kwargs) -> Any:
    """A field with no default: the flag (or the --config preset) must give it. Keyword-only, so it may
    come after fields with defaults."""
    return dataclasses.field(kw_only=True, metadata={"help": help, **argparse_kwargs})


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's line breaks; shows the default once: "(paper: X)" gets "(the default)" where the
    default is the paper's value, else "(default: X)" is appended unless the help says what it is."""

    def _get_help_string(self, action):
        text = (action.help or "").replace("%", "%%")          # a literal % in a help text
        if action.default in (None, argparse.SUPPRESS, False) or not action.option_strings \
                or action.option_strings[0].startswith("--no") or re.search(r"\(default\b|\bdefault:", text):
            return text
        if f"(paper: {action.default})" in text:
            return text + " (the default)"
        return text + " (default: %(default)s)"


def make_parser(cls: type, description: str | None = None):
    """The HfArgumentParser of the dataclass `cls`, with `--config`."""
    from transformers import HfArgumentParser

    for f in _fields(cls):
        if not f.metadata.get("help"):
            raise TypeError(f"{cls.__name__}.{f.name} has no help text: declare it with arg(default, \"help\")")
        if f.name == "config":
            raise TypeError(f"{cls.__name__}: a field may not be called `config` (reserved for --config)")
    parser = HfArgumentParser(cls, description=description, formatter_class=_Formatter)
    parser.add_argument("--config", metavar="PATH", default=None,
                        help="YAML file of `field_name: value` pairs that replace the defaults; flags override it")
    return parser


def parse_args(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parse `argv` (default: sys.argv[1:]) into an instance of the dataclass `cls`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser(cls, description)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        preset = load_yaml_defaults(cls, known.config)
        parser.set_defaults(**preset)          # so --help shows them as the defaults, and flags still win
        for action in parser._actions:         # a required field the preset gives is no longer required
            if action.dest in preset:
                action.required = False
    namespace = parser.parse_args(argv)
    values = {f.name: getattr(namespace, f.name) for f in _fields(cls)}
    for name, annotation in _hints(cls).items():
        if _optional(annotation) is str and values.get(name) in NONE_STRINGS:
            values[name] = None
    return cls(**values)


def load_yaml_defaults(cls: type, path: str | Path) -> dict[str, Any]:
    """A YAML preset for `cls`, every key and value checked; errors name the file and key."""
    import yaml  # only needed with --config

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path}: expected a mapping of field_name: value, got {type(values).__name__}")
    hints, choices = _hints(cls), {f.name: f.metadata.get("choices") for f in _fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"config file {path}: unknown key {key!r} for {cls.__name__}. "
                              f"Valid keys: {', '.join(sorted(hints))}")
        out[key] = _check_value(hints[key], value, choices[key], f"config file {path}, key {key!r}")
    return out


def _check_value(annotation: Any, value: Any, choices: list | None, where: str) -> Any:
    """`value` as the field's type (numbers written as strings are converted, as on the command line)."""
    base, is_list = _optional(annotation), False
    if typing.get_origin(base) is list:
        base, is_list = (typing.get_args(base) or (str,))[0], True
    if typing.get_origin(base) is typing.Literal:
        choices, base = list(typing.get_args(base)), type(typing.get_args(base)[0])

    def one(v):
        if base is bool:
            if not isinstance(v, bool):
                raise ConfigError(f"{where}: expected true or false, got {v!r}")
            return v
        wrong = isinstance(v, bool) or (base is str and not isinstance(v, str)) or (base is int and isinstance(v, float))
        if wrong:
            raise ConfigError(f"{where}: expected {base.__name__}, got {v!r} ({type(v).__name__})")
        try:
            v = base(v)                    # PyYAML reads `1e-5` (no dot) as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {base.__name__}, got {v!r}") from None
        if choices and v not in choices:
            raise ConfigError(f"{where}: {v!r} is not one of {list(choices)}")
        return v

    if value is None:
        if _optional(annotation) is not annotation:
            return None
        raise ConfigError(f"{where}: expected {base.__name__} (this field may not be null)")
    if is_list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [one(v) for v in value]
    return one(value)


def _fields(cls: type) -> list[dataclasses.Field]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"expected a dataclass, got {cls!r}")
    return [f for f in dataclasses.fields(cls) if f.init]


def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations (scripts use `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in _fields(cls)}


def _optional(annotation: Any) -> Any:
    """X for `X | None`, else the annotation itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def save_args(args: Any, path: str | Path) -> None:
    """Writes the dataclass `args` as indented JSON (the exact hyperparameters of a run)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(args), indent=2, default=str) + "\n")


def load_args(cls: type[T], path: str | Path) -> T:
    """Reads arguments written by `save_args` back into `cls`; an unknown key is an error."""
    path = Path(path)
    values = {k: v for k, v in json.loads(path.read_text()).items() if k != "derived"}   # rundir's derived values
    names = {f.name for f in _fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown} for {cls.__name__}. Valid keys: {', '.join(sorted(names))}")
    return cls(**values)
