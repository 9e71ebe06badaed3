"""Per-step metrics: one JSON object per line in ``metrics.jsonl`` plus TensorBoard scalars."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator


class MetricsWriter:
    """Appends to ``<dir>/metrics.jsonl`` (so a resumed run continues the same file) and writes
    TensorBoard events under ``<dir>/tensorboard``."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))

    def write(self, step: int, metrics: Dict[str, float]) -> None:
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


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class PhaseTimer:
    """Wall time per named phase of a step: ``with timer("rollout"): ...``."""

    def __init__(self) -> None:
        self.times: Dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self) -> Dict[str, float]:
        return {f"timing/{k}": v for k, v in self.times.items()}
