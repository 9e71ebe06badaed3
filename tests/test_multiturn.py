"""Multi-turn rollouts (rollout/multiturn.py): masks, ids appended and never re-rendered, limits,
malformed calls, a chat template that rewrites history, teacher scoring of a whole trajectory,
the packing of a one-turn domain, and (slow) the HF rollout actor over a ``lookup`` domain.

    OMP_NUM_THREADS=1 pytest tests/test_multiturn.py            # add -m "not slow" to skip the actor
"""

from __future__ import annotations

import random

import pytest
import torch

from mopd.config import BUILTIN_TOKENIZER, EnvironmentConfig, ModelConfig, MOPDConfig, TeacherConfig, validate
from mopd.dist.env_pool import EnvPool
from mopd.envs import Env, ParsedCall, StepResult, get_parser
from mopd.envs import parsers as env_parsers
from mopd.envs.base import tool_message
from mopd.envs.builtin import LookupEnv, lookup_rows
from mopd.envs.parsers import ParsedTurn, ToolCallParser
from mopd.loop import rollout_metrics
from mopd.models import build_char_tokenizer, forward_logits, tiny_mimo_config, token_logprobs
from mopd.objective import mopd_loss
from mopd.types import PromptRow
from rollout.batching import pack_rollout
from rollout.multiturn import (
    ChatRenderer,
    TemplateError,
    TextRenderer,
    TurnLimits,
    make_renderer,
    pack_episodes,
    run_episodes,
)
from test_rollout import make_cfg, prompts, sharpened_student

TOK = build_char_tokenizer()
EOS = TOK.eos_token_id
LP = -0.5  # the log-prob the scripted student "samples" every token with


class Scripted:
    """A fake ``generate_turn``: each trajectory (found by its prompt) says its turns in order,
    each ending with ``end`` (None: no stop token). Records every context it was given."""

    def __init__(self, tok, scripts: dict[tuple[int, ...], list[str]], end: int | None = EOS) -> None:
        self.tok, self.end = tok, end
        self.scripts = {p: iter(turns) for p, turns in scripts.items()}
        self.contexts: list[list[int]] = []

    def __call__(self, contexts, max_new):
        out = []
        for ctx, m in zip(contexts, max_new, strict=True):
            self.contexts.append(list(ctx))
            script = next(s for p, s in self.scripts.items() if tuple(ctx[: len(p)]) == p)
            ids = list(self.tok(next(script), add_special_tokens=False)["input_ids"])
            ids += [] if self.end is None else [self.end]
            stopped = self.end is not None and len(ids) <= m
            out.append((ids[:m], [LP] * len(ids[:m]), stopped))
        return out


LIMITS = TurnLimits(max_turns=4, max_tokens=200, max_new_tokens=64)


def rollout(rows, scripts, limits=LIMITS, renderer=None, tok=TOK, end=EOS, parser="simple"):
    renderer = renderer or TextRenderer(tok)
    envs = [LookupEnv(r) for r in rows]
    keyed = {
        tuple(renderer.prompt(r, e.initial_messages(), e.tools())): s
        for r, e, s in zip(rows, envs, scripts, strict=True)
    }
    fake = Scripted(tok, keyed, end)
    pool = EnvPool("lookup", workers=1, local=True)
    try:
        trajs = run_episodes(
            rows,
            1,
            pool=pool,
            parser=get_parser(parser),
            renderer=renderer,
            generate_turn=fake,
            limits=limits,
            decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        )
    finally:
        pool.shutdown()
    return trajs, fake


@pytest.fixture
def rows():
    return lookup_rows(random.Random(0), 2, "train")


def good_script(row):
    return [f"[lookup({row.meta['key']})]", row.meta["answer"]]


# --------------------------------------------------------------------------- the loop, faked


def test_two_turn_episode_masks_logprobs_and_stats(rows):
    trajs, _ = rollout(rows, [good_script(r) for r in rows])
    batch = pack_episodes(trajs, TOK.pad_token_id, policy_version=3)
    for i, (t, row) in enumerate(zip(trajs, rows, strict=True)):
        assert t.stop == "done" and t.turns == 2 and t.last_text == row.meta["answer"]
        assert t.stats is not None and (t.stats.turns, t.stats.tool_calls, t.stats.tool_errors) == (2, 1, 0)
        assert t.stats.reward == 1.0 and t.stats.stop == "done"
        number = row.meta["table"][row.meta["key"]]
        text = TOK.decode(t.tokens)  # call, EOS, tool result, answer, EOS
        assert text == f"[lookup({row.meta['key']})]</s>={number};{row.meta['answer']}</s>"
        P, cols = batch.prompt_len, torch.arange(batch.input_ids.shape[1])
        resp = batch.response_mask[i, P : P + len(t.tokens)]
        assert resp.tolist() == t.sampled and batch.attention_mask[i, P : P + len(t.tokens)].all()
        tool = batch.attention_mask[i] & ~batch.response_mask[i] & (cols >= P)
        assert TOK.decode(batch.input_ids[i, tool]) == f"={number};"  # the only context tokens
        assert (batch.rollout_logprobs[i, tool] == 0).all()
        assert (batch.rollout_logprobs[i, batch.response_mask[i]] == LP).all()
    assert batch.truncated is not None and not batch.truncated.any()
    assert batch.episodes == [t.stats for t in trajs] and batch.policy_version == 3
    m = rollout_metrics(batch)
    assert m["rollout/agent/turns"] == 2.0 and m["rollout/agent/tool_calls"] == 1.0
    assert m["rollout/agent/env_reward"] == 1.0 and m["rollout/agent/tool_errors"] == 0.0
    assert m["rollout/agent/context_tokens"] == float(len("=417;"))  # three-digit numbers
    assert m["rollout/agent/response_len"] == float(batch.response_mask.sum(-1).float().mean())


def test_earlier_ids_are_never_changed_by_later_turns(rows):
    scripts = [[f"[lookup({r.meta['key']})]", "[lookup(nobody)]", r.meta["answer"]] for r in rows]
    trajs, fake = rollout(rows, scripts)
    for t in trajs:
        mine = [c for c in fake.contexts if c[: len(t.prompt)] == t.prompt]
        assert len(mine) == 3
        full = t.prompt + t.tokens
        for earlier, later in zip(mine, mine[1:], strict=False):
            assert later[: len(earlier)] == earlier  # appended to, never rewritten
        assert full[: len(mine[-1])] == mine[-1]


def test_a_tool_token_never_reaches_the_loss(rows):
    trajs, _ = rollout(rows, [good_script(r) for r in rows])
    b = pack_episodes(trajs, TOK.pad_token_id, 0)
    logp_train = (b.rollout_logprobs + 0.1).clone().requires_grad_(True)
    teacher = torch.full_like(b.rollout_logprobs, -1.0)
    loss, _ = mopd_loss(
        logp_train, b.rollout_logprobs, teacher, b.response_mask, eps_low=0.5, eps_high=5.0, alpha=0.0, adv_clip=5.0
    )
    loss.backward()
    assert logp_train.grad is not None
    context = b.attention_mask & ~b.response_mask
    assert context[:, b.prompt_len :].any()
    assert (logp_train.grad[context] == 0).all() and (logp_train.grad[b.response_mask] != 0).all()


def test_malformed_call_is_answered_with_an_error_and_the_episode_goes_on(rows):
    row = rows[0]
    trajs, _ = rollout([row], [["[lookup bob]", *good_script(row)]])
    t = trajs[0]
    assert t.stop == "done" and t.turns == 3 and t.stats is not None
    assert t.stats.tool_errors == 1 and t.stats.tool_calls == 2 and t.stats.reward == 1.0
    assert "=error: invalid tool call: expected [name(arg,...)]" in TOK.decode(t.tokens)


CALL = "[lookup({key})]"  # L tokens with its EOS; its result "=417;" is 5


@pytest.mark.parametrize(
    "max_turns, max_tokens, max_new, script, end, stop, turns",
    [
        (1, lambda L: 200, 64, [CALL], EOS, "max_turns", 1),  # still calling after the last turn
        (4, lambda L: 200, 5, [CALL], EOS, "max_new_tokens", 1),  # one turn runs past max_new
        (4, lambda L: 200, 64, [CALL], None, "max_new_tokens", 1),  # no stop token at all
        (4, lambda L: L - 2, 64, [CALL], EOS, "max_tokens", 1),  # the budget ends the first turn
        (4, lambda L: L + 5, 64, [CALL, "ok"], EOS, "max_tokens", 1),  # the tool result would leave no room
        (4, lambda L: 2 * L + 5, 64, [CALL, CALL, "z"], EOS, "max_tokens", 2),  # a call on the budget's last token
    ],
)
def test_limits_stop_a_trajectory_and_say_which(rows, max_turns, max_tokens, max_new, script, end, stop, turns):
    key = rows[0].meta["key"]
    script = [s.format(key=key) for s in script]
    limits = TurnLimits(max_turns, max_tokens(len(CALL.format(key=key)) + 1), max_new)
    trajs, _ = rollout(rows[:1], [script], limits=limits, end=end)
    t = trajs[0]
    assert (t.stop, t.turns) == (stop, turns) and t.stats is not None and t.stats.stop == stop
    assert len(t.tokens) <= limits.max_tokens and t.sampled[-1]  # never ends on context tokens
    b = pack_episodes(trajs, TOK.pad_token_id, 0)
    assert b.truncated is not None and bool(b.truncated[0])
    assert rollout_metrics(b)[f"rollout/agent/stop_{stop}"] == 1.0


# --------------------------------------------------------------------------- chat templates

# A template that rewrites history as Qwen3's does: earlier assistant turns lose their <think> block.
THINK_DROPPING = (
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and not loop.last and '</think>' in c %}{% set c = c.split('</think>')[-1] %}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ c }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer(template: str):
    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def test_a_template_that_rewrites_history_leaves_the_trajectory_ids_unchanged(rows):
    tok = chat_tokenizer(THINK_DROPPING)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    renderer = make_renderer(tok, [end])
    assert isinstance(renderer, ChatRenderer) and renderer.glue == "\n"
    row = rows[0]
    turns = [f"<think>who?</think>[lookup({row.meta['key']})]", f"<think>got it</think>{row.meta['answer']}"]
    trajs, _ = rollout([row], [turns], renderer=renderer, tok=tok, end=end)
    t = trajs[0]
    assert t.stop == "done" and t.turns == 2  # (no reward: the answer keeps its <think> block)
    number = row.meta["table"][row.meta["key"]]
    expected = (
        f"<|im_start|>user\n{row.prompt}<|im_end|>\n<|im_start|>assistant\n"
        f"{turns[0]}<|im_end|>\n<|im_start|>tool\n{number}<|im_end|>\n<|im_start|>assistant\n{turns[1]}<|im_end|>"
    )
    assert tok.decode(t.prompt + t.tokens) == expected  # the first turn keeps its <think> block
    assert t.prompt + t.tokens == list(tok(expected, add_special_tokens=False)["input_ids"])
    conversation = [
        {"role": "user", "content": row.prompt},
        {"role": "assistant", "content": turns[0]},
        {"role": "tool", "content": number},
        {"role": "assistant", "content": turns[1]},
    ]
    rerendered = tok.apply_chat_template(conversation, tokenize=False)
    assert "who?" not in rerendered  # the template does rewrite history; the rollout never re-rendered


def test_a_template_that_is_not_prefix_preserving_for_tool_messages_is_refused():
    changes_history = (
        "{% if messages | selectattr('role', 'equalto', 'tool') | list %}TOOLS {% endif %}" + THINK_DROPPING
    )
    with pytest.raises(TemplateError, match="not prefix-preserving for tool messages"):
        ChatRenderer(chat_tokenizer(changes_history), [])
    no_tools = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="cannot render tool messages"):
        ChatRenderer(chat_tokenizer(no_tools), [])


# --------------------------------------------------------------------------- teacher scoring


def test_teacher_scores_of_a_whole_trajectory_equal_the_per_turn_scores_by_hand(rows):
    """One prefill of the packed trajectories equals scoring each student turn after its own
    context, one turn at a time."""
    from teachers.hf import HFTeacherWorker

    trajs, _ = rollout(rows, [["[lookup(nobody)]", *good_script(r)] for r in rows])
    b = pack_episodes(trajs, TOK.pad_token_id, 0)
    cfg = TeacherConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER, batch_size=8)
    worker = HFTeacherWorker("agent", cfg, seed=0, set_threads=False)
    scores = worker.score(b.input_ids, b.attention_mask, b.response_mask).logprobs
    for i, t in enumerate(trajs):
        full = t.prompt + t.tokens
        flags = [False] * len(t.prompt) + t.sampled
        starts = [k for k in range(len(full)) if flags[k] and not flags[k - 1]]
        ends = [k for k in range(len(full)) if flags[k] and (k + 1 == len(full) or not flags[k + 1])]
        assert len(starts) == t.turns == 3
        by_hand = []
        for a, e in zip(starts, ends, strict=True):
            ids = torch.tensor([full[: e + 1]])
            with torch.no_grad():
                logits = forward_logits(worker.model, ids, torch.ones_like(ids, dtype=torch.bool)).logits
            by_hand += token_logprobs(logits, ids)[0, a : e + 1].tolist()
        torch.testing.assert_close(scores[i, b.response_mask[i]], torch.tensor(by_hand), atol=1e-5, rtol=1e-5)
        assert (scores[i, ~b.response_mask[i]] == 0).all()


# --------------------------------------------------------------------------- packing, config


def test_a_one_turn_batch_packs_as_before():
    args = dict(
        prompts=[[1, 5, 6], [1, 7]],
        responses=[[8, 9, EOS], [10]],
        logprobs=[[-1.0, -2.0, -3.0], [-4.0]],
        group_ids=[0, 1],
        rows=prompts(2),
        texts=["a", "b"],
        pad_id=0,
        policy_version=1,
        truncated=[False, True],
    )
    before = pack_rollout(**args)
    explicit = pack_rollout(**args, sampled=[[True] * 3, [True]])
    for name in ("input_ids", "attention_mask", "response_mask", "rollout_logprobs", "group_ids", "truncated"):
        assert torch.equal(getattr(before, name), getattr(explicit, name)), name
    assert before.episodes is None and "rollout/math/turns" not in rollout_metrics(before)
    mixed = pack_rollout(**args, sampled=[[True, False, True], [True]])
    assert mixed.response_mask[0, -3:].tolist() == [True, False, True] and mixed.rollout_logprobs[0, -2] == 0.0
    assert mixed.attention_mask[0, -3:].all()


def env_cfg(**env) -> MOPDConfig:
    cfg = MOPDConfig()
    cfg.run.total_steps = 1
    cfg.student = ModelConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER)
    cfg.teachers = {"agent": TeacherConfig(config=tiny_mimo_config(), tokenizer=BUILTIN_TOKENIZER)}
    from mopd.config import DataSourceConfig

    cfg.data.sources = [DataSourceConfig(domain="agent", generator="agent")]
    cfg.environments = {"agent": EnvironmentConfig(**{"name": "lookup", "parser": "simple", **env})}
    return cfg


def test_config_accepts_an_environment_and_refuses_bad_ones():
    validate(env_cfg())
    from mopd.config import ConfigError
    from mopd.envs.parsers import registered_parsers

    cases = [
        (dict(name="nope"), r"environments.agent.name: unknown environment 'nope'; registered: (.*, )?lookup, shell"),
        # every registered format (a test earlier in this process may have loaded a plugin's own)
        (dict(parser="xml"), rf"environments.agent.parser is 'xml'; valid: {', '.join(registered_parsers())}"),
        (dict(max_turns=0), r"environments.agent.max_turns must be positive"),
    ]
    for env, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate(env_cfg(**env))
    cfg = env_cfg()
    cfg.environments["law"] = EnvironmentConfig(name="lookup")
    with pytest.raises(ConfigError, match=r"environments.law: no teacher for domain 'law'; configured teachers: agent"):
        validate(cfg)
    cfg = env_cfg()
    cfg.rollout.routing_replay = True
    validate(cfg)  # the hf rollout records the routes of every turn (tests/test_routing.py)
    # Outcome rewards (alpha > 0): a multi-turn domain's come from its environment, so it needs no
    # verifier; a one-turn domain without one is still refused.
    cfg = env_cfg()  # domain "shop": no verifier of that name
    cfg.environments = {"shop": cfg.environments.pop("agent")}
    cfg.teachers = {"shop": cfg.teachers.pop("agent")}
    cfg.data.sources[0].domain = "shop"
    cfg.objective.alpha = 0.5
    validate(cfg)
    cfg.environments = {}
    with pytest.raises(ConfigError, match=r"needs a verifier for every one-turn data domain, and domain 'shop'"):
        validate(cfg)


# --------------------------------------------------------------------------- the HF actor


class EveryTurnIsACall(ToolCallParser):
    """Reads any turn as one call of ``echo``: a random student then takes several turns."""

    def parse(self, text, tools=()):
        return ParsedTurn("", [ParsedCall("echo", {"text": text})])


class ChattyEnv(Env):
    """Answers ``echo`` with "ok"; the episode ends at the third step."""

    def __init__(self, row: PromptRow, **kwargs) -> None:
        super().__init__(row)
        self.steps = 0

    def step(self, calls, content=""):
        self.steps += 1
        done = self.steps >= 3
        return StepResult([tool_message(c, "ok") for c in calls], done=done, reward=0.5 if done else None)


@pytest.mark.slow
def test_hf_actor_rolls_out_environment_domains_and_keeps_row_order(tmp_path, monkeypatch):
    from rollout.hf import HFRolloutActor

    monkeypatch.setitem(env_parsers._PARSERS, "every_turn_test", EveryTurnIsACall)  # for this test only

    sharpened_student(seed=0).save_pretrained(tmp_path)
    # Half the characters end a turn, so that the random student's turns end and trajectories go on.
    stops = list(range(3, 99, 2))
    cfg = make_cfg(
        ModelConfig(path=str(tmp_path), tokenizer=BUILTIN_TOKENIZER), max_new_tokens=12, stop_token_ids=stops
    )
    cfg.environments = {
        "agent": EnvironmentConfig(name="lookup", parser="simple", max_turns=3, max_tokens=40),
        "chat": EnvironmentConfig(
            name="test_multiturn:ChattyEnv", parser="every_turn_test", max_turns=4, max_tokens=60
        ),
    }
    actor = HFRolloutActor(cfg)
    chat = [PromptRow(prompt=f"hi {i}", domain="chat", index=i) for i in range(2)]
    rows = [prompts(1)[0], *lookup_rows(random.Random(1), 2, "train"), chat[0], prompts(2)[1], chat[1]]
    try:
        b = actor.generate(rows, n=2, seed=0)
        again = actor.generate(rows, n=2, seed=0)
        forced = actor.logprobs(b.input_ids, b.attention_mask)
    finally:
        actor.shutdown()
    assert torch.equal(b.input_ids, again.input_ids)  # seeded: the same trajectories
    assert [r.prompt for r in b.rows] == [r.prompt for r in rows for _ in range(2)]
    assert b.group_ids.tolist() == [i for i in range(len(rows)) for _ in range(2)]
    assert b.episodes is not None
    assert [e is not None for e in b.episodes] == [r.domain != "math" for r in b.rows]
    assert not (b.response_mask & ~b.attention_mask).any() and (b.rollout_logprobs[~b.response_mask] == 0).all()
    chat_rows = [i for i, r in enumerate(b.rows) if r.domain == "chat"]
    context = b.attention_mask & ~b.response_mask
    assert context[chat_rows, b.prompt_len :].any()  # tool / user messages inside the response region
    # The rollout's log-probs are those of the whole trajectory, teacher-forced (temperature 1).
    torch.testing.assert_close(forced[b.response_mask], b.rollout_logprobs[b.response_mask], atol=1e-4, rtol=1e-4)
    m = rollout_metrics(b)
    for d in ("agent", "chat"):
        for k in ("turns", "tool_calls", "tool_errors", "tool_timeouts", "tool_latency_s"):
            assert f"rollout/{d}/{k}" in m
    assert m["rollout/chat/turns"] > 1.0 and "rollout/math/turns" not in m
    assert m["rollout/chat/env_reward"] == 0.5  # every chat trajectory reached its third step (max_turns 4)


AGENT_LAYER = """
run: {{total_steps: 2, plugins: ["{plugin}"], output_dir: "{out}"}}
teachers:
  agent:
    tokenizer: builtin:char
    config: {{model_type: llama, vocab_size: 128, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
              num_attention_heads: 2, num_key_value_heads: 1, max_position_embeddings: 1024, bos_token_id: 1,
              eos_token_id: 2, pad_token_id: 0}}
data:
  sources:
    - {{domain: math, generator: math, num_prompts: 50}}
    - {{domain: code, generator: code, num_prompts: 50}}
    - {{domain: agent, generator: agent_lookup_test, num_prompts: 50, weight: 8.0}}
environments:
  agent: {{name: lookup, parser: simple, max_turns: 3, max_tokens: 48}}
rollout: {{prompts_per_step: 3}}
checkpoint: {{every: 0}}
"""
PLUGIN = """
from mopd.domains import register_generator
from mopd.envs.builtin import lookup_rows

register_generator("agent_lookup_test", lambda rng, n, split: lookup_rows(rng, n, split))
"""


@pytest.mark.slow
@pytest.mark.extended  # ~80 s on 2 cores; by default the reference run of tests/conftest.py (`uninterrupted`)
# trains with a multi-turn domain (tests/layers/agent.yaml), checked in test_train_e2e and test_faults
def test_mopd_train_two_steps_with_a_lookup_environment(tmp_path):
    """`mopd train` on recipes/tiny.yaml plus an ``agent`` domain rolled out in the ``lookup``
    environment: the multi-turn metrics reach metrics.jsonl."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "plugin.py").write_text(PLUGIN)
    layer = tmp_path / "agent.yaml"
    layer.write_text(AGENT_LAYER.format(plugin=tmp_path / "plugin.py", out=tmp_path / "run"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mopd.app.cli", "train", "recipes/tiny.yaml", str(layer)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    keys = set().union(*steps)
    for k in ("turns", "tool_calls", "tool_errors", "tool_timeouts", "tool_latency_s", "env_reward"):
        assert f"rollout/agent/{k}" in keys, k
    assert "rollout/math/turns" not in keys
    assert all(r["rollout/agent/turns"] >= 1.0 for r in steps if "rollout/agent/turns" in r)


# --------------------------------------------------------------------------- per-request seeds (vLLM)


def test_turn_seeds_follow_each_trajectory_across_turns():
    """rollout.multiturn.TurnSeeds: seed_for(seed, trajectory, turn), the trajectory of a context
    found by the context it extends, also after others stopped."""
    from mopd.seeds import seed_for
    from rollout.multiturn import TurnSeeds

    seeds = TurnSeeds(7)
    first = seeds([[1, 3], [1, 4], [2]])
    assert first == [seed_for(7, t, 0) for t in range(3)] and len(set(first)) == 3
    assert seeds([[1, 4, 9, 9], [2, 5, 6]]) == [seed_for(7, 1, 1), seed_for(7, 2, 1)]  # trajectory 0 stopped
    assert seeds([[2, 5, 6, 8]]) == [seed_for(7, 2, 2)]
    with pytest.raises(RuntimeError, match="extends no context of the previous turn"):
        seeds([[1, 3, 0]])


def test_outcome_rewards_of_tool_trajectories_are_their_environments():
    """alpha > 0 and the in-run eval score a multi-turn trajectory by its environment's reward (0.0
    where it gave none, e.g. cut at max_turns), a one-turn row by its domain's verifier."""
    from mopd.envs.base import TrajectoryStats
    from mopd.loop import outcome_rewards

    rows = [
        PromptRow("ring bob ->", "agent", {"answer": "dial(417)"}),
        PromptRow("ring bob ->", "agent", {"answer": "dial(417)"}),
        PromptRow("1+2=", "math", {"answer": "3"}),
    ]
    # The first answered wrongly by the verifier's measure, but its environment rewarded it: the
    # environment decides. The second was cut before any reward. The third has no environment.
    texts, stats = (
        ["dial(0)", "[lookup(bob)]", "3"],
        [TrajectoryStats(reward=1.0), TrajectoryStats(stop="max_turns"), None],
    )
    batch = pack_rollout(
        prompts=[[1, 5]] * 3, responses=[[7, 2]] * 3, logprobs=[[-0.1, -0.2]] * 3, group_ids=[0, 1, 2],
        rows=rows, texts=texts, pad_id=0, policy_version=0, episodes=stats,
    )  # fmt: skip
    assert outcome_rewards(batch) == [1.0, 0.0, 1.0]
    one_turn = pack_rollout([[1, 5]], [[7, 2]], [[-0.1, -0.2]], [0], rows[2:], ["4"], pad_id=0, policy_version=0)
    assert outcome_rewards(one_turn) == [0.0]
