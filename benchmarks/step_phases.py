"""Where a ``mopd train`` step's time goes at benchmark size, and what each phase costs without Ray.

Part 1 runs ``mopd train`` (the ``vs_trl.py`` set-up: Qwen3-MoE student of 10.7M parameters, dense
teacher of 3.2M, 8 prompts x 4 samples x <= 128 new tokens, one CPU per actor) and splits the steady
steps (2..N) into the loop's timed phases, as the driver sees them: rollout, teacher scoring, train,
weight sync, ``other`` (inside the step but outside the named phases) and ``outside`` (between steps:
metrics writer, progress bar), in seconds and as fractions of the step.

Part 2 runs the same classes in this process, one torch thread each as in the actors, on a batch of
the same size: ``HFRolloutActor.generate``, ``HFTeacherWorker.score`` against a bare forward pass of
the teacher over the same tokens (the ``teacher scoring <= 1.2x forward`` target),
``TrainerWorker.train_step`` and the weight sync (``state_dict`` + ``load_weights``). The gap between
a phase in part 1 and its bare cost in part 2 is what Ray calls and serialisation add.

    OMP_NUM_THREADS=1 python benchmarks/step_phases.py --steps 8 --out results/step_phases.json
    OMP_NUM_THREADS=1 python benchmarks/step_phases.py --from-run runs/bench/mopd_vs_trl   # part 1 from a vs_trl.py run
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import _bench
from mopd.config import load_config
from mopd.dist.runtime import free_port
from mopd.metrics import read_metrics

PHASES = ("rollout", "teachers", "train", "sync", "other", "outside")


def phase_table(records: list[dict[str, Any]], start: float) -> dict[str, Any]:
    """Mean seconds per steady step (2..N) of each phase, and fractions of the step."""
    times = [start] + [r["time"] for r in records]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    steady = list(range(1, len(records)))
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    secs = {p: mean([records[i].get(f"timing/{p}", 0.0) for i in steady]) for p in PHASES[:-1]}
    secs["other"] += mean([records[i].get("timing/verify", 0.0) for i in steady])
    # rollout.overlap: the wait for the batch generating ahead is rollout time the step did not hide.
    secs["rollout"] += mean([records[i].get("timing/rollout_wait", 0.0) for i in steady])
    step = mean([gaps[i] for i in steady])
    secs["outside"] = step - mean([records[i]["timing/step"] for i in steady])
    teacher_actor = mean([records[i].get("teacher/math/latency_s", 0.0) for i in steady])
    return {
        "step_s": step,
        "phase_s": secs,
        "fraction": {p: s / step for p, s in secs.items()},
        "beyond_rollout_teachers_train": (secs["sync"] + secs["other"] + secs["outside"]) / step,
        "teacher_actor_score_s": teacher_actor,
        "response_tokens": mean([records[i]["rollout/tokens"] for i in steady]),
        "steps": len(steady),
    }


def part1(args, work: Path) -> dict[str, Any]:
    if args.from_run:
        out = Path(args.from_run)
        records = [r for r in read_metrics(out / "metrics.jsonl") if "timing/rollout" in r]
        # The command's start is unknown here: step 1 is dropped anyway.
        return phase_table(records, records[0]["time"] - records[0]["timing/step"])
    models = _bench.save_models(work, args.seed)
    recipe = _bench.recipe(work, models, args, "mopd_phases")
    run = _bench.run_mopd(recipe, log=work / "mopd_phases.log")
    res = phase_table(run["records"], run["start"])
    res["startup_s"] = _bench.mopd_steady(run)["startup_s"]
    return res


# ---------------------------------------------------------------------- part 2: bare costs


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """Result of the last call and the median wall time of ``repeats`` calls (after one warm-up)."""
    out = fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return out, statistics.median(ts)


def part2(args, work: Path) -> dict[str, Any]:
    from mopd.models import forward_logits
    from mopd.types import TrainBatch
    from rollout.hf import HFRolloutActor
    from teachers.hf import HFTeacherWorker
    from trainers.deepspeed_trainer import TrainerWorker

    torch.set_num_threads(1)
    models = _bench.save_models(work, args.seed)
    cfg = load_config(_bench.recipe(work, models, args, "mopd_phases"))
    rows = _bench.prompt_stream(work / "mopd_phases.yaml", 1)[0]
    rollout = HFRolloutActor(cfg)
    t0 = time.perf_counter()
    batch = rollout.generate(rows, cfg.rollout.n, seed=1)
    gen_s = time.perf_counter() - t0
    teacher = HFTeacherWorker("math", cfg.teachers["math"], seed=args.seed)
    ids, am, rm = batch.input_ids, batch.attention_mask, batch.response_mask
    k = cfg.objective.topk
    scores, score_s = timed(lambda: teacher.score(ids, am, rm, topk=k), args.repeats)
    _, score_lp_s = timed(lambda: teacher.score(ids, am, rm, topk=0), args.repeats)
    with torch.no_grad():
        _, fwd_s = timed(lambda: forward_logits(teacher.model, ids, am), args.repeats)
    trainer = TrainerWorker(cfg, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port("127.0.0.1"))
    tb = TrainBatch(batch, scores.logprobs, None, scores.topk_ids, scores.topk_logprobs)
    _, train_s = timed(lambda: trainer.train_step(tb), args.repeats)
    _, sync_s = timed(lambda: rollout.load_weights(trainer.state_dict(), 1), args.repeats)
    return {
        "rows": int(ids.shape[0]),
        "columns": int(ids.shape[1]),
        "real_tokens": int(am.sum()),
        "response_tokens": int(rm.sum()),
        "generate_s": gen_s,
        "teacher_score_topk_s": score_s,
        "teacher_score_logprobs_s": score_lp_s,
        "teacher_bare_forward_s": fwd_s,
        "score_over_forward": score_s / fwd_s,
        "train_step_s": train_s,
        "sync_s": sync_s,
    }


def report(res: dict[str, Any]) -> str:
    p1, p2 = res["ray_run"], res["bare"]
    lines = [
        f"mopd train, steady steps (2..N): {p1['step_s']:.2f} s/step, "
        f"{p1['response_tokens']:.0f} response tokens/step; load {res['machine']['load_avg_1_5_15']}"
    ]
    lines += ["| phase | s/step | fraction |", "|---|---|---|"]
    lines += [f"| {p} | {p1['phase_s'][p]:.3f} | {100 * p1['fraction'][p]:.1f}% |" for p in PHASES]
    lines.append(
        f"outside rollout + teacher scoring + train: {100 * p1['beyond_rollout_teachers_train']:.1f}% of the step"
    )
    lines.append(
        f"in-process, one thread, {p2['rows']} rows x {p2['columns']} columns "
        f"({p2['response_tokens']} response tokens): generate {p2['generate_s']:.2f} s, "
        f"train step {p2['train_step_s']:.2f} s, sync {p2['sync_s']:.3f} s"
    )
    lines.append(
        f"teacher: bare forward {p2['teacher_bare_forward_s']:.3f} s; score (log-probs + top-{res['args']['topk']}) "
        f"{p2['teacher_score_topk_s']:.3f} s = {p2['score_over_forward']:.2f}x; score (log-probs only) "
        f"{p2['teacher_score_logprobs_s']:.3f} s; in the Ray run: actor {p1['teacher_actor_score_s']:.3f} s, "
        f"driver phase {p1['phase_s']['teachers']:.3f} s"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _bench.add_workload_args(p)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each bare measurement")
    p.add_argument("--from-run", help="take part 1 from this run's metrics.jsonl instead of a new run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/bench")
    p.add_argument("--out", default="results/step_phases.json")
    args = p.parse_args()
    args.topk = _bench.CHAR_VOCAB_SIZE
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"args": vars(args), "machine": _bench.machine()}
    print("part 1: mopd train ...", flush=True)
    res["ray_run"] = part1(args, work)
    print("part 2: the same classes in-process ...", flush=True)
    res["bare"] = part2(args, work)
    print(report(res))
    _bench.write_json(args.out, res)


if __name__ == "__main__":
    main()
