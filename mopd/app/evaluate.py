"""``mopd eval``: a student's accuracy on a recipe's held-out prompts, greedy and sampled.

    mopd eval RECIPE --student runs/x/checkpoints                  # the latest checkpoint
    mopd eval RECIPE --student runs/x/student_hf --samples 8       # an exported directory; mean@8, pass@8

Every data source with held-out prompts (its ``eval_path``, or its generator's eval split) is
scored on up to ``--prompts`` of them (default ``eval.num_prompts``) by its verifier (a multi-turn
domain: its environment's reward), on the recipe's rollout backend in this process (one replica,
no Ray). The same scoring as the training loop's in-run eval (``mopd.loop.eval_samples``):

    greedy    the mean reward of one greedy response per prompt (pass@1 when rewards are 0 or 1)
    mean@k    the mean reward of k sampled responses per prompt (rollout.temperature, top_p)
    pass@k    the share of prompts with at least one of those k at full reward (1.0)

Prints a table (one row per source, then per domain) and writes the same figures as JSON.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from mopd.checkpoint import resolve
from mopd.config import ConfigError, MOPDConfig
from mopd.types import PromptRow

log = logging.getLogger(__name__)


def student_dir(path: str | Path) -> Path:
    """The Hugging Face directory of ``path``: an exported (or any HF) directory as it is, a
    checkpoint's ``hf/``, or the latest checkpoint's under a run's ``checkpoints/``."""
    p = Path(path)
    if (p / "config.json").is_file():
        return p
    try:
        hf = resolve(p) / "hf"
    except FileNotFoundError:
        raise ConfigError(
            f"--student {path}: neither a Hugging Face directory (config.json) nor a checkpoint "
            "(step_NNNNNN/) nor a run's checkpoints/ holding one"
        ) from None
    if not (hf / "config.json").is_file():
        raise ConfigError(f"--student {path}: checkpoint {hf.parent} holds no Hugging Face model ({hf}/config.json)")
    return hf


def eval_rows_by_source(cfg: MOPDConfig, num_prompts: int, tokenizer: Any) -> dict[str, list[PromptRow]]:
    """Up to ``num_prompts`` held-out rows of every source that has some and a verifier, by source
    name (``mopd.data.source_name`` of the training source)."""
    from mopd.app.run import evaluated_sources, held_out_rows
    from mopd.data import source_name

    return {source_name(src): held_out_rows(cfg, src, num_prompts, tokenizer) for src in evaluated_sources(cfg)}


def summarize(rewards: list[list[float]]) -> dict[str, float]:
    """``{"prompts", "mean", "pass"}`` of per-prompt reward lists: the mean reward over every
    response, and the share of prompts with at least one response at full reward."""
    flat = [r for per in rewards for r in per]
    return {
        "prompts": len(rewards),
        "mean": sum(flat) / len(flat),
        "pass": sum(any(r >= 1.0 for r in per) for per in rewards) / len(rewards),
    }


def run_eval(
    cfg: MOPDConfig, student: str | Path, samples: int = 0, num_prompts: int | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Evaluate ``student`` (see ``student_dir``) on ``cfg``'s held-out rows: greedy, and with
    ``samples`` > 0 that many sampled responses per prompt. Returns the report ``mopd eval``
    prints and saves."""
    from mopd.app.run import readable_student_tokenizer
    from mopd.loop import eval_samples
    from rollout.pool import RolloutPool

    hf = student_dir(student)
    # One replica in this process, on every core of the machine (a run's replica has its share).
    cores = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    resources = replace(cfg.rollout.resources, num_cpus=cores)
    cfg = replace(
        cfg,
        student=replace(cfg.student, path=str(hf), config=None, tokenizer=None),
        rollout=replace(cfg.rollout, resources=resources),
    )
    num_prompts = cfg.eval.num_prompts if num_prompts is None else num_prompts
    if num_prompts <= 0 or samples < 0:
        raise ConfigError(f"mopd eval: --prompts must be positive and --samples >= 0 (got {num_prompts}, {samples})")
    by_source = eval_rows_by_source(cfg, num_prompts, readable_student_tokenizer(cfg))
    if not by_source:
        raise ConfigError(
            "mopd eval: no data source has held-out prompts and a verifier (give a source an eval_path, "
            "or use a generator, whose eval split is held out)"
        )
    seed = cfg.run.seed if seed is None else seed
    rows = [r for rs in by_source.values() for r in rs]
    log.info("mopd eval: %d prompts from %d sources, greedy%s", len(rows), len(by_source),
             f", then {samples} samples each" if samples else "")  # fmt: skip
    pool = RolloutPool(cfg, local=True)
    try:
        _, greedy = eval_samples(pool, rows, 1, seed, greedy=True)
        if samples:
            log.info("mopd eval: greedy done; sampling %d responses", samples * len(rows))
        sampled = eval_samples(pool, rows, samples, seed, greedy=False)[1] if samples else None
    finally:
        pool.shutdown()

    def figures(idx: list[int]) -> dict[str, float]:
        out = {"prompts": len(idx), "greedy": summarize([greedy[i] for i in idx])["mean"]}
        if sampled is not None:
            s = summarize([sampled[i] for i in idx])
            out |= {f"mean@{samples}": s["mean"], f"pass@{samples}": s["pass"]}
        return out

    start, sources, domains = 0, {}, {}
    for name, rs in by_source.items():
        sources[name] = {"domain": rs[0].domain if rs else None, **figures(list(range(start, start + len(rs))))}
        start += len(rs)
    for d in sorted({r.domain for r in rows}):
        domains[d] = figures([i for i, r in enumerate(rows) if r.domain == d])
    return {"student": str(hf), "samples": samples, "seed": seed, "sources": sources, "domains": domains}


def format_eval(report: dict[str, Any]) -> str:
    """The report as a table: one line per source, then one per domain."""
    k = report["samples"]
    cols = ["prompts", "greedy"] + ([f"mean@{k}", f"pass@{k}"] if k else [])
    names = list(report["sources"]) + [f"domain {d}" for d in report["domains"]]
    width = max(len(n) for n in [*names, "source"])
    lines = [f"{'source':<{width}}  " + "  ".join(f"{c:>8}" for c in cols)]
    entries = [*report["sources"].items(), *((f"domain {d}", v) for d, v in report["domains"].items())]
    for name, v in entries:
        cells = [f"{v['prompts']:>8d}"] + [f"{v[c]:>8.3f}" for c in cols[1:]]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def write_eval(report: dict[str, Any], path: str | Path) -> Path:
    """The report as JSON at ``path`` (written whole: a crash leaves the old file, not half of one)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    return out
