#!/usr/bin/env bash
# GPU check (figures go to docs/benchmarks.md), four parts on one CUDA device:
#   1. a few in-process MOPD steps with a ~345M-parameter MiMoV2Flash student through the product's
#      workers on the device (HF rollout, HF teacher, DeepSpeed trainer under ZeRO-3, bf16): tokens/s
#      per phase and MFU (scripts/gpu_check.py; extra arguments go to it);
#   2. the direct weight sync between two processes on that device: trainer rank 0 (ZeRO-3) sends,
#      an HF rollout worker receives (scripts/gpu_sync_check.py; NCCL, expected to be refused with
#      two ranks on one GPU, then gloo, what a colocated run uses);
#   3. `mopd plan`'s trainer-memory estimate against the peak CUDA memory of real training steps
#      (scripts/plan_gpu_check.py; GPU only);
#   4. long responses (issue 26): the longest row one train step of the same student (at vocabulary
#      151,936) completes, full-logits log-probs vs chunked, without and with gradient
#      checkpointing, and train tokens/s and MFU at 4K and 16K tokens (scripts/gpu_long_check.py).
#      It gets what is left of GPU_CHECK_LIMIT_S (default 530 s, the device call's 540 s less a
#      margin), at most LONG_BUDGET_S (default 150 s), and stops its search there.
#
# The device machine has CUDA torch and transformers but no internet, no Ray, no vLLM, no pydantic
# (which DeepSpeed imports), and only what is carried to it (64 MiB). So, on this machine first:
#   bash scripts/gpu_check.sh --pack      # copies DeepSpeed, omegaconf and their small pure-Python
#                                         # dependencies from .venv into .gpu_deps/, and downloads
#                                         # wheels for the device's Python 3.12 (pydantic with its
#                                         # compiled core, and .venv's transformers) into
#                                         # .gpu_deps/wheels (~30 MB in all, git-ignored)
# then on the device (the run tool, carry: [".gpu_deps"], timeout_s 540):
#   bash scripts/gpu_check.sh             # about 6.5-9 minutes (parts 0-3: 4-6, part 4: at most ~3)
# and on a CPU, parts 1, 2 and 4 through the same code on a tiny student (gloo only):
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
out=${OUT:-runs/gpu_check}
cpu=0
[[ " $* " == *" --cpu "* ]] && cpu=1
if ((!cpu)) && "$py" -c "import pytest" 2>/dev/null; then
    echo "=== 0/4 the device tests (tests/test_devices.py: GPU workers return the CPU workers' results)"
    "$py" -m pytest -q -p no:cacheprovider tests/test_devices.py || echo "device tests: exit status $?"
fi
echo "=== 1/4 MOPD steps on the device (ZeRO-3 unless --zero 2)"
"$py" scripts/gpu_check.py --zero 3 --json "$out/gpu_check.json" "$@"
echo "=== 2/4 direct weight sync, two processes on one device"
if ((cpu)); then
    "$py" scripts/gpu_sync_check.py --cpu --tiny --backends gloo --json "$out/gpu_sync_check.json"
else
    # A refused NCCL group should fail at once; the cap keeps a hang from eating the device time.
    timeout 120 "$py" scripts/gpu_sync_check.py --backends nccl --timeout 60 --json "$out/gpu_sync_nccl.json" ||
        echo "nccl attempt: exit status $?"
    "$py" scripts/gpu_sync_check.py --backends gloo --json "$out/gpu_sync_check.json"
fi
if ((cpu)); then
    echo "=== 3/4 plan vs measured memory: GPU only, skipped"
else
    echo "=== 3/4 mopd plan's trainer estimate vs peak CUDA memory of a real step"
    # Cases zero,bf16,checkpointing,micro-batch,tokens (plan_gpu_check.py has two more).
    for case in 2,1,0,4,1024 3,1,0,4,1024; do
        timeout 150 "$py" scripts/plan_gpu_check.py "$case" | grep '^RESULT' | tee -a "$out/plan_gpu_check.jsonl" ||
            echo "plan case $case: exit status $?"
    done
fi
limit=${GPU_CHECK_LIMIT_S:-530}
budget=${LONG_BUDGET_S:-150}
if ((cpu)); then
    echo "=== 4/4 long responses: the same code on the tiny student, T = 64..512 (OOM simulated at 512)"
    "$py" scripts/gpu_long_check.py --cpu --tiny --simulate-oom-at 512 --budget-s 600 \
        --json "$out/gpu_long_check.json" || echo "long check: exit status $?"
else
    left=$((limit - SECONDS - 45)) # 45 s: start-up, and the last process may run 20 s past the budget
    ((left < budget)) && budget=$left
    if ((budget < 60)); then
        echo "=== 4/4 long responses: skipped, ${left} s left of GPU_CHECK_LIMIT_S=${limit}"
    else
        echo "=== 4/4 long responses on one device: longest row that trains, today vs chunked log-probs (${budget} s)"
        timeout -k 5 $((budget + 40)) "$py" scripts/gpu_long_check.py --budget-s "$budget" \
            --json "$out/gpu_long_check.json" || echo "long check: exit status $?"
    fi
fi
