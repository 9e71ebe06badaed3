"""The quickstart pipeline at toy size: every stage runs, the report has its fields, stages are
cached and `--from-stage` re-runs from there. (Whether MOPD closes the gap at full size is measured
in docs/quickstart.md, not asserted here: at these sizes nothing is learned.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

TOY = [
    "train_prompts=200", "eval_prompts=8", "sft_batch=8", "student_sft_steps=4", "teacher_sft_steps=4",
    "run.total_steps=2", "eval.every=1", "eval.num_prompts=4", "rollout.prompts_per_step=4", "rollout.n=2",
    "rollout.max_new_tokens=8",
]  # fmt: skip


def quickstart(*args: str) -> str:
    """Run `mopd quickstart` in its own process (it starts Ray and a gloo group); return stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mopd.cli", "quickstart", *args, *TOY]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_toy_quickstart_stages_report_and_cache(tmp_path):
    out = tmp_path / "qs"
    quickstart("--output-dir", str(out))
    report = json.loads((out / "report.json").read_text())
    assert set(report["domains"]) == {"math", "code", "agent"}
    for r in report["domains"].values():
        assert set(r) >= {"teacher", "student_before", "student_after", "reverse_kl_start", "reverse_kl_end"}
        assert all(0.0 <= r[k] <= 1.0 for k in ("teacher", "student_before", "student_after"))
    assert report["objective"] == "topk" and report["wall_time_s"] > 0
    assert "normalized_score" in report
    assert (out / "curves.png").stat().st_size > 0
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(out / "student_hf")).__name__ == "MiMoV2FlashForCausalLM"

    printed = quickstart("--output-dir", str(out))
    assert all(f"{s}: cached" in printed for s in ("domains", "student", "teachers", "mopd", "report"))

    printed = quickstart("--output-dir", str(out), "--from-stage", "report")
    assert "mopd: cached" in printed and "report: running" in printed
