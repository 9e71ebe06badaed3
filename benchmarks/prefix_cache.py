"""Multi-turn rollouts on the vLLM backend with and without prefix caching: each later turn of a
trajectory re-sends its whole context (prompt, earlier turns, tool results) as token ids, and with
vLLM's automatic prefix caching (``enable_prefix_caching=True``, rollout/vllm.py) the engine reuses
the KV blocks it computed for the earlier turns instead of prefilling them again.

The same rollout steps run twice in one process, caching on, then off (``--off-first``: the other
way round; two engines, each started once): the ``vs_trl.py`` student (Qwen3-MoE, 10.7M parameters,
random weights) on rows of an environment defined here whose every call is answered with
``--result-chars`` characters, for ``--turns`` turns; several character ids end a turn
(``--stop-chars``), so that the random student's turns end. Before every step the prefix cache is
reset, as the weight sync of a training step does, so no step reuses another's KV. Reported per
setting: the median wall time of a step, the prefix cache hit rate from vLLM's own counters
(``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries``, engine started with
``disable_log_stats=False``) and from the requests' ``num_cached_tokens``, and whether both settings
sampled the same trajectories.

    OMP_NUM_THREADS=1 python benchmarks/prefix_cache.py --out results/prefix_cache.json     # ~5 min
    OMP_NUM_THREADS=1 python benchmarks/prefix_cache.py --turns 4 --result-chars 200 --off-first
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import string
import time
from pathlib import Path
from typing import Any

import _bench
from mopd.config import BUILTIN_TOKENIZER, EnvironmentConfig, ModelConfig, MOPDConfig
from mopd.envs import Env, ParsedCall, StepResult, register_env
from mopd.envs.base import tool_message
from mopd.envs.parsers import ParsedTurn, ToolCallParser, register_parser
from mopd.types import PromptRow
from rollout.vllm import VLLMRolloutActor

ALPHABET = string.ascii_lowercase + string.digits + " "


@register_parser("prefix_bench")
class EveryTurnIsACall(ToolCallParser):
    """Any student turn is one call of ``read``: a random student then takes every turn allowed."""

    def parse(self, text, tools=()):
        return ParsedTurn("", [ParsedCall("read", {"page": text})])


@register_env("prefix_bench")
class NotesEnv(Env):
    """Answers every call with ``chars`` characters of notes (drawn per row and step); the episode
    ends at step ``turns``."""

    def __init__(self, row: PromptRow, chars: int = 120, turns: int = 6, **kwargs: Any) -> None:
        super().__init__(row)
        self.chars, self.turns, self.steps = chars, turns, 0

    def step(self, calls, content=""):
        self.steps += 1
        rng = random.Random(f"{self.row.index}-{self.steps}")
        notes = "".join(rng.choice(ALPHABET) for _ in range(self.chars))
        return StepResult([tool_message(c, notes) for c in calls], done=self.steps >= self.turns, reward=0.0)


class Measured(VLLMRolloutActor):
    """The rollout actor with prefix caching on or off and vLLM's stats kept (for its counters)."""

    caching = True

    def _engine_args(self) -> dict[str, Any]:
        return {**super()._engine_args(), "enable_prefix_caching": self.caching, "disable_log_stats": False}


def make_cfg(student_dir: str, args) -> MOPDConfig:
    cfg = MOPDConfig()
    cfg.student = ModelConfig(path=student_dir, tokenizer=BUILTIN_TOKENIZER)
    cfg.rollout.backend = "vllm"
    cfg.rollout.max_new_tokens = args.max_new
    cfg.rollout.max_model_len = args.max_model_len
    cfg.rollout.stop_token_ids = list(range(3, 3 + 2 * args.stop_chars, 2))
    budget = args.turns * (args.max_new + args.result_chars + 2)  # "=<notes>;" after every turn
    cfg.environments = {
        "bench": EnvironmentConfig(
            name="prefix_bench",
            parser="prefix_bench",
            max_turns=args.turns,
            max_tokens=min(budget, args.max_model_len - 64),  # 64: room for the prompt
            max_result_chars=args.result_chars,
            kwargs={"chars": args.result_chars, "turns": args.turns},
        )
    }
    return cfg


def step_rows(step: int, k: int) -> list[PromptRow]:
    return [PromptRow(prompt=f"task {step}.{i}: read the notes", domain="bench", index=step * k + i) for i in range(k)]


def counters(llm) -> dict[str, int]:
    """vLLM's prefix-cache counters (summed over engines)."""
    out = {"queries": 0, "hits": 0}
    for m in llm.get_metrics():
        if m.name == "vllm:prefix_cache_queries":
            out["queries"] += int(m.value)
        elif m.name == "vllm:prefix_cache_hits":
            out["hits"] += int(m.value)
    return out


def measure(cfg: MOPDConfig, caching: bool, args) -> dict[str, Any]:
    Measured.caching = caching
    t0 = time.perf_counter()
    actor = Measured(cfg)
    start_s = time.perf_counter() - t0
    steps, batches = [], []
    try:
        for step in range(args.warmup + args.steps):
            actor.llm.reset_prefix_cache()  # what every weight sync does
            before, counts_before = counters(actor.llm), actor.prefix_cache_counts()
            t0 = time.perf_counter()
            batch = actor.generate(step_rows(step, args.prompts), args.n, seed=step)
            wall = time.perf_counter() - t0
            after, counts = counters(actor.llm), actor.prefix_cache_counts()
            if step < args.warmup:
                continue
            batches.append(batch)
            episodes = [e for e in batch.episodes or [] if e is not None]
            steps.append(
                {
                    "wall_s": wall,
                    "vllm_queries": after["queries"] - before["queries"],
                    "vllm_hits": after["hits"] - before["hits"],
                    "context_tokens": counts["context_tokens"] - counts_before["context_tokens"],
                    "cached_tokens": counts["cached_tokens"] - counts_before["cached_tokens"],
                    "sampled_tokens": int(batch.response_mask.sum()),
                    "trajectory_tokens": int(batch.attention_mask.sum()),
                    "mean_turns": statistics.mean(e.turns for e in episodes),
                }
            )
    finally:
        actor.shutdown()
        del actor
        gc.collect()
    total = {k: sum(s[k] for s in steps) for k in ("vllm_queries", "vllm_hits", "context_tokens", "cached_tokens")}
    return {
        "prefix_caching": caching,
        "engine_start_s": start_s,
        "step_s": statistics.median(s["wall_s"] for s in steps),
        "vllm_hit_rate": total["vllm_hits"] / max(total["vllm_queries"], 1),
        "cached_fraction": total["cached_tokens"] / max(total["context_tokens"], 1),
        **total,
        "steps": steps,
        "_batches": batches,
    }


def same_batches(a: list, b: list) -> bool:
    import torch

    return all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--result-chars", type=int, default=100, help="characters of every tool result")
    p.add_argument("--max-new", type=int, default=32, help="rollout.max_new_tokens (one turn)")
    p.add_argument("--stop-chars", type=int, default=8, help="character ids that end a turn")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--off-first", action="store_true", help="run the caching-off engine first (order bias check)")
    p.add_argument("--work", default="runs/bench")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = _bench.save_models(work)
    cfg = make_cfg(models["student"]["path"], args)
    order = (False, True) if args.off_first else (True, False)
    results = sorted((measure(cfg, caching, args) for caching in order), key=lambda r: not r["prefix_caching"])
    on, off = results
    identical = same_batches(on.pop("_batches"), off.pop("_batches"))
    for r in results:
        print(
            f"prefix caching {'on ' if r['prefix_caching'] else 'off'}: {r['step_s']:.2f} s/step (median of "
            f"{args.steps}), vLLM hit rate {r['vllm_hit_rate']:.1%} ({r['vllm_hits']} of {r['vllm_queries']} "
            f"tokens), cached context {r['cached_fraction']:.1%} ({r['cached_tokens']} of {r['context_tokens']}), "
            f"engine start {r['engine_start_s']:.0f} s"
        )
    s = on["steps"][0]
    print(
        f"{args.prompts} prompts x {args.n}, {s['mean_turns']:.1f} turns per trajectory (step 1), "
        f"{s['trajectory_tokens'] / (args.prompts * args.n):.0f} tokens per trajectory, "
        f"{s['sampled_tokens']} sampled tokens per step; off/on step time {off['step_s'] / on['step_s']:.2f}x; "
        f"same trajectories with and without caching: {identical}"
    )
    result = {
        "args": vars(args),
        "on": on,
        "off": off,
        "speedup": off["step_s"] / on["step_s"],
        "same_trajectories": identical,
        "machine": _bench.machine(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, default=str))
    _bench.write_json(args.out, result)


if __name__ == "__main__":
    main()
