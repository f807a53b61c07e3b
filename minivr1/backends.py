"""Where model outputs come from: local transformers models, or any OpenAI-compatible server.

Every backend has one method,

    backend.complete(requests, sampling) -> iterator of ChatResult, in the order they finish

so a caller appends each result to its output file the moment it arrives (bridge.py and
evaluate.py never lose finished work). A `ChatRequest` is one user turn: its text, its images and
an optional system prompt. `<image>` placeholders in the text mark where images go; with none,
the images go before the text (as in minivr1.chat).

    VLMBackend       any image-text-to-text checkpoint our loaders open (Qwen2.5-VL, ...), batched.
                     Given no images it is a text-only model, which is how the CPU demo uses the
                     tiny VLM as the "reasoning model" too.
    CausalLMBackend  any AutoModelForCausalLM with its tokenizer's chat template (DeepSeek-R1-Distill,
                     Qwen2.5, ...), batched, text only.
    OpenAIBackend    POST {api_base}/chat/completions on any OpenAI-compatible server: `vllm serve`,
                     DeepSeek's API, others.

OpenAIBackend, in detail:
  - Images go inline: each image file's own bytes (full resolution, as the authors evaluated) as a
    base64 data URL in an `image_url` content part. A request without images sends its text as a
    plain string (text-only APIs such as DeepSeek's accept nothing else).
  - The API key is read from the environment variable NAMED by `api_key_env`; the key itself is
    never an argument, and is never printed, logged, saved, or put in an error message (a server
    message that echoes it is redacted). Unset variable: requests go without a key (a local
    `vllm serve` needs none).
  - At most `concurrency` requests are in flight (one thread each). `connect_timeout` seconds to
    connect; then `timeout` seconds for the reply (for a non-streamed request, the whole answer,
    including any time it waits in the server's queue; DeepSeek's API sends keep-alive blank
    lines, which is fine). A timeout means the server is behind: it halves the number of requests
    in flight before the retry (at most once per wave of requests), and each run of that many
    answers in a row raises it by one again, up to `concurrency`. So a server that generates one
    request at a time (`transformers serve`) gets a short queue, not a storm of resends.
  - Retried, up to `max_retries` times, with exponential backoff `backoff_base * 2**attempt`
    (capped at `backoff_max`) times a random jitter factor in [0.5, 1.5), or exactly what a
    Retry-After header asks: HTTP 429, HTTP 5xx, timeouts, dropped connections, a refused
    connection once the server has answered (it is restarting), and a 200 reply whose body is
    not the expected JSON (a body cut short by a proxy or an overloaded server is transient; if
    it persists, BackendError says "malformed reply" with the body's start).
  - Not retried (BackendError at once, and the other requests stop retrying): a refused
    connection before the server ever answered ("nothing listens at URL": wrong port, or not
    started), 401/403 (the key in environment variable X was rejected, or X is not set), 404
    (wrong URL or model name), any other 4xx. Error messages quote the server's own message
    (OpenAI's {"error": {"message"}}, FastAPI's {"detail"}), not its raw JSON.
  - Proxies: the standard http_proxy / https_proxy / no_proxy environment variables apply.
  - A reasoning model's separate reasoning field, `reasoning_content` (DeepSeek, vLLM's reasoning
    parsers) or `reasoning` (newer vLLM), becomes `ChatResult.reasoning`.

A reply maps to our `<think>...</think><answer>...</answer>` format in one of two ways:
  - `raw_response(content, reasoning)`: the output as the model wrote it, the reasoning put back
    between think tags. evaluate.py scores this: a model that gives no answer block scores 0.
  - `r1_response(content, reasoning)`: modality bridging's mapping of a reasoner's reply (step 3);
    see its docstring.
"""
from __future__ import annotations

import base64
import email.utils
import http.client
import io
import itertools
import json
import logging
import os
import queue
import random
import re
import ssl
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from minivr1.cli import UserError
from minivr1.data import ImageRef, Problem

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 600.0  # seconds; a server asking for more is treated as asking for this


class BackendError(UserError, RuntimeError):
    """A request that cannot succeed (bad key, wrong URL, a 4xx, retries used up); says what to do."""


@dataclass
class ClientArgs:
    """How evaluate.py and bridge.py talk to OpenAI-compatible servers (the same flags in both)."""

    concurrency: int = field(default=32, metadata={"help": "openai backends: most requests in flight at once (fewer while the server times out)"})
    connect_timeout: float = field(default=10.0, metadata={"help": "openai backends: seconds to connect to the server"})
    request_timeout: float = field(default=1200.0, metadata={"help": "openai backends: seconds to wait for a reply, queueing at the server included; a timeout halves the requests in flight and retries"})
    max_retries: int = field(default=10, metadata={"help": "openai backends: retries of a request on 429, 5xx, timeouts, dropped connections, a restarting server, malformed replies (the default waits ~5 min in all)"})
    backoff_base: float = field(default=1.0, metadata={"help": "openai backends: first retry waits about this many seconds, doubling each time (jittered; Retry-After wins)"})
    backoff_max: float = field(default=60.0, metadata={"help": "openai backends: longest wait between retries, in seconds"})

    def client_options(self) -> dict:
        """These options as OpenAIBackend keyword arguments."""
        return dict(concurrency=self.concurrency, connect_timeout=self.connect_timeout, timeout=self.request_timeout,
                    max_retries=self.max_retries, backoff_base=self.backoff_base, backoff_max=self.backoff_max)


@dataclass
class ChatRequest:
    key: str                                             # the record id; its result carries it back
    text: str                                            # the user turn; "<image>" marks where images go
    images: list[ImageRef] = field(default_factory=list)
    system: str | None = None                            # None: the chat template's / server's default


@dataclass
class ChatResult:
    key: str
    content: str                                         # the reply (for a reasoning server: after the reasoning)
    reasoning: str | None = None                         # a server's separate reasoning field, if any
    completion_tokens: int | None = None                 # None when the server reports no usage
    finish_reason: str | None = None                     # "stop" | "length" | ...


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0                             # 0 = greedy
    top_p: float = 1.0


# ----------------------------------------------------------------------------- reply -> format


def raw_response(content: str, reasoning: str | None) -> str:
    """The model's output as generated: a split-off reasoning goes back between think tags."""
    return content if reasoning is None else f"<think>\n{reasoning.strip()}\n</think>\n{content.lstrip()}"


_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.S)
_FINAL = re.compile(r"final answer\s*(?:is)?\s*[:：]?\s*(.+)", re.I)


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces matched (answers like \\frac{1}{2} nest)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None                                     # unclosed: cut off mid-answer


def final_answer(text: str) -> str | None:
    """The final answer stated in a reply's text: its own <answer> block (the last), else the last
    \\boxed{} (what DeepSeek recommends asking R1 for), else a "Final answer: X" line, else the last
    non-empty line with markdown emphasis and a leading "Answer:" removed. None for an empty text."""
    blocks = _ANSWER_BLOCK.findall(text)
    if blocks and blocks[-1].strip():
        return blocks[-1].strip()
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        m = _FINAL.search(line)
        if m and m.group(1).strip(" *$."):
            return m.group(1).strip(" *$")
    if not lines:
        return None
    last = re.sub(r"^(?:\*\*)?answer\s*[:：]\s*", "", lines[-1].replace("**", ""), flags=re.I).strip()
    return last or None


def r1_response(content: str, reasoning: str | None) -> str:
    """A reasoner's reply as `<think>\\n{thinking}\\n</think>\\n<answer>{answer}</answer>`.

    thinking: the server's separate reasoning field when present; else the text before the
    reply's own `</think>` (R1-style models served without a reasoning parser, or local ones);
    else there is no thinking to find, and the reply is returned unchanged (the format filter
    drops it). answer: `final_answer` of what follows the thinking; the rest of that text
    (R1 writes a tidy summary of its solution there) is dropped, as the target format has only
    the two blocks. No answer found (e.g. cut off by the length limit): no answer block, so
    the format filter drops it.
    """
    if reasoning is not None:
        think, rest = reasoning, content
    elif "</think>" in content:
        think, _, rest = content.partition("</think>")
        think = think.replace("<think>", "", 1)
    else:
        return content
    answer = final_answer(rest)
    tail = f"<answer>{answer}</answer>" if answer else ""
    return f"<think>\n{think.strip()}\n</think>\n{tail}"


def strip_thinking(content: str) -> str:
    """A reply without its `<think>...</think>` part (for outputs that are not reasoning traces)."""
    return content.partition("</think>")[2].strip() if "</think>" in content else content.strip()


# ----------------------------------------------------------------------------- local models


def _batches(requests: Iterable[ChatRequest], size: int) -> Iterator[list[ChatRequest]]:
    """Consecutive batches of `size`, split where the system prompt changes (one per batch)."""
    for _, group in itertools.groupby(requests, key=lambda r: r.system):
        group = iter(group)
        while chunk := list(itertools.islice(group, size)):
            yield chunk


class VLMBackend:
    """A local image-text-to-text model (via minivr1.models), `batch_size` requests per generate call."""

    def __init__(self, model: str, batch_size: int = 8, dtype: str = "auto", max_pixels: int | None = None,
                 seed: int = 0, trust_remote_code: bool = False):
        import torch

        from minivr1 import models

        self.model = models.load_for_inference(model, dtype, trust_remote_code=trust_remote_code)
        self.processor = models.load_processor(model, max_pixels, trust_remote_code)
        self.batch_size = batch_size
        torch.manual_seed(seed)

    def complete(self, requests: Iterable[ChatRequest], sampling: Sampling) -> Iterator[ChatResult]:
        from minivr1 import rollout
        from minivr1.chat import prompt_batch

        for chunk in _batches(requests, self.batch_size):
            problems = [Problem(id=r.key, question=r.text, answer="", images=r.images) for r in chunk]
            batch = prompt_batch(self.processor, problems, chunk[0].system)
            ro = rollout.generate(self.model, self.processor, batch, sampling.max_new_tokens, sampling.temperature,
                                  sampling.top_p, do_sample=sampling.temperature > 0)
            for r, text, n, cut in zip(chunk, ro.texts, ro.completion_mask.sum(1).tolist(), ro.truncated.tolist()):
                yield ChatResult(r.key, text, None, int(n), "length" if cut else "stop")


class CausalLMBackend:
    """A local text-only model: AutoModelForCausalLM, prompts built by its tokenizer's chat template."""

    def __init__(self, model: str, batch_size: int = 8, dtype: str = "auto", seed: int = 0,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from minivr1 import models

        models.check_source(model)
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"           # batched generation continues every row at the end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=models.resolve_dtype(dtype), trust_remote_code=trust_remote_code).eval().to(device)
        self.batch_size = batch_size
        torch.manual_seed(seed)

    def complete(self, requests: Iterable[ChatRequest], sampling: Sampling) -> Iterator[ChatResult]:
        import torch

        from minivr1 import rollout

        tok, device = self.tokenizer, self.model.device
        eos = rollout.eos_token_ids(self.model, tok)
        greedy = sampling.temperature <= 0
        for chunk in _batches(requests, self.batch_size):
            if any(r.images for r in chunk):
                raise BackendError(f"request {chunk[0].key!r} has images, but a causal LM backend is text only: "
                                   "use the vlm or openai backend for the steps that see the image")
            texts = [tok.apply_chat_template(([{"role": "system", "content": r.system}] if r.system else [])
                                             + [{"role": "user", "content": r.text}],
                                             add_generation_prompt=True, tokenize=False) for r in chunk]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = self.model.generate(**enc, max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                                          temperature=None if greedy else sampling.temperature,
                                          top_p=None if greedy else sampling.top_p, top_k=None if greedy else 0,
                                          eos_token_id=eos, pad_token_id=tok.pad_token_id)
            completion = out[:, enc["input_ids"].shape[1]:]
            mask, truncated = rollout.completion_mask(completion, eos)
            completion = torch.where(mask.bool(), completion, torch.full_like(completion, tok.pad_token_id))
            decoded = tok.batch_decode(completion, skip_special_tokens=True)
            for r, text, n, cut in zip(chunk, decoded, mask.sum(1).tolist(), truncated.tolist()):
                yield ChatResult(r.key, text, None, int(n), "length" if cut else "stop")


# ----------------------------------------------------------------------------- OpenAI-compatible HTTP


class _Secret:
    """Holds the API key; its repr never shows it (tracebacks with locals, debuggers, logs)."""

    def __init__(self, value: str | None):
        self._value = value or None

    def __repr__(self) -> str:
        return "<secret>" if self._value else "<no secret>"

    def reveal(self) -> str | None:
        return self._value

    def redact(self, text: str) -> str:
        return text.replace(self._value, "***") if self._value else text


class _Retryable(Exception):
    """A failed attempt worth repeating; `wait` is the server's Retry-After in seconds, if any;
    `timeout` says the server did not answer in time (so fewer requests should be in flight)."""

    def __init__(self, problem: str, wait: float | None = None, timeout: bool = False):
        super().__init__(problem)
        self.problem, self.wait, self.timeout = problem, wait, timeout


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (a number, or an HTTP date), capped; None if absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


class _InFlight:
    """At most `limit` requests in flight, `limit` adapting between 1 and `most`: a timeout halves the
    limit the request was sent under (so a wave of timeouts halves it once), and `limit` answers in a
    row raise it by one (additive increase, multiplicative decrease, as TCP does)."""

    def __init__(self, most: int, stop: threading.Event):
        self.most = self.limit = most
        self.active = self.streak = 0
        self.stop = stop
        self._cond = threading.Condition()

    def enter(self) -> int:
        """Wait for a slot; returns the limit the request goes out under."""
        with self._cond:
            while self.active >= self.limit and not self.stop.is_set():
                self._cond.wait(0.1)
            self.active += 1
            return self.limit

    def leave(self, outcome: str, sent_under: int) -> None:
        """outcome: "answered", "timeout" or "failed" (anything else: no change to the limit)."""
        with self._cond:
            self.active -= 1
            if outcome == "timeout":
                new = min(self.limit, max(1, sent_under // 2))
                if new < self.limit:
                    log.warning("the server is not answering within the timeout: %d requests in flight at most, "
                                "not %d", new, self.limit)
                self.limit, self.streak = new, 0
            elif outcome == "answered":
                self.streak += 1
                if self.streak >= self.limit and self.limit < self.most:
                    self.limit, self.streak = self.limit + 1, 0
            self._cond.notify_all()


def image_data_url(ref: ImageRef) -> str:
    """An image inline as `data:image/<fmt>;base64,...`: the file's own bytes when they are a format
    every server reads (PNG, JPEG, WebP, GIF), else re-encoded as PNG. Size is checked first."""
    from PIL import Image

    ref.size()                                   # raises ImageError when missing, unreadable or too large
    raw = ref.data if ref.data is not None else ref.path.read_bytes()
    with Image.open(io.BytesIO(raw)) as image:
        fmt = (image.format or "").lower()
    if fmt not in ("png", "jpeg", "webp", "gif"):
        buf = io.BytesIO()
        ref.load().save(buf, format="PNG")
        raw, fmt = buf.getvalue(), "png"
    return f"data:image/{fmt};base64,{base64.b64encode(raw).decode('ascii')}"


def openai_messages(request: ChatRequest) -> list[dict]:
    """Chat-completions messages: image_url parts where the images go (minivr1.chat's placement)."""
    from minivr1.chat import user_content       # here: chat imports torch, which an HTTP-only run never needs

    messages = [{"role": "system", "content": request.system}] if request.system else []
    if not request.images:
        return messages + [{"role": "user", "content": request.text}]
    images = iter(request.images)
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(next(images))}} if p["type"] == "image"
             else p for p in user_content(request.text, len(request.images))]
    return messages + [{"role": "user", "content": parts}]


def _connection(url: str, connect_timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """A not-yet-connected HTTP(S) connection for `url` (through the environment's proxy, if any)
    and the request target to send on it."""
    u = urllib.parse.urlsplit(url)
    https = u.scheme == "https"
    port = u.port or (443 if https else 80)
    proxy = urllib.request.getproxies().get(u.scheme)
    if proxy and urllib.request.proxy_bypass(u.hostname or ""):
        proxy = None
    target = u.path + (f"?{u.query}" if u.query else "")
    if not proxy:
        cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
        kwargs = {"context": ssl.create_default_context()} if https else {}
        return cls(u.hostname, port, timeout=connect_timeout, **kwargs), target
    p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    if https:                                   # a CONNECT tunnel through the proxy
        conn = http.client.HTTPSConnection(p.hostname, p.port or 80, timeout=connect_timeout,
                                           context=ssl.create_default_context())
        conn.set_tunnel(u.hostname, port)
        return conn, target
    return http.client.HTTPConnection(p.hostname, p.port or 80, timeout=connect_timeout), url   # absolute URL


class OpenAIBackend:
    """An OpenAI-compatible chat-completions server (see the module docstring for the behaviour)."""

    def __init__(self, api_base: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8,
                 timeout: float = 1200.0, max_retries: int = 10, backoff_base: float = 1.0, backoff_max: float = 60.0,
                 connect_timeout: float = 10.0):
        if not api_base or not model:
            raise ValueError("an OpenAI-compatible backend needs a base URL (e.g. http://localhost:8000/v1) "
                             "and a model name")
        base = api_base.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.concurrency, self.timeout, self.max_retries = max(1, concurrency), timeout, max_retries
        self.connect_timeout = connect_timeout
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self._key = _Secret(os.environ.get(api_key_env))
        self._stop = threading.Event()              # set on a fatal error: the other threads stop retrying
        self._in_flight = _InFlight(self.concurrency, self._stop)
        self._answered = False                      # has the server ever answered? (refused: restart, not a typo)
        if self._key.reveal() is None:
            log.info("environment variable %s is not set: sending requests without an API key", api_key_env)

    def __repr__(self) -> str:
        return f"OpenAIBackend(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    def complete(self, requests: Iterable[ChatRequest], sampling: Sampling) -> Iterator[ChatResult]:
        """Results in the order they finish, at most `concurrency` requests in flight.

        One daemon thread per request in flight, started as another finishes (requests are
        built, and their images encoded, only then, so memory stays bounded). Daemon threads:
        after a fatal error or Ctrl-C the process exits at once instead of waiting out the
        requests still in flight (their results are simply redone by the next run).
        """
        self._stop.clear()
        requests = iter(requests)
        results: queue.Queue = queue.Queue()

        def work(request: ChatRequest) -> None:
            try:
                results.put(self._request(request, sampling))
            except BaseException as e:              # handed to the caller's thread, raised there
                results.put(e)

        def start_next() -> int:
            request = next(requests, None)
            if request is None:
                return 0
            threading.Thread(target=work, args=(request,), daemon=True).start()
            return 1

        in_flight = sum(start_next() for _ in range(self.concurrency))
        try:
            while in_flight:
                result = results.get()
                in_flight -= 1
                if isinstance(result, BaseException):
                    raise result                     # a BackendError stops the caller's loop here
                yield result
                in_flight += start_next()
        finally:                                     # an error, Ctrl-C, or the caller stopped early
            self._stop.set()                         # threads still retrying give up

    # -- one request, with retries

    def _request(self, request: ChatRequest, sampling: Sampling) -> ChatResult:
        body = json.dumps({"model": self.model, "messages": openai_messages(request),
                           "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                           "top_p": sampling.top_p}).encode()
        t0 = time.monotonic()
        for attempt in range(self.max_retries + 1):
            if self._stop.is_set():
                raise BackendError(f"request {request.key!r} stopped: another request failed or the run was interrupted")
            sent_under, outcome = self._in_flight.enter(), "failed"
            try:
                raw = self._post(body)
                outcome = "answered"
                return self._parse(request.key, raw)
            except _Retryable as e:
                outcome = "timeout" if e.timeout else "failed"
                if attempt == self.max_retries:
                    raise BackendError(f"request {request.key!r} to {self.url}: {e.problem}; gave up after "
                                       f"{attempt + 1} attempts in {time.monotonic() - t0:.0f} s (raise --max_retries "
                                       f"or --request_timeout, or check the server)") from None
                delay = e.wait if e.wait is not None else \
                    min(self.backoff_max, self.backoff_base * 2 ** attempt) * random.uniform(0.5, 1.5)
                log.warning("request %r: %s; retry %d/%d in %.2f s", request.key, e.problem, attempt + 1,
                            self.max_retries, delay)
            finally:
                self._in_flight.leave(outcome, sent_under)
            if self._stop.wait(delay):
                raise BackendError(f"request {request.key!r} stopped: another request failed or the run was "
                                   "interrupted") from None
        raise AssertionError("unreachable")

    def _post(self, body: bytes) -> bytes:
        """One POST: connect within `connect_timeout`, then the reply within `timeout`."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key.reveal():
            headers["Authorization"] = "Bearer " + self._key.reveal()
        conn, target = _connection(self.url, self.connect_timeout)
        try:
            try:
                conn.connect()
            except ConnectionRefusedError:
                if not self._answered:       # never reached: a wrong URL or a server not started
                    raise BackendError(f"nothing listens at {self.url}: start the server (and wait until it is up), "
                                       "or fix its base URL") from None
                raise _Retryable("the server refused the connection (restarting?)") from None
            except TimeoutError:
                raise _Retryable(f"could not connect within {self.connect_timeout} s (--connect_timeout)") from None
            conn.sock.settimeout(self.timeout)
            conn.request("POST", target, body, headers)
            reply = conn.getresponse()
            status, raw = reply.status, reply.read()
            retry_after = reply.getheader("Retry-After")
        except TimeoutError:
            raise _Retryable(f"no reply within {self.timeout} s (--request_timeout)", timeout=True) from None
        except (OSError, http.client.HTTPException) as e:    # reset, dropped, cut-off body, DNS, TLS
            raise _Retryable(f"connection failed ({type(e).__name__}: {e})") from None
        finally:
            conn.close()
        self._answered = True
        if status == 200:
            return raw
        message = self._server_message(raw)
        if status == 429 or status >= 500:
            raise _Retryable(f"HTTP {status} ({message})", _retry_after(retry_after))
        raise self._fatal(status, message)

    def _server_message(self, raw: bytes) -> str:
        """The server's own error message: OpenAI's {"error": {"message"}}, FastAPI's {"detail": "..."}
        or {"detail": [{"loc": [...], "msg": ...}]}, else the text; short, key redacted."""
        text = raw.decode("utf-8", "replace")
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if isinstance(body, dict):
            err = body.get("error", body.get("detail", body.get("message", text)))
            if isinstance(err, dict):
                err = err.get("message", str(err))
            elif isinstance(err, list):       # FastAPI validation errors
                err = "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg', e)}" if isinstance(e, dict)
                                else str(e) for e in err)
            text = str(err)
        return self._key.redact(" ".join(text.split())[:300]) or "no message"

    def _fatal(self, code: int, message: str) -> BackendError:
        if code in (401, 403):
            if self._key.reveal() is None:
                return BackendError(f"{self.url} refused the request (HTTP {code}: {message}): it needs an API key; "
                                    f"put it in the environment variable {self.api_key_env}")
            return BackendError(f"{self.url} rejected the API key in the environment variable {self.api_key_env} "
                                f"(HTTP {code}: {message}); check the key, or name another variable with the api_key_env option")
        if code == 404:
            return BackendError(f"{self.url} or model {self.model!r} not found (HTTP 404: {message}); the base URL "
                                "usually ends in /v1 (the client appends /chat/completions), and the model must be "
                                "the name the server serves")
        return BackendError(f"{self.url} refused the request (HTTP {code}: {message})")

    def _parse(self, key: str, raw: bytes) -> ChatResult:
        try:
            reply = json.loads(raw)
            choice = reply["choices"][0]
            message = choice["message"]
            content = message.get("content") or ""
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            usage = reply.get("usage") or {}
            tokens = usage.get("completion_tokens")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            start = self._key.redact(raw[:120].decode("utf-8", "replace"))
            raise _Retryable(f"malformed reply (not chat-completions JSON): {start!r}") from None
        return ChatResult(key, content, reasoning, tokens if isinstance(tokens, int) else None,
                          choice.get("finish_reason"))
