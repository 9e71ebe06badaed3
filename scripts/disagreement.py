"""Where a student disagrees with its teacher, and whether reverse KL can move it there.

For each prompt the student answers greedily; at every response position where the teacher's most
likely token differs from the student's, this prints (as medians over those positions) the
student's probability of the teacher's token and the norm of the per-position reverse-KL and
forward-KL gradients with respect to the student's logits. Reverse KL's gradient scales with the
student's probability of the teacher's token: a median near 1e-4 means the student is confidently
wrong there, and `objective.forward_kl` (or a student that holds its teacher's answers in its
support) is what moves it (docs/quickstart.md, "Why runs stalled").

    python scripts/disagreement.py --student DIR --teacher DIR --data prompts.jsonl [--num-prompts 64]

The data file holds one JSON object per line with a "prompt" field (e.g. a quickstart run's
data/<domain>_eval.jsonl). Student and teacher share a tokenizer (the student's is used).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def position_stats(student, teacher, ids: torch.Tensor, prompt_len: int) -> list[tuple[str, dict]]:
    """(agree|disagree, figures) for every response position of one sequence."""
    with torch.no_grad():
        ls = torch.log_softmax(student(ids).logits[0, prompt_len - 1 : -1].float(), -1)
        lt = torch.log_softmax(teacher(ids).logits[0, prompt_len - 1 : -1].float(), -1)
    out = []
    for s, t in zip(ls, lt, strict=True):
        ps, pt = s.exp(), t.exp()
        kl = float((ps * (s - t)).sum())
        top = int(t.argmax())
        out.append(
            (
                "disagree" if top != int(s.argmax()) else "agree",
                {
                    "p_student(teacher token)": float(ps[top]),
                    "reverse KL": kl,
                    "|grad reverse KL|": float((ps * (s - t - kl)).norm()),
                    "|grad forward KL|": float((ps - pt).norm()),
                },
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student).eval()
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher).eval()
    with open(args.data) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()][: args.num_prompts]
    figures: dict = defaultdict(lambda: defaultdict(list))
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = student.generate(
            ids, max_new_tokens=args.max_new_tokens, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        for where, fig in position_stats(student, teacher, out, ids.shape[1]):
            for name, value in fig.items():
                figures[where][name].append(value)
    for where in ("disagree", "agree"):
        n = len(figures[where]["reverse KL"])
        print(f"{where}: {n} positions")
        for name, values in figures[where].items():
            print(f"  {name:26s} median {statistics.median(values):.2e}")


if __name__ == "__main__":
    main()
