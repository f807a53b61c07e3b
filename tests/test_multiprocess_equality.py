"""Two processes reach the same weights and log the same metrics as one, on the same global batch.

SFT: 1 process x 2 conversations per micro-batch x 2 accumulation steps == 2 processes x 1 x 2 (the
global batch of 4 is cut into contiguous shares per process, training.batch_indices). GRPO: 4 prompts
per step, G completions each, over 1 process or 2 (2 whole groups each), through PTST stages whose
micro-batch count changes; once with the paper's per-sequence mean (LoRA, the reference is the
adapter-disabled model) and once with the token mean (full fine-tuning, the reference a frozen copy),
where a per-process denominator would show. GRPO rollouts are made independent of which process
owns a prompt by tests/equality_probe.py; everything else is the scripts' own code.

The 2-process side runs under `torchrun` (gloo + DDP: `accelerate launch --cpu` starts only one process here), all runs in one launch; the
1-process side runs in this process. A negative control, the token-mean run with per-process
denominators, must NOT match: it proves the comparison can see the bug it is there to catch.
The same 2-process runs are repeated under FSDP2, DeepSpeed ZeRO-2 and ZeRO-3, which accelerate
only runs on accelerators; tests/cpu_backends.py builds those states over gloo on the CPU. (The
loss scale that ignored DeepSpeed's own accumulation count failed the ZeRO-2 runs: weights off by
up to 1.4e-2.)
"""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import equality_probe
from minivr1 import data, models, training
from minivr1.chat import prompt_batch
from conftest import make_eos_likely

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"t_rollout", "t_update", "tok_per_s", "label_tokens_per_s", "time"}
# fp32 with a different reduction order (DDP's all-reduce, other padding, other micro-batches): the
# measured differences are ~1e-7..1e-6; the broken denominator gives ~1e-3.
WEIGHT_ATOL = 1e-5
# FSDP2's reduce-scatter and DeepSpeed's bucketed reductions sum in yet other orders: their metrics
# agree with 1 process to ~1e-6 (relative), but Adam divides each coordinate by its own gradient
# scale, which turns rounding in the near-zero gradient coordinates into weight differences of up to
# ~2.5e-5 (lr 1e-2). A wrong loss scale or a split group shows in the metrics (grad_norm, kl, loss).
SHARDED_WEIGHT_ATOL = 5e-5
METRIC_RTOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def eos_model_dir(tiny_model_dir, processor, toy_dir, tmp_path_factory):
    """The tiny model with <|im_end|> made likely, so completions end at different lengths: with every
    completion at the limit, every process holds the same token count and a per-process token mean
    would equal the global one (the test could not catch it)."""
    out = tmp_path_factory.mktemp("eq") / "model"
    shutil.copytree(tiny_model_dir, out)
    model = models.load_for_inference(out, dtype="fp32")
    problems, _ = data.read_problems(toy_dir / "data" / "rl_train.jsonl")
    batch = prompt_batch(processor, problems[:4], repeat=4)
    make_eos_likely(model, processor, batch, 16)
    model.save_pretrained(out)
    return out


def grpo_args(model_dir, toy_dir, out, **kw):
    args = dict(model=str(model_dir), data=str(toy_dir / "data" / "rl_train.jsonl"), output_dir=str(out),
                stages="16x4:2,32x2:1", prompts_per_step=4, micro_batch_size=4, learning_rate=1e-3, beta=0.04,
                reward="length_mod3", save_steps=0, sample_every=0, seed=0, resume=None)
    return {**args, **kw}


def sft_args(model_dir, toy_dir, out, **kw):
    args = dict(model=str(model_dir), data=str(toy_dir / "data" / "cold_start.json"), output_dir=str(out),
                mode="full", max_steps=3, learning_rate=1e-3, logging_steps=1, save_steps=0, seed=0, resume=None)
    return {**args, **kw}


GRPO_RUNS = {   # name: overrides
    "grpo_seq_mean_lora": dict(loss_aggregation="seq_mean", mode="lora", lora_r=8, lora_alpha=16, learning_rate=1e-2),
    "grpo_token_mean_full": dict(loss_aggregation="token_mean", mode="full"),
}
# under DDP only: micro-batches by token budget (rows sorted by length, each process as many micro-batches as the
# process that needs most), with the token mean, whose denominator would show a micro-batch lost or counted twice
DDP_RUNS = {"grpo_token_budget": dict(loss_aggregation="token_mean", mode="full", micro_batch_tokens=150)}


def two_process_spec(backend, tiny_model_dir, eos_model_dir, toy_dir, tmp, broken: bool = False) -> dict:
    return {"records": str(tmp / "records2"), "backend": backend, "runs": [
        {"name": "sft", "script": "sft",
         "args": sft_args(tiny_model_dir, toy_dir, tmp / "2" / "sft", per_device_batch_size=1, gradient_accumulation_steps=2)},
        *[{"name": name, "script": "grpo", "args": grpo_args(eos_model_dir, toy_dir, tmp / "2" / name, **kw)}
          for name, kw in (GRPO_RUNS | (DDP_RUNS if backend == "ddp" else {})).items()],
        *([{"name": "broken", "script": "grpo", "break": "local_denominators",
            "args": grpo_args(eos_model_dir, toy_dir, tmp / "2" / "broken", **GRPO_RUNS["grpo_token_mean_full"])}]
          if broken else []),
    ]}


def start_torchrun(spec: dict, tmp: Path):
    """`torchrun --nproc_per_node 2 tests/equality_probe.py SPEC` in the background: (process, log path)."""
    path = tmp / f"spec-{spec['backend']}.json"
    path.write_text(json.dumps(spec))
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(ROOT / "tests" / "equality_probe.py"), str(path)]
    log_path = tmp / f"torchrun-{spec['backend']}.log"
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log_path


def finish_torchrun(proc, log_path: Path, timeout: float = 300) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = log_path.read_text()
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{text[-4000:]}"
    assert "terminate called" not in text, text[-4000:]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, eos_model_dir, toy_dir, tmp_path_factory):
    """Every run with 1 process (here) and with 2 under DDP (torchrun, in the background meanwhile)."""
    tmp = tmp_path_factory.mktemp("equality")
    one = {"records": str(tmp / "records1"), "runs": [
        {"name": "sft", "script": "sft",
         "args": sft_args(tiny_model_dir, toy_dir, tmp / "1" / "sft", per_device_batch_size=2, gradient_accumulation_steps=2)},
        *[{"name": name, "script": "grpo", "args": grpo_args(eos_model_dir, toy_dir, tmp / "1" / name, **kw)}
          for name, kw in (GRPO_RUNS | DDP_RUNS).items()],
    ]}
    proc, log_path = start_torchrun(two_process_spec("ddp", tiny_model_dir, eos_model_dir, toy_dir, tmp, broken=True), tmp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # the tiny model gains nothing from threads; leave the cores to torchrun
    try:
        equality_probe.run_all(one)
    finally:
        torch.set_num_threads(threads)
        equality_probe.reset_accelerate()
        finish_torchrun(proc, log_path)
    return {"1": tmp / "1", "2": tmp / "2", "records1": Path(one["records"]), "records2": tmp / "records2"}


@pytest.fixture(scope="module", params=["fsdp", "zero2", "zero3"])
def sharded_runs(request, runs, tiny_model_dir, eos_model_dir, toy_dir, tmp_path_factory):
    """The same 2-process runs under FSDP2 / DeepSpeed ZeRO-2 / ZeRO-3 on CPU (tests/cpu_backends.py),
    next to the 1-process runs of `runs`."""
    tmp = tmp_path_factory.mktemp(f"equality-{request.param}")
    finish_torchrun(*start_torchrun(two_process_spec(request.param, tiny_model_dir, eos_model_dir, toy_dir, tmp), tmp))
    return {"backend": request.param, "1": runs["1"], "2": tmp / "2", "records1": runs["records1"],
            "records2": tmp / "records2"}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """A LoRA adapter's tensors as saved; a full checkpoint's as transformers loads it (the names in the
    file may differ: under ZeRO-3, transformers writes Qwen2.5-VL's keys in another, equally loadable form)."""
    if (model_dir / "adapter_model.safetensors").is_file():
        return {k: v.float() for k, v in load_file(model_dir / "adapter_model.safetensors").items()}
    return {k: v.float() for k, v in models.load_for_inference(model_dir, dtype="fp32").state_dict().items()}


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a / "final"), weights(b / "final")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def max_weight_change(run_dir: Path, start: Path) -> float:
    w, w0 = weights(run_dir / "final"), weights(start)
    return max((w[k] - w0[k]).abs().max().item() for k in w)


def metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(one: list[dict], two: list[dict]):
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for m1, m2 in zip(one, two):
        assert m1.keys() == m2.keys()
        for k in m1:
            assert m2[k] == pytest.approx(m1[k], rel=METRIC_RTOL, abs=1e-7), (m1["step"], k, m1[k], m2[k])


def check_sft(runs, tiny_model_dir, atol=WEIGHT_ATOL):
    diff = max_weight_diff(runs["1"] / "sft", runs["2"] / "sft")
    print(f"sft: max |w1 - w2| = {diff:.2e}, max |w1 - w0| = {max_weight_change(runs['1'] / 'sft', tiny_model_dir):.2e}")
    assert diff <= atol
    assert max_weight_change(runs["1"] / "sft", tiny_model_dir) > 1e-3          # it trained
    # loss (a mean over the label tokens of the whole global batch) and grad_norm are global
    assert_same_metrics(metrics(runs["1"] / "sft"), metrics(runs["2"] / "sft"))


def check_grpo(runs, name, toy_dir, atol=WEIGHT_ATOL):
    diff = max_weight_diff(runs["1"] / name, runs["2"] / name)
    print(f"{name}: max |w1 - w2| = {diff:.2e}")
    assert diff <= atol
    # every logged metric (reward, accuracy, format, len, len_max, truncated, zero_var, kl, clip, loss,
    # grad_norm, lr) is that of the global batch, not of one process
    m1, m2 = metrics(runs["1"] / name), metrics(runs["2"] / name)
    assert_same_metrics(m1, m2)
    assert [m["stage"] for m in m1] == [1, 1, 2]
    assert m1[-1]["kl"] > 0 and m1[-1]["grad_norm"] > 0                     # the KL and gradients were live
    assert 0 < m1[0]["truncated"] < 1, "precondition: completions of different lengths"

    # groups stayed whole: per step, process r rolled out the r-th contiguous half of the 1-process
    # prompts, each G times in a row (equality_probe asserts the rows), and the halves partition them
    problems, _ = data.read_problems(toy_dir / "data" / "rl_train.jsonl")
    one = json.loads((runs["records1"] / f"{name}-rank0.json").read_text())["steps"]
    two = [json.loads((runs["records2"] / f"{name}-rank{r}.json").read_text())["steps"] for r in (0, 1)]
    for step, s1 in enumerate(one):
        want = [problems[i].id for i in training.batch_indices(len(problems), 4, step, seed=0)]
        assert s1["ids"] == want
        assert [t[step]["ids"] for t in two] == [want[:2], want[2:]]
        assert s1["G"] == two[0][step]["G"] == two[1][step]["G"]


def test_sft_two_processes_equal_one(runs, tiny_model_dir):
    check_sft(runs, tiny_model_dir)


@pytest.mark.parametrize("name", list(GRPO_RUNS) + list(DDP_RUNS))
def test_grpo_two_processes_equal_one(runs, name, toy_dir):
    check_grpo(runs, name, toy_dir)


def test_sft_sharded_equals_one_process(sharded_runs, tiny_model_dir):
    """FSDP2 / ZeRO-2 / ZeRO-3 with 2 processes: the same weights and metrics as 1 process."""
    check_sft(sharded_runs, tiny_model_dir, SHARDED_WEIGHT_ATOL)


@pytest.mark.parametrize("name", list(GRPO_RUNS))
def test_grpo_sharded_equals_one_process(sharded_runs, name, toy_dir):
    """GRPO under FSDP2 (rollouts on gathered parameters, a sharded reference for full fine-tuning) and
    DeepSpeed (ZeRO-3: synced generation, a ZeRO-3 reference engine; the engine's own accumulation
    count in the loss scale, with 2 and 1 micro-batches per step across the PTST stages)."""
    check_grpo(sharded_runs, name, toy_dir, SHARDED_WEIGHT_ATOL)


def test_per_process_denominator_is_caught(runs, eos_model_dir):
    """The negative control: the token-mean run with per-process sequence and token counts in the loss
    (what a per-process token mean would be) differs from 1 process, in weights and in grad_norm."""
    good, bad = runs["1"] / "grpo_token_mean_full", runs["2"] / "broken"
    diff = max_weight_diff(good, bad)
    print(f"broken: max |w1 - w2| = {diff:.2e}, max |w1 - w0| = {max_weight_change(good, eos_model_dir):.2e}")
    assert diff > 20 * WEIGHT_ATOL
    norms = [(m1["grad_norm"], m2["grad_norm"]) for m1, m2 in zip(metrics(good), metrics(bad))]
    assert any(abs(a - b) > 0.01 * a for a, b in norms), norms
