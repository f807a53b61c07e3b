"""minivr1.rundir's rules, without a model: which recorded settings a rerun may change, how paths and PTST
stages compare, what --overwrite deletes. (The scripts' own reruns are in test_sft, test_grpo_train,
test_evaluate and test_bridge.)"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from minivr1 import rundir
from minivr1.cli import UserError
from minivr1.config import arg


@dataclass
class Args:
    model: str = arg("m", "model")
    lr: float = arg(1e-3, "learning rate")
    logging: int = arg(10, "log every N steps")
    new_option: int = arg(0, "an option a newer version added")


def _run_with_results(tmp_path, **kw):
    out = rundir.claim(tmp_path / "run")
    rundir.check_settings(out, Args(**kw), ("logging",), {"ptst_stages": "8x4:2"})
    (out / "checkpoints" / "step-0000002").mkdir(parents=True)
    (out / "checkpoints" / "step-0000002" / "trainer_state.json").write_text('{"step": 2, "complete": true}')
    return out


def test_what_a_rerun_may_change(tmp_path, monkeypatch):
    out = _run_with_results(tmp_path, model="runs/x")
    monkeypatch.chdir(tmp_path)
    rundir.check_settings(out, Args(model="./runs/x", logging=99), ("logging",), {"ptst_stages": "8x4:2"})
    with pytest.raises(UserError, match=r"model \./runs/x -> runs/y; lr 0\.001 -> 0\.002"):
        rundir.check_settings(out, Args(model="runs/y", lr=2e-3), ("logging",), {"ptst_stages": "8x4:2"})
    # a setting (or derived value) the record lacks, written by an older version: fine at its default only
    record = json.loads((out / "args.json").read_text())
    older = {k: v for k, v in record.items() if k not in ("new_option", "derived")}
    (out / "args.json").write_text(json.dumps(older))
    with pytest.raises(UserError, match=r"new_option \(not recorded\) -> 1"):
        rundir.check_settings(out, Args(model="runs/x", new_option=1), ("logging",), {"ptst_stages": "8x4:2"})
    rundir.check_settings(out, Args(model="runs/x"), ("logging",), {"ptst_stages": "8x4:2"})


@pytest.mark.parametrize("new, problem", [("8x4:2,16x2:2", None), ("8x4:5", None), ("8x4:1,16x2:3", "not the same"),
                                          ("8x4:1", "fewer steps")])
def test_ptst_stages_may_change_after_the_steps_already_run(tmp_path, new, problem):
    out = _run_with_results(tmp_path)                    # 2 steps of 8x4 already run
    if problem is None:
        rundir.check_settings(out, Args(), ("logging",), {"ptst_stages": new})
    else:
        with pytest.raises(UserError, match=rf"ptst_stages 8x4:2 -> {new} \({problem}"):
            rundir.check_settings(out, Args(), ("logging",), {"ptst_stages": new})


def test_overwrite_deletes_only_what_minivr1_writes(tmp_path):
    out = _run_with_results(tmp_path)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("mine")
    rundir.claim(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.txt"]
