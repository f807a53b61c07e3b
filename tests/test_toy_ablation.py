"""scripts/toy_ablation.py without training: its presets, the stage split of --steps/--quick, the
completion-token count from metrics.jsonl, the per-level report on a hand-made run directory, the
job runner's order and resume, and that its patterns match the toy traces' own sentences."""
from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from minivr1 import stages, toy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("toy_ablation", ROOT / "scripts" / "toy_ablation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                   # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_every_grpo_preset_has_the_same_budget_and_steps(ablation):
    for name, (_, preset, _) in ablation.METHODS.items():
        parsed = stages.parse_stages(ablation.stage_spec(ROOT / preset))
        assert {s.max_completion_length * s.group_size for s in parsed} == {768}, name
        assert sum(s.steps for s in parsed) == 200, name
        assert ablation.read_yaml_key(ROOT / preset, "prompts_per_step") == 8
    assert ablation.stage_spec(ROOT / "configs/toy_grpo_ptst3.yaml") == "96x8:67,128x6:67,192x4:66"
    assert ablation.stage_spec(ROOT / "configs/toy_grpo_ptst3.yaml", 100) == "96x8:34,128x6:33,192x4:33"
    assert ablation.stage_spec(ROOT / "configs/toy_grpo_ptst.yaml", 100) == "96x8:50,192x4:50"


def test_completion_tokens_from_len_and_group_size(ablation):
    metrics = [{"step": 1, "stage": 1, "len": 50.0}, {"step": 2, "stage": 2, "len": 100.5},
               {"step": 3, "stage": 2, "len": 90.0, "completion_tokens": 2000}]
    assert ablation.completion_tokens(metrics, "96x8:1,192x4:2", 8) == [50 * 8 * 8, round(100.5 * 8 * 4), 2000]


def test_patterns_match_the_toy_traces(ablation):
    assert ablation.STEPS_MARK == toy.PLAN
    rng = random.Random(0)
    scene = toy.Scene([(0, 0, "red", "square"), (0, 1, "blue", "square"), (1, 1, "blue", "square")])
    q = toy.make_question(scene, "pairs", rng)
    for loop in (0, 4):
        trace = toy.cold_start_trace(scene, q, rng, n_waits=0, flawed=False, loop=loop)
        assert len(ablation.LOOP_LINE.findall(trace)) == loop == toy.trace_features(trace)["loop"]
        assert (ablation.STEPS_MARK in trace) and toy.trace_features(trace)["steps"]


def _fake_run(out: Path, seeds, methods, ablation):
    """A run directory as the ablation leaves it: eval.jsonl, each model's evaluation, each GRPO run's metrics."""
    (out / "data").mkdir(parents=True)
    ids = [f"eval-{i:05d}" for i in range(6)]
    (out / "data" / "eval.jsonl").write_text("".join(json.dumps({"id": i, "level": k % 3 + 1}) + "\n"
                                                     for k, i in enumerate(ids)))
    for name in methods:
        for s in seeds:
            d = out / f"eval-{name}-s{s}"
            d.mkdir()
            preds = [{"id": i, "correct": k % 3 != 2, "length": 320 if k == 5 else 40 + 10 * k,
                      "response": toy.PLAN if k % 3 else "Wait, let me recount the red shapes."} for k, i in enumerate(ids)]
            (d / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
            (d / "summary.json").write_text(json.dumps({
                "accuracy": 4 / 6, "format_rate": 1.0, "mean_length": 100.0 + s, "mean_waits": 0.5,
                "accuracy_by_length": [{"accuracy": 0.5, "min_length": 40, "max_length": 60}]}))
            if name in ablation.METHODS:
                g = out / f"grpo-{name}-s{s}"
                g.mkdir()
                spec = ablation.stage_spec(ROOT / ablation.METHODS[name][1])
                bounds = [p.steps for p in stages.parse_stages(spec)]
                metrics = []
                step = 0
                for stage, n in enumerate(bounds, 1):
                    for _ in range(n):
                        step += 1
                        metrics.append({"step": step, "stage": stage, "len": 50.0, "truncated": 0.25,
                                        "reward": 0.5, "accuracy": 0.5})
                (g / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_report_per_level_and_tokens(tmp_path, ablation):
    names = ["CI", *ablation.METHODS]
    _fake_run(tmp_path, [0, 1], names, ablation)
    rows = ablation.summarise(tmp_path, [0, 1], names)
    ci, long = rows["CI"], rows["Long"]
    assert ci["levels"]["1"]["accuracy"] == (1.0, 0.0) and ci["levels"]["3"]["accuracy"] == (0.0, 0.0)
    assert ci["levels"]["2"]["steps"][0] == 1.0 and ci["levels"]["1"]["loops"][0] == 1.0
    assert ci["levels"]["2"]["accuracy_steps"] == (1.0, 0.0) and ci["levels"]["2"]["accuracy_no_steps"] == (None, None)
    assert ci["levels"]["3"]["truncated"][0] == 0.5                          # one of level 3's two answers is cut off
    assert ci["mean_length"] == (100.5, 0.5) and "completion_tokens" not in ci
    assert long["completion_tokens"][0] == 200 * 50 * 8 * 4                  # 200 steps of 8 prompts x G 4 x 50 tokens
    assert rows["PTST"]["completion_tokens"][0] == 100 * 50 * 8 * 8 + 100 * 50 * 8 * 4
    assert long["train_truncated_last20"][0] == 0.25
    text = ablation.table(rows, [0, 1]) + "\n" + ablation.level_table(rows)
    for name in names:
        assert f"| {name} |" in text
    assert "accuracy L3" in text and "worked steps L2" in text and "0.32M" in text      # Long's tokens
    assert "| 100% / - |" in text                         # level 2: every answer worked, none without steps
    (tmp_path / "results.json").write_text(json.dumps(rows))                            # JSON-serialisable


def test_plots_when_matplotlib_is_there(tmp_path, ablation):
    pytest.importorskip("matplotlib")
    names = ["CI", *ablation.METHODS]
    _fake_run(tmp_path, [0], names, ablation)
    written = ablation.plots(tmp_path, [0], ablation.summarise(tmp_path, [0], names))
    assert {p.name for p in written} == {"training_curves.png", "accuracy_vs_tokens.png", "accuracy_by_level.png",
                                          "accuracy_vs_length.png"}


def test_jobs_run_after_their_dependencies_and_finished_ones_are_skipped(tmp_path, ablation, capsys):
    order = tmp_path / "order.txt"

    def job(name, deps=()):
        code = f"open({str(order)!r}, 'a').write({name!r} + '\\n'); open({str(tmp_path / name)!r}, 'w').close()"
        return ablation.Job(name, [sys.executable, "-c", code], tmp_path / name, list(deps))

    jobs = [job("a"), job("b", ["a"]), job("c", ["a"]), job("d", ["b", "c"])]
    ablation.run_jobs(jobs, 2, 1, tmp_path)
    done = order.read_text().split()
    assert sorted(done) == list("abcd") and done[0] == "a" and done[-1] == "d"
    (tmp_path / "d").unlink()
    ablation.run_jobs(jobs, 2, 1, tmp_path)                   # a rerun redoes only what is missing
    assert order.read_text().split()[4:] == ["d"]
    assert "a: done before, skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        ablation.run_jobs([job("e", ["missing"])], 2, 1, tmp_path)
