"""The quickstart end to end at reduced size (fewer prompts and steps than the default): every stage
runs through the same code as `mopd quickstart`, the report has its fields (the multi-turn agent
domain's episode stats included), MOPD improves the student on at least one domain without it
falling on the others, stages are cached and `--from-stage` re-runs from there. Also the agent
domain's SFT targets: a demonstration's ids are those its multi-turn rollout gives, the tool result
is context. The full-size figures are in docs/quickstart.md."""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mopd.types import PromptRow

ROOT = Path(__file__).resolve().parents[1]


# A shorter student and teacher SFT, an eighth of the MOPD samples, half the eval prompts. The
# student's gaps still come mostly from the sub-tasks where its SFT data was noisy
# (student_noisy_kinds), as in the default run.
REDUCED = [
    "eval_prompts=64", "student_sft_steps=400", "teacher_sft_steps=150",
    "run.total_steps=60", "rollout.prompts_per_step=48", "trainer.micro_batch_size=48",
    "eval.every=30", "eval.num_prompts=64", "checkpoint.every=60",
]  # fmt: skip
# Greedy accuracy on 64 prompts moves in steps of 1/64; a domain "falls" if it loses more than 3.
TOLERANCE = 3 / 64
# The normalised score (mean over domains of the share of the teacher-student gap that MOPD closed) at
# this size: 0.423 on seed 3 on a 2-core machine (math 0.38 -> 0.47 of 0.97, code 0.20 -> 0.63 of 0.97,
# multi-turn agent 0.47 -> 0.77 of 1.0; agent tool calls per trajectory 0.48 -> 1.00, the teacher's
# 1.00), in 280-287 s for this test. Another machine rounds into another SFT student, so the bound
# leaves room.
MIN_NORMALIZED = 0.2


@pytest.mark.parametrize(
    "items, message",
    [
        ({"student_mix.maths": "0.5"}, "student_mix names maths"),
        ({"student_mix.math": "-1"}, "must be >= 0"),
        ({"teacher_sft_schedule": "cosin"}, "teacher_sft_schedule='cosin'; valid: constant, linear, cosine"),
        (
            {"student_noisy_kinds.agent": "[wether]"},
            "student_noisy_kinds.agent=['wether']: agent_lookup draws the kinds dial, mail",
        ),
        ({"student_noisy_kinds.maths": "[+]"}, "student_noisy_kinds names maths"),
        ({"student_noise": "1.5"}, "student_noise must be in [0, 1], got 1.5"),
        ({"teacher_lora_lr": "0"}, "teacher_lora_lr must be > 0, got 0.0"),
    ],
)
def test_bad_settings_fail_before_any_stage(items, message):
    from mopd.app.quickstart import settings_from

    with pytest.raises(ValueError, match=re.escape(message)):
        settings_from(items)


def test_lookup_rows_without_the_lookup_environment_fail_before_any_stage():
    from mopd.app.quickstart import RECIPE, environment_errors, settings_from
    from mopd.config import load_config

    base = load_config(RECIPE, [])
    assert environment_errors(settings_from({}), base) == []
    one_turn = settings_from({"generators.agent": "agent_l1", "student_noisy_kinds.agent": "[dial]"})
    assert environment_errors(one_turn, base) == []
    assert environment_errors(settings_from({}), replace(base, environments={})) == [
        "generators.agent=agent_lookup makes lookup rows, which need environments.agent.name=lookup "
        "(no environments.agent)"
    ]


def test_agent_rows_keep_their_table_and_tools_through_the_data_files(tmp_path):
    """The agent domain's rows (generator ``agent_lookup``) are written to JSONL by the domains
    stage and read back for every later stage: the hidden table and the tool schema must survive."""
    from mopd.app.quickstart import RECIPE, read_rows, settings_from, stage_domains
    from mopd.config import load_config
    from mopd.domains import get_generator
    from mopd.envs.base import apply_step
    from mopd.envs.builtin import LookupEnv, demonstration
    from mopd.envs.parsers import get_parser

    st = settings_from({"train_prompts": "30", "eval_prompts": "10"})
    stage_domains(tmp_path, st)
    rows = read_rows(tmp_path, "agent", "eval", load_config(RECIPE, []))
    made = get_generator("agent_lookup").generate(random.Random(0), 1, "eval")[0]
    assert len(rows) == 10 and all(set(r.meta) == set(made.meta) for r in rows)
    for row in rows:
        env, demo = LookupEnv(row), demonstration(row)
        turn = get_parser("simple").parse(demo[0]["content"], env.tools())
        assert apply_step(env, turn.calls, turn.content).messages[0]["content"] == demo[1]["content"]
        assert apply_step(env, [], demo[2]["content"]).reward == 1.0


def test_dotted_settings_go_to_the_stages_and_the_rest_to_the_recipe():
    from mopd.app.quickstart import settings_from, split_overrides

    mine, recipe = split_overrides(
        ["generators.agent=agent_l2", "student_noisy_kinds.agent=[fx]", "student_mix.agent=0.25", "trainer.lr=1e-3"]
    )
    assert recipe == ["trainer.lr=1e-3"]
    st = settings_from(mine)
    assert st.generators["agent"] == "agent_l2" and st.generators["math"] == "math_l0"
    assert st.student_mix["agent"] == 0.25 and st.student_mix["code"] == 1.0


def test_typo_swaps_the_first_two_characters():
    from mopd.app.quickstart import typo

    assert typo("time(Sive)") == "itme(Sive)" and typo("54") == "45"
    assert typo("55") == "55" and typo("5") == "5" and typo("") == ""


def test_the_student_sees_typos_only_on_its_noisy_kinds_at_the_set_rate():
    from mopd.app.quickstart import settings_from, student_target
    from mopd.types import PromptRow

    st = settings_from({"student_noise": "0.6", "student_noisy_kinds.code": "[upper]"})
    target = student_target(st, {})
    rng = random.Random(0)
    upper = PromptRow("upper('ab')=", "code", meta={"answer": "AB", "kind": "upper"})
    concat = PromptRow("'a'+'b'=", "code", meta={"answer": "ab", "kind": "concat"})
    drawn = [target(upper, rng) for _ in range(2000)]
    assert {t[0]["content"] for t in drawn} == {"AB", "BA"} and all(len(t) == 1 for t in drawn)
    assert abs(sum(t[0]["content"] == "BA" for t in drawn) / 2000 - 0.6) < 0.05  # binomial sd 0.011
    assert all(target(concat, rng) == [{"role": "assistant", "content": "ab"}] for _ in range(200))
    assert upper.meta["answer"] == "AB"  # the row itself is never changed


def test_the_students_noisy_tool_rows_answer_at_once_with_a_guessed_number():
    """On a noisy kind of a multi-turn domain (default: agent `mail`) the student's SFT target is
    an answer without the lookup, its number made up; other kinds (and the teachers) get the
    whole demonstration."""
    from mopd.app.quickstart import RECIPE, settings_from, sft_target, student_target
    from mopd.config import load_config
    from mopd.envs.builtin import demonstration, lookup_rows

    envs = load_config(RECIPE, []).environments
    target = student_target(settings_from({}), envs)  # student_noise 0.7, agent: [mail]
    rows = lookup_rows(random.Random(0), 40, "train")
    rng = random.Random(0)
    for row in rows:
        assert sft_target(row, envs) == demonstration(row, "simple")
        drawn = [target(row, rng) for _ in range(100)]
        if row.meta["kind"] == "dial":
            assert all(t == demonstration(row) for t in drawn)
            continue
        guesses = [t[0]["content"] for t in drawn if len(t) == 1]
        assert 50 <= len(guesses) <= 90  # 70 expected, binomial sd 4.6
        number = row.meta["table"][row.meta["key"]]
        for g in guesses:
            made_up = re.fullmatch(r"mail\((\d{3}),([a-z]+)\)", g)
            assert made_up and made_up[1] != number and g.replace(made_up[1], number) == row.meta["answer"]
        assert all(t == demonstration(row) for t in drawn if len(t) > 1)


def test_the_teachers_stage_starts_the_longest_sft_first():
    """The agent domain's tool trajectories make its SFT the longest: its teacher starts first, on
    a core of its own (``_stage_teachers``)."""
    from mopd.app.quickstart import RECIPE, sft_cost
    from mopd.config import load_config
    from mopd.domains import get_generator

    envs = load_config(RECIPE, []).environments
    cost = {d: sft_cost(get_generator(g).generate(random.Random(0), 64, "train"), envs) for d, g in
            (("math", "math_l0"), ("code", "code_l0"), ("agent", "agent_lookup"))}  # fmt: skip
    assert cost["agent"] > cost["code"] > cost["math"] > 0, cost


def test_sft_rows_are_sorted_by_length_with_their_targets():
    from mopd.app.quickstart import by_length

    rows = [PromptRow(p, "x", meta={"answer": a}) for p, a in (("long prompt", "a"), ("p", "b"), ("mid", "ccccc"))]
    targets = [[{"role": "assistant", "content": str(r.meta["answer"])}] for r in rows]
    got, got_targets = by_length(rows, targets)
    assert [r.prompt for r in got] == ["p", "mid", "long prompt"]
    assert [t[0]["content"] for t in got_targets] == ["b", "ccccc", "a"]


def test_a_demonstrations_sft_ids_are_those_its_multi_turn_rollout_gives():
    """A tool trajectory in SFT is the very row MOPD's rollout makes of it: the same ids, with the
    tool result as context (response_mask 0), each turn and its EOS trained."""
    from mopd.app.quickstart import sft_batch, sft_target
    from mopd.config import EnvironmentConfig
    from mopd.dist.env_pool import EnvPool
    from mopd.envs import get_parser
    from mopd.envs.builtin import lookup_rows
    from mopd.models import build_char_tokenizer
    from rollout.multiturn import TurnLimits, make_renderer, pack_episodes, run_episodes

    tok = build_char_tokenizer()
    envs = {"agent": EnvironmentConfig(name="lookup", parser="simple")}
    rows = lookup_rows(random.Random(5), 6, "train")
    targets = [sft_target(r, envs) for r in rows]
    assert {r.meta["kind"] for r in rows} == {"dial", "mail"}
    trajs = []
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    pool = EnvPool("lookup", workers=1, local=True)
    try:
        for row, target in zip(rows, targets, strict=True):
            turns = iter(m["content"] for m in target if m["role"] == "assistant")

            def generate_turn(contexts, max_new, turns=turns):  # the model "writes" the demonstration
                ids = [*tok(next(turns), add_special_tokens=False)["input_ids"], tok.eos_token_id]
                return [(ids, [-0.5] * len(ids), True)]

            trajs += run_episodes(
                [row], 1, pool=pool, parser=get_parser("simple"), renderer=make_renderer(tok, [tok.eos_token_id]),
                generate_turn=generate_turn, limits=TurnLimits(3, 64, 16), decode=decode,
            )  # fmt: skip
    finally:
        pool.shutdown()
    assert all(t.stop == "done" and t.turns == 2 and t.stats.reward == 1.0 for t in trajs)
    rolled = pack_episodes(trajs, tok.pad_token_id, 0)
    sft = sft_batch(tok, rows, {}, targets).rollout
    assert torch.equal(sft.input_ids, rolled.input_ids) and torch.equal(sft.attention_mask, rolled.attention_mask)
    assert torch.equal(sft.response_mask, rolled.response_mask)
    for i, row in enumerate(rows):
        context = sft.attention_mask[i] & ~sft.response_mask[i]
        context[: sft.prompt_len] = False
        assert tok.decode(sft.input_ids[i][context]) == f"={row.meta['table'][row.meta['key']]};"


def test_the_table_shows_each_multi_turn_domains_episodes():
    from mopd.app.quickstart import format_table

    report = _report((0.5,), (1.0,), (0.9,), 0.8)
    report["objective"] = "topk"
    stats = {"turns": 1.5, "tool_calls": 0.5, "tool_errors": 0.0, "success": 0.5}
    report["domains"]["x"]["episodes"] = {
        "student_before": stats,
        "teacher": {**stats, "turns": 2.0, "tool_calls": 1.0, "success": 1.0},
        "student_after": {**stats, "turns": 2.0, "tool_calls": 1.0, "tool_errors": 0.25, "success": 0.9},
    }
    lines = format_table(report).splitlines()
    assert "invalid calls" in lines[-4] and "success" in lines[-4]
    assert lines[-3].split() == ["x", "student", "before", "1.50", "0.50", "0.00", "0.500"]
    assert lines[-1].split() == ["x", "student", "after", "2.00", "1.00", "0.25", "0.900"]
    del report["domains"]["x"]["episodes"]
    assert "multi-turn" not in format_table(report)


def test_the_seeds_episodes_table_gives_each_seed_and_the_mean(tmp_path, capsys):
    from mopd.app.quickstart import episodes_table, main

    def report(turns_after):
        r = _report((0.5,), (1.0,), (0.9,), 0.8)
        stats = {"turns": 1.5, "tool_calls": 0.5, "tool_errors": 0.0, "success": 0.5}
        r["domains"]["x"]["episodes"] = {w: stats for w in ("student_before", "teacher")}
        r["domains"]["x"]["episodes"]["student_after"] = {**stats, "turns": turns_after}
        return r

    table = episodes_table({0: report(2.0), 1: report(1.0)}).splitlines()
    assert table[0].startswith("| seed | x turns before | x turns teacher | x turns after | x tool calls before")
    assert "x invalid calls after | x success before" in table[0] and len(table) == 5
    assert table[2].startswith("| 0 | 1.50 | 1.50 | 2.00 | 0.50 |") and table[-1].startswith(
        "| **mean** | 1.50 | 1.50 | 1.50 |"
    )
    assert episodes_table({0: _report((0.5,), (1.0,), (0.9,), 0.8)}) == ""
    for seed, turns in ((0, 2.0), (1, 1.0)):
        (tmp_path / f"seed_{seed}").mkdir()
        (tmp_path / f"seed_{seed}" / "report.json").write_text(json.dumps(report(turns)))
    assert main([str(tmp_path), "0", "1"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == table


def test_evaluate_adds_a_multi_turn_domains_episode_stats():
    from mopd.envs.base import TrajectoryStats
    from mopd.loop import evaluate
    from mopd.models import build_char_tokenizer
    from rollout.batching import pack_rollout

    tok = build_char_tokenizer()
    rows = [PromptRow("a ->", "agent", meta={"answer": "dial(1)"}), PromptRow("1+1=", "math", meta={"answer": "2"})]

    class Fake:
        def generate(self, rows, n, seed, greedy=False):
            stats = TrajectoryStats(turns=2, tool_calls=1, tool_errors=1, reward=1.0, stop="done")
            return pack_rollout(
                [[1, 5], [1, 6]], [[7, 2, 8, 9, 2], [10, 2]], [[0.0] * 5, [0.0] * 2], [0, 1], rows,
                ["dial(1)", "3"], tok.pad_token_id, 0, sampled=[[True, True, False, True, True], [True, True]],
                episodes=[stats, None],
            )  # fmt: skip

    out = evaluate(Fake(), rows)
    assert out["eval/agent/accuracy"] == 1.0 and out["eval/math/accuracy"] == 0.0
    assert out["eval/agent/turns"] == 2.0 and out["eval/agent/tool_calls"] == 1.0
    assert out["eval/agent/tool_errors"] == 1.0 and out["eval/agent/env_reward"] == 1.0
    assert not any(k.startswith("eval/math/") and k != "eval/math/accuracy" for k in out)


def test_sft_batch_encodes_each_row_once_and_as_encoding_it_alone_would():
    from mopd.app.quickstart import sft_batch
    from mopd.chat import prompt_ids
    from mopd.models import build_char_tokenizer
    from mopd.types import PromptRow

    tok = build_char_tokenizer()
    rows = [PromptRow(f"{a}+{b}=", "math", meta={"answer": a + b}) for a, b in ((1, 2), (30, 4), (5, 67))]
    cache: dict = {}
    first = sft_batch(tok, rows, cache)
    assert len(cache) == 3

    class Counting:
        def __init__(self):
            self.calls = 0

        def __call__(self, *args, **kwargs):
            self.calls += 1
            return tok(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(tok, name)

    counting = Counting()
    again = sft_batch(counting, [rows[2], rows[0], rows[2]], cache)
    assert counting.calls == 0, "rows already in the cache were encoded again"
    for batch, order in ((first, rows), (again, [rows[2], rows[0], rows[2]])):
        for i, row in enumerate(order):
            want = prompt_ids(tok, row) + tok(str(row.meta["answer"]), add_special_tokens=False)["input_ids"]
            got = batch.rollout.input_ids[i][batch.rollout.attention_mask[i]].tolist()
            assert got == want + [tok.eos_token_id]


def _report(before, teacher, after, score):
    return {
        "domains": {
            d: {"student_before": b, "teacher": t, "student_after": a}
            for d, b, t, a in zip("xyz"[: len(before)], before, teacher, after, strict=True)
        },
        "normalized_score": score,
        "wall_time_s": 300.0,
    }


def test_the_seed_table_gives_mean_min_and_every_missed_target():
    from mopd.app.report import seeds_table, target_misses

    good = _report((0.3, 0.5), (1.0, 0.95), (0.9, 0.9), 0.93)
    bad = _report((0.75, 0.2), (1.0, 0.85), (0.7, 0.8), float("nan"))
    assert target_misses(good) == []
    assert target_misses(bad) == [
        "x gap 0.250 < 0.3", "x after 0.700 <= before 0.750", "y teacher 0.850 < 0.9", "normalised nan < 0.9",
    ]  # fmt: skip
    table = seeds_table({0: good, 1: bad})
    assert "| **mean** | 0.525 | 1.000 | 0.800 | 0.350 | 0.900 | 0.850 | nan |" in table
    assert "| **min** | 0.300 | 1.000 | 0.700 | 0.200 | 0.850 | 0.800 | nan |" in table
    assert "seed 0: every target met" in table and "seed 1: MISSED x gap 0.250" in table


def test_a_cached_stage_made_with_other_settings_is_rerun(tmp_path):
    """Changing a setting re-runs the first stage that used it and every stage after it."""
    from mopd.app.quickstart import STAGES, StageCache, settings_from, stage_inputs

    cache = StageCache(tmp_path)
    ran = stage_inputs(settings_from({}), [])
    for stage in STAGES:
        cache.finish(stage, {"seconds": 1.0, "inputs": ran[stage]})
    assert cache.first_changed(ran) is None
    assert cache.first_changed(stage_inputs(settings_from({"teacher_sft_steps": "50"}), [])) == (
        "teachers",
        ["teacher_sft_steps"],
    )
    assert cache.first_changed(stage_inputs(settings_from({"student_mix.agent": "0.25"}), [])) == (
        "student",
        ["student_mix"],
    )
    assert cache.first_changed(stage_inputs(settings_from({}), ["trainer.lr=1e-3"])) == ("mopd", ["recipe_overrides"])
    assert cache.first_changed(stage_inputs(settings_from({"eval_prompts": "8"}), []))[0] == "domains"


def test_run_quickstart_reruns_from_the_changed_stage(tmp_path, monkeypatch, capsys):
    import mopd.app.quickstart as qs

    ran = []
    monkeypatch.setattr(qs, "STAGE_FUNCS", {s: (lambda *a, s=s: ran.append(s) or {}) for s in qs.STAGES})
    qs.run_quickstart(str(tmp_path))
    assert ran == list(qs.STAGES)
    ran.clear()
    qs.run_quickstart(str(tmp_path), overrides=["teacher_sft_steps=10"])
    assert ran == ["teachers", "mopd", "report"]
    assert "teachers: its settings changed since it ran (teacher_sft_steps)" in capsys.readouterr().out
    ran.clear()
    qs.run_quickstart(str(tmp_path), overrides=["teacher_sft_steps=10", "trainer.lr=1e-3"], from_stage="report")
    assert ran == ["mopd", "report"]  # the changed stage comes before the one asked for


def quickstart(*args: str) -> str:
    """Run `mopd quickstart` in its own process (it starts Ray and a gloo group); return stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mopd.app.cli", "quickstart", *args, *REDUCED]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def check_report(report: dict) -> None:
    """The report's fields, and what MOPD must do at this size: every domain's reverse KL falls,
    the student gains on at least one domain by >= 0.1 (6 prompts of 64) and falls on none, and
    closes at least MIN_NORMALIZED of the teacher-student gap on average."""
    assert set(report["domains"]) == {"math", "code", "agent"}
    for r in report["domains"].values():
        assert set(r) >= {"teacher", "student_before", "student_after", "reverse_kl_start", "reverse_kl_end"}
        assert all(0.0 <= r[k] <= 1.0 for k in ("teacher", "student_before", "student_after"))
    assert report["objective"] == "topk" and report["wall_time_s"] > 0
    score = report["normalized_score"]
    assert isinstance(score, float) and math.isfinite(score), score  # NaN: a teacher not above its student
    assert score >= MIN_NORMALIZED, score
    gains = {d: r["student_after"] - r["student_before"] for d, r in report["domains"].items()}
    assert max(gains.values()) >= 0.1, gains
    assert min(gains.values()) >= -TOLERANCE, gains
    # Distillation pulls the student towards its teachers on every domain.
    for d, r in report["domains"].items():
        assert r["reverse_kl_end"] < r["reverse_kl_start"], (d, r)
    check_episodes(report["domains"])


def check_episodes(domains: dict) -> None:
    """The multi-turn agent domain's greedy episodes: every model's turns, tool calls, invalid calls
    and success (its accuracy); only agent has them. Its answer needs the tool, so the teacher looks
    the number up, and MOPD moves the student's tool use towards the teacher's."""
    assert [d for d, r in domains.items() if "episodes" in r] == ["agent"]
    eps = domains["agent"]["episodes"]
    assert set(eps) == {"student_before", "teacher", "student_after"}
    for who, e in eps.items():
        assert set(e) == {"turns", "tool_calls", "tool_errors", "success"}, e
        assert 1.0 <= e["turns"] <= 3.0 and 0.0 <= e["tool_errors"] <= e["tool_calls"] <= 2.0, (who, e)
        assert e["success"] == domains["agent"][who], (who, e)
    assert eps["teacher"]["tool_calls"] >= 0.9, eps
    before, teacher, after = (eps[w]["tool_calls"] for w in ("student_before", "teacher", "student_after"))
    assert abs(teacher - after) < abs(teacher - before), eps


@pytest.mark.slow
def test_reduced_quickstart_improves_the_student(tmp_path):
    """On seed 3, not the default seed 0: what MOPD does is not a property of seed 0's data and
    initialisation (nor of one CPU's rounding of it). Seed 0 runs in the extended set below."""
    out = tmp_path / "qs"
    quickstart("--output-dir", str(out), "seed=3", "run.seed=3")
    check_report(json.loads((out / "report.json").read_text()))
    assert (out / "curves.png").stat().st_size > 0
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(out / "student_hf")).__name__ == "MiMoV2FlashForCausalLM"

    printed = quickstart("--output-dir", str(out), "--from-stage", "report", "seed=3", "run.seed=3")
    assert all(f"{s}: cached" in printed for s in ("domains", "student", "teachers", "mopd"))
    assert "report: running" in printed


@pytest.mark.slow
@pytest.mark.extended  # ~3 min more on 2 cores; the default run covers seed 3, scripts/quickstart_seeds.sh all five
def test_reduced_quickstart_improves_the_student_on_the_default_seed(tmp_path):
    out = tmp_path / "qs"
    quickstart("--output-dir", str(out))
    check_report(json.loads((out / "report.json").read_text()))


def test_the_seed_table_command_exits_1_when_a_seed_misses_a_target(tmp_path, capsys):
    from mopd.app.report import main

    for seed, score in ((0, 0.93), (1, 0.87)):
        (tmp_path / f"seed_{seed}").mkdir()
        (tmp_path / f"seed_{seed}" / "report.json").write_text(json.dumps(_report((0.3,), (1.0,), (0.9,), score)))
    assert main([str(tmp_path), "0", "1"]) == 1
    assert "seed 1: MISSED normalised 0.870 < 0.9" in capsys.readouterr().out
    assert main([str(tmp_path), "0", "1", "--normalized", "0.85"]) == 0


def test_adapter_teachers_point_the_mopd_stage_at_the_student_and_its_adapters(tmp_path):
    """``teacher_lora_rank`` > 0: every teacher is the SFT student plus its domain's adapter (one
    worker group), and the teachers stage re-runs when the rank changes."""
    from mopd.app.quickstart import RECIPE, QuickstartSettings, StageCache, mopd_overrides, stage_inputs
    from mopd.config import load_config, teacher_groups

    out = tmp_path / "qs"
    (out / "student_sft").mkdir(parents=True)  # what the recipe checks exists
    (out / "data").mkdir()
    for d in ("math", "code", "agent"):
        (out / "teachers" / d / "adapter").mkdir(parents=True)
        (out / "teachers" / d / "adapter" / "adapter_config.json").write_text("{}")
        for split in ("train", "eval"):
            (out / "data" / f"{d}_{split}.jsonl").write_text('{"prompt": "1+1="}\n')
    st = QuickstartSettings(teacher_lora_rank=16)
    cfg = load_config(RECIPE, mopd_overrides(out, st))
    assert {t.path for t in cfg.teachers.values()} == {str(out / "student_sft")}
    assert {d: t.adapter for d, t in cfg.teachers.items()} == {
        d: str(out / "teachers" / d / "adapter") for d in cfg.teachers
    }
    assert [g.domains for g in teacher_groups(cfg.teachers)] == [tuple(sorted(cfg.teachers))]
    full = load_config(RECIPE, mopd_overrides(out, QuickstartSettings()))
    assert all(t.adapter is None and t.path == str(out / "teachers" / d) for d, t in full.teachers.items())
    cache = StageCache(out)
    for stage, inputs in stage_inputs(QuickstartSettings(), []).items():
        cache.finish(stage, {"inputs": inputs})
    assert cache.first_changed(stage_inputs(st, [])) == ("teachers", ["teacher_lora_rank"])


@pytest.mark.parametrize(("rank", "lr"), [(0, 3e-3), (16, 1e-2)], ids=["full", "adapter"])
def test_adapter_teachers_train_at_their_own_rate(tmp_path, monkeypatch, rank, lr):
    """``teacher_lora_lr`` (not ``teacher_sft_lr``) is the rate of adapter teachers, and their SFT
    starts from the student with a LoRA of ``teacher_lora_rank``."""
    import mopd.app.quickstart as q
    from mopd.config import load_config

    seen = {}

    def run_sft(base, init, rows, steps, lr, *args, **kwargs):
        seen.update(init=init, lr=lr)
        return {"final_loss": 0.0, "seconds": 0.0, "steps": steps}

    monkeypatch.setattr(q, "run_sft", run_sft)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the teacher's process would take 1
    monkeypatch.setattr(q, "read_rows", lambda *a: [])
    monkeypatch.setattr(q, "evaluate_model", lambda *a: q.Evaluation({"math": 1.0}, {}))
    st = q.QuickstartSettings(teacher_lora_rank=rank, teacher_sft_lr=3e-3, teacher_lora_lr=1e-2)
    q._train_teacher((tmp_path, st, load_config(q.RECIPE), 0, "math", 0))
    assert seen["lr"] == lr
    lora = seen["init"].get("lora")
    assert (lora is None) if rank == 0 else (lora.r == rank and lora.alpha == 2 * rank)
