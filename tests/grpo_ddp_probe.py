"""Runs train_grpo.py unchanged (same flags) while recording, on every process, what that process
rolled out and trained on; tests/test_multiprocess.py starts it under torchrun and reads the records.

The wrappers only observe: each calls the real function and returns its result. Per process,
written at the end to $GRPO_PROBE_DIR/rank{RANK}.json:
    prompts      per step: the problem ids handed to the rollout engine and G
    rollout      per step: the prompt rows of the rollout (token ids, as lists)
    advantages   per step: (number of rewards, G) that group_advantages normalised
    params       per checkpoint save: (step, sum and sum of squares of the trainable weights)
    events       in order: ["generate", problem ids] per call of the rollout engine, ["advantages", n] per step
                 (with --dynamic_sampling a step may call the engine several times), ["micro", n, count] per
                 call of training.token_budget_micro_batches (n micro-batches made for the count asked, 0 = any)
"""
import json
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # the repository root, for train_grpo

import train_grpo  # noqa: E402
from minivr1 import checkpoint, config, grader, training  # noqa: E402

records = {"prompts": [], "rollout": [], "advantages": [], "params": [], "events": []}


def length_reward(text, answer, **meta):
    """A reward that varies within groups on a random model: gives every step a gradient."""
    return float(len(text) % 3)


def numbers_only_reward(text, answer, **meta):
    """length_reward for counting questions, constant for multiple choice: those groups have no signal."""
    return length_reward(text, answer) if answer.isdigit() else 1.0


def wrap(module, name, before=None, after=None):
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        out = real(*args, **kwargs)
        if after:
            after(out, *args, **kwargs)
        return out

    setattr(module, name, wrapper)


def on_make_engine(engine, *args, **kwargs):
    real = engine.generate

    def generate(problems, G, max_new_tokens):
        ro = real(problems, G, max_new_tokens)
        records["prompts"].append({"ids": [p.id for p in problems], "repeat": G})
        records["rollout"].append([row.tolist() for row in ro.prompt_ids])
        records["events"].append(["generate", [p.id for p in problems]])
        return ro

    engine.generate = generate


def on_advantages(adv, rewards, G, **kwargs):
    records["advantages"].append([rewards.numel(), G])
    records["events"].append(["advantages", rewards.numel()])


def on_micro_batches(out, *args, count=0):
    records["events"].append(["micro", len(out), count])


def on_save(ckpt, accelerator, out_dir, step, state, model=None, keep_last=2):
    weights = [p.detach().double() for p in model.parameters() if p.requires_grad]
    records["params"].append([step, float(sum(w.sum() for w in weights)), float(sum((w * w).sum() for w in weights))])


if __name__ == "__main__":
    grader.REWARDS["length_mod3"] = length_reward
    grader.REWARDS["numbers_only"] = numbers_only_reward
    wrap(train_grpo, "make_engine", after=on_make_engine)
    wrap(train_grpo, "group_advantages", after=on_advantages)
    wrap(checkpoint, "save_checkpoint", after=on_save)
    wrap(training, "token_budget_micro_batches", after=on_micro_batches)
    train_grpo.main(config.parse_args(train_grpo.Args))
    out = Path(os.environ["GRPO_PROBE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(records))
