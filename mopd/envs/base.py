"""Tool environments: what a multi-turn trajectory talks to between the student's turns.

An environment is as small as tinker-cookbook's ``Env``: built from one ``PromptRow``, it gives the
first messages, then answers each student turn with ``step(calls, content)``. The rollout owns the
tokens; the environment only sees parsed calls and returns plain message dicts. It keeps the state
of one trajectory (e.g. a working directory) and is never shared between trajectories.

    env = get_env("lookup")(row)
    messages = env.initial_messages()        # [{"role": "system", ...}, {"role": "user", ...}]
    tools = env.tools()                      # JSON schemas of the tools (OpenAI function format)
    res = env.step(calls, content)           # StepResult(messages=[tool results], done, reward, info)

Where a row keeps its tools: ``row.meta["tools"]`` (a list of OpenAI-style function schemas,
``{"type": "function", "function": {"name", "description", "parameters"}}``) and its system prompt
``row.meta["system"]``; an environment class may declare defaults (``TOOLS``, ``SYSTEM``).

An episode ends when the environment says so: on a call of a tool named in ``FINAL_TOOLS``
(``finish``), or on a turn without a call (a final answer), or when the caller's limits
(``max_turns``, the token budget) stop it. ``reward`` is the outcome reward, set on the last step.

A subclass usually writes only ``tool_<name>(**arguments) -> str`` methods and ``reward``: the base
``step`` dispatches each call, answers an unknown tool, bad arguments or a raising tool with an
``error: ...`` tool message (counted in ``info["tool_errors"]``), never with an exception.
``apply_step`` wraps any ``step`` for the worker: calls that did not parse are answered without
reaching the environment, an exception in ``step`` becomes error messages, results are capped.

Registry: ``register_env("name")`` (a class decorator; duplicates refused), ``get_env(spec)`` where
spec is a registered name or ``module.path:Class``; user environments register themselves in a
module listed in ``run.plugins`` (``resolve_env(spec, plugins)`` loads those first).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from mopd.types import PromptRow

Message = dict[str, Any]  # {"role", "content"} (+ "tool_call_id", "name" for role "tool")
ERROR_PREFIX = "error: "


class EnvError(RuntimeError):
    """An environment that cannot be named, built or called as the interface says."""


@dataclass
class ParsedCall:
    """One tool call found in a student turn.

    name       the tool's name ("" when the call did not say)
    arguments  keyword arguments of the call
    id         unique within its turn ("call_0", "call_1", ...): the tool message's ``tool_call_id``
    error      why the call cannot run (malformed JSON, no name, ...), or None for a valid call
    raw        the call's text as the student wrote it
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str = "call_0"
    error: str | None = None
    raw: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class StepResult:
    """What one student turn led to.

    messages  one ``role: "tool"`` message per call, in call order (empty for a final answer)
    done      the episode ended (``finish``, a final answer, or the environment's own rule)
    reward    outcome reward of the trajectory, set when ``done`` (None: the environment has none)
    info      counters and notes: ``tool_errors``, ``tool_timeouts``, ``truncated_results``
              (ints), ``final`` (a turn without calls), ``timeout`` (the step ran past its
              deadline), ``ended`` (why the pool ended the trajectory), ``error``, and whatever
              the environment adds (``lookup``: ``lookups``, ``answered_without_call``, ...)
    """

    messages: list[Message]
    done: bool = False
    reward: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


def tool_message(call: ParsedCall, content: str) -> Message:
    """The tool message that answers ``call``."""
    return {"role": "tool", "content": content, "tool_call_id": call.id, "name": call.name}


def error_message(call: ParsedCall, why: str) -> Message:
    """A tool message saying that ``call`` failed and why: the student reads it as the result."""
    return tool_message(call, ERROR_PREFIX + why)


def function_schema(name: str, description: str, params: dict[str, str] | None = None) -> dict[str, Any]:
    """An OpenAI-style function schema whose parameters are required strings described by
    ``params`` (name -> description), in the order given (the ``simple`` parser's positions)."""
    params = params or {}
    props = {p: {"type": "string", "description": d} for p, d in params.items()}
    parameters = {"type": "object", "properties": props, "required": list(params)}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def schema_name(schema: dict[str, Any]) -> str:
    """The tool name of a function schema (OpenAI ``{"function": {...}}`` or bare)."""
    return str(schema.get("function", schema).get("name", ""))


def schema_params(schema: dict[str, Any]) -> list[str]:
    """Parameter names of a function schema, in declaration order."""
    return list(schema.get("function", schema).get("parameters", {}).get("properties", {}))


class Env:
    """One trajectory's environment (module docstring). Subclasses set ``TOOLS`` / ``SYSTEM`` and
    write ``tool_<name>`` methods and ``reward``, or override ``step`` altogether."""

    TOOLS: ClassVar[list[dict[str, Any]]] = []  # default tool schemas, when the row has none
    SYSTEM: ClassVar[str] = ""  # default system prompt, when the row has none
    FINAL_TOOLS: ClassVar[tuple[str, ...]] = ("finish",)  # a valid call of one of these ends the episode

    def __init__(self, row: PromptRow, **kwargs: Any) -> None:
        self.row = row

    def tools(self) -> list[dict[str, Any]]:
        """The tool schemas the student is shown: the row's, else the class's."""
        return list(self.row.meta.get("tools") or self.TOOLS)

    def initial_messages(self) -> list[Message]:
        """The conversation before the student's first turn: a system message (the row's
        ``meta["system"]``, else ``SYSTEM``) unless the row's own messages start with one, then the
        row's messages (or its prompt as one user message)."""
        given = [dict(m) for m in self.row.messages] if self.row.messages else None
        msgs = given or [{"role": "user", "content": self.row.prompt}]
        system = self.row.meta.get("system") or self.SYSTEM
        if system and msgs[0].get("role") != "system":
            msgs.insert(0, {"role": "system", "content": system})
        return msgs

    def step(self, calls: list[ParsedCall], content: str = "") -> StepResult:
        """Answer one student turn: ``calls`` (all valid when reached through ``apply_step``) and
        ``content``, the turn's text outside its calls. No calls: the turn is a final answer."""
        if not calls:
            return StepResult([], done=True, reward=self.reward(content), info={"final": True})
        messages, errors, done = [], 0, False
        for call in calls:
            msg = self.run_call(call)
            errors += msg["content"].startswith(ERROR_PREFIX)
            done = done or (call.name in self.FINAL_TOOLS and not msg["content"].startswith(ERROR_PREFIX))
            messages.append(msg)
        return StepResult(messages, done, self.reward(content) if done else None, {"tool_errors": errors})

    def run_call(self, call: ParsedCall) -> Message:
        """Run one call as ``tool_<name>(**arguments)``; every failure is an error message."""
        method = getattr(self, f"tool_{call.name}", None) if call.name.isidentifier() else None
        if method is None:
            names = ", ".join(schema_name(s) for s in self.tools()) or "none"
            return error_message(call, f"unknown tool {call.name!r}; tools: {names}")
        try:
            result = method(**call.arguments)
        except TypeError as e:  # wrong, missing or extra arguments (or a TypeError inside the tool)
            return error_message(call, f"bad arguments for {call.name}: {e}")
        except Exception as e:
            return error_message(call, f"{call.name} raised {type(e).__name__}: {e}")
        return tool_message(call, result if isinstance(result, str) else json.dumps(result))

    def reward(self, content: str) -> float | None:
        """Outcome reward once the episode ends; ``content`` is the last turn's text."""
        return None

    def close(self) -> None:
        """Release what the environment holds (called once, when the trajectory is over)."""


# --------------------------------------------------------------------------- one step, guarded


def cap_result(content: str, max_chars: int) -> tuple[str, bool]:
    """``content`` cut to ``max_chars`` characters with a note saying how much was dropped."""
    if len(content) <= max_chars:
        return content, False
    return content[:max_chars] + f"\n[... truncated: {len(content) - max_chars} of {len(content)} characters]", True


def apply_step(env: Env, calls: Sequence[ParsedCall], content: str = "", max_result_chars: int = 1 << 16) -> StepResult:
    """``env.step`` as the rollout should see it, whatever the environment does.

    Calls that did not parse get an error message and never reach the environment (when all of a
    turn's calls failed to parse, the turn is not a final answer: the episode goes on). An
    exception in ``step`` answers every call with an error. Each result is capped to
    ``max_result_chars`` (``info["truncated_results"]`` counts the cut ones).
    """
    valid = [c for c in calls if c.ok]
    invalid = len(calls) - len(valid)
    if calls and not valid:
        res = StepResult([], info={"tool_errors": 0})
    else:
        res = _guarded_step(env, valid, content)
    answers = iter(res.messages)
    messages = [next(answers) if c.ok else error_message(c, f"invalid tool call: {c.error}") for c in calls]
    res.info["tool_errors"] = res.info.get("tool_errors", 0) + invalid
    res.info["truncated_results"] = 0
    for m in messages:
        m["content"], cut = cap_result(str(m.get("content", "")), max_result_chars)
        res.info["truncated_results"] += cut
    res.messages = messages
    return res


def _guarded_step(env: Env, calls: list[ParsedCall], content: str) -> StepResult:
    try:
        res = env.step(calls, content)
        if len(res.messages) != len(calls):
            raise EnvError(f"{type(env).__name__}.step returned {len(res.messages)} messages for {len(calls)} calls")
    except Exception as e:
        why = f"environment raised {type(e).__name__}: {e}"
        if not calls:  # a final answer whose reward could not be computed
            return StepResult([], done=True, info={"final": True, "error": why})
        return StepResult([error_message(c, why) for c in calls], info={"tool_errors": len(calls), "error": why})
    return res


# --------------------------------------------------------------------------- registry

E = TypeVar("E", bound=type[Env])
_REGISTRY: dict[str, type[Env]] = {}
_BUILTINS_LOADED = False
BUILTINS = ("mopd.envs.builtin",)  # modules whose environments register on first use


# Why the rollout stopped a trajectory (``TrajectoryStats.stop``): the environment ended it, or a limit.
STOPS = ("done", "max_turns", "max_tokens", "max_new_tokens")
LIMIT_STOPS = STOPS[1:]  # each marks the trajectory truncated


@dataclass
class TrajectoryStats:
    """What the pool saw of one trajectory (the per-domain rollout metrics are means of these).

    turns              steps answered (student turns that reached the environment)
    tool_calls         calls made, valid or not
    tool_errors        calls answered with an error (did not parse, unknown tool, raised, worker died)
    tool_timeouts      calls answered with a timeout error
    tool_latency_s     wall time of the steps, summed (queueing for a free slot excluded)
    truncated_results  results cut to ``max_result_chars``
    retries            calls retried after their worker died
    reward             the environment's outcome reward, once it gave one
    ended              why the pool ended the trajectory ("" when it did not)
    stop               why the rollout stopped the trajectory (rollout/multiturn.py): ``done`` (the
                       environment ended it), ``max_turns``, ``max_tokens``, ``max_new_tokens``
    """

    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_timeouts: int = 0
    tool_latency_s: float = 0.0
    truncated_results: int = 0
    retries: int = 0
    reward: float | None = None
    ended: str = ""
    stop: str = ""

    def add(self, res: StepResult, n_calls: int, latency_s: float) -> None:
        self.turns += 1
        self.tool_calls += n_calls
        self.tool_errors += int(res.info.get("tool_errors", 0))
        self.tool_timeouts += int(res.info.get("tool_timeouts", 0))
        self.truncated_results += int(res.info.get("truncated_results", 0))
        self.tool_latency_s += latency_s
        if res.reward is not None:
            self.reward = res.reward
        if res.info.get("ended"):
            self.ended = str(res.info["ended"])


def summarize(stats: Sequence[TrajectoryStats], domain: str) -> dict[str, float]:
    """Per-domain rollout metrics: means over the domain's trajectories (``env_reward`` over those
    that got a reward)."""
    if not stats:
        return {}
    n, p = len(stats), f"rollout/{domain}/"
    out = {
        p + k: sum(getattr(s, k) for s in stats) / n for k in ("turns", "tool_calls", "tool_errors", "tool_timeouts")
    }
    calls = sum(s.tool_calls for s in stats)
    out[p + "tool_latency_s"] = sum(s.tool_latency_s for s in stats) / max(1, sum(s.turns for s in stats))
    out[p + "tool_truncated"] = sum(s.truncated_results for s in stats) / max(1, calls)
    rewarded = [s.reward for s in stats if s.reward is not None]
    if rewarded:
        out[p + "env_reward"] = sum(rewarded) / len(rewarded)
    return out


def register_env(name: str, *, replace: bool = False) -> Callable[[E], E]:
    """Class decorator registering an ``Env`` subclass under ``name``. A taken name raises
    ``ValueError`` unless ``replace`` (the same class again is a no-op: a module imported twice)."""

    def register(cls: E) -> E:
        if not (isinstance(cls, type) and issubclass(cls, Env)):
            raise TypeError(f"register_env({name!r}): {cls!r} is not a subclass of mopd.envs.Env")
        _load_builtins()  # a plugin registering first still meets the built-in names
        old = _REGISTRY.get(name)
        if old is not None and not replace and _qualified(old) != _qualified(cls):
            raise ValueError(
                f"an environment named {name!r} is already registered ({_qualified(old)}), so {_qualified(cls)} "
                "would shadow it; choose another name, or pass replace=True to replace it on purpose"
            )
        _REGISTRY[name] = cls
        return cls

    return register


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        for module in BUILTINS:
            importlib.import_module(module)


def registered_envs() -> dict[str, type[Env]]:
    """Every registered environment by name (the built-in ones included)."""
    _load_builtins()
    return dict(_REGISTRY)


def get_env(spec: str | type[Env]) -> type[Env]:
    """The environment class ``spec`` names: a registered name or ``module.path:Class`` (a class
    is returned as it is)."""
    if isinstance(spec, type):
        return _checked(spec, _qualified(spec))
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise EnvError(f"environment {spec!r}: cannot import {attr!r} from {module!r}: {e}") from e
        return _checked(obj, spec)
    envs = registered_envs()
    if spec not in envs:
        raise EnvError(
            f"unknown environment {spec!r}; registered: {', '.join(sorted(envs)) or 'none'} (or name a class "
            "as module.path:Class, or register one with mopd.envs.register_env in a run.plugins module)"
        )
    return envs[spec]


def _checked(obj: Any, spec: str) -> type[Env]:
    if not (isinstance(obj, type) and issubclass(obj, Env)):
        raise EnvError(f"environment {spec!r} is not a subclass of mopd.envs.Env")
    return obj


def resolve_env(spec: str | type[Env], plugins: Sequence[str] = ()) -> type[Env]:
    """``get_env`` after importing the ``run.plugins`` modules, where user environments register."""
    if plugins:
        from mopd.domains import load_plugins

        load_plugins(list(plugins))
    return get_env(spec)
