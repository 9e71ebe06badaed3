"""Checkpoints: written atomically, found by step, exported (mopd/app/export.py) as Hugging Face directories.

Layout of ``<checkpoint dir>/step_000010/``:
    state.json   step, policy version, data cursor, RNG state, teacher set, the recipe
    trainer/     DeepSpeed engine state (weights, optimizer, scheduler) for ``--resume``
    hf/          the student as a Hugging Face directory (what ``mopd export`` copies)

A checkpoint is first written to ``step_000010.tmp`` and renamed when complete, so a crash during a
save leaves the previous checkpoint as the latest usable one. On a multi-node cluster the directory
must be on a file system that the trainer actors and the driver share.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mopd.config import MOPDConfig

STEP_RE = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "state.json"


def checkpoint_root(cfg: MOPDConfig) -> Path:
    """Where a run's checkpoints go: ``checkpoint.dir``, by default ``<run.output_dir>/checkpoints``."""
    return Path(cfg.checkpoint.dir or Path(cfg.run.output_dir) / "checkpoints")


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found, key=lambda step_path: step_path[0])]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def begin(root: str | os.PathLike, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step``; partial checkpoints left by a
    crash during an earlier save (``step_*.tmp``) are removed."""
    root = Path(root)
    if root.is_dir():
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"step_{step:06d}.tmp"
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict[str, Any], keep: int) -> Path:
    """Write ``state.json`` last, rename the directory into place, prune old checkpoints."""
    state_path = tmp / STATE_FILE
    with open(state_path, "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    for old in checkpoint_dirs(final.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    with open(Path(ckpt) / STATE_FILE) as f:
        return json.load(f)


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or the latest one under a directory of checkpoints."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint at {path} (expected step_NNNNNN/{STATE_FILE})")
    return latest
