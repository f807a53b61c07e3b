"""Modality bridging: build Vision-R1-cold-style cold-start data with no human labels.

Vision-R1 Sec. 3.1. A vision-language model (MLLM) sees but reasons shallowly; DeepSeek-R1
reasons like a person but cannot see. Bridging hands the image to R1 as text. Per problem
(image, question, ground-truth answer):
  1. the MLLM sees image + question and writes a pseudo-CoT: caption + reasoning
     -> output_dir/stage1_pseudo_cot.jsonl
  2. the MLLM sees image + question + pseudo-CoT and writes a detailed description with every
     visual detail needed to answer (the paper's prompt) -> stage2_description.jsonl
  3. a text-only reasoning model reads description + question and reasons step by step; its
     reply becomes <think>reasoning</think><answer>X</answer> -> stage3_reasoning.jsonl
  4. rule-based filtering: not cut off, right format, right answer, sane length, no loops, no
     "I cannot see the image", no leaked hint, no leftover "the description" after word replacement
     -> cold_start.json (Vision-R1-cold format; images under output_dir/images/),
        report.json (records in/out, drops per rule, 'Wait's, length histogram), filter_log.jsonl
Every prompt and rule is in minivr1/bridging.py; the backends are in minivr1/backends.py.

CPU demo on the toy task. Tiny random models write nonsense, so the filter drops every sample:
the demo shows every step running, not data quality (tests/test_bridge.py runs the pipeline with
scripted replies too, and trains train_sft.py on its output).
    python -m minivr1.toy runs/toy --model_size tiny
    python bridge.py --data runs/toy/data/rl_train.jsonl --limit 4 --mllm runs/toy/base \\
        --reasoner runs/toy/base --output_dir runs/toy/bridge --mllm_max_new_tokens 48 --reasoner_max_new_tokens 96
One GPU, local models (the MLLM is freed before the reasoner loads):
    python bridge.py --data Vision-R1-rl.parquet --output_dir runs/bridge --mllm Qwen/Qwen2.5-VL-7B-Instruct \\
        --reasoner deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --reasoner_backend causal_lm
The paper's models: Qwen2.5-VL-72B served by vLLM (or -7B-Instruct, --tensor-parallel-size 1) and DeepSeek-R1:
    vllm serve Qwen/Qwen2.5-VL-72B-Instruct --tensor-parallel-size 8 --port 8000
    export DEEPSEEK_API_KEY=...      # read from the environment only: never an argument, never printed or saved
    python bridge.py --data Vision-R1-rl.parquet --output_dir runs/bridge --concurrency 32 \\
        --mllm Qwen/Qwen2.5-VL-72B-Instruct --mllm_backend openai --mllm_api_base http://localhost:8000/v1 \\
        --reasoner deepseek-reasoner --reasoner_backend openai --reasoner_api_base https://api.deepseek.com \\
        --reasoner_api_key_env DEEPSEEK_API_KEY
    python train_sft.py --config configs/sft_lora_1gpu.yaml --data runs/bridge/cold_start.json   # images: its folder

Never lose work: each result is appended to its stage file the moment it arrives, keyed by
record id. Rerun the same command after a crash, Ctrl-C or kill: finished records are not redone,
a torn last line is dropped and redone, and filtering (cheap) is recomputed from the stage files.
args.json records what made the replies; a rerun with other models, prompts or sampling stops and
names the difference (the filter's thresholds, --limit and the server options may change;
--overwrite deletes the stage files and starts over).

Departures from the paper:
1. The prompts of steps 1 and 3 are ours (the paper describes these steps, not their prompts);
   step 3 asks for R1's recommended "\\boxed{}" answer, mapped into the answer tag
   (minivr1.backends.r1_response).
2. The reasoner does not see the ground truth unless --give_answer (the authors showed it):
   then the answer filter checks the reasoning instead of trusting a hint it may work back from.
3. Filter rules beyond answer matching, and the word-replacement table, are ours; the paper names
   answer matching, dropping logically inconsistent samples and word replacement.
4. One reply per problem and step; dropped problems are not re-sampled.
5. Any problems file our readers take (RL or MathVista layout), not LLaVA-CoT and Mulberry.
6. The answer block holds the bare answer (<answer>3</answer>), not the released models'
   "Final Answer:3"; the grader accepts both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from minivr1 import backends, bridging, cli, data, grader, rundir, threads
from minivr1.backends import ChatRequest, Sampling
from minivr1.data import DEFAULT_MAX_PIXELS
from minivr1.tracking import print0, progress_bar

STAGE_FILES = ["stage1_pseudo_cot.jsonl", "stage2_description.jsonl", "stage3_reasoning.jsonl"]


@dataclass
class Args(backends.ClientArgs):            # + the server options: --concurrency, --request_timeout, --max_retries, ...
    data: str = field(kw_only=True, metadata={"help": "problems with ground-truth answers: RL (Vision-R1-rl / geometry3k) or MathVista layout, JSON/JSONL/parquet"})
    image_root: str | None = field(default=None, metadata={"help": "directory image paths are relative to (default: the data file's directory)"})
    output_dir: str = field(kw_only=True, metadata={"help": "stage files, cold_start.json, report.json; rerun with the same one to resume"})
    overwrite: bool = field(default=False, metadata={"help": "delete the stage files, cold_start.json, report.json and images/ already in output_dir and start over"})
    limit: int = field(default=0, metadata={"help": "bridge only the first N problems (0 = all)"})
    mllm: str = field(kw_only=True, metadata={"help": "steps 1-2: local checkpoint / hub id, or the served model name with --mllm_backend openai"})
    mllm_backend: str = field(default="vlm", metadata={"help": "steps 1-2: a local image-text-to-text model, or an OpenAI-compatible server", "choices": ["vlm", "openai"]})
    mllm_api_base: str | None = field(default=None, metadata={"help": "with --mllm_backend openai: base URL, e.g. http://localhost:8000/v1 (vllm serve)"})
    mllm_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "NAME of the environment variable holding the MLLM server's API key (unset: no key)"})
    reasoner: str = field(kw_only=True, metadata={"help": "step 3: local checkpoint / hub id, or the served model name (e.g. deepseek-reasoner)"})
    reasoner_backend: str = field(default="vlm", metadata={"help": "step 3: a local VLM used text-only, a local causal LM (AutoModelForCausalLM), or an OpenAI-compatible server", "choices": ["vlm", "causal_lm", "openai"]})
    reasoner_api_base: str | None = field(default=None, metadata={"help": "with --reasoner_backend openai: base URL, e.g. https://api.deepseek.com"})
    reasoner_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "NAME of the environment variable holding the reasoner server's API key (e.g. DEEPSEEK_API_KEY)"})
    give_answer: bool = field(default=False, metadata={"help": "show the ground-truth answer to the reasoner, as the authors did (more samples survive; the reasoning may work back from it)"})
    mllm_max_new_tokens: int = field(default=2048, metadata={"help": "generation limit for the pseudo-CoT and the description"})
    reasoner_max_new_tokens: int = field(default=16384, metadata={"help": "generation limit for the reasoning (R1: thinking + answer)"})
    mllm_temperature: float = field(default=0.7, metadata={"help": "MLLM sampling temperature (0 = greedy)"})
    reasoner_temperature: float = field(default=0.6, metadata={"help": "reasoner sampling temperature (DeepSeek's recommendation for R1: 0.6)"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling top_p for both models"})
    batch_size: int = field(default=8, metadata={"help": "local backends: requests per generate call"})
    min_words: int = field(default=20, metadata={"help": "filter: drop responses shorter than this many words"})
    max_words: int = field(default=12000, metadata={"help": "filter: drop responses longer than this many words (~16K tokens, the paper's SFT cutoff; lower it to fit a shorter train_sft.py --max_length)"})
    max_repeats: int = field(default=8, metadata={"help": "filter: drop responses where one 8-word sequence occurs more often than this (a loop)"})
    dtype: str = field(default="auto", metadata={"help": "local models' dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32"})
    max_pixels: int | None = field(default=None, metadata={"help": "local VLM: cap on pixels per image for the processor"})
    seed: int = field(default=0, metadata={"help": "local models' sampling seed"})
    skip_bad_records: bool = field(default=False, metadata={"help": "skip malformed records (counted and reported) instead of stopping"})
    max_image_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={"help": "reject images larger than this many pixels"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code from local checkpoints"})


# What a rerun may change and still continue the stage files in output_dir: none changes a reply (filtering is
# recomputed from the stage files on every run, so its thresholds may change too). Any other difference stops it.
RESUME_MAY_CHANGE = ("output_dir", "overwrite", "limit", "batch_size", "min_words", "max_words", "max_repeats",
                     "skip_bad_records", "max_image_pixels", "trust_remote_code", "mllm_api_base", "reasoner_api_base",
                     "mllm_api_key_env", "reasoner_api_key_env", "concurrency", "connect_timeout", "request_timeout",
                     "max_retries", "backoff_base", "backoff_max")
OUTPUTS = (*STAGE_FILES, "cold_start.json", "report.json", "filter_log.jsonl", "images", "args.json")


class Models:
    """Each role's backend, built on first use (a finished stage never loads its model). The MLLM
    and the reasoner share one loaded model when they are the same local checkpoint."""

    def __init__(self, args: Args, given: dict):
        self.args, self.given, self.loaded = args, given, {}

    def _key(self, role: str) -> tuple:
        kind = getattr(self.args, f"{role}_backend")
        return (role,) if kind == "openai" else (kind, getattr(self.args, role))

    def get(self, role: str):
        if self.given.get(role) is not None:
            return self.given[role]
        key, a = self._key(role), self.args
        if key not in self.loaded:
            kind, name = getattr(a, f"{role}_backend"), getattr(a, role)
            if kind == "openai":
                self.loaded[key] = backends.OpenAIBackend(
                    getattr(a, f"{role}_api_base"), name, getattr(a, f"{role}_api_key_env"), **a.client_options())
            elif kind == "causal_lm":
                self.loaded[key] = backends.CausalLMBackend(name, a.batch_size, a.dtype, a.seed, a.trust_remote_code)
            else:
                self.loaded[key] = backends.VLMBackend(name, a.batch_size, a.dtype, a.max_pixels, a.seed,
                                                       a.trust_remote_code)
        return self.loaded[key]

    def release(self, role: str, unless_used_by: str) -> None:
        """Free a local model another role does not share (one GPU holds one model at a time)."""
        if self._key(role) != self._key(unless_used_by) and self.loaded.pop(self._key(role), None) is not None:
            import gc

            import torch
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def run_stage(title: str, path: Path, problems: list, backend, sampling: Sampling, make_request,
              keep=None) -> dict[str, dict]:
    """Ask the backend about every problem not yet in `path`, appending each reply as it arrives.

    `backend` is called only if there is work (so a finished stage loads no model); `keep(record)`
    (optional) is shown in the progress bar as the running count of replies the filter would drop.
    Returns every record of the file by id.
    """
    data.repair_tail(path)
    done = data.read_done(path)
    todo = [p for p in problems if p.id not in done]
    print0(f"{title}: {len(problems)} records, {len(problems) - len(todo)} already in {path.name}, {len(todo)} to do")
    if not todo:
        return done
    bar = progress_bar(total=len(problems), initial=len(problems) - len(todo), desc=title)
    dropped = empty = 0
    with open(path, "a", encoding="utf-8") as f:
        for r in backend().complete((make_request(p) for p in todo), sampling):
            record = {"id": r.key, "content": r.content, "reasoning": r.reasoning, "tokens": r.completion_tokens,
                      "finish_reason": r.finish_reason}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()                                   # on disk before the next one: a kill loses nothing
            done[r.key] = record
            empty += not r.content.strip()
            dropped += keep is not None and not keep(record)
            bar.update(1)
            bar.set_postfix({"empty": empty, **({"would_drop": dropped} if keep else {})})
    bar.close()
    return done


def main(args: Args, mllm=None, reasoner=None) -> dict:
    """Run the four steps; `mllm` / `reasoner` replace the backends built from args (tests pass scripted ones)."""
    given = {"mllm": mllm, "reasoner": reasoner}
    if any(getattr(args, f"{role}_backend") != "openai" and not given[role] for role in given):
        threads.set_cpu_threads()              # a local model on a CPU: one thread unless OMP_NUM_THREADS says otherwise
    for role in given:
        if getattr(args, f"{role}_backend") == "openai" and not getattr(args, f"{role}_api_base") and not given[role]:
            raise cli.UserError(f"--{role}_backend openai needs --{role}_api_base (e.g. http://localhost:8000/v1)")
    out = rundir.claim(args.output_dir, args.overwrite, outputs=OUTPUTS)      # ours alone: a lock
    problems, read_report = data.read_problems(args.data, args.image_root, skip_bad=args.skip_bad_records,
                                               max_image_pixels=args.max_image_pixels)
    print0(read_report.summary())
    # args.json holds the key's variable NAME only, never the key
    rundir.check_settings(out, args, RESUME_MAY_CHANGE, {"data_bytes": Path(args.data).stat().st_size})
    problems = problems[:args.limit] if args.limit else problems
    models = Models(args, given)
    see = Sampling(args.mllm_max_new_tokens, args.mllm_temperature, args.top_p)
    think = Sampling(args.reasoner_max_new_tokens, args.reasoner_temperature, args.top_p)
    limits = bridging.Limits(args.min_words, args.max_words, args.max_repeats)
    files = [out / name for name in STAGE_FILES]

    # ---- step 1: the MLLM writes a pseudo-CoT (caption + reasoning) from image + question ----
    cot = run_stage("1 pseudo-CoT", files[0], problems, lambda: models.get("mllm"), see,
                    lambda p: ChatRequest(p.id, bridging.pseudo_cot_prompt(p), p.images))

    # ---- step 2: the MLLM turns image + question + pseudo-CoT into a detailed description ----
    def pseudo_cot(p):           # a reasoning MLLM's split-off thinking is part of its pseudo-CoT
        return backends.raw_response(cot[p.id]["content"], cot[p.id]["reasoning"]).strip()

    desc = run_stage("2 description", files[1], problems, lambda: models.get("mllm"), see,
                     lambda p: ChatRequest(p.id, bridging.description_prompt(p, pseudo_cot(p)), p.images))
    models.release("mllm", unless_used_by="reasoner")

    # ---- step 3: the text-only reasoner reasons from description + question ----
    def description(p):         # the description only, should the MLLM have thought aloud first
        return backends.strip_thinking(desc[p.id]["content"])

    def candidate(record) -> tuple[str, int]:
        """The reply in our format, references to the description rewritten (paper: word replacement)."""
        return bridging.rewrite_thinking(backends.r1_response(record["content"], record["reasoning"]))

    def verdict(p, record, response) -> dict[str, str]:
        finished = record["finish_reason"] != "length"
        return bridging.judge(bridging.Sample(response, p.question, p.answer, p.grading_meta(), finished), limits)

    by_id = {p.id: p for p in problems}
    solved = run_stage("3 reasoning", files[2], problems, lambda: models.get("reasoner"), think,
                       lambda p: ChatRequest(p.id, bridging.reasoning_prompt(p, description(p), args.give_answer)),
                       keep=lambda record: not verdict(by_id[record["id"]], record, candidate(record)[0]))

    # ---- step 4: rule-based filtering -> cold_start.json + report.json ----
    kept, log = [], []
    for p in problems:
        response, rewrites = candidate(solved[p.id])
        failed = verdict(p, solved[p.id], response)
        log.append({"id": p.id, "dropped_by": next(iter(failed), None), "failed": failed,
                    "waits": grader.count_wait(response), "words": len(response.split()), "rewrites": rewrites})
        if not failed:
            kept.append(bridging.cold_start_record(p, response, bridging.export_images(p, out)))
    data.write_jsonl(out / "filter_log.jsonl", log)
    bridging.write_json(out / "cold_start.json", kept)
    stage_counts = {name: sum(p.id in d for p in problems)
                    for name, d in zip(["pseudo_cot", "description", "reasoning"], [cot, desc, solved])}
    report = bridging.build_report(log, len(problems), stage_counts)
    report.update({"mllm": args.mllm, "reasoner": args.reasoner, "give_answer": args.give_answer,
                   "read": read_report.summary()})
    bridging.write_json(out / "report.json", report)
    print0(bridging.format_report(report))
    if not kept:
        print0("no sample survived the filter (expected with tiny random models; see filter_log.jsonl for why)")
    print0(f"wrote {out / 'cold_start.json'} ({len(kept)} samples) and {out / 'report.json'}")
    return report


if __name__ == "__main__":
    cli.run(main, Args, __doc__)
