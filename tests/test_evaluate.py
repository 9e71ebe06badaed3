"""`mopd eval`: which directory a --student names, the greedy / mean@k / pass@k figures per source
and per domain, and the scoring it shares with the loop's in-run eval (mopd.loop.eval_samples)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mopd import checkpoint as ckpt
from mopd.config import ConfigError, load_config
from mopd.types import PromptRow

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory) -> Path:
    """recipes/tiny.yaml's student (random weights) saved as a Hugging Face directory."""
    from mopd.models import build_char_tokenizer, load_model

    cfg = load_config(TINY)
    out = tmp_path_factory.mktemp("student")
    load_model(cfg.student, seed=0).save_pretrained(out)
    build_char_tokenizer().save_pretrained(out)
    return out


def test_student_names_a_directory_a_checkpoint_or_a_run(tmp_path, tiny_student):
    from mopd.app.evaluate import student_dir

    assert student_dir(tiny_student) == tiny_student
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step:06d}" / "hf").mkdir(parents=True)
        (root / f"step_{step:06d}" / "hf" / "config.json").write_text("{}")
        (root / f"step_{step:06d}" / ckpt.STATE_FILE).write_text("{}")
    assert student_dir(root) == root / "step_000004" / "hf"  # the latest
    assert student_dir(root / "step_000002") == root / "step_000002" / "hf"
    with pytest.raises(ConfigError, match=r"--student .*nope: neither a Hugging Face directory"):
        student_dir(tmp_path / "nope")
    (root / "step_000004" / "hf" / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"step_000004 holds no Hugging Face model"):
        student_dir(root)


def test_eval_samples_gives_each_row_its_own_responses_rewards():
    """Sample k of rows[i] is at i * n + k of the batch (RolloutPool.generate): the rewards come back
    per row in that order, as the verifier scored them."""
    from mopd.loop import eval_samples
    from mopd.models import build_char_tokenizer
    from rollout.batching import pack_rollout

    tok = build_char_tokenizer()
    rows = [PromptRow(f"{i}+0=", "math", meta={"answer": str(i)}) for i in range(3)]

    class Fake:
        def generate(self, rows, n, seed, greedy=False):
            # row i answers right in its first i samples of n
            texts = [str(i) if k < i else "x" for i in range(len(rows)) for k in range(n)]
            ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
            return pack_rollout(
                [[1]] * len(texts), ids, [[0.0] * len(x) for x in ids],
                [i for i in range(len(rows)) for _ in range(n)], [r for r in rows for _ in range(n)],
                texts, tok.pad_token_id, 0,
            )  # fmt: skip

    _, rewards = eval_samples(Fake(), rows, 3, seed=0, greedy=False)
    assert rewards == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]


def test_mean_and_pass_at_k():
    from mopd.app.evaluate import summarize

    s = summarize([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    assert s == {"prompts": 4, "mean": pytest.approx(7 / 16), "pass": 0.5}  # 0.5 is no pass: full reward only


def test_mopd_eval_scores_every_source_greedy_and_sampled(tmp_path, tiny_student, monkeypatch, capsys):
    """The command end to end on the tiny recipe's two generator sources, the verifier replaced by
    one whose reward is known from the response (its length is even): the figures are those of the
    responses the rollout gave."""
    import mopd.loop
    from mopd.app.cli import main

    seen: dict[int, list[float]] = {}  # batch size -> rewards: 8 greedy (4 prompts x 2), 24 sampled
    original = mopd.loop.outcome_rewards

    def even_length(batch):
        original(batch)  # the real verifiers run too (and must not raise)
        seen[len(batch.rows)] = [float(len(r) % 2 == 0) for r in batch.responses]
        return seen[len(batch.rows)]

    monkeypatch.setattr(mopd.loop, "outcome_rewards", even_length)
    out = tmp_path / "eval.json"
    args = ["eval", str(TINY), "--student", str(tiny_student), "--samples", "3", "--prompts", "4"]
    assert main([*args, "--output", str(out), "rollout.max_new_tokens=6"]) == 0
    report = json.loads(out.read_text())
    assert report["samples"] == 3 and report["student"] == str(tiny_student)
    assert set(report["sources"]) == {"generator:math", "generator:code"}
    assert set(report["domains"]) == {"math", "code"}
    assert sorted(seen) == [8, 24]
    for i, name in enumerate(("generator:math", "generator:code")):
        mine = report["sources"][name]
        greedy, sampled = seen[8][4 * i : 4 * i + 4], seen[24][12 * i : 12 * i + 12]
        assert mine["prompts"] == 4 and mine["greedy"] == pytest.approx(sum(greedy) / 4)
        assert mine["mean@3"] == pytest.approx(sum(sampled) / 12)
        passed = [any(sampled[3 * p : 3 * p + 3]) for p in range(4)]
        assert mine["pass@3"] == pytest.approx(sum(passed) / 4)
        assert report["domains"][name.split(":")[1]] == {k: v for k, v in mine.items() if k != "domain"}
    printed = capsys.readouterr().out
    assert "generator:math" in printed and "pass@3" in printed and f"wrote {out}" in printed


def test_mopd_eval_refuses_a_recipe_without_held_out_prompts(tmp_path, tiny_student, capsys):
    from mopd.app.cli import main

    data = tmp_path / "math.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    sources = f"data.sources=[{{domain: math, path: {data}}}, {{domain: code, path: {data}}}]"
    assert main(["eval", str(TINY), "--student", str(tiny_student), sources]) == 2
    assert "no data source has held-out prompts and a verifier" in capsys.readouterr().err


def test_outcome_rewards_use_the_sources_verifier_else_the_domains():
    """A row whose source names a verifier (``row.verifier``) is scored by it; the others by their
    domain's registered verifier (exact match for the synthetic math domain), in one batch."""
    from mopd.loop import outcome_rewards
    from mopd.models import build_char_tokenizer
    from mopd.types import PromptRow
    from rollout.batching import pack_rollout

    tok = build_char_tokenizer()
    gsm8k = PromptRow("q", "math", meta={"answer": "Half of 2,000 is 1,000.\n#### 1,000"}, verifier="math_answer")
    synthetic = PromptRow("1+1=", "math", meta={"answer": "2"})
    rows = [gsm8k, gsm8k, synthetic, synthetic]
    texts = ["so \\boxed{1000}", "the answer is 999", "2", "2.0"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = pack_rollout(
        [[1]] * 4, ids, [[0.0] * len(x) for x in ids], [0, 1, 2, 3], rows, texts, tok.pad_token_id, 0
    )  # fmt: skip
    assert outcome_rewards(batch) == [1.0, 0.0, 1.0, 0.0]  # "2.0" is no exact match; 1000 is 1,000


def test_eval_rows_carry_their_sources_verifier_which_decides_whether_code_runs(tmp_path):
    from mopd.app.run import build_eval_rows, executes
    from mopd.domains import verifiers

    data = tmp_path / "law.jsonl"
    data.write_text('{"prompt": "2+2=", "answer": "4"}\n{"prompt": "3+3=", "answer": "6"}\n')
    sources = (
        f"data.sources=[{{domain: math, generator: math}}, {{domain: code, path: {data}, eval_path: {data}, "
        "verifier: code_tests}]"
    )
    cfg = load_config(TINY, [sources, "eval.every=1", "eval.num_prompts=4"])
    rows = [r for r in build_eval_rows(cfg) if r.domain == "code"]
    assert [r.prompt for r in rows] == ["2+2=", "3+3="] and all(r.verifier == "code_tests" for r in rows)
    assert executes(rows[0], verifiers())  # code_tests runs the response: the sandbox preflight asks for it
    plain = load_config(TINY, [sources.replace(", verifier: code_tests", ""), "eval.every=1"])
    assert not any(executes(r, verifiers()) for r in build_eval_rows(plain) if r.domain == "code")
