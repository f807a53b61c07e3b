"""Evaluate a model on a MathVista-style benchmark: accuracy, format rate, reasoning length.

Vision-R1 Sec. 4 evaluates with temperature 0.6, top_p 0.95 and up to 16000 new tokens; the
answer is the content of the <answer> tags, matched per benchmark (minivr1/grader.py). Three
ways to run it:

1. Generate with a model (a hub id, a full checkpoint dir, or a LoRA adapter dir):
    python evaluate.py --model runs/toy/sft/final --data runs/toy/data/eval.jsonl --output_dir runs/toy/eval-sft
    python evaluate.py --model Qwen/Qwen2.5-VL-7B-Instruct --data testmini.json --image_root mathvista/ \
        --output_dir runs/mathvista --max_new_tokens 16000
   Several GPUs: `accelerate launch evaluate.py ...` splits the problems across processes.
   Or generate through an OpenAI-compatible server (e.g. `vllm serve runs/vision-r1/final`), at the
   server's speed and with the same scoring; the key, if the server needs one, is read from the
   environment variable named by --api_key_env and never printed or saved:
    python evaluate.py --api_base http://localhost:8000/v1 --api_model runs/vision-r1/final \
        --data testmini.json --image_root mathvista/ --output_dir runs/mathvista --concurrency 64
   Images go inline (base64 data URLs); a server's separate reasoning field is put back between
   <think> tags (minivr1.backends.raw_response); lengths are the server's usage.completion_tokens,
   or words where it reports none (summary.json's length_unit says which).
2. Score predictions made elsewhere (e.g. by vLLM), no model needed: records in the benchmark
   schema plus a `response` field:
    python evaluate.py --predictions preds.jsonl --output_dir runs/scored [--tokenizer MODEL]
3. Try a model on one image, streaming its reasoning as it is generated:
    python evaluate.py --model runs/toy/grpo/final --image some.png --question "How many red shapes are there?"

Writes output_dir/predictions.jsonl (id, response, extracted answer, correct, format_ok,
length in tokens, count of "Wait") and output_dir/summary.json. A rerun skips ids already in
predictions.jsonl, so an interrupted evaluation resumes.

Departure from the authors' harness: no re-sampling when </answer> is missing, and no LLM
answer extraction; a response without a complete <answer> block scores 0.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minivr1 import backends, cli, data, evaluation, models, rollout
from minivr1.chat import R1_ZERO_SYSTEM_PROMPT, problem_messages, prompt_batch
from minivr1.tracking import print0, progress_bar


SERVER_SAMPLING_CAVEAT = (
    "temperature and top_p were requested from the server, which may not sample as requested: transformers "
    "serve, for one, decodes greedily when the model's generation_config.json says do_sample: false")


@dataclass
class Args(backends.ClientArgs):            # + the server options: --concurrency, --request_timeout, --max_retries, ...
    model: str | None = field(default=None, metadata={"help": "hub id, full checkpoint dir, or LoRA adapter dir to generate with"})
    data: str | None = field(default=None, metadata={"help": "benchmark file: MathVista-style or RL format (JSON/JSONL/parquet)"})
    image_root: str | None = field(default=None, metadata={"help": "directory image paths are relative to (default: the data file's directory)"})
    output_dir: str = field(default="runs/eval", metadata={"help": "where predictions.jsonl and summary.json go"})
    predictions: str | None = field(default=None, metadata={"help": "score this predictions file (benchmark records + 'response') instead of generating"})
    tokenizer: str | None = field(default=None, metadata={"help": "with --predictions: tokenizer for lengths in tokens (default: lengths in words)"})
    image: str | None = field(default=None, metadata={"help": "one-off mode: an image path (with --question and --model)"})
    question: str | None = field(default=None, metadata={"help": "one-off mode: the question to ask about --image"})
    batch_size: int = field(default=16, metadata={"help": "problems per generation batch (per process)"})
    max_new_tokens: int = field(default=16000, metadata={"help": "generation limit per answer (paper: 16000)"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature (paper: 0.6); 0 = greedy decoding"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling top_p (paper: 0.95)"})
    system_prompt: str | None = field(default=None, metadata={"help": "system prompt: 'r1_zero' (the R1-Zero prompt, for Zero models), a literal prompt, or none (the template's default)"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N problems (0 = all)"})
    max_pixels: int | None = field(default=None, metadata={"help": "cap on pixels per image for the processor"})
    dtype: str = field(default="auto", metadata={"help": "weight dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    skip_bad_records: bool = field(default=False, metadata={"help": "skip malformed records (counted and reported) instead of stopping"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code from the checkpoint"})
    api_base: str | None = field(default=None, metadata={"help": "generate through an OpenAI-compatible server instead of --model: its base URL, e.g. http://localhost:8000/v1 (vllm serve)"})
    api_model: str | None = field(default=None, metadata={"help": "with --api_base: the model name the server serves"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "with --api_base: NAME of the environment variable holding the API key (unset: no key); the key is never printed or saved"})


def one_off(args: Args) -> None:
    from transformers import TextStreamer

    model = models.load_for_inference(args.model, args.dtype, trust_remote_code=args.trust_remote_code)
    processor = models.load_processor(args.model, args.max_pixels, args.trust_remote_code)
    problem = data.Problem(id="cli", question=args.question, answer="", images=[data.ImageRef(path=Path(args.image))])
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    ro = rollout.generate(model, processor, prompt_batch(processor, [problem], args.system_prompt), args.max_new_tokens,
                          args.temperature, args.top_p, do_sample=args.temperature > 0, streamer=streamer)
    from minivr1.grader import parse_response
    parsed = parse_response(ro.texts[0])
    print(f"\n[answer: {parsed.answer!r}, format {'ok' if parsed.format_ok else 'NOT ok'}, "
          f"{int(ro.completion_mask.sum())} tokens]")


def generate_via_api(args: Args, todo: list, preds_path: Path) -> None:
    """Generate through an OpenAI-compatible server, appending each record as its reply arrives."""
    server = backends.OpenAIBackend(args.api_base, args.api_model, args.api_key_env, **args.client_options())
    sampling = backends.Sampling(args.max_new_tokens, args.temperature, args.top_p)
    by_id = {p.id: p for p in todo}
    requests = (backends.ChatRequest(p.id, p.question, p.images, args.system_prompt) for p in todo)
    with open(preds_path, "a", buffering=1) as f:
        for r in progress_bar(server.complete(requests, sampling), total=len(todo), desc="eval"):
            response = backends.raw_response(r.content, r.reasoning)
            n = r.completion_tokens if r.completion_tokens is not None else len(response.split())
            record = evaluation.score(by_id[r.key], response, n)
            record["length_unit"] = "tokens" if r.completion_tokens is not None else "words"
            f.write(json.dumps(record) + "\n")


def main(args: Args) -> dict | None:
    args.system_prompt = {"none": None, "r1_zero": R1_ZERO_SYSTEM_PROMPT}.get(args.system_prompt, args.system_prompt)
    if args.image or args.question:
        if not (args.image and args.question and args.model):
            raise SystemExit("one-off mode needs --model, --image and --question")
        return one_off(args)
    if sum(map(bool, (args.predictions, args.model, args.api_base))) != 1:
        raise SystemExit("pass either --model or --api_base (with --data) to generate, or --predictions to score "
                         "existing responses")
    if args.api_base and not (args.api_model and args.data):
        raise SystemExit("--api_base needs --api_model (the served model's name) and --data")
    out = Path(args.output_dir)
    preds_path = out / "predictions.jsonl"

    if args.predictions:                      # ---- score responses produced elsewhere ----
        problems, report = data.read_problems(args.predictions, args.image_root, skip_bad=args.skip_bad_records)
        print0(report.summary())
        missing = [p.id for p in problems if p.response is None]
        if missing:
            raise SystemExit(f"{args.predictions}: {len(missing)} records have no 'response' field (first: {missing[0]})")
        tok = models.load_processor(args.tokenizer).tokenizer if args.tokenizer else None
        length = (lambda t: len(tok(t).input_ids)) if tok else (lambda t: len(t.split()))
        records = [evaluation.score(p, p.response, length(p.response)) for p in problems]
        out.mkdir(parents=True, exist_ok=True)
        data.write_jsonl(preds_path, records)
        summary = evaluation.summarize(records, "tokens" if tok else "words")
    elif args.api_base:                       # ---- generate through a server, resumably ----
        problems, report = data.read_problems(args.data, args.image_root, skip_bad=args.skip_bad_records)
        print0(report.summary())
        problems = problems[:args.limit] if args.limit else problems
        out.mkdir(parents=True, exist_ok=True)
        data.repair_tail(preds_path)
        done = data.read_done(preds_path)
        todo = [p for p in problems if p.id not in done]
        print0(f"{len(problems)} problems, {len(done)} already in {preds_path}, {len(todo)} to generate")
        generate_via_api(args, todo, preds_path)
        done = data.read_done(preds_path)
        records = [done[p.id] for p in problems if p.id in done]
        units = {r.get("length_unit", "tokens") for r in records}
        summary = evaluation.summarize(records, units.pop() if len(units) == 1 else
                                       "mixed: tokens where the server reported usage, else words")
    else:                                     # ---- generate, resumably ----
        if not args.data:
            raise SystemExit("--model needs --data (the benchmark file)")
        from accelerate import PartialState
        state = PartialState(cpu=not torch.cuda.is_available())
        problems, report = data.read_problems(args.data, args.image_root, skip_bad=args.skip_bad_records)
        print0(report.summary())
        problems = problems[:args.limit] if args.limit else problems
        done = data.read_done(preds_path)
        todo = [p for p in problems if p.id not in done]
        print0(f"{len(problems)} problems, {len(done)} already in {preds_path}, {len(todo)} to generate")
        model = models.load_for_inference(args.model, args.dtype, device=str(state.device),
                                          trust_remote_code=args.trust_remote_code)
        processor = models.load_processor(args.model, args.max_pixels, args.trust_remote_code)
        torch.manual_seed(args.seed + state.process_index)
        mine = todo[state.process_index::state.num_processes]
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        state.wait_for_everyone()
        part = out / f"predictions.part{state.process_index}.jsonl" if state.num_processes > 1 else preds_path
        data.repair_tail(part)
        with open(part, "a", buffering=1) as f:
            for i in progress_bar(range(0, len(mine), args.batch_size), desc="eval", disable=not state.is_main_process):
                batch = mine[i:i + args.batch_size]
                ro = rollout.generate(model, processor, prompt_batch(processor, batch, args.system_prompt),
                                      args.max_new_tokens, args.temperature, args.top_p, do_sample=args.temperature > 0)
                for p, text, n in zip(batch, ro.texts, ro.completion_mask.sum(1).tolist()):
                    f.write(json.dumps(evaluation.score(p, text, int(n))) + "\n")   # appended as it finishes
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        if state.num_processes > 1:           # merge the per-process parts into predictions.jsonl
            data.repair_tail(preds_path)
            with open(preds_path, "a") as f:
                for k in range(state.num_processes):
                    p = out / f"predictions.part{k}.jsonl"
                    f.write(p.read_text())
                    p.unlink()
        done = data.read_done(preds_path)
        records = [done[p.id] for p in problems if p.id in done]
        summary = evaluation.summarize(records)
    summary.update({"model": args.model or args.api_model, "data": args.data or args.predictions, "temperature": args.temperature,
                    "top_p": args.top_p, "max_new_tokens": args.max_new_tokens})
    if args.api_base:
        summary["sampling"] = SERVER_SAMPLING_CAVEAT
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print0(evaluation.format_summary(summary, title=f"{args.model or args.api_model or args.predictions}: "))
    return summary


if __name__ == "__main__":
    cli.run(main, Args, __doc__)
