"""minivr1/backends.py: the reply-to-format mapping (table-driven), the OpenAI-compatible HTTP
backend against a scripted local server (answers, reasoning_content, 429/500/hang/malformed
then success, Retry-After, 401/403/404/400 without retries, bounded concurrency, images inline),
the API key never leaking, evaluate.py through the server, and the local causal-LM backend."""
from __future__ import annotations

import base64
import json
import logging
import os
import time

import pytest
from accelerate.state import AcceleratorState

import bridge
import evaluate
from fake_openai_server import FakeOpenAIServer, completion, user_text
from minivr1 import backends, grader
from minivr1.backends import BackendError, ChatRequest, OpenAIBackend, Sampling
from minivr1.data import ImageRef

KEY = "sk-test-7f3aZZdistinctiveKEY91"     # set in the environment by the `key` fixture
ENV = "MINIVR1_TEST_API_KEY"
SAMPLING = Sampling(max_new_tokens=32, temperature=0.6, top_p=0.95)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """The test server is on 127.0.0.1: a proxy from the environment must not get in between."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(ENV, KEY)
    return KEY


def _backend(url, **kw) -> OpenAIBackend:
    base = dict(api_key_env=ENV, concurrency=2, timeout=0.3, max_retries=3, backoff_base=0.01, backoff_max=0.05)
    return OpenAIBackend(url, "served-model", **{**base, **kw})


def _image(toy_dir) -> ImageRef:
    return ImageRef(path=toy_dir / "data" / "images" / "rl_train-00000.png")


# ----------------------------------------------------------------------------- reply -> format

R1_CASES = [
    # (content, reasoning, expected r1_response)
    ("The answer is \\boxed{7}.", "count: 3 + 4 = 7", "<think>\ncount: 3 + 4 = 7\n</think>\n<answer>7</answer>"),
    ("Summary...\n<answer>B</answer>", "think", "<think>\nthink\n</think>\n<answer>B</answer>"),
    ("So x = \\boxed{\\frac{1}{2}} at last", "t", "<think>\nt\n</think>\n<answer>\\frac{1}{2}</answer>"),
    ("Steps.\nFinal answer: 12", "t", "<think>\nt\n</think>\n<answer>12</answer>"),
    ("Steps.\n**Answer:** C", "t", "<think>\nt\n</think>\n<answer>C</answer>"),
    ("<think>\nlet me see\n</think>\n\nIt is \\boxed{5}.", None, "<think>\nlet me see\n</think>\n<answer>5</answer>"),
    ("let me see\n</think>\nIt is \\boxed{5}.", None, "<think>\nlet me see\n</think>\n<answer>5</answer>"),  # template opened <think>
    ("", "thinking cut off by the limit", "<think>\nthinking cut off by the limit\n</think>\n"),   # no answer: format fails
    ("<think>a</think><answer>3</answer>", None, "<think>\na\n</think>\n<answer>3</answer>"),  # formatted: same layout
    ("just text", None, "just text"),                                                             # nothing to map
]


@pytest.mark.parametrize("content,reasoning,expected", R1_CASES)
def test_r1_response(content, reasoning, expected):
    assert backends.r1_response(content, reasoning) == expected


def test_r1_response_format_verdicts():
    assert grader.parse_response(backends.r1_response("x \\boxed{7}", "r")).format_ok
    assert not grader.parse_response(backends.r1_response("", "r")).format_ok


def test_raw_response_keeps_the_output_as_generated():
    assert backends.raw_response("<answer>3</answer>", "r") == "<think>\nr\n</think>\n<answer>3</answer>"
    assert backends.raw_response("The answer is 3", "r") == "<think>\nr\n</think>\nThe answer is 3"   # format fails
    assert backends.raw_response("as is", None) == "as is"


# ----------------------------------------------------------------------------- HTTP backend


def test_scripted_failures_are_retried_and_every_record_arrives(toy_dir, key, caplog, capfd):
    scripts = {"ok": ["ok"], "reasoning": ["reasoning"], "rate": ["429", "ok"], "crash": ["500", "ok"],
               "hang": ["hang", "ok"], "badjson": ["badjson", "ok"], "slow1": ["slow"], "slow2": ["slow"]}
    image = _image(toy_dir)
    requests = [ChatRequest(f"id-{case}", f"<image>case={case} How many?", [image]) for case in scripts]
    requests.append(ChatRequest("id-text", "case=ok text only", [], system="Be brief."))
    with caplog.at_level(logging.DEBUG), FakeOpenAIServer(scripts) as server:
        t0 = time.monotonic()
        results = {r.key: r for r in _backend(server.url).complete(requests, SAMPLING)}
        elapsed = time.monotonic() - t0
    assert set(results) == {r.key for r in requests}
    assert dict(server.counts) == {"ok": 2, "reasoning": 1, "rate": 2, "crash": 2, "hang": 2, "badjson": 2,
                                   "slow1": 1, "slow2": 1}
    assert elapsed < 5
    for case in ("ok", "rate", "crash", "hang", "badjson"):
        r = results[f"id-{case}"]
        assert r.content == f"answer for {case}" and r.completion_tokens == 7 and r.finish_reason == "stop"
    r = results["id-reasoning"]
    assert r.reasoning.startswith("Let me count") and "\\boxed{42}" in r.content
    response = backends.r1_response(r.content, r.reasoning)
    assert grader.parse_response(response).format_ok and grader.extract_answer(response) == "42"
    assert grader.count_wait(response) == 1

    # the request: images inline as data URLs holding the file's bytes, then the text; a key header
    first = next(q for q in server.requests if q["case"] == "ok" and q["body"]["messages"][-1]["content"] != "case=ok text only")
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == f"Bearer {KEY}"
    body = first["body"]
    assert body["model"] == "served-model" and body["max_tokens"] == 32 and body["temperature"] == 0.6
    parts = body["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"] and parts[1]["text"] == "case=ok How many?"
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == image.path.read_bytes()
    text_only = next(q["body"] for q in server.requests if user_text(q["body"]) == "case=ok text only")
    assert text_only["messages"] == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "case=ok text only"}]   # a plain string

    # retries were logged, and nothing anywhere shows the key
    assert "HTTP 429" in caplog.text and "HTTP 500" in caplog.text and "malformed reply" in caplog.text
    assert "no reply within" in caplog.text
    out, err = capfd.readouterr()
    assert KEY not in caplog.text + out + err


def test_at_most_concurrency_requests_in_flight(key):
    with FakeOpenAIServer({"slow": ["slow"]}) as server:
        requests = [ChatRequest(str(i), "case=slow") for i in range(6)]
        results = list(_backend(server.url, concurrency=2, timeout=5).complete(requests, SAMPLING))
    assert sorted(r.key for r in results) == [str(i) for i in range(6)]
    assert server.max_in_flight == 2


def test_retry_after_is_honoured(key):
    with FakeOpenAIServer({"wait": ["429:0.4", "ok"]}) as server:
        t0 = time.monotonic()
        [r] = _backend(server.url, backoff_max=0.01).complete([ChatRequest("a", "case=wait")], SAMPLING)
        assert time.monotonic() - t0 >= 0.4 and r.content == "answer for wait"
        assert server.counts["wait"] == 2


@pytest.mark.parametrize("status,expected", [
    ("401", f"rejected the API key in the environment variable {ENV}"),
    ("404", "not found (HTTP 404: The model does not exist)"),
    ("400", "refused the request (HTTP 400: scripted 400)"),
])
def test_client_errors_fail_at_once_with_a_clear_message(key, status, expected, caplog, capfd):
    with caplog.at_level(logging.DEBUG), FakeOpenAIServer({"bad": [status]}) as server:
        with pytest.raises(BackendError) as info:
            list(_backend(server.url, max_retries=5).complete([ChatRequest("a", "case=bad")], SAMPLING))
        assert server.counts["bad"] == 1                       # no retry loop
    message = str(info.value)
    assert expected in message
    out, err = capfd.readouterr()
    for text in (message, repr(info.value), caplog.text, out, err, repr(_backend("http://x/v1"))):
        assert KEY not in text                                  # the 401 body echoed it: redacted
    if status == "401":
        assert "***" in message


def test_unset_key_says_which_variable_to_set(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with FakeOpenAIServer({"bad": ["401"]}) as server:
        with pytest.raises(BackendError, match=f"put it in the environment variable {ENV}"):
            list(_backend(server.url).complete([ChatRequest("a", "case=bad")], SAMPLING))
        assert "Authorization" not in server.requests[0]["headers"]


def test_persistent_failures_give_up_with_a_clear_error(key):
    with FakeOpenAIServer({"bad": ["badjson"], "down": ["500"]}) as server:
        with pytest.raises(BackendError, match=r"malformed reply .* gave up after 3 attempts"):
            list(_backend(server.url, max_retries=2).complete([ChatRequest("a", "case=bad")], SAMPLING))
        with pytest.raises(BackendError, match=r"HTTP 500 .* gave up after 2 attempts"):
            list(_backend(server.url, max_retries=1).complete([ChatRequest("b", "case=down")], SAMPLING))
        assert server.counts["bad"] == 3 and server.counts["down"] == 2


# ----------------------------------------------------------------------------- scripts through HTTP


def _stage_aware(body: dict) -> dict:
    """Replies by bridging step: a caption, a description, an R1-style reply with reasoning_content."""
    text = user_text(body)
    if text.startswith("Look at the image"):
        return {"content": "The image shows a grid of coloured squares. Counting them gives the answer."}
    if text.startswith("Given an image"):
        return {"content": "A 4x4 grid. The description lists red, green, blue and yellow squares."}
    reasoning = ("The description says there are squares in a grid. Let me count them one by one, row by row, "
                 "carefully. Wait, let me check the first row again. Yes, the count holds.")
    return {"content": "The count is \\boxed{3}.", "reasoning": reasoning, "tokens": 50}


def test_bridge_over_http_never_writes_or_prints_the_key(toy_dir, tmp_path, key, caplog, capfd):
    out = tmp_path / "bridge"
    with caplog.at_level(logging.DEBUG), FakeOpenAIServer({}, default=_stage_aware) as server:
        args = bridge.Args(data=str(toy_dir / "data" / "rl_train.jsonl"), output_dir=str(out), limit=3,
                           mllm="vl-72b", mllm_backend="openai", mllm_api_base=server.url, mllm_api_key_env=ENV,
                           reasoner="deepseek-reasoner", reasoner_backend="openai", reasoner_api_base=server.url,
                           reasoner_api_key_env=ENV, concurrency=2, request_timeout=5, backoff_base=0.01)
        report = bridge.main(args)
    assert server.counts["default"] == 9                        # 3 records x 3 steps
    assert report["records_in"] == 3 and report["stage_outputs"] == {"pseudo_cot": 3, "description": 3, "reasoning": 3}
    stage3 = [json.loads(line) for line in (out / "stage3_reasoning.jsonl").read_text().splitlines()]
    assert all(r["reasoning"].startswith("The description says") and r["tokens"] == 50 for r in stage3)
    assert json.loads((out / "args.json").read_text())["reasoner_api_key_env"] == ENV
    texts = [p.read_bytes().decode("utf-8", "replace") for p in out.rglob("*") if p.is_file()]
    captured = capfd.readouterr()
    for text in texts + [caplog.text, captured.out, captured.err]:
        assert KEY not in text


@pytest.fixture
def _reset_accelerate():
    yield
    AcceleratorState._reset_state(True)


def test_evaluate_through_a_server_with_resume(toy_dir, tmp_path, key, _reset_accelerate):
    def answer(body):
        return {"content": "<think>\nI count.\n</think>\n<answer>3</answer>", "tokens": 12}

    out = tmp_path / "eval"
    args = evaluate.Args(api_base=None, api_model="served", api_key_env=ENV, data=str(toy_dir / "data" / "eval.jsonl"),
                         output_dir=str(out), limit=3, concurrency=2, request_timeout=5)
    with FakeOpenAIServer({}, default=answer) as server:
        summary = evaluate.main(evaluate.Args(**{**vars(args), "api_base": server.url}))
        assert server.counts["default"] == 3
        again = evaluate.main(evaluate.Args(**{**vars(args), "api_base": server.url}))
        assert server.counts["default"] == 3                   # resumed: nothing asked twice
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["length"] == 12 and r["format_ok"] for r in records)
    assert summary["length_unit"] == again["length_unit"] == "tokens" and summary["model"] == "served"
    assert server.requests[0]["body"]["temperature"] == 0.6 and server.requests[0]["body"]["max_tokens"] == 16000

    def no_usage(body):
        return {"content": "<think>\nI count the squares.\n</think>\n<answer>3</answer>", "tokens": None}

    with FakeOpenAIServer({}, default=no_usage) as server:
        words = evaluate.main(evaluate.Args(**{**vars(args), "api_base": server.url, "output_dir": str(tmp_path / "w")}))
    assert words["length_unit"] == "words" and words["mean_length"] == 7          # whitespace-separated
    assert KEY not in (out / "predictions.jsonl").read_text() + (out / "summary.json").read_text()


# ----------------------------------------------------------------------------- local causal LM


@pytest.fixture(scope="module")
def tiny_causal_lm(tmp_path_factory):
    """A random Qwen2 text model with the tiny tokenizer (it has a chat template)."""
    from minivr1 import tiny
    return tiny.build_text(tmp_path_factory.mktemp("causal") / "lm", hidden_size=32, num_hidden_layers=1)


def test_causal_lm_backend_generates_text_only(tiny_causal_lm, toy_dir):
    lm = backends.CausalLMBackend(str(tiny_causal_lm), batch_size=2, dtype="fp32")
    requests = [ChatRequest("a", "How many red shapes?"), ChatRequest("b", "Count again", system="Be brief."),
                ChatRequest("c", "And now?")]
    results = list(lm.complete(requests, Sampling(5, temperature=0.0)))
    assert [r.key for r in results] == ["a", "b", "c"]
    assert all(isinstance(r.content, str) and 1 <= r.completion_tokens <= 5 for r in results)
    with pytest.raises(BackendError, match="text only"):
        list(lm.complete([ChatRequest("d", "look", [_image(toy_dir)])], Sampling(5, temperature=0.0)))


def test_completion_helper_shape():
    reply = completion({"model": "m"}, "c", reasoning="r", tokens=None)
    assert "usage" not in reply and reply["choices"][0]["message"]["reasoning_content"] == "r"


# ----------------------------------------------------------------------------- the client's edges


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wrong_port_fails_fast_saying_nothing_listens(key):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    t0 = time.monotonic()
    with pytest.raises(BackendError, match=f"nothing listens at {url}"):
        list(_backend(url, max_retries=5, backoff_base=1.0).complete([ChatRequest("a", "hi")], SAMPLING))
    assert time.monotonic() - t0 < 1.0                           # not a retry loop


def test_a_server_that_restarts_loses_no_request(key):
    """Refused connections after the server has answered once are a restart: wait and retry."""
    port = _free_port()
    requests = [ChatRequest(str(i), "case=slow") for i in range(6)]
    backend = _backend(f"http://127.0.0.1:{port}/v1", concurrency=2, timeout=5, max_retries=8, backoff_base=0.05,
                       backoff_max=0.2)
    results = []
    server = FakeOpenAIServer({"slow": ["slow"]}, port=port).__enter__()
    for r in backend.complete(requests, SAMPLING):
        results.append(r.key)
        if len(results) == 2:                                     # the server goes away ...
            server.__exit__(None, None, None)
            time.sleep(0.3)
            server = FakeOpenAIServer({"slow": ["slow"]}, port=port).__enter__()   # ... and comes back
    server.__exit__(None, None, None)
    assert sorted(results) == sorted(r.key for r in requests)


def test_fastapi_error_detail_is_shown_as_its_message(key):
    with FakeOpenAIServer({"bad": ["422"]}) as server:
        with pytest.raises(BackendError) as info:
            list(_backend(server.url).complete([ChatRequest("a", "case=bad")], SAMPLING))
    assert "HTTP 422: body.top_k: Extra inputs are not permitted" in str(info.value)
    assert "{" not in str(info.value)


def test_a_one_at_a_time_server_gets_no_retry_storm(key):
    """Issue: against a server that generates one request at a time, a timeout shorter than the queue
    turned waiting into retries: 115 requests for 40 records, then the client gave up. A timeout now
    halves the requests in flight, so the queue shrinks instead of growing."""
    n = 16
    with FakeOpenAIServer({"q": ["serial"]}, serial_s=0.1) as server:
        requests = [ChatRequest(str(i), "case=q") for i in range(n)]
        backend = _backend(server.url, concurrency=8, timeout=0.45, max_retries=6, backoff_base=0.01,
                           backoff_max=0.05)
        results = list(backend.complete(requests, SAMPLING))
    assert sorted(r.key for r in results) == sorted(r.key for r in requests)
    assert server.counts["q"] <= 2 * n, server.counts["q"]        # fewer resends than records


def test_evaluate_and_bridge_share_the_client_options():
    import dataclasses

    shared = {f.name for f in dataclasses.fields(backends.ClientArgs)}
    assert {"max_retries", "request_timeout", "connect_timeout", "concurrency"} <= shared
    for script in (evaluate.Args, bridge.Args):
        names = {f.name for f in dataclasses.fields(script)}
        assert shared <= names, script


def test_a_dead_server_is_one_clean_line_from_evaluate(toy_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    url = f"http://127.0.0.1:{_free_port()}/v1"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "evaluate.py"), "--api_base", url, "--api_model", "m",
                           "--data", str(toy_dir / "data" / "eval.jsonl"), "--output_dir", str(tmp_path / "e")],
                          capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"nothing listens at {url}" in last


def test_a_wrong_argument_combination_is_exit_2_and_one_line(tmp_path):
    """evaluate.py and bridge.py end a user's wrong flags like every script: status 2, one `error:` line."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cases = [
        (["evaluate.py", "--model", "m", "--output_dir", str(tmp_path / "e")], "--model needs --data"),
        (["bridge.py", "--data", str(tmp_path / "d.jsonl"), "--output_dir", str(tmp_path / "b"),
          "--mllm", "m", "--mllm_backend", "openai", "--reasoner", "r"], "--mllm_backend openai needs --mllm_api_base"),
    ]
    for argv, message in cases:
        proc = subprocess.run([sys.executable, str(root / argv[0]), *argv[1:]], capture_output=True, text=True,
                              timeout=120, cwd=root, env={**os.environ, "MINIVR1_DEBUG": ""})
        assert proc.returncode == 2, (argv[0], proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), (argv[0], lines)
