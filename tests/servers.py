"""Real inference servers as subprocesses, for the real-server test tier (`pytest -m real_server`).

`transformers serve` and vLLM run from their own virtual environments, which
`scripts/real_servers.sh` builds (their pins differ from the project's): the environment variables
MINIVR1_SERVE_PYTHON and MINIVR1_VLLM_PYTHON override where their interpreters are.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVE_PYTHON = Path(os.environ.get("MINIVR1_SERVE_PYTHON", ROOT / ".venv-serve" / "bin" / "python"))
VLLM_PYTHON = Path(os.environ.get("MINIVR1_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
SETUP = "bash scripts/real_servers.sh (it builds .venv-serve and .venv-vllm, then runs this tier)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(python: Path) -> None:
    """The tier fails, rather than skips, when a server's environment is missing."""
    if not python.is_file():
        raise AssertionError(f"{python} not found: set up the real-server environments with {SETUP}")


class Server:
    """A server process on 127.0.0.1:`port` serving `model` (a directory); start, kill -9, restart."""

    def __init__(self, kind: str, model: Path, log: Path, port: int | None = None):
        self.kind, self.model, self.log = kind, Path(model), Path(log)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    def command(self) -> tuple[list[str], dict]:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        if self.kind == "transformers":
            require(SERVE_PYTHON)
            return [str(SERVE_PYTHON), "-m", "transformers.cli.transformers", "serve", str(self.model),
                    "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"], env
        require(VLLM_PYTHON)                 # vLLM's CPU build: a text model, fp32, no CUDA graphs
        env.update(VLLM_CPU_KVCACHE_SPACE="1")
        return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--enforce-eager",
                "--gpu-memory-utilization", "0.1", "--max-model-len", "2048"], env

    def start(self, timeout: float = 240) -> Server:
        cmd, env = self.command()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.kind} server exited with {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"{self.kind} server did not come up within {timeout} s; see {self.log}")

    def kill9(self) -> None:
        """SIGKILL the whole process group: no graceful shutdown, as when a machine dies."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    stop = kill9

    def chat(self, content, max_tokens: int = 4, temperature: float = 0.0) -> dict:
        body = {"model": str(self.model), "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens, "temperature": temperature}
        request = urllib.request.Request(f"{self.url}/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            return json.loads(r.read())
