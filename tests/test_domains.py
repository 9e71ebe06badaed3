"""The built-in synthetic domains: deterministic, disjoint splits, strict verifiers, tokenizable."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

import mopd.domains as registry
from mopd.domains import (
    agent,
    code,
    generators,
    get_generator,
    get_verifier,
    load_plugins,
    register_domain,
    register_generator,
    register_verifier,
    verifiers,
)
from mopd.domains.common import split_of
from mopd.models import CHARS
from mopd.types import PromptRow

DOMAINS = ("math", "code", "agent")
LEVELED = [f"{d}_l{level}" for d in DOMAINS for level in (1, 2, 3)]
ALL = list(DOMAINS) + LEVELED


def _gen(name: str, n: int, split: str, seed: int = 0) -> list[PromptRow]:
    return get_generator(name).generate(random.Random(seed), n, split)


def test_builtins_registered():
    """A verifier per domain (rows are looked up by their domain); a generator per level too."""
    assert set(ALL) | {"code_exec"} <= set(generators())
    assert set(DOMAINS) <= set(verifiers()) and not (set(LEVELED) | {"code_exec"}) & set(verifiers())
    assert get_verifier("code").executes is code.executes


@pytest.fixture
def scratch(monkeypatch):
    """The registries as they are, put back after the test."""
    verifiers()  # the built-ins are in
    monkeypatch.setattr(registry, "_VERIFIERS", dict(registry._VERIFIERS))
    monkeypatch.setattr(registry, "_GENERATORS", dict(registry._GENERATORS))


def _shadow_verify(row, response):
    return 1.0


def _shadow_generate(rng, n, split):
    return []


def test_a_taken_name_is_refused_naming_what_holds_it(scratch):
    """Regression: register_domain("math", ...) in a plugin used to replace the built-in math
    domain without a word."""
    with pytest.raises(ValueError, match=r"verifier named 'math' is already registered \(mopd\.domains\.common\."):
        register_verifier("math", _shadow_verify)
    with pytest.raises(ValueError, match=r"generator named 'math_l3' is already registered.*replace=True"):
        register_generator("math_l3", _shadow_generate)
    with pytest.raises(ValueError, match="generator named .math.*_shadow_generate would shadow it"):
        register_domain("math", _shadow_generate, _shadow_verify)
    assert get_verifier("math").verify is not _shadow_verify


def test_register_domain_registers_both_or_neither(scratch):
    register_generator("legal", lambda rng, n, split: [])
    with pytest.raises(ValueError, match="generator named 'legal'"):
        register_domain("legal", _shadow_generate, _shadow_verify)
    assert "legal" not in verifiers()  # the refused register_domain registered nothing
    register_domain("law", _shadow_generate, _shadow_verify)
    assert get_generator("law").generate is _shadow_generate and get_verifier("law").verify is _shadow_verify


def test_replace_is_explicit_and_the_same_function_again_is_no_conflict(scratch):
    register_verifier("math", _shadow_verify, replace=True)
    assert get_verifier("math").verify is _shadow_verify
    register_verifier("math", _shadow_verify)  # a module imported twice registers the same function


def test_a_plugin_that_shadows_a_built_in_is_refused_naming_both(tmp_path, scratch):
    plugin = tmp_path / "shadow_math.py"
    plugin.write_text("from mopd.domains import register_verifier\nregister_verifier('math', lambda row, resp: 1.0)\n")
    with pytest.raises(ImportError, match=r"run.plugins: cannot import '.*shadow_math.py': a verifier named 'math'"):
        load_plugins([str(plugin)])
    assert "mopd_plugin_shadow_math" not in sys.modules  # the fixed file is imported next time


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(KeyError, match="no verifier for domain 'math_l3'; registered: agent, code, math"):
        get_verifier("math_l3")
    with pytest.raises(KeyError, match="unknown generator 'lawl'; registered: agent, agent_l1"):
        get_generator("lawl")


def test_a_plugin_that_registers_before_any_read_still_meets_the_built_ins():
    code = (
        "from mopd.domains import register_verifier\n"
        "try:\n    register_verifier('code', lambda row, response: 1.0)\n"
        "except ValueError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "verifier named 'code' is already registered (mopd.domains.code.verify)" in out


@pytest.mark.parametrize("name", ALL)
def test_deterministic_per_seed(name):
    a, b = _gen(name, 200, "train", seed=1), _gen(name, 200, "train", seed=1)
    assert [(r.prompt, r.meta) for r in a] == [(r.prompt, r.meta) for r in b]
    c = _gen(name, 200, "train", seed=2)
    assert [r.prompt for r in a] != [r.prompt for r in c]


@pytest.mark.parametrize("name", ALL)
def test_train_and_eval_disjoint(name):
    train = {r.prompt for seed in range(3) for r in _gen(name, 400, "train", seed)}
    evals = {r.prompt for seed in range(3) for r in _gen(name, 100, "eval", seed)}
    assert evals and train and not (train & evals)
    assert all(split_of(p) == "train" for p in train) and all(split_of(p) == "eval" for p in evals)


@pytest.mark.parametrize("name", DOMAINS)
def test_rows_are_short_tokenizable_and_carry_the_answer(name):
    chars = set(CHARS)
    for row in _gen(name, 500, "train") + _gen(name, 100, "eval"):
        answer = row.meta["answer"]
        assert row.domain == name and isinstance(answer, str) and answer
        assert len(row.prompt) < 40 and len(answer) <= 15, (row.prompt, answer)
        assert set(row.prompt) <= chars and set(answer) <= chars, (row.prompt, answer)
        assert answer == answer.strip() and "\n" not in answer


def test_eval_rows_are_distinct():
    rows = _gen("math", 300, "eval")
    assert len({r.prompt for r in rows}) == 300


def test_small_space_repeats_rather_than_hangs():
    from mopd.domains.common import sample_split

    space = [f"q{i} ->" for i in range(200)]  # about 20 of them hash into the eval split
    rows = sample_split(random.Random(0), 500, "eval", "toy", lambda r: (r.choice(space), "a", "toy"))
    assert len(rows) == 500 and len({r.prompt for r in rows}) < 40


@pytest.mark.parametrize("name,distinct", [("math_l0", 121), ("code_l0", 128), ("agent_l1", 128)])
def test_quickstart_eval_sets_hold_distinct_prompts(name, distinct):
    """The quickstart's 128 eval prompts per domain are different ones (math_l0's whole eval split
    has 121): an accuracy then counts distinct requests, not one miss repeated (agent_l1 once held
    35 distinct prompts in 128)."""
    rows = _gen(name, 128, "eval")
    assert len({r.prompt for r in rows}) == distinct


def test_agent_slots_must_be_copied_not_memorised():
    """Level 1 draws from thousands of names and cities, so eval requests name slot values that
    training rarely or never saw with that phrasing: a model has to copy them."""
    assert len(set(agent.NAMES)) > 500 and len(set(agent.CITIES)) > 2000
    train = _gen("agent_l1", 4000, "train")
    evals = _gen("agent_l1", 128, "eval")
    seen = {r.meta["answer"] for r in train}
    assert sum(r.meta["answer"] not in seen for r in evals) > 64


def test_math_answers_are_python_arithmetic_and_non_negative():
    for row in _gen("math_l3", 500, "train"):
        assert row.prompt.endswith("=")
        value = eval(row.prompt[:-1], {"__builtins__": {}})  # operands are plain decimal literals
        assert value >= 0 and row.meta["answer"] == str(value)
    assert {r.meta["kind"] for r in _gen("math_l3", 200, "train")} == {"+", "-", "*"}
    assert {r.meta["kind"] for r in _gen("math_l1", 50, "train")} == {"+"}


def test_code_answers_are_python_values():
    namespace = {"__builtins__": {"len": len}, **code.HELPERS}
    rows = _gen("code_l3", 800, "train")
    assert {r.meta["kind"] for r in rows} == set(code.OPS)
    for row in rows:
        assert row.prompt.endswith("=")
        assert str(eval(row.prompt[:-1], namespace)) == row.meta["answer"], row.prompt


def test_agent_calls_use_the_tools_format():
    assert agent.render(agent.TOOLS[0], 0, {"city": "Paris"}) == ("weather in Paris ->", "weather(Paris)")
    fx = next(t for t in agent.TOOLS if t.name == "fx")
    assert agent.render(fx, 3, {"amount": "12", "src": "usd", "dst": "eur"}) == (
        "how many eur for 12 usd ->",
        "fx(12,usd,eur)",
    )
    for row in _gen("agent_l3", 300, "train"):
        name, args = row.meta["answer"].rstrip(")").split("(")
        assert name == row.meta["kind"] and " " not in row.meta["answer"]
        assert all(a in row.prompt for a in args.split(","))
        if name == "fx":
            src, dst = args.split(",")[1:]
            assert src != dst


@pytest.mark.parametrize("name", DOMAINS)
def test_verifier_is_strict(name):
    verify = get_verifier(name).verify
    for row in _gen(name, 50, "eval"):
        a = row.meta["answer"]
        assert verify(row, a) == 1.0
        assert verify(row, f"  {a}\n") == 1.0  # surrounding whitespace is not part of the answer
        near_misses = [a + a[-1], a[:-1], f"{a} ", f"{a}.", f"{a}\n{a}", f"answer: {a}", f"'{a}'", a.swapcase(), ""]
        for bad in near_misses:
            if bad.strip() != a:
                assert verify(row, bad) == 0.0, (row.prompt, bad)


def test_verifier_without_answer_says_so():
    row = PromptRow(prompt="1+1=", domain="math", source="x.jsonl", index=3)
    with pytest.raises(KeyError, match="answer"):
        get_verifier("math").verify(row, "2")


def test_unknown_split_and_level_rejected():
    from mopd.domains import math as math_domain

    with pytest.raises(ValueError, match="valid: train, eval"):
        math_domain.generate(random.Random(0), 3, "test")
    with pytest.raises(ValueError, match="unknown level 7"):
        math_domain.generate(random.Random(0), 3, "train", level=7)
