"""Evaluate a model on the paper's benchmarks: MathVista, MathVerse, MM-Math, DynaMath.

Vision-R1 Sec. 4 evaluates with temperature 0.6, top_p 0.95 and up to 16000 new tokens; the
answer is the content of the <answer> tags, judged per benchmark (minivr1/benchmarks.py: the
release formats each reader takes, the prompts, the answer rules, the metrics). Ways to run it:

1. Generate with a model (a hub id, a full checkpoint dir, or a LoRA adapter dir):
    python evaluate.py --model runs/toy/sft/final --data runs/toy/data/eval.jsonl --output_dir runs/toy/eval-sft
    python evaluate.py --model Qwen/Qwen2.5-VL-7B-Instruct --data testmini.json --image_root mathvista/ \\
        --output_dir runs/mathvista --max_new_tokens 16000
   The paper's table in one run: one --data entry per benchmark, in the order of --benchmark (an
   entry is a file, a folder, or a quoted glob; e.g. DynaMath's ten variant files):
    python evaluate.py --model runs/vision-r1/final --benchmark mathvista,mathverse,mmmath,dynamath \\
        --data mathvista/testmini.json,mathverse/,mm_math/MM_Math.jsonl,'dynamath/trial*/dataset.json' \\
        --image_root mathvista/,mathverse/images/,mm_math/images/, --output_dir runs/paper
   Each benchmark gets output_dir/<benchmark>/ and a table with the paper's columns is printed
   (and saved in output_dir/summary.json). --benchmark auto (the default) tells each entry's
   benchmark from its fields.
   Several GPUs: `accelerate launch evaluate.py ...` splits the problems across processes.
   Or generate through an OpenAI-compatible server (e.g. `vllm serve runs/vision-r1/final`), at the
   server's speed and with the same scoring; the key, if the server needs one, is read from the
   environment variable named by --api_key_env and never printed or saved:
    python evaluate.py --api_base http://localhost:8000/v1 --api_model runs/vision-r1/final \\
        --data testmini.json --image_root mathvista/ --output_dir runs/mathvista --concurrency 64
   Images go inline (base64 data URLs); a server's separate reasoning field is put back between
   <think> tags (minivr1.backends.raw_response); lengths are the server's usage.completion_tokens,
   or words where it reports none (summary.json's length_unit says which).
2. Score predictions made elsewhere (e.g. by vLLM or VLMEvalKit), no model and no images needed
   (image files are never opened): records in the benchmark's schema plus a `response` (or
   VLMEvalKit's `prediction`) field:
    python evaluate.py --benchmark mathverse --predictions preds.jsonl --output_dir runs/scored
   (add --tokenizer MODEL for lengths in that model's tokens instead of words).
   For VLMEvalKit outputs (which hold an extracted answer or a raw reply, no tags) add
   --prompt_style official so that answers are found the benchmark's way.
3. Try a model on one image, streaming its reasoning as it is generated:
    python evaluate.py --model runs/toy/grpo/final --image some.png --question "How many red shapes are there?"

--prompt_style plain (default) gives the model the plain question, as the Vision-R1 models were
trained, and takes the last <answer> block as the answer; official gives each benchmark's own
prompt and, where a response has no <answer> block, finds the answer as the benchmark's harness
does (\\boxed{}, DynaMath's JSON "short answer", "the answer is X"). docs/evaluation.md lists
every departure from the official protocols.

Writes predictions.jsonl (id, response, extracted answer, correct, format_ok, length, count of
"Wait", the benchmark's grouping fields) and summary.json (accuracy, format rate, length, accuracy
by length, and the benchmark's own metrics). A rerun skips ids already in predictions.jsonl, so an
interrupted evaluation resumes; args.json records what made the predictions (model, data, prompt
style, sampling), and a rerun that would mix them with another model's or other settings' stops and
names the difference (the batch size, --limit and the server options may change; --overwrite
deletes the predictions and starts over).

Departure from the authors' harness: no re-sampling when </answer> is missing, and no LLM
answer extraction or judge; with the plain style a response without an <answer> block scores 0.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minivr1 import backends, benchmarks, cli, data, evaluation, models, rollout, rundir, threads, tracking
from minivr1.chat import R1_ZERO_SYSTEM_PROMPT, prompt_batch
from minivr1.tracking import print0, progress_bar


SERVER_SAMPLING_CAVEAT = (
    "temperature and top_p were requested from the server, which may not sample as requested: transformers "
    "serve, for one, decodes greedily when the model's generation_config.json says do_sample: false")


@dataclass
class Args(backends.ClientArgs):            # + the server options: --concurrency, --request_timeout, --max_retries, ...
    model: str | None = field(default=None, metadata={"help": "hub id, full checkpoint dir, or LoRA adapter dir to generate with"})
    benchmark: str = field(default="auto", metadata={"help": "mathvista | mathverse | mmmath | dynamath, comma-separated for several (one per --data entry); auto: told from each file's fields"})
    data: str | None = field(default=None, metadata={"help": "benchmark data, one entry per benchmark, comma-separated; an entry is a file (JSON/JSONL/parquet/TSV as released), a folder (every data file under it) or a glob ('dynamath/trial*/dataset.json')"})
    image_root: str | None = field(default=None, metadata={"help": "directory image paths are relative to (default: each data file's directory); comma-separated to give one per benchmark"})
    prompt_style: str = field(default="plain", metadata={"help": "plain: the plain question, the answer is the <answer> block (how Vision-R1 models are used); official: each benchmark's own prompt, and answers without an <answer> block found the benchmark's way", "choices": list(benchmarks.STYLES)})
    output_dir: str = field(default="runs/eval", metadata={"help": "where predictions.jsonl and summary.json go (per benchmark in a subdirectory when there are several)"})
    predictions: str | None = field(default=None, metadata={"help": "score these predictions (benchmark records + 'response' or 'prediction') instead of generating; entries as for --data; images are not needed"})
    tokenizer: str | None = field(default=None, metadata={"help": "with --predictions: tokenizer for lengths in tokens (default: lengths in words)"})
    image: str | None = field(default=None, metadata={"help": "one-off mode: an image path (with --question and --model)"})
    question: str | None = field(default=None, metadata={"help": "one-off mode: the question to ask about --image"})
    batch_size: int = field(default=16, metadata={"help": "problems per generation batch (per process)"})
    max_new_tokens: int = field(default=16000, metadata={"help": "generation limit per answer (paper: 16000)"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature (paper: 0.6); 0 = greedy decoding"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling top_p (paper: 0.95)"})
    system_prompt: str | None = field(default=None, metadata={"help": "system prompt: 'r1_zero' (the R1-Zero prompt, for Zero models), a literal prompt, or none (the template's default)"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N problems of each benchmark (0 = all; DynaMath keeps whole seeds first)"})
    max_pixels: int | None = field(default=None, metadata={"help": "cap on pixels per image for the processor"})
    dtype: str = field(default="auto", metadata={"help": "weight dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    skip_bad_records: bool = field(default=False, metadata={"help": "skip malformed records (counted and reported) instead of stopping"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code from the checkpoint"})
    api_base: str | None = field(default=None, metadata={"help": "generate through an OpenAI-compatible server instead of --model: its base URL, e.g. http://localhost:8000/v1 (vllm serve)"})
    api_model: str | None = field(default=None, metadata={"help": "with --api_base: the model name the server serves"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "with --api_base: NAME of the environment variable holding the API key (unset: no key); the key is never printed or saved"})
    overwrite: bool = field(default=False, metadata={"help": "delete the predictions and summaries already in output_dir and start over"})


# What a rerun may change and still add to the predictions in output_dir: none changes what is measured (the
# same model, data, prompts and sampling distribution). Any other difference stops the rerun.
RESUME_MAY_CHANGE = ("output_dir", "overwrite", "batch_size", "limit", "skip_bad_records", "trust_remote_code",
                     "api_base", "api_key_env", "concurrency", "connect_timeout", "request_timeout", "max_retries",
                     "backoff_base", "backoff_max", "image", "question")
OUTPUTS = ("predictions.jsonl", "predictions.part*.jsonl", "summary.json", "args.json", "*/predictions.jsonl",
           "*/predictions.part*.jsonl", "*/summary.json", "*/args.json")


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


def score_predictions(args: Args, bench, problems: list, preds_path: Path) -> tuple[list[dict], str]:
    """Score responses produced elsewhere; predictions.jsonl is written afresh."""
    missing = [p.id for p in problems if p.response is None]
    if missing:
        raise cli.UserError(f"{args.predictions}: {len(missing)} records have no 'response' field (first: {missing[0]})")
    tok = models.load_processor(args.tokenizer).tokenizer if args.tokenizer else None
    length = (lambda t: len(tok(t).input_ids)) if tok else (lambda t: len(t.split()))
    official = args.prompt_style == "official"
    records = [evaluation.score(p, p.response, length(p.response), bench, official) for p in problems]
    data.write_jsonl(preds_path, records)
    return records, "tokens" if tok else "words"


def generate_via_api(args: Args, bench, todo: list, preds_path: Path) -> None:
    """Generate through an OpenAI-compatible server, appending each record as its reply arrives."""
    server = backends.OpenAIBackend(args.api_base, args.api_model, args.api_key_env, **args.client_options())
    sampling = backends.Sampling(args.max_new_tokens, args.temperature, args.top_p)
    by_id = {p.id: p for p in todo}
    requests = (backends.ChatRequest(p.id, p.question, p.images, args.system_prompt) for p in todo)
    with open(preds_path, "a", buffering=1) as f:
        for r in progress_bar(server.complete(requests, sampling), total=len(todo), desc=f"eval {bench.name}"):
            response = backends.raw_response(r.content, r.reasoning)
            n = r.completion_tokens if r.completion_tokens is not None else len(response.split())
            record = evaluation.score(by_id[r.key], response, n, bench, args.prompt_style == "official")
            record["length_unit"] = "tokens" if r.completion_tokens is not None else "words"
            f.write(json.dumps(record) + "\n")


def generate_locally(args: Args, engine: dict, bench, todo: list, out: Path) -> None:
    """Generate with the model in `engine` (loaded once for all benchmarks), this process's share of
    `todo`, appending each record as it finishes; under several processes the parts are merged."""
    state, model, processor = engine["state"], engine["model"], engine["processor"]
    mine = todo[state.process_index::state.num_processes]
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    preds_path = out / "predictions.jsonl"
    part = out / f"predictions.part{state.process_index}.jsonl" if state.num_processes > 1 else preds_path
    data.repair_tail(part)
    with open(part, "a", buffering=1) as f:
        for i in progress_bar(range(0, len(mine), args.batch_size), desc=f"eval {bench.name}",
                              disable=not state.is_main_process):
            batch = mine[i:i + args.batch_size]
            ro = rollout.generate(model, processor, prompt_batch(processor, batch, args.system_prompt),
                                  args.max_new_tokens, args.temperature, args.top_p, do_sample=args.temperature > 0)
            for p, text, n in zip(batch, ro.texts, ro.completion_mask.sum(1).tolist()):
                record = evaluation.score(p, text, int(n), bench, args.prompt_style == "official")
                f.write(json.dumps(record) + "\n")   # appended as it finishes
    state.wait_for_everyone()
    if state.num_processes > 1 and state.is_main_process:   # merge the per-process parts
        data.repair_tail(preds_path)
        with open(preds_path, "a") as f:
            for k in range(state.num_processes):
                p = out / f"predictions.part{k}.jsonl"
                f.write(p.read_text())
                p.unlink()
    state.wait_for_everyone()


def load_engine(args: Args) -> dict:
    from accelerate import PartialState
    state = PartialState(cpu=not torch.cuda.is_available())
    model = models.load_for_inference(args.model, args.dtype, device=str(state.device),
                                      trust_remote_code=args.trust_remote_code)
    processor = models.load_processor(args.model, args.max_pixels, args.trust_remote_code)
    torch.manual_seed(args.seed + state.process_index)
    return {"state": state, "model": model, "processor": processor}


def main(args: Args) -> dict | None:
    threads.set_cpu_threads()                  # on a CPU: one thread unless OMP_NUM_THREADS says otherwise
    args.system_prompt = {"none": None, "r1_zero": R1_ZERO_SYSTEM_PROMPT}.get(args.system_prompt, args.system_prompt)
    if args.image or args.question:
        if not (args.image and args.question and args.model):
            raise cli.UserError("one-off mode needs --model, --image and --question")
        return one_off(args)
    if sum(map(bool, (args.predictions, args.model, args.api_base))) != 1:
        raise cli.UserError("pass either --model or --api_base (with --data) to generate, or --predictions to score "
                         "existing responses")
    if args.api_base and not (args.api_model and args.data):
        raise cli.UserError("--api_base needs --api_model (the served model's name) and --data")
    if args.model and not args.data:
        raise cli.UserError("--model needs --data (the benchmark file)")
    if args.prompt_style not in benchmarks.STYLES:
        raise cli.UserError(f"--prompt_style {args.prompt_style!r}: use one of {', '.join(benchmarks.STYLES)}")
    rundir.claim(args.output_dir, args.overwrite, tracking.is_main_process(), OUTPUTS)   # ours alone: a lock
    runs = benchmarks.plan(args.benchmark, args.predictions or args.data, args.image_root)
    engine, main_process, summaries = None, True, {}

    for bench, files, image_root in runs:
        out = Path(args.output_dir) / bench.name if len(runs) > 1 else Path(args.output_dir)
        preds_path = out / "predictions.jsonl"
        problems, report = bench.read(files, image_root, args.prompt_style, skip_bad=args.skip_bad_records,
                                      with_images=not args.predictions)
        print0(f"{bench.title}: {report.summary()}")
        unit = "tokens"
        settings = {**dataclasses.asdict(args), "benchmark": bench.name, "data": [str(f) for f in files],
                    "image_root": None if image_root is None else str(image_root)}
        made_by = {"made_by": "scoring" if args.predictions else "generating"}
        if args.predictions:                  # ---- score responses produced elsewhere ----
            # written afresh: settings may change, but another run's generated predictions are not replaced
            rundir.check_settings(out, settings, list(settings), made_by, is_main=tracking.is_main_process())
            records, unit = score_predictions(args, bench, problems, preds_path)
        else:                                 # ---- generate, resumably ----
            problems = problems[:args.limit] if args.limit else problems
            if args.api_base:
                out.mkdir(parents=True, exist_ok=True)
                data.repair_tail(preds_path)
            done = data.read_done(preds_path)
            made = {(r.get("benchmark", bench.name), r.get("prompt_style", args.prompt_style)) for r in done.values()}
            if made - {(bench.name, args.prompt_style)}:   # never mix two runs' records in one file
                raise cli.UserError(f"{preds_path} holds predictions made for {sorted(made)} (benchmark, prompt style), "
                                 f"not {bench.name} with --prompt_style {args.prompt_style}: use another --output_dir")
            rundir.check_settings(out, settings, RESUME_MAY_CHANGE, made_by, is_main=tracking.is_main_process())
            todo = [p for p in problems if p.id not in done]
            print0(f"{len(problems)} problems, {len(done)} already in {preds_path}, {len(todo)} to generate")
            if args.api_base:
                generate_via_api(args, bench, todo, preds_path)
            else:
                engine = engine or load_engine(args)
                generate_locally(args, engine, bench, todo, out)
                main_process = engine["state"].is_main_process
                if not main_process:
                    continue
            done = data.read_done(preds_path)
            records = [done[p.id] for p in problems if p.id in done]
            if args.api_base:
                units = {r.get("length_unit", "tokens") for r in records}
                unit = units.pop() if len(units) == 1 else "mixed: tokens where the server reported usage, else words"
        summary = evaluation.summarize(records, unit, bench)
        summary.update({"model": args.model or args.api_model, "data": [str(f) for f in files],
                        "prompt_style": args.prompt_style, "temperature": args.temperature, "top_p": args.top_p,
                        "max_new_tokens": args.max_new_tokens})
        if args.api_base:
            summary["sampling"] = SERVER_SAMPLING_CAVEAT
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print0(evaluation.format_summary(summary, title=f"{bench.title} ({args.model or args.api_model or report.path}): "))
        summaries[bench.name] = summary

    if not main_process:
        return None
    if len(runs) == 1:
        return summaries[runs[0][0].name]
    name = args.model or args.api_model or args.predictions
    table = benchmarks.paper_table({name: summaries})
    combined = {"model": args.model or args.api_model, "prompt_style": args.prompt_style, "table": table,
                "benchmarks": summaries}
    (Path(args.output_dir) / "summary.json").write_text(json.dumps(combined, indent=2))
    print0("\n" + table)
    return combined


if __name__ == "__main__":
    cli.run(main, Args, __doc__)
