#!/usr/bin/env bash
# GPU check (figures go to docs/benchmarks.md): a few in-process MOPD steps on one CUDA device with a
# ~345M-parameter MiMoV2Flash student; prints tokens/s per phase and MFU (scripts/gpu_check.py).
#
# The device machine has CUDA torch and transformers but no internet, no Ray, no vLLM, no pydantic
# (which DeepSpeed imports), and only what is carried to it (64 MiB). So, on this machine first:
#   bash scripts/gpu_check.sh --pack      # copies DeepSpeed, omegaconf and their small pure-Python
#                                         # dependencies from .venv into .gpu_deps/, and downloads
#                                         # wheels for the device's Python 3.12 (pydantic with its
#                                         # compiled core, and .venv's transformers) into
#                                         # .gpu_deps/wheels (~30 MB in all, git-ignored)
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
    # Compiled or version-sensitive packages travel as wheels for the device's CPython 3.12 (x86-64).
    pins=$(.venv/bin/python -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in
        ('pydantic', 'pydantic_core', 'annotated_types', 'typing_inspection', 'transformers')))")
    # shellcheck disable=SC2086
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu_deps/wheels $pins
    du -sh .gpu_deps
    exit 0
fi

py=python3
[[ -x .venv/bin/python ]] && py=.venv/bin/python
# The wheels are built for the device's CPython 3.12; a CPU run from .venv uses its own packages.
if compgen -G ".gpu_deps/wheels/*.whl" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    site=/tmp/mopd_gpu_site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .gpu_deps/wheels/*.whl
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p "${OUT:-runs/gpu_check}"
"$py" - <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "transformers", "deepspeed", "omegaconf", "pydantic") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing {', '.join(missing)} (run 'bash scripts/gpu_check.sh --pack' here and carry .gpu_deps)")
import torch, transformers
print(f"torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}", flush=True)
EOF
exec "$py" scripts/gpu_check.py --json "${OUT:-runs/gpu_check}/gpu_check.json" "$@"
