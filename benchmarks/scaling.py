"""How a ``mopd train`` step's cost grows with the number of domain teachers and with rollout
replicas / trainer ranks, at the same work per step.

Teachers: 1, 2, 4, 8 domains (``--teachers``), each its own teacher actor (the benchmark teacher,
one CPU each), the ``math`` generator relabelled per domain, the same 8 prompts x 4 samples per
step split evenly between them: the tokens scored per step stay the same, only the number of
actors they are spread over changes. Layouts: rollout replicas x trainer ranks (``--layouts``,
e.g. ``1x1,2x1,1x2,2x2``), one teacher. Each configuration is a fresh ``mopd train`` of
``--steps`` steps; the figures are the steady steps (2..N) by phase, as ``step_phases.py``
splits them.

    OMP_NUM_THREADS=1 python benchmarks/scaling.py --out results/scaling.json   # ~15 min on 2 cores
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import _bench
import step_phases


def measure(work: Path, models, args, name: str, teachers: int, replicas: int, ranks: int) -> dict[str, Any]:
    layout = argparse.Namespace(**{**vars(args), "rollout_replicas": replicas, "world_size": ranks})
    path = _bench.recipe(work, models, layout, name, domains=tuple(f"d{i}" for i in range(teachers)))
    run = _bench.run_mopd(path, log=work / f"{name}.log")
    res = step_phases.phase_table(run["records"], run["start"])
    recs = run["records"][1:]
    latency = [sum(r.get(f"teacher/d{i}/latency_s", 0.0) for r in recs) / max(len(recs), 1) for i in range(teachers)]
    res.update(teachers=teachers, replicas=replicas, ranks=ranks, startup_s=_bench.mopd_steady(run)["startup_s"])
    res["teacher_latency_s"] = latency
    return res


def report(res: dict[str, Any]) -> str:
    lines = [f"load {res['machine']['load_avg_1_5_15']} -> {res['machine_after']['load_avg_1_5_15']}"]
    head = "| {} | start-up s | step s | rollout | teacher scoring | train | sync | response tokens/step |"
    for title, rows, label in (
        ("teachers", res["teachers"], lambda r: str(r["teachers"])),
        ("replicas x ranks", res["layouts"], lambda r: f"{r['replicas']} x {r['ranks']}"),
    ):
        if not rows:
            continue
        lines += ["", head.format(title), "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            p = r["phase_s"]
            lines.append(
                f"| {label(r)} | {r['startup_s']:.1f} | {r['step_s']:.2f} | {p['rollout']:.2f} | {p['teachers']:.2f} "
                f"| {p['train']:.2f} | {p['sync']:.2f} | {r['response_tokens']:.0f} |"
            )
    for r in res["teachers"]:
        per = ", ".join(f"{x:.2f}" for x in r["teacher_latency_s"])
        lines.append(f"{r['teachers']} teacher(s): each teacher actor's own scoring time per step (s): {per}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _bench.add_workload_args(p)
    p.add_argument("--teachers", default="1,2,4,8", help="teacher counts to run (empty: none)")
    p.add_argument("--layouts", default="1x1,2x1,1x2,2x2", help="rollout replicas x trainer ranks (empty: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/bench")
    p.add_argument("--out", default="results/scaling.json")
    args = p.parse_args()
    args.steps = max(args.steps, 3)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = _bench.save_models(work, args.seed)
    res: dict[str, Any] = {"args": vars(args), "machine": _bench.machine(), "teachers": [], "layouts": []}
    for n in [int(x) for x in args.teachers.split(",") if x]:
        print(f"{n} teacher(s) ...", flush=True)
        res["teachers"].append(measure(work, models, args, f"scaling_t{n}", n, 1, 1))
    for layout in [x for x in args.layouts.split(",") if x]:
        replicas, ranks = (int(v) for v in layout.split("x"))
        same = [r for r in res["teachers"] if r["teachers"] == 1 and (replicas, ranks) == (1, 1)]
        if same:  # 1 x 1 with one teacher is the first teachers' run: not run twice
            res["layouts"].append(same[0])
            continue
        print(f"{replicas} rollout replica(s) x {ranks} trainer rank(s) ...", flush=True)
        res["layouts"].append(measure(work, models, args, f"scaling_r{replicas}w{ranks}", 1, replicas, ranks))
    res["machine_after"] = _bench.machine()
    print(report(res))
    _bench.write_json(args.out, res)


if __name__ == "__main__":
    main()
