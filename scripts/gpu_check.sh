#!/usr/bin/env bash
# GPU check (figures go to docs/benchmarks.md): a few in-process MOPD steps on one CUDA device with a
# ~345M-parameter MiMoV2Flash student; prints tokens/s per phase and MFU (scripts/gpu_check.py).
#
# The device machine has CUDA torch and transformers but no internet, no Ray, no vLLM, and only what
# is carried to it (64 MiB). So, on this machine first:
#   bash scripts/gpu_check.sh --pack      # copies DeepSpeed, omegaconf and their small pure-Python
#                                         # dependencies from .venv into .gpu_deps/ (~27 MB, git-ignored)
# then on the device (the run tool, carry: [".gpu_deps"], timeout_s 540):
#   bash scripts/gpu_check.sh             # about 2-4 minutes; extra arguments go to gpu_check.py
# and on a CPU, the same code path on a tiny student:
#   bash scripts/gpu_check.sh --cpu --tiny
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--pack" ]]; then
    site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    rm -rf .gpu_deps && mkdir -p .gpu_deps
    # msgpack's C extension is optional (it falls back to pure Python on another Python version).
    for pkg in deepspeed omegaconf hjson cpuinfo msgpack einops; do
        cp -r "$site/$pkg" .gpu_deps/
    done
    find .gpu_deps -name __pycache__ -type d -prune -exec rm -rf {} +
    du -sh .gpu_deps
    exit 0
fi

export PYTHONPATH="$PWD:$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
py=python3
[[ -x .venv/bin/python ]] && py=.venv/bin/python
mkdir -p "${OUT:-runs/gpu_check}"
"$py" - <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "transformers", "deepspeed", "omegaconf") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing {', '.join(missing)} (run 'bash scripts/gpu_check.sh --pack' here and carry .gpu_deps)")
import torch, transformers
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}", flush=True)
EOF
exec "$py" scripts/gpu_check.py --json "${OUT:-runs/gpu_check}/gpu_check.json" "$@"
