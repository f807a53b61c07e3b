"""The real-server tier: checkpoints written by train_sft.py, served by servers nobody here wrote.

Run it with `bash scripts/real_servers.sh` (it builds the servers' own environments first; about
N minutes on 2 CPU cores, see the README). Not in the default run: it needs those environments.

- `transformers serve` (from .venv-serve, which has torchvision, so the standard Qwen2.5-VL
  processor loads) serves the toy checkpoint exactly as train_sft.py wrote it: the server must see
  the image, greedy scores through the server must equal local greedy evaluation record by record,
  and a kill -9 of the server in the middle of an evaluation, then a restart, must lose and
  duplicate no record.
- vLLM (the CPU build, from .venv-vllm) serves a text model as bridge.py's reasoner, while
  `transformers serve` is its MLLM: bridging runs end to end through both.
Each test starts from the same checkpoint; servers run on 127.0.0.1 only.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from accelerate.state import AcceleratorState

import bridge
import evaluate
import train_sft
from minivr1 import backends, models, tiny, toy
from minivr1.data import ImageRef
from servers import ROOT, SERVE_PYTHON, Server

pytestmark = pytest.mark.real_server

N_EVAL = 40
IMAGE_TOKENS = 16 + 2              # a 112x112 toy image: 16 merged patches, plus <|vision_start|>, <|vision_end|>


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("real-servers")


@pytest.fixture(scope="module")
def checkpoint(work):
    """A toy checkpoint as a user gets it: train_sft.py's final/ (short SFT: it writes the format)."""
    toy.generate(work / "data", n_train=16, n_eval=N_EVAL, n_cold=512, seed=0)
    tiny.build("tiny", work / "base", seed=0)
    args = train_sft.Args(model=str(work / "base"), data=str(work / "data" / "cold_start.json"),
                          output_dir=str(work / "sft"), mode="full", freeze_vision=False, learning_rate=3e-3,
                          max_steps=400, per_device_batch_size=16, gradient_accumulation_steps=1,
                          warmup_ratio=0.02, max_length=512, save_steps=0, logging_steps=100, dtype="fp32")
    final = train_sft.main(args)
    AcceleratorState._reset_state(True)
    return final


@pytest.fixture(scope="module")
def served(checkpoint, work):
    server = Server("transformers", checkpoint, work / "transformers-serve.log").start()
    yield server
    server.stop()


def _eval_args(work, checkpoint, out, **kw) -> evaluate.Args:
    base = dict(data=str(work / "data" / "eval.jsonl"), output_dir=str(work / out), max_new_tokens=200,
                temperature=0.0, dtype="fp32", batch_size=20)
    return evaluate.Args(**{**base, **kw})


def _predictions(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_serving_stack_loads_the_standard_processor(checkpoint):
    """In an environment with torchvision, AutoProcessor gives Qwen2.5-VL's own processor for our
    checkpoint: what transformers serve and vLLM build (with today's checkpoints it gave the tokenizer)."""
    probe = ("from transformers import AutoProcessor; import sys; "
             "p = AutoProcessor.from_pretrained(sys.argv[1]); "
             "print(type(p).__name__, type(p.image_processor).__name__, type(p.video_processor).__name__)")
    out = subprocess.run([str(SERVE_PYTHON), "-c", probe, str(checkpoint)], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    assert out == ["Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"]


def test_the_server_sees_the_image(served, work):
    """Issue: the server dropped every image silently; usage.prompt_tokens was the same with and without."""
    url = backends.image_data_url(ImageRef(path=work / "data" / "images" / "eval-00000.png"))
    text = {"type": "text", "text": "How many red shapes are in the image?"}
    with_image = served.chat([{"type": "image_url", "image_url": {"url": url}}, text])["usage"]["prompt_tokens"]
    without = served.chat([text])["usage"]["prompt_tokens"]
    assert with_image - without == IMAGE_TOKENS


@pytest.fixture(scope="module")
def local_run(checkpoint, work):
    summary = evaluate.main(_eval_args(work, checkpoint, "eval-local", model=str(checkpoint)))
    AcceleratorState._reset_state(True)
    return summary


@pytest.fixture(scope="module")
def server_run(served, checkpoint, work):
    return evaluate.main(_eval_args(work, checkpoint, "eval-server", api_base=served.url, api_model=str(checkpoint),
                                    concurrency=4))


def test_scores_through_the_server_equal_local_greedy_evaluation(local_run, server_run, work):
    local, remote = local_run, server_run
    assert local["format_rate"] > 0.5, local                   # the model is trained: scores mean something
    mine = {r["id"]: r for r in _predictions(work / "eval-local" / "predictions.jsonl")}
    theirs = {r["id"]: r for r in _predictions(work / "eval-server" / "predictions.jsonl")}
    assert mine.keys() == theirs.keys() and len(mine) == N_EVAL
    for key in mine:
        for field in ("extracted", "correct", "format_ok", "length"):
            assert mine[key][field] == theirs[key][field], (key, field, mine[key], theirs[key])
    assert remote["accuracy"] == local["accuracy"] and remote["format_rate"] == local["format_rate"]
    assert remote["length_unit"] == "tokens"


def test_a_killed_and_restarted_server_loses_and_duplicates_nothing(checkpoint, work, server_run):
    """kill -9 the server while evaluate.py streams through it, restart it on the same port: the client
    waits, retries, and ends with every record exactly once, the same as an undisturbed run."""
    server = Server("transformers", checkpoint, work / "restart.log").start()
    out = work / "eval-killed"
    cmd = [sys.executable, str(ROOT / "evaluate.py"), "--api_base", server.url, "--api_model", str(checkpoint),
           "--data", str(work / "data" / "eval.jsonl"), "--output_dir", str(out), "--max_new_tokens", "200",
           "--temperature", "0", "--concurrency", "4", "--backoff_base", "0.5", "--backoff_max", "4",
           "--max_retries", "30"]
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            path = out / "predictions.jsonl"
            if path.exists() and len(path.read_text().splitlines()) >= 8:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("no progress before the kill")
        server.kill9()
        time.sleep(3)                                             # the client sees refused connections
        assert client.poll() is None, client.stdout.read()       # ... and keeps waiting
        server.start()
        output, _ = client.communicate(timeout=600)
    finally:
        client.kill()
        server.stop()
    assert client.returncode == 0, output
    records = _predictions(out / "predictions.jsonl")
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == N_EVAL
    undisturbed = {r["id"]: r["response"] for r in _predictions(work / "eval-server" / "predictions.jsonl")}
    assert {r["id"]: r["response"] for r in records} == undisturbed        # as without the kill


def test_transformers_serve_samples_greedily_whatever_temperature_is_asked(served, server_run):
    """The caveat evaluate.py writes into summary.json for --api_base runs: a server may not sample as
    asked. transformers serve decodes greedily when the checkpoint's generation_config says
    do_sample: false (as our toy checkpoints do), whatever temperature the request sends."""
    assert json.loads((served.model / "generation_config.json").read_text()).get("do_sample") is False
    text = [{"type": "text", "text": "How many red shapes are in the image?"}]
    replies = {served.chat(text, max_tokens=24, temperature=1.5)["choices"][0]["message"]["content"]
               for _ in range(3)}
    assert len(replies) == 1                                     # no sampling happened
    assert "may not sample as requested" in server_run["sampling"]


def test_bridge_through_transformers_serve_and_vllm(served, checkpoint, work):
    """Modality bridging over HTTP: the MLLM steps through transformers serve (with images), the
    reasoner through vLLM serving a text model. The MLLM's replies equal a local greedy run's."""
    reasoner = Server("vllm", tiny.build_text(work / "reasoner", hidden_size=256), work / "vllm.log").start()   # head_dim 64: vLLM's CPU attention has no kernel for 16
    common = dict(data=str(work / "data" / "rl_train.jsonl"), limit=4, mllm_max_new_tokens=48,
                  reasoner_max_new_tokens=64, mllm_temperature=0.0, reasoner_temperature=0.0, concurrency=4)
    try:
        report = bridge.main(bridge.Args(**common, output_dir=str(work / "bridge-http"), mllm=str(checkpoint),
                                         mllm_backend="openai", mllm_api_base=served.url,
                                         reasoner=str(reasoner.model), reasoner_backend="openai",
                                         reasoner_api_base=reasoner.url))
    finally:
        reasoner.stop()
    local = bridge.main(bridge.Args(**common, output_dir=str(work / "bridge-local"), mllm=str(checkpoint),
                                    reasoner=str(reasoner.model), reasoner_backend="causal_lm", dtype="fp32"))
    assert report["records_in"] == local["records_in"] == 4
    assert report["stage_outputs"] == {"pseudo_cot": 4, "description": 4, "reasoning": 4}
    for name in ("stage1_pseudo_cot.jsonl", "stage2_description.jsonl"):    # the server strips trailing space
        http = {r["id"]: r["content"].strip() for r in _predictions(work / "bridge-http" / name)}
        here = {r["id"]: r["content"].strip() for r in _predictions(work / "bridge-local" / name)}
        assert http == here, name
    stage3 = _predictions(work / "bridge-http" / "stage3_reasoning.jsonl")
    assert all(isinstance(r["tokens"], int) and r["tokens"] > 0 for r in stage3)   # vLLM reports usage
