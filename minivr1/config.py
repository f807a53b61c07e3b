"""Script arguments as dataclasses: one field per hyperparameter, its help text, its default.

Each training script declares a single `@dataclass class Args` (cleanrl style). `parse_args` turns
it into an argparse parser, so every hyperparameter lives in exactly one place:

    @dataclass
    class Args:
        lr: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
        use_lora: bool = field(default=True, metadata={"help": "train a LoRA adapter"})
        report_to: list[str] = field(default_factory=lambda: ["none"],
                                     metadata={"help": "trackers", "choices": ["none", "tensorboard", "wandb"]})

    args = parse_args(Args, description=__doc__)

Command line, in increasing priority:
    1. the dataclass defaults,
    2. `--config preset.yaml`, a YAML mapping `field_name: value` that replaces defaults,
    3. flags: `--lr 2e-5`, `--use_lora` / `--no-use_lora`, `--report_to tensorboard wandb`
       (or `--report_to tensorboard,wandb`).

Supported field types: int, float, str, bool, `X | None` for those, `list[int|float|str]`, and
`Literal[...]` (its values become the choices). Every field must carry
`metadata={"help": ...}`: building the parser raises otherwise, so a `--help` test catches an
undocumented hyperparameter.

`save_args` / `load_args` write and read the exact arguments as JSON, next to every run and
checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_NONE_STRINGS = ("none", "None", "null")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the script docstring's line breaks and appends `(default: ...)` to every flag."""


@dataclasses.dataclass
class _FieldSpec:
    """What parse_args needs to know about one dataclass field."""

    name: str
    base: type  # int, float, str or bool: the element type for lists
    optional: bool  # `X | None`
    is_list: bool
    choices: list | None
    help: str


def _field_spec(cls: type, f: dataclasses.Field, annotation: Any) -> _FieldSpec:
    """Reads one field's annotation and metadata; raises on anything parse_args cannot express."""
    where = f"{cls.__name__}.{f.name}"
    help_text = f.metadata.get("help")
    if not help_text:
        raise ValueError(f'{where} has no help text: declare it with field(..., metadata={{"help": "..."}})')

    optional = False
    origin, type_args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):  # `X | None` / Optional[X]
        rest = [a for a in type_args if a is not type(None)]
        if len(rest) != 1 or len(type_args) != 2:
            raise TypeError(f"{where}: only `X | None` unions are supported, got {annotation}")
        optional, annotation = True, rest[0]
        origin, type_args = typing.get_origin(annotation), typing.get_args(annotation)

    is_list = False
    if origin is list:
        is_list, annotation = True, type_args[0] if type_args else str
        origin, type_args = typing.get_origin(annotation), typing.get_args(annotation)

    choices = f.metadata.get("choices")
    if origin is typing.Literal:
        choices = list(type_args)
        annotation = type(type_args[0])

    if annotation not in (int, float, str, bool):
        raise TypeError(f"{where}: unsupported type {annotation} (use int, float, str, bool, X | None, list[X])")
    if annotation is bool and (is_list or optional):
        raise TypeError(f"{where}: a bool field must be a plain `bool` (it becomes --flag / --no-flag)")
    return _FieldSpec(f.name, annotation, optional, is_list, list(choices) if choices else None, help_text)


def _field_specs(cls: type) -> list[_FieldSpec]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"parse_args expects a dataclass, got {cls!r}")
    # get_type_hints resolves string annotations (scripts may use `from __future__ import annotations`).
    hints = typing.get_type_hints(cls)
    return [_field_spec(cls, f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _convert(spec: _FieldSpec, text: str) -> Any:
    """Converts one command-line string to the field's (element) type."""
    if spec.optional and text in _NONE_STRINGS:
        return None
    return spec.base(text)


def _split_list(spec: _FieldSpec, values: list) -> list:
    """`--x a,b c` and `--x a b,c` both mean [a, b, c]."""
    out = []
    for v in values:
        parts = v.split(",") if isinstance(v, str) else [v]
        out.extend(spec.base(p.strip()) for p in parts if not (isinstance(p, str) and p.strip() == ""))
    return out


def make_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """Builds the argparse parser for the dataclass `cls` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    parser.add_argument(
        "--config",
        type=str,
        metavar="PATH",
        default=None,
        help="YAML file of `field_name: value` pairs that replace the defaults; flags still override it",
    )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for spec in _field_specs(cls):
        if spec.name == "config":
            raise ValueError(f"{cls.__name__}: a field may not be called `config` (reserved for --config)")
        default = _default(fields[spec.name])
        kwargs: dict[str, Any] = {"help": spec.help.replace("%", "%%"), "dest": spec.name}
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if spec.base is bool:
            parser.add_argument(f"--{spec.name}", action=argparse.BooleanOptionalAction, **kwargs)
            continue
        # Lists are read as raw strings and split/converted after parsing, so commas work too.
        kwargs["type"] = str if spec.is_list else (lambda text, spec=spec: _convert(spec, text))
        if spec.choices:
            kwargs["metavar"] = "{" + ",".join(map(str, spec.choices)) + "}"
        else:
            kwargs["metavar"] = spec.base.__name__.upper()
        if spec.is_list:
            kwargs["nargs"] = "*"  # choices are checked after splitting commas
        elif spec.choices:
            kwargs["choices"] = spec.choices + ([None] if spec.optional else [])
        parser.add_argument(f"--{spec.name}", **kwargs)
    return parser


def _yaml_value(spec: _FieldSpec, value: Any, key_where: str) -> Any:
    """Checks (and, for numbers written as strings, converts) one YAML value for its field."""

    def bad(expected: str) -> TypeError:
        return TypeError(f"{key_where}: expected {expected}, got {value!r} ({type(value).__name__})")

    def one(v: Any) -> Any:
        if spec.base is bool:
            if not isinstance(v, bool):
                raise bad("true or false")
            return v
        if isinstance(v, bool):  # bool is a subclass of int: reject `lr: true`
            raise bad(spec.base.__name__)
        if spec.base is str:
            if not isinstance(v, str):
                raise bad("a string (quote it in YAML)")
            return v
        if isinstance(v, str):
            # PyYAML reads `1e-5` (no dot) as a string: accept it the way the command line does.
            try:
                return spec.base(v)
            except ValueError:
                raise bad(spec.base.__name__) from None
        if spec.base is float and isinstance(v, (int, float)):
            return float(v)
        if spec.base is int and isinstance(v, int):
            return v
        raise bad(spec.base.__name__)

    if value is None:
        if spec.optional:
            return None
        raise bad(spec.base.__name__ + " (this field may not be null)")
    if spec.is_list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise bad("a list")
        value = [one(v.strip() if isinstance(v, str) else v) for v in items]
        bad_items = [v for v in value if spec.choices and v not in spec.choices]
    else:
        value = one(value)
        bad_items = [value] if spec.choices and value not in spec.choices else []
    if bad_items:
        raise ValueError(f"{key_where}: {bad_items[0]!r} is not one of {spec.choices}")
    return value


def load_yaml_defaults(cls: type, path: str | Path) -> dict[str, Any]:
    """Reads a YAML preset for `cls`, checking every key and value; errors name the file and key."""
    import yaml  # only needed with --config

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise TypeError(f"config file {path}: expected a mapping of field_name: value, got {type(data).__name__}")
    specs = {s.name: s for s in _field_specs(cls)}
    out = {}
    for key, value in data.items():
        if key not in specs:
            valid = ", ".join(sorted(specs))
            raise ValueError(f"config file {path}: unknown key {key!r} for {cls.__name__}. Valid keys: {valid}")
        out[key] = _yaml_value(specs[key], value, f"config file {path}, key {key!r}")
    return out


def parse_args(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parses `argv` (default: sys.argv[1:]) into an instance of the dataclass `cls`.

    Priority: dataclass defaults < `--config file.yaml` < command-line flags.
    `description` (pass the script's `__doc__`) is printed verbatim at the top of `--help`.
    """
    parser = make_parser(cls, description)
    # First pass: only --config, so the YAML can become the defaults that --help then shows.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config is not None:
        yaml_values = load_yaml_defaults(cls, known.config)
        parser.set_defaults(**yaml_values)
        for action in parser._actions:  # a required field given in the YAML is no longer required
            if action.dest in yaml_values:
                action.required = False
    ns = parser.parse_args(argv)

    values = {}
    for spec in _field_specs(cls):
        value = getattr(ns, spec.name)
        # A list given on the command line arrives as raw strings; defaults and YAML values are already typed.
        if spec.is_list and value is not None and value is not parser.get_default(spec.name):
            try:
                value = _split_list(spec, value)
            except ValueError as e:
                parser.error(f"argument --{spec.name}: {e}")
            bad = [v for v in value if spec.choices and v not in spec.choices]
            if bad:
                parser.error(f"argument --{spec.name}: invalid choice {bad[0]!r} (choose from {spec.choices})")
        values[spec.name] = value
    return cls(**values)


def save_args(args: Any, path: str | Path) -> None:
    """Writes the dataclass `args` as indented JSON (the exact hyperparameters of a run)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(args), indent=2, default=str) + "\n")


def load_args(cls: type[T], path: str | Path) -> T:
    """Reads arguments written by `save_args` back into `cls`; an unknown key is an error."""
    path = Path(path)
    data = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        valid = ", ".join(sorted(names))
        raise ValueError(f"{path}: unknown keys {unknown} for {cls.__name__}. Valid keys: {valid}")
    return cls(**data)
