"""Per-step metrics: one JSON object per line in ``metrics.jsonl`` plus TensorBoard scalars."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


class MetricsWriter:
    """Appends to ``<dir>/metrics.jsonl`` (so a resumed run continues the same file) and writes
    TensorBoard events under ``<dir>/tensorboard``.

    ``resume_step``: the checkpoint step a resumed run restarts from. Records of later steps (run
    before a crash, about to be redone) are dropped, so every step appears once."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        if resume_step is not None:
            drop_records_after(self.path, resume_step)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": step, "time": time.time(), **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible
    return v


def drop_records_after(path: Path, step: int) -> int:
    """Rewrite ``path`` (atomically) without the records of steps after ``step``; returns how many
    were dropped. A torn last line (the writer was killed mid-write) is dropped too."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if _step_of(line) <= step]
    dropped = len(lines) - len(kept)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # torn by a kill mid-write
        return math.inf


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class PhaseTimer:
    """Wall time per named phase of a step: ``with timer("rollout"): ...``.

    With ``total="step"``, ``metrics()`` also gives ``timing/step`` (wall time since the timer was
    made) and ``timing/other`` (that minus the named phases: Ray calls outside them, batch
    assembly, checks, idle)."""

    def __init__(self, total: str | None = None) -> None:
        self.times: dict[str, float] = {}
        self.total = total
        self._t0 = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        out = {f"timing/{k}": v for k, v in self.times.items()}
        if self.total:
            wall = time.perf_counter() - self._t0
            out[f"timing/{self.total}"] = wall
            out["timing/other"] = max(0.0, wall - sum(self.times.values()))
        return out
