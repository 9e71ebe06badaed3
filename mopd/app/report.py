"""The quickstart's report: per-domain accuracies, the normalised score, reverse-KL and accuracy
curves over MOPD steps (read back from the run's ``metrics.jsonl``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mopd.metrics import read_metrics


def normalized_score(domains: dict[str, dict[str, float]]) -> float:
    """Mean over domains of (after - before) / (teacher - before), as in the standalone MOPD paper:
    0 is the student before MOPD, 1 each domain's teacher. A domain where the teacher is not above
    the student has no defined gap; it is reported as NaN rather than hidden."""
    gaps = []
    for r in domains.values():
        gap = r["teacher"] - r["student_before"]
        gaps.append((r["student_after"] - r["student_before"]) / gap if gap > 0 else float("nan"))
    return sum(gaps) / len(gaps) if gaps else float("nan")


def curve(records: list[dict], key: str) -> list[tuple]:
    """(step, value) pairs of ``key`` in a metrics log, in step order."""
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]


def _first_last(points: list[tuple], k: int = 5) -> tuple:
    """Means of the first and the last ``k`` values: one step's figure is a ~30-sample estimate."""
    if not points:
        return float("nan"), float("nan")
    head, tail = [v for _, v in points[:k]], [v for _, v in points[-k:]]
    return sum(head) / len(head), sum(tail) / len(tail)


def build_report(
    domains: list[str], results: dict[str, Any], after: dict[str, float], metrics_path: Path
) -> dict[str, Any]:
    records = read_metrics(metrics_path)
    out: dict[str, Any] = {"domains": {}}
    for d in domains:
        kl_start, kl_end = _first_last(curve(records, f"teacher/{d}/reverse_kl"))
        out["domains"][d] = {
            "teacher": results["teachers"][d]["accuracy"],
            "student_before": results["student"]["accuracy"][d],
            "student_after": after[d],
            "reverse_kl_start": kl_start,
            "reverse_kl_end": kl_end,
        }
    out["normalized_score"] = normalized_score(out["domains"])
    out["objective"] = results["mopd"]["objective"]
    out["mopd_steps"] = results["mopd"]["steps"]
    out["stage_seconds"] = {s: round(r["seconds"], 1) for s, r in results.items() if "seconds" in r}
    return out


def plot_curves(metrics_path: Path, domains: list[str], png: Path) -> Path | None:
    """Per-domain eval accuracy and token reverse KL over MOPD steps, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, (ax_acc, ax_kl) = plt.subplots(1, 2, figsize=(10, 4))
    for d in domains:
        for ax, key in ((ax_acc, f"eval/{d}/accuracy"), (ax_kl, f"teacher/{d}/reverse_kl")):
            pts = [(s, v) for s, v in curve(records, key) if math.isfinite(v)]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=d, marker="o" if ax is ax_acc else None, markersize=3)
    ax_acc.set(title="eval accuracy (greedy)", xlabel="MOPD step", ylim=(0, 1.02))
    ax_kl.set(title="token reverse KL to the domain's teacher", xlabel="MOPD step", yscale="log")
    for ax in (ax_acc, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


# ---------------------------------------------------------------------- several seeds

# The quickstart's targets, checked on every seed (docs/quickstart.md).
TARGETS = {
    "teacher": 0.90,  # each teacher on its own domain
    "gap": 0.30,  # teacher - student before, every domain
    "normalized_score": 0.90,
}


def target_misses(report: dict[str, Any], targets: dict[str, float] | None = None) -> list[str]:
    """The quickstart targets one report misses, each as a short phrase (empty: all met)."""
    t = {**TARGETS, **(targets or {})}
    misses = []
    for d, r in report["domains"].items():
        if r["teacher"] < t["teacher"]:
            misses.append(f"{d} teacher {r['teacher']:.3f} < {t['teacher']}")
        if r["teacher"] - r["student_before"] < t["gap"]:
            misses.append(f"{d} gap {r['teacher'] - r['student_before']:.3f} < {t['gap']}")
        if not r["student_after"] > r["student_before"]:
            misses.append(f"{d} after {r['student_after']:.3f} <= before {r['student_before']:.3f}")
    score = report["normalized_score"]
    if not score >= t["normalized_score"]:  # NaN misses too
        misses.append(f"normalised {score:.3f} < {t['normalized_score']}")
    return misses


def seeds_table(reports: dict[int, dict[str, Any]], targets: dict[str, float] | None = None) -> str:
    """A Markdown table of several seeds' reports: before / teacher / after per domain and the
    normalised score, one row per seed, then the mean and the minimum of every column, then the
    targets each seed misses."""
    seeds = sorted(reports)
    domains = list(reports[seeds[0]]["domains"])
    cols = [(d, k) for d in domains for k in ("student_before", "teacher", "student_after")]
    head = "| seed | " + " | ".join(f"{d} {k.replace('student_', '')}" for d, k in cols) + " | normalised | minutes |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    table = {s: [reports[s]["domains"][d][k] for d, k in cols] + [reports[s]["normalized_score"]] for s in seeds}
    for s in seeds:
        minutes = reports[s].get("wall_time_s", float("nan")) / 60
        lines.append(f"| {s} | " + " | ".join(f"{v:.3f}" for v in table[s]) + f" | {minutes:.1f} |")
    # A NaN (a domain whose teacher is not above the student) propagates: it is never hidden.
    for name, fn in (
        ("mean", lambda v: sum(v) / len(v)),
        ("min", lambda v: float("nan") if any(map(math.isnan, v)) else min(v)),
    ):
        lines.append(
            f"| **{name}** | "
            + " | ".join(f"{fn([table[s][i] for s in seeds]):.3f}" for i in range(len(cols) + 1))
            + " | |"
        )
    lines.append("")
    for s in seeds:
        misses = target_misses(reports[s], targets)
        lines.append(f"seed {s}: " + ("every target met" if not misses else "MISSED " + "; ".join(misses)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m mopd.app.report DIR SEED... [--normalized X]``: the table of
    ``DIR/seed_S/report.json``; exit status 1 if a seed misses a target (``--normalized`` sets the
    normalised-score target, e.g. 0.85 for the sampled objective)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m mopd.app.report")
    ap.add_argument("dir", type=Path)
    ap.add_argument("seeds", type=int, nargs="+")
    ap.add_argument("--normalized", type=float, default=TARGETS["normalized_score"])
    args = ap.parse_args(argv)
    reports = {s: json.loads((args.dir / f"seed_{s}" / "report.json").read_text()) for s in args.seeds}
    targets = {"normalized_score": args.normalized}
    print(seeds_table(reports, targets))
    return 1 if any(target_misses(r, targets) for r in reports.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
