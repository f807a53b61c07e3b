"""Two processes on one CPU: `torchrun --nproc_per_node 2` runs train_grpo.py and train_sft.py on the
tiny model (gloo + DDP). GRPO runs through tests/grpo_ddp_probe.py, which records on
each process what it rolled out and normalised, so the test can check that groups stay whole
(docs/pitfalls.md #3) and that the processes' weights stay in sync."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path


from minivr1 import data, training
from minivr1.chat import prompt_batch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, args, tmp_path, extra_env=None):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **(extra_env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    (tmp_path / "torchrun.log").write_text(log)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{log[-4000:]}"
    # the gloo exit crash (distributed.shutdown) the scripts guard against by freeing DDP before end_training
    assert "terminate called" not in log, log[-4000:]
    return log


def unpadded(row, pad_id):
    return [t for t in row if t != pad_id]


def test_grpo_two_processes_keep_groups_whole(tiny_model_dir, toy_dir, processor, tmp_path):
    out, probe = tmp_path / "run", tmp_path / "probe"
    P, G, steps = 4, 2, 2
    torchrun(ROOT / "tests" / "grpo_ddp_probe.py",
             ["--model", tiny_model_dir, "--data", toy_dir / "data" / "rl_train.jsonl", "--output_dir", out,
              "--mode", "lora", "--stages", f"24x{G}:{steps}", "--prompts_per_step", P, "--micro_batch_size", 2,
              "--learning_rate", 1e-2, "--reward", "length_mod3", "--save_steps", 1, "--sample_every", 0],
             tmp_path, {"GRPO_PROBE_DIR": str(probe)})

    # it trained: final/ saved, metrics written once per step (by rank 0 only)
    assert (out / "final" / "adapter_model.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]

    problems, _ = data.read_problems(toy_dir / "data" / "rl_train.jsonl")
    by_id = {p.id: p for p in problems}
    pad = processor.tokenizer.pad_token_id
    for step in range(steps):
        # the step's global batch of P prompts is split into two halves of whole prompts
        want = [problems[i].id for i in training.batch_indices(len(problems), P, step, seed=0)]
        got = [r["prompts"][step] for r in ranks]
        assert [g["ids"] for g in got] == [want[:P // 2], want[P // 2:]]
        assert all(g["repeat"] == G for g in got)
        for r in ranks:
            # each process generated its own prompts, each G times in a row: rows [p0, p0, p1, p1]
            rows = r["rollout"][step]
            own = r["prompts"][step]["ids"]
            assert len(rows) == len(own) * G
            for i, row in enumerate(rows):
                alone = prompt_batch(processor, [by_id[own[i // G]]])["input_ids"][0].tolist()
                assert unpadded(row, pad) == unpadded(alone, pad), (step, i)
            # and normalised advantages over its own rewards, in groups of G
            assert r["advantages"][step] == [len(own) * G, G]

    # DDP kept the processes' weights identical, and they changed
    assert ranks[0]["params"] == ranks[1]["params"]
    assert [p[0] for p in ranks[0]["params"]] == [1, 2]
    assert ranks[0]["params"][0][1:] != ranks[0]["params"][1][1:]


def test_grpo_two_processes_dynamic_sampling_and_token_budget(tiny_model_dir, toy_dir, tmp_path):
    """--dynamic_sampling and --micro_batch_tokens under 2 processes: each process drops its own groups with no
    signal and fills its own share with other prompts (whole groups), both make the same number of rollouts per
    step (the rounds are agreed) and train exactly their share, the token-budget micro-batch counts are made equal
    (else DDP would hang here), and the weights stay in sync."""
    out, probe = tmp_path / "run", tmp_path / "probe"
    P, G, steps = 4, 2, 2
    torchrun(ROOT / "tests" / "grpo_ddp_probe.py",
             ["--model", tiny_model_dir, "--data", toy_dir / "data" / "rl_train.jsonl", "--output_dir", out,
              "--mode", "lora", "--stages", f"24x{G}:{steps}", "--prompts_per_step", P, "--micro_batch_tokens", 150,
              "--learning_rate", 1e-2, "--reward", "numbers_only", "--save_steps", 1, "--sample_every", 0,
              "--dynamic_sampling", "--max_extra_rollouts", 3],
             tmp_path, {"GRPO_PROBE_DIR": str(probe)})
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]

    def per_step(events, kind):      # per step, the values of its events of this kind
        steps = [[]]
        for event in events:
            if event[0] == kind:
                steps[-1].append(event[1:])
            if event[0] == "advantages":
                steps.append([])
        return steps[:-1] if kind != "micro" else steps[1:]     # micro-batches are made after the advantages

    problems, _ = data.read_problems(toy_dir / "data" / "rl_train.jsonl")
    rounds = [per_step(r["events"], "generate") for r in ranks]
    micro = [per_step(r["events"], "micro") for r in ranks]
    extra, uneven = 0, 0
    for step in range(steps):
        want = [problems[i].id for i in training.batch_indices(len(problems), P, step, seed=0)]
        assert [rounds[r][step][0][0] for r in (0, 1)] == [want[:P // 2], want[P // 2:]]   # each its own share first
        assert len(rounds[0][step]) == len(rounds[1][step])                               # the same number of rollouts
        extra += len(rounds[0][step]) - 1
        assert metrics[step]["sampled_groups"] == sum(len(c[0]) for r in (0, 1) for c in rounds[r][step])
        # micro-batches: each process's own count, then both make the larger one
        (own0, _), (final0, asked0) = micro[0][step]
        (own1, _), (final1, asked1) = micro[1][step]
        assert final0 == final1 == asked0 == asked1 == max(own0, own1)
        uneven += own0 != own1
    assert extra > 0, "precondition: some step needed extra rollouts"
    assert uneven > 0, "precondition: some step's processes needed different numbers of micro-batches"
    assert all(a == [P // 2 * G, G] for r in ranks for a in r["advantages"])             # each trained its share
    assert ranks[0]["params"] == ranks[1]["params"] and ranks[0]["params"][0][1:] != ranks[0]["params"][1][1:]


def test_sft_two_processes(tiny_model_dir, toy_dir, tmp_path):
    out = tmp_path / "run"
    torchrun(ROOT / "train_sft.py",
             ["--model", tiny_model_dir, "--data", toy_dir / "data" / "cold_start.json", "--output_dir", out,
              "--max_steps", 2, "--per_device_batch_size", 1, "--gradient_accumulation_steps", 2,
              "--logging_steps", 1, "--save_steps", 0, "--learning_rate", 1e-3],
             tmp_path)
    assert any((out / "final").glob("*.safetensors"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
