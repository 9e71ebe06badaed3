"""docs/adding_a_teacher.md, followed literally: its files are written from the document's code
blocks and its commands run as written; a fourth domain trains for two MOPD steps."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mopd.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "adding_a_teacher.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def write_doc_files(where: Path) -> list[str]:
    names = []
    for block in blocks("python") + blocks("yaml"):
        m = re.match(r"# file: (\S+)\n", block)
        if m:
            (where / m.group(1)).write_text(block)
            names.append(m.group(1))
    return names


def doc_commands() -> list[list[str]]:
    lines = [line for b in blocks("bash") for line in b.splitlines() if line.startswith("mopd ")]
    return [shlex.split(line) for line in lines]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mopd.app.cli", *cmd[1:]]
    # The document's paths are relative to the repository (recipes/...) and to the user's files.
    cmd = [str(ROOT / c) if c.startswith("recipes/") else c for c in cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


def test_document_has_the_files_and_commands():
    assert {"echo_domain.py", "echo.yaml"} <= set(re.findall(r"# file: (\S+)", DOC.read_text()))
    assert [c[:2] for c in doc_commands()] == [["mopd", "validate"], ["mopd", "train"]]


def test_the_documents_validate_command_accepts_its_files(tmp_path):
    """The plugin domain of the document registers, has a teacher and data: `mopd validate` as written."""
    write_doc_files(tmp_path)
    validate, _ = doc_commands()
    proc = run(validate, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "echo:" in proc.stdout


@pytest.mark.slow
@pytest.mark.extended  # ~40 s of Ray; the default run has the document's files, commands and validate above
def test_fourth_domain_trains_from_the_document(tmp_path):
    write_doc_files(tmp_path)
    _, train = doc_commands()
    proc = run(train + ["run.total_steps=2", "trainer.world_size=1", "rollout.prompts_per_step=8"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path / "runs" / "echo" / "metrics.jsonl")
    keys = set().union(*records)
    assert {"teacher/echo/reverse_kl", "teacher/echo/token_share", "eval/echo/accuracy"} <= keys
    assert [r["policy_version"] for r in records if "train/loss" in r] == [1.0, 2.0]


def test_domain_without_teacher_is_named(tmp_path):
    write_doc_files(tmp_path)
    layer = tmp_path / "echo.yaml"
    layer.write_text(layer.read_text().replace("  echo:\n    tokenizer", "  echo_teacher:\n    tokenizer"))
    proc = run(["mopd", "validate", "recipes/tiny.yaml", "echo.yaml"], tmp_path)
    assert proc.returncode == 2
    assert "no teacher for domain 'echo'; configured teachers: code, echo_teacher, math" in proc.stderr
