"""Tests for minivr1.config: dataclass -> HfArgumentParser, YAML presets, saving the arguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from minivr1.config import load_args, make_parser, parse_args, save_args


@dataclass
class Args:
    """Arguments of a pretend script."""

    model: str = field(default="tiny", metadata={"help": "model path"})
    lr: float = field(default=1e-5, metadata={"help": "learning rate (100% of the peak)"})
    steps: int = field(default=10, metadata={"help": "optimizer steps"})
    use_lora: bool = field(default=True, metadata={"help": "train a LoRA adapter"})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast"})
    max_samples: int | None = field(default=None, metadata={"help": "cap on the dataset size"})
    run_name: str | None = field(default=None, metadata={"help": "name of the run"})
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={"help": "trackers", "choices": ["none", "tensorboard", "wandb"]},
    )
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "targets"})
    ranks: list[int] = field(default_factory=lambda: [8], metadata={"help": "LoRA ranks per stage"})
    loss: str = field(default="grpo", metadata={"help": "loss variant", "choices": ["grpo", "dapo"]})
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata={"help": "weights dtype"})


DOC = """Pretend script.

Usage:
    python pretend.py --lr 2e-5
"""


def test_defaults():
    assert parse_args(Args, []) == Args()


def test_flags_of_every_type():
    args = parse_args(
        Args,
        "--model m --lr 2e-5 --steps 3 --no_use_lora --bf16 --max_samples 7 --run_name r "
        "--report_to tensorboard wandb --lora_targets a b c --loss dapo --precision bf16 --ranks 4 8".split(),
    )
    assert args == Args(
        model="m", lr=2e-5, steps=3, use_lora=False, bf16=True, max_samples=7, run_name="r",
        report_to=["tensorboard", "wandb"], lora_targets=["a", "b", "c"], loss="dapo", precision="bf16", ranks=[4, 8],
    )  # fmt: skip
    assert isinstance(args.lr, float) and isinstance(args.steps, int)
    assert parse_args(Args, ["--run_name", "none"]).run_name is None
    assert parse_args(Args, ["--use_lora", "false"]).use_lora is False


@pytest.mark.parametrize(
    "argv",
    [["--steps", "1.5"], ["--loss", "ppo"], ["--precision", "fp8"], ["--report_to", "mlflow"], ["--nope", "1"],
     ["--ranks", "4", "x"]],
)
def test_bad_flags_exit(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(Args, argv)


def test_help_shows_description_defaults_and_help(capsys):
    with pytest.raises(SystemExit):
        parse_args(Args, ["--help"], description=DOC)
    out = capsys.readouterr().out
    assert "Usage:\n    python pretend.py --lr 2e-5" in out  # docstring kept verbatim
    assert "--no_use_lora" in out
    assert "learning rate (100% of the peak) (default: 1e-05)" in out
    assert "--config" in out


def test_every_field_needs_help():
    @dataclass
    class Undocumented:
        lr: float = 1e-5

    with pytest.raises(TypeError, match=r"Undocumented\.lr has no help"):
        make_parser(Undocumented)


def test_required_field_and_yaml_can_supply_it(tmp_path):
    @dataclass
    class Req:
        data: str = field(metadata={"help": "dataset path"})
        n: int = field(default=1, metadata={"help": "n"})

    with pytest.raises(SystemExit):
        parse_args(Req, [])
    assert parse_args(Req, ["--data", "d"]) == Req(data="d")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: from_yaml\n")
    assert parse_args(Req, ["--config", str(cfg)]) == Req(data="from_yaml")


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "preset.yaml"
    # `1e-4` without a dot is a *string* to PyYAML: it must still work.
    cfg.write_text("lr: 1e-4\nsteps: 5\nuse_lora: false\nreport_to: [tensorboard]\nmax_samples: null\n")
    args = parse_args(Args, ["--config", str(cfg)])
    assert (args.lr, args.steps, args.use_lora, args.report_to) == (1e-4, 5, False, ["tensorboard"])
    args = parse_args(Args, ["--config", str(cfg), "--steps", "8", "--use_lora"])
    assert (args.lr, args.steps, args.use_lora) == (1e-4, 8, True)


def test_yaml_values_show_as_defaults_in_help(tmp_path, capsys):
    cfg = tmp_path / "preset.yaml"
    cfg.write_text("steps: 123\n")
    with pytest.raises(SystemExit):
        parse_args(Args, ["--config", str(cfg), "--help"])
    assert "(default: 123)" in capsys.readouterr().out


def test_yaml_unknown_key_names_file_key_and_valid_keys(tmp_path):
    cfg = tmp_path / "preset.yaml"
    cfg.write_text("lr: 0.1\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError) as e:
        parse_args(Args, ["--config", str(cfg)])
    msg = str(e.value)
    assert str(cfg) in msg and "'learning_rate'" in msg and "Valid keys:" in msg and "lr" in msg


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("steps: 1.5\n", "steps"),
        ("steps: abc\n", "steps"),
        ("lr: true\n", "lr"),
        ("use_lora: 1\n", "use_lora"),
        ("model: 7\n", "model"),
        ("steps: null\n", "steps"),
        ("loss: ppo\n", "loss"),
        ("report_to: [mlflow]\n", "report_to"),
    ],
)
def test_yaml_bad_value_names_key(tmp_path, yaml_text, key):
    cfg = tmp_path / "preset.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises((TypeError, ValueError), match=f"key '{key}'"):
        parse_args(Args, ["--config", str(cfg)])


def test_yaml_not_a_mapping(tmp_path):
    cfg = tmp_path / "preset.yaml"
    cfg.write_text("- lr\n- steps\n")
    with pytest.raises(ValueError, match="mapping"):
        parse_args(Args, ["--config", str(cfg)])


def test_save_load_roundtrip(tmp_path):
    args = parse_args(Args, ["--lr", "3e-6", "--report_to", "wandb", "--max_samples", "4"])
    assert args.max_samples == 4
    save_args(args, tmp_path / "run" / "args.json")
    assert load_args(Args, tmp_path / "run" / "args.json") == args
    (tmp_path / "bad.json").write_text('{"lr": 0.1, "old_flag": 1}')
    with pytest.raises(ValueError, match="old_flag"):
        load_args(Args, tmp_path / "bad.json")


def test_post_init_still_runs():
    @dataclass
    class Checked:
        g: int = field(default=8, metadata={"help": "group size"})

        def __post_init__(self):
            if self.g < 2:
                raise ValueError("group size must be >= 2")

    with pytest.raises(ValueError, match="group size"):
        parse_args(Checked, ["--g", "1"])
    assert dataclasses.asdict(parse_args(Checked, [])) == {"g": 8}
