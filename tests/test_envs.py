"""Tool environments (mopd/envs/) and the pool that runs them (mopd/dist/env_pool.py): the call
parsers on good and malformed calls, the environment registry, the built-in ``lookup`` and
``shell`` environments, and the pool with a sleeping, a hanging, a raising, a huge and a
worker-killing tool (in-process, then on real Ray actors: marked ``slow``).

    OMP_NUM_THREADS=1 pytest tests/test_envs.py
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time

import pytest

from mopd import sandbox
from mopd.envs import Env, EnvError, ParsedCall, apply_step, get_env, get_parser, register_env, registered_envs
from mopd.envs import base as env_base
from mopd.envs import parsers as env_parsers
from mopd.envs.base import cap_result, function_schema, resolve_env
from mopd.envs.builtin import LookupEnv, demonstration, lookup_rows, shell_row
from mopd.models import CHARS
from mopd.types import PromptRow

HERMES, SIMPLE = get_parser("hermes"), get_parser("simple")
LOOKUP = function_schema("lookup", "a number", {"name": "who"})
PAIR = function_schema("pair", "two things", {"a": "first", "b": "second"})


# --------------------------------------------------------------------------- parsers


def test_hermes_reads_several_calls_and_the_text_around_them():
    text = (
        'Let me look.\n<tool_call>\n{"name": "lookup", "arguments": {"name": "bob"}}\n</tool_call>\n'
        '<tool_call>{"name": "pair", "arguments": "{\\"a\\": 1, \\"b\\": [2]}"}</tool_call>'
        '<tool_call>{"name": "finish"}</tool_call> done'
    )
    turn = HERMES.parse(text)
    assert turn.content == "Let me look.\n\n done"
    assert [(c.name, c.arguments, c.id, c.ok) for c in turn.calls] == [
        ("lookup", {"name": "bob"}, "call_0", True),
        ("pair", {"a": 1, "b": [2]}, "call_1", True),  # arguments given as a JSON string
        ("finish", {}, "call_2", True),  # no arguments
    ]
    assert turn.calls[0].raw.startswith("<tool_call>") and turn.calls[0].raw.endswith("</tool_call>")
    assert HERMES.stop == ("</tool_call>",)


def test_hermes_call_cut_at_its_stop_string_still_counts():
    """Engines drop the stop string from the output: the last call arrives unclosed."""
    turn = HERMES.parse('ok <tool_call>{"name": "lookup", "arguments": {"name": "ann"}}')
    assert turn.content == "ok" and turn.calls[0].ok and turn.calls[0].arguments == {"name": "ann"}


@pytest.mark.parametrize(
    "body, error",
    [
        ('{"name": "lookup", "arguments": {"name": "bob"', "malformed JSON"),
        ("{bad}", "malformed JSON"),
        ('{"arguments": {"name": "bob"}}', "the call has no 'name'"),
        ('{"name": "", "arguments": {}}', "the call has no 'name'"),
        ('["lookup", "bob"]', "expected a JSON object"),
        ('{"name": "lookup", "arguments": [1, 2]}', "'arguments' must be a JSON object, got list"),
        ('{"name": "lookup", "arguments": "{oops"}', "malformed JSON in 'arguments'"),
        ("", "malformed JSON"),
    ],
)
def test_hermes_malformed_calls_come_back_with_an_error_never_raise(body, error):
    good = '<tool_call>{"name": "finish", "arguments": {}}</tool_call>'
    turn = HERMES.parse(f"<tool_call>{body}</tool_call>{good}")
    assert len(turn.calls) == 2 and error in (turn.calls[0].error or "") and not turn.calls[0].ok
    assert turn.calls[1].ok and turn.calls[1].name == "finish"  # a bad call does not spoil the next one


def test_hermes_format_call_round_trips():
    text = HERMES.format_call("bash", {"command": "echo 'hi' > \"a b\""})
    [call] = HERMES.parse(text).calls
    assert (call.name, call.arguments) == ("bash", {"command": "echo 'hi' > \"a b\""})


def test_simple_format_maps_positions_to_the_schema_parameters():
    turn = SIMPLE.parse("[lookup(bob)][pair(x, y)] note [finish()]", [LOOKUP, PAIR])
    assert [(c.name, c.arguments) for c in turn.calls] == [
        ("lookup", {"name": "bob"}),
        ("pair", {"a": "x", "b": "y"}),
        ("finish", {}),
    ]
    assert turn.content == "note" and SIMPLE.stop == ("]",)
    assert SIMPLE.parse("[lookup(bob)", [LOOKUP]).calls[0].arguments == {"name": "bob"}  # cut at "]"
    assert SIMPLE.parse("dial(417)").calls == []  # the agent domain's answers hold no call


def test_simple_format_errors_and_characters():
    turn = SIMPLE.parse("[lookup(a,b)][lookup bob][(x)][", [LOOKUP])
    errors = [c.error for c in turn.calls]
    assert errors[0] == "lookup takes 1 argument(s) (name), got 2"
    assert all(e and e.startswith("expected [name(arg,...)]") for e in errors[1:])
    text = SIMPLE.format_call("pair", {"a": "x", "b": "7"})
    assert text == "[pair(x,7)]" and set(text) <= set(CHARS)  # the character tokenizer can write it


def test_parsers_never_raise_on_noise():
    rng = random.Random(0)
    alphabet = '<>{}[]()",: ' + "tool_call/name" + "abc"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(60)))
        for parser in (HERMES, SIMPLE):
            turn = parser.parse(text, [LOOKUP])
            assert all(isinstance(c, ParsedCall) for c in turn.calls)


def test_parser_registry_names_the_valid_formats():
    # Every registered format, the built-in ones included (a test earlier in this process may have
    # loaded a plugin that registers its own: tests/layers/calls_every_turn.py).
    names = env_parsers.registered_parsers()
    assert {"hermes", "simple"} <= set(names)
    with pytest.raises(KeyError, match=f"unknown tool-call format 'xml'; registered: {', '.join(names)}"):
        get_parser("xml")
    with pytest.raises(ValueError, match="'hermes' is already registered"):

        @env_parsers.register_parser("hermes")
        class Other(env_parsers.ToolCallParser):
            pass


# --------------------------------------------------------------------------- registry


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the environment registry."""
    registered_envs()
    monkeypatch.setattr(env_base, "_REGISTRY", dict(env_base._REGISTRY))


def test_builtins_are_registered_and_an_unknown_name_lists_them():
    assert {"lookup", "shell"} <= set(registered_envs())
    assert get_env("lookup") is LookupEnv
    with pytest.raises(EnvError, match=r"unknown environment 'nope'; registered: lookup, shell .*module.path:Class"):
        get_env("nope")


def test_a_taken_name_is_refused_unless_replaced(registry):
    class Mine(Env):
        pass

    with pytest.raises(ValueError, match=r"an environment named 'lookup' is already registered \(mopd.envs.builtin"):
        register_env("lookup")(Mine)
    register_env("mine")(Mine)
    register_env("mine")(Mine)  # the same class again: a module imported twice
    register_env("lookup", replace=True)(Mine)
    assert get_env("lookup") is Mine
    with pytest.raises(TypeError, match="is not a subclass of mopd.envs.Env"):
        register_env("x")(dict)  # type: ignore[type-var]


def test_a_class_named_by_module_path_or_registered_by_a_plugin_file(registry, tmp_path):
    assert get_env("mopd.envs.builtin:LookupEnv") is LookupEnv
    with pytest.raises(EnvError, match="cannot import 'Nope' from 'mopd.envs.builtin'"):
        get_env("mopd.envs.builtin:Nope")
    with pytest.raises(EnvError, match="is not a subclass of mopd.envs.Env"):
        get_env("mopd.envs.builtin:PromptRow")
    plugin = tmp_path / "echo_env.py"
    plugin.write_text(
        "from mopd.envs import Env, register_env\n\n"
        "@register_env('echo')\nclass Echo(Env):\n    def tool_echo(self, text):\n        return text\n"
    )
    cls = resolve_env("echo", [str(plugin)])
    assert cls.__name__ == "Echo"
    res = apply_step(cls(PromptRow("p", "d")), [ParsedCall("echo", {"text": "hi"})])
    assert res.messages == [{"role": "tool", "content": "hi", "tool_call_id": "call_0", "name": "echo"}]


# --------------------------------------------------------------------------- the interface


class Counter(Env):
    """Test environment: a counter, a raising tool, a huge result."""

    def __init__(self, row: PromptRow, **kwargs) -> None:
        super().__init__(row)
        self.n = 0

    def tool_inc(self, by: str = "1") -> str:
        self.n += int(by)
        return str(self.n)

    def tool_boom(self) -> str:
        raise RuntimeError("disk on fire")

    def tool_big(self) -> str:
        return "x" * 10_000_000

    def reward(self, content: str) -> float | None:
        return float(content.strip() == str(self.n))


def test_initial_messages_carry_the_rows_system_prompt_and_tools():
    row = PromptRow("count to 2", "d", meta={"system": "be brief", "tools": [LOOKUP]})
    env = Counter(row)
    assert env.initial_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "count to 2"},
    ]
    assert env.tools() == [LOOKUP]
    chat = PromptRow(
        "(rendered)", "d", messages=[{"role": "system", "content": "own"}, {"role": "user", "content": "q"}]
    )
    assert Counter(chat).initial_messages() == chat.messages  # the row's own system message wins


def test_apply_step_answers_every_failure_with_a_message():
    env = Counter(PromptRow("p", "d"))
    calls = [
        ParsedCall("inc", {"by": "2"}, "c0"),
        ParsedCall("", {}, "c1", error="malformed JSON (x)"),
        ParsedCall("inc", {"step": "2"}, "c2"),
        ParsedCall("boom", {}, "c3"),
        ParsedCall("nope", {}, "c4"),
    ]
    res = apply_step(env, calls, "working")
    contents = [m["content"] for m in res.messages]
    assert contents[0] == "2"
    assert contents[1] == "error: invalid tool call: malformed JSON (x)"
    assert contents[2].startswith("error: bad arguments for inc:")
    assert contents[3] == "error: boom raised RuntimeError: disk on fire"
    assert contents[4] == "error: unknown tool 'nope'; tools: none"
    assert [m["tool_call_id"] for m in res.messages] == ["c0", "c1", "c2", "c3", "c4"]
    assert not res.done and res.info["tool_errors"] == 4
    bad_only = apply_step(env, [ParsedCall("", error="no name")])
    assert not bad_only.done and bad_only.info["tool_errors"] == 1  # not a final answer
    final = apply_step(env, [], "2")
    assert final.done and final.reward == 1.0 and final.messages == []


def test_a_step_that_raises_or_breaks_the_contract_becomes_errors():
    class Broken(Env):
        def step(self, calls, content=""):
            if calls and calls[0].name == "raise":
                raise OSError("gone")
            return env_base.StepResult([])  # no message for the call

    env = Broken(PromptRow("p", "d"))
    res = apply_step(env, [ParsedCall("raise")])
    assert res.messages[0]["content"] == "error: environment raised OSError: gone" and res.info["tool_errors"] == 1
    res = apply_step(env, [ParsedCall("x")])
    assert "returned 0 messages for 1 calls" in res.messages[0]["content"]


def test_results_are_capped_with_a_note():
    res = apply_step(Counter(PromptRow("p", "d")), [ParsedCall("big")], max_result_chars=100)
    content = res.messages[0]["content"]
    assert content.startswith("x" * 100) and content.endswith("[... truncated: 9999900 of 10000000 characters]")
    assert res.info["truncated_results"] == 1
    assert cap_result("short", 10) == ("short", False)


# --------------------------------------------------------------------------- lookup


def test_the_lookup_tools_written_out_schema_is_function_schemas():
    from mopd.domains.agent import LOOKUP_TOOL
    from mopd.envs.base import function_schema

    assert LOOKUP_TOOL == function_schema("lookup", "The number saved for a person.", {"name": "the person's name"})


def test_lookup_rows_need_the_tool_and_the_demonstration_scores_one():
    rows = lookup_rows(random.Random(0), 40, "train")
    for row in rows:
        number = row.meta["table"][row.meta["key"]]
        assert number not in row.prompt and number in row.meta["answer"]  # only the tool knows it
        env = LookupEnv(row)
        demo = demonstration(row)
        turn = SIMPLE.parse(demo[0]["content"], env.tools())
        res = apply_step(env, turn.calls, turn.content)
        assert res.messages[0]["content"] == demo[1]["content"] == number and not res.done
        final = apply_step(env, [], demo[2]["content"])
        assert final.done and final.reward == 1.0 and final.info["used_result"]
        assert set(demo[0]["content"] + demo[2]["content"]) <= set(CHARS)
    assert {r.meta["kind"] for r in rows} == {"dial", "mail"}
    assert all(r.prompt.endswith(" ->") for r in rows)


def test_lookup_without_the_tool_or_with_a_wrong_key_fails():
    row = lookup_rows(random.Random(1), 1, "eval")[0]
    env = LookupEnv(row)
    guess = apply_step(env, [], row.meta["answer"].replace(row.meta["table"][row.meta["key"]], "000"))
    assert guess.done and guess.reward == 0.0 and guess.info["answered_without_call"]
    res = apply_step(LookupEnv(row), [ParsedCall("lookup", {"name": "zzz"})])
    assert res.messages[0]["content"] == "error: no entry for zzz" and res.info["tool_errors"] == 1


def test_lookup_splits_are_disjoint():
    train = {r.prompt for r in lookup_rows(random.Random(0), 200, "train")}
    evals = {r.prompt for r in lookup_rows(random.Random(0), 50, "eval")}
    assert train and evals and not train & evals


# --------------------------------------------------------------------------- shell


@pytest.fixture
def contained(monkeypatch):
    """Shell tests run trusted commands: where the kernel layer is missing they run unisolated."""
    monkeypatch.setattr(sandbox, "_ALLOW_UNISOLATED", True)


def _bash(env: Env, command: str) -> str:
    turn = HERMES.parse(HERMES.format_call("bash", {"command": command}))
    return apply_step(env, turn.calls, turn.content).messages[0]["content"]


def test_shell_keeps_its_working_directory_across_turns_and_rewards_the_test(contained):
    row = shell_row("make out.txt hold 42", {"src/in.txt": "41\n"}, 'test "$(cat out.txt)" = 42')
    env = get_env("shell")(row, command_timeout_s=2.0)
    assert env.initial_messages()[0]["role"] == "system"
    assert [t["function"]["name"] for t in env.tools()] == ["bash", "finish"]
    assert _bash(env, "cat src/in.txt; ls") == "41\nsrc\n"
    assert _bash(env, "echo $(( $(cat src/in.txt) + 1 )) > out.txt; echo oops >&2; exit 3") == "oops\n[exit 3]"
    assert _bash(env, "cat out.txt") == "42\n"  # the file written a turn earlier is still there
    assert _bash(env, "sleep 5").endswith("[timed out after 2s]")
    done = apply_step(env, [ParsedCall("finish")])
    assert done.done and done.reward == 1.0 and done.messages[0]["content"] == "finished"
    fresh = get_env("shell")(row)
    assert apply_step(fresh, [], "I am done").reward == 0.0  # a final answer runs the test too


def test_shell_refuses_files_outside_its_directory(contained):
    with pytest.raises(ValueError, match="must be a relative path"):
        get_env("shell")(shell_row("t", {"../escape": "x"}, "true"))


# --------------------------------------------------------------------------- the pool, in-process


def _pool(env=Counter, **kw):
    from mopd.dist.env_pool import EnvPool

    return EnvPool(env, **{"workers": 2, "timeout_s": 1.0, "max_result_chars": 1000, "local": True, **kw})


def pool_classes():
    """Defined in a function so that Ray ships them by value (the workers cannot import tests/)."""

    class Tools(Env):
        def __init__(self, row: PromptRow, **kwargs) -> None:
            super().__init__(row)
            self.n = 0

        def tool_inc(self) -> str:
            self.n += 1
            return str(self.n)

        def tool_sleep(self, seconds: str) -> str:
            time.sleep(float(seconds))
            return "slept"

        def tool_boom(self) -> str:
            raise ValueError("bad input")

        def tool_big(self) -> str:
            return "y" * 10_000_000

        def tool_die(self, marker: str) -> str:
            """Kills its worker the first time (``marker`` remembers), then answers."""
            if not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return "alive"

        def tool_pid(self) -> str:
            return str(os.getpid())

        def tool_wedge(self) -> str:
            """Holds the GIL for ever (a regex that backtracks 2**64 times): the worker stops answering."""
            return str(re.match(r"(a+)+$", "a" * 64 + "b"))

    return Tools


def _run(pool, tid, *calls):
    return pool.step(tid, [ParsedCall(n, a) for n, a in calls]).result(timeout=120)


def test_local_pool_runs_trajectories_concurrently_and_survives_bad_tools():
    Tools = pool_classes()
    pool = _pool(Tools)
    try:
        eps = [f.result() for f in [pool.open(PromptRow(f"p{i}", "d")) for i in range(4)]]
        start = time.monotonic()
        futures = [pool.step(e.id, [ParsedCall("sleep", {"seconds": "0.5"})]) for e in eps]
        assert [f.result().messages[0]["content"] for f in futures] == ["slept"] * 4
        assert time.monotonic() - start < 1.5  # side by side, not 4 x 0.5 s
        tid = eps[0].id
        assert _run(pool, tid, ("inc", {})).messages[0]["content"] == "1"
        hung = _run(pool, tid, ("sleep", {"seconds": "60"}))
        assert hung.messages[0]["content"] == "error: the tool call timed out after 1s" and not hung.done
        # The environment was dropped with its hung thread and rebuilt by replaying the steps: n == 1.
        assert _run(pool, tid, ("inc", {})).messages[0]["content"] == "2"
        assert _run(pool, tid, ("boom", {})).messages[0]["content"] == "error: boom raised ValueError: bad input"
        big = _run(pool, tid, ("big", {})).messages[0]["content"]
        assert len(big) < 1100 and big.endswith("[... truncated: 9999000 of 10000000 characters]")
        stats = pool.close(tid)
        assert (stats.turns, stats.tool_calls, stats.tool_timeouts, stats.tool_errors) == (6, 6, 1, 1)
        assert stats.truncated_results == 1 and len(pool) == 3
    finally:
        pool.shutdown()


def test_pool_episode_reward_and_metrics():
    from mopd.dist.env_pool import summarize

    rows = lookup_rows(random.Random(3), 2, "train")
    pool = _pool("lookup")
    try:
        eps = [pool.open(r).result() for r in rows]
        assert eps[0].tools[0]["function"]["name"] == "lookup" and eps[0].messages[-1]["content"] == rows[0].prompt
        for ep, row in zip(eps, rows, strict=True):
            turn = SIMPLE.parse(demonstration(row)[0]["content"], ep.tools)
            pool.step(ep.id, turn.calls, turn.content).result()
        final = pool.step(eps[0].id, [], rows[0].meta["answer"]).result()
        assert final.done and final.reward == 1.0
        pool.step(eps[1].id, [], "dial(0)").result()
        metrics = summarize([pool.close(e.id) for e in eps], "agent")
        assert metrics["rollout/agent/turns"] == 2.0 and metrics["rollout/agent/tool_calls"] == 1.0
        assert metrics["rollout/agent/env_reward"] == 0.5 and metrics["rollout/agent/tool_timeouts"] == 0.0
    finally:
        pool.shutdown()


def test_pool_refuses_an_unknown_environment_before_starting():
    with pytest.raises(EnvError, match="unknown environment 'nope'; registered: lookup, shell"):
        _pool("nope")


# --------------------------------------------------------------------------- the pool on Ray


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="test-envs")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_pool_timeouts_errors_and_killed_workers(ray_local, tmp_path):
    """One pool (worker starts are the slow part): a hanging, a raising and a huge tool; a tool that
    kills its worker mid-call (Ray restarts the worker, the call is retried and the trajectory's
    state replayed); then one that kills it past the retry limit (the trajectory ends, the
    worker's other trajectories go on); then one that holds the GIL, so that the worker stops
    answering (it is killed and restarted, the call answered as timed out)."""
    Tools = pool_classes()
    pool = _pool(Tools, local=False, timeout_s=1.0, wedged_grace_s=10.0)
    try:
        a, b, c, d = (pool.open(PromptRow(p, "d")).result(timeout=60) for p in "abcd")  # workers 0, 1, 0, 1
        pid = int(_run(pool, a.id, ("pid", {})).messages[0]["content"])
        assert int(_run(pool, b.id, ("pid", {})).messages[0]["content"]) != pid
        assert _run(pool, a.id, ("inc", {})).messages[0]["content"] == "1"
        hang = pool.step(a.id, [ParsedCall("sleep", {"seconds": "60"})])
        assert _run(pool, c.id, ("sleep", {"seconds": "0.2"})).messages[0]["content"] == "slept"  # c does not wait
        assert "timed out after 1s" in hang.result(timeout=30).messages[0]["content"]
        assert _run(pool, a.id, ("boom", {})).info["tool_errors"] == 1
        assert _run(pool, a.id, ("big", {})).messages[0]["content"].endswith("of 10000000 characters]")
        died = _run(pool, a.id, ("die", {"marker": str(tmp_path / "a")}))
        assert died.messages[0]["content"] == "alive" and not died.done
        assert int(_run(pool, a.id, ("pid", {})).messages[0]["content"]) != pid  # a fresh worker process
        assert _run(pool, a.id, ("inc", {})).messages[0]["content"] == "2"  # state replayed onto it
        stats = pool.close(a.id)
        assert (stats.retries, stats.tool_timeouts, stats.tool_errors, stats.truncated_results) == (1, 1, 1, 1)
        assert pool.metrics()["faults/env_restarts"] == 1.0

        pool.max_retries = 0  # the next death is one too many
        assert _run(pool, d.id, ("inc", {})).messages[0]["content"] == "1"
        gone = _run(pool, b.id, ("die", {"marker": str(tmp_path / "b")}))
        assert (
            gone.done and gone.info["ended"] == "worker_died" and "worker died 1 times" in gone.messages[0]["content"]
        )
        assert pool.close(b.id).ended == "worker_died"
        assert _run(pool, d.id, ("inc", {})).messages[0]["content"] == "2"  # rebuilt on the restarted worker
        assert pool.metrics()["faults/env_restarts"] == 2.0

        pool.wedged_grace_s = 2.0  # a worker silent this long past the call's deadline is restarted
        wedged = _run(pool, d.id, ("wedge", {}))
        assert "timed out" in wedged.messages[0]["content"] and wedged.info["tool_timeouts"] == 1
        assert pool.metrics() == {"faults/env_restarts": 3.0, "faults/env_wedged": 1.0}
        assert _run(pool, d.id, ("inc", {})).messages[0]["content"] == "3"  # the wedged step is not replayed
    finally:
        pool.shutdown()


def test_stats_roundtrip_json():
    """The stats are plain numbers: they go into metrics files as they are."""
    from dataclasses import asdict

    from mopd.dist.env_pool import TrajectoryStats

    assert json.loads(json.dumps(asdict(TrajectoryStats(turns=2, reward=1.0))))["turns"] == 2
