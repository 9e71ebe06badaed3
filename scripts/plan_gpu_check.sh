#!/usr/bin/env bash
# Device run of scripts/plan_gpu_check.py (same set-up as scripts/gpu_check.sh: carry .gpu_deps).
set -euo pipefail
cd "$(dirname "$0")/.."
py=python3
if compgen -G ".gpu_deps/wheels/*.whl" >/dev/null; then
    site=/tmp/mopd_gpu_site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu_deps/wheels/*.whl
    PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec "$py" scripts/plan_gpu_check.py "$@"
