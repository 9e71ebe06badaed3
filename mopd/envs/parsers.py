"""Tool-call parsers: find the calls in one student turn, by name of format.

    parser = get_parser("hermes")
    turn = parser.parse('Let me check.<tool_call>{"name": "bash", "arguments": {"command": "ls"}}</tool_call>')
    turn.content, turn.calls     # "Let me check.", [ParsedCall(name="bash", arguments={"command": "ls"}, ...)]
    parser.stop                  # ("</tool_call>",): where one call ends
    parser.format_call("bash", {"command": "ls"})   # the inverse, e.g. for SFT demonstrations

Formats:

* ``hermes``: the Hermes / Qwen chat format, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  any number per turn. ``arguments`` may also be a JSON string of an object (some models write
  that) and may be missing (no arguments). A call closed by the end of the text counts (generation
  stopped at ``</tool_call>``, which engines drop from the output).
* ``simple``: for the built-in character tokenizer (printable ASCII only): ``[name(arg,arg)]``, the
  quickstart agent domain's own call syntax inside square brackets (which its answers never use).
  Arguments are bare strings, matched by position to the tool schema's parameters.

A call that cannot be read (malformed JSON, no name, arguments that are not an object, an
unbalanced bracket) comes back as a ``ParsedCall`` whose ``error`` says why: parsing never raises.
``stop`` holds the strings that end one call: a rollout that runs calls one at a time stops
generation there; one that lets a turn hold several calls stops at the end-of-turn token instead.
A new format subclasses ``ToolCallParser`` and registers with ``@register_parser("name")``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from mopd.envs.base import ParsedCall, schema_name, schema_params


@dataclass
class ParsedTurn:
    """One student turn, read: ``content`` is its text outside the calls (stripped), ``calls`` the
    calls in order of appearance (valid or not)."""

    content: str
    calls: list[ParsedCall] = field(default_factory=list)


class ToolCallParser:
    """A tool-call format: ``parse`` a turn's text, ``format_call`` a call, ``stop`` strings."""

    name: ClassVar[str] = ""
    stop: ClassVar[tuple[str, ...]] = ()

    def parse(self, text: str, tools: Sequence[dict[str, Any]] = ()) -> ParsedTurn:
        """The calls in ``text``; ``tools`` (function schemas) for formats that need them."""
        raise NotImplementedError

    def format_call(self, name: str, arguments: dict[str, Any]) -> str:
        """The text of one call, as the student should write it."""
        raise NotImplementedError


P = TypeVar("P", bound=type[ToolCallParser])
_PARSERS: dict[str, type[ToolCallParser]] = {}


def register_parser(name: str) -> Callable[[P], P]:
    """Class decorator registering a parser format under ``name`` (duplicates refused)."""

    def register(cls: P) -> P:
        old = _PARSERS.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise ValueError(f"tool-call parser {name!r} is already registered ({old.__qualname__})")
        cls.name = name
        _PARSERS[name] = cls
        return cls

    return register


def registered_parsers() -> list[str]:
    return sorted(_PARSERS)


def get_parser(name: str) -> ToolCallParser:
    """A parser for the format ``name``."""
    if name not in _PARSERS:
        raise KeyError(f"unknown tool-call format {name!r}; registered: {', '.join(registered_parsers())}")
    return _PARSERS[name]()


def _blocks(text: str, open_: str, close: str) -> tuple[list[tuple[str, bool, str]], str]:
    """(body, closed, raw) of every ``open_ ... close`` block of ``text`` (a block also ends at the
    next ``open_`` or at the end of the text, then unclosed), and the text outside them."""
    blocks, outside, pos = [], [], 0
    while (start := text.find(open_, pos)) != -1:
        outside.append(text[pos:start])
        body_start = start + len(open_)
        end, nxt = text.find(close, body_start), text.find(open_, body_start)
        closed = end != -1 and (nxt == -1 or end < nxt)
        stop = end if closed else (nxt if nxt != -1 else len(text))
        pos = stop + len(close) if closed else stop
        blocks.append((text[body_start:stop], closed, text[start:pos]))
    outside.append(text[pos:])
    return blocks, "".join(outside).strip()


@register_parser("hermes")
class HermesParser(ToolCallParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (module docstring)."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    stop = (CLOSE,)

    def parse(self, text: str, tools: Sequence[dict[str, Any]] = ()) -> ParsedTurn:
        blocks, content = _blocks(text, self.OPEN, self.CLOSE)
        calls = [self._call(body, raw, f"call_{k}") for k, (body, _, raw) in enumerate(blocks)]
        return ParsedTurn(content, calls)

    def _call(self, body: str, raw: str, call_id: str) -> ParsedCall:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            return ParsedCall("", {}, call_id, f"malformed JSON ({e.msg} at character {e.pos})", raw)
        if not isinstance(obj, dict):
            return ParsedCall("", {}, call_id, 'expected a JSON object {"name": ..., "arguments": {...}}', raw)
        name = obj.get("name")
        if not isinstance(name, str) or not name:
            return ParsedCall("", {}, call_id, "the call has no 'name'", raw)
        args, error = _arguments(obj.get("arguments", obj.get("parameters", {})))
        return ParsedCall(name, args, call_id, error, raw)

    def format_call(self, name: str, arguments: dict[str, Any]) -> str:
        return f"{self.OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{self.CLOSE}"


def _arguments(args: Any) -> tuple[dict[str, Any], str | None]:
    if isinstance(args, str):  # a JSON string of the object
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return {}, f"malformed JSON in 'arguments' ({e.msg} at character {e.pos})"
    if args is None:
        return {}, None
    if not isinstance(args, dict):
        return {}, f"'arguments' must be a JSON object, got {type(args).__name__}"
    return args, None


_SIMPLE_CALL = re.compile(r"\s*([A-Za-z_]\w*)\((.*)\)\s*", re.DOTALL)


@register_parser("simple")
class SimpleParser(ToolCallParser):
    """``[name(arg,arg)]`` for the character tokenizer (module docstring)."""

    OPEN, CLOSE = "[", "]"
    stop = (CLOSE,)

    def parse(self, text: str, tools: Sequence[dict[str, Any]] = ()) -> ParsedTurn:
        params = {schema_name(s): schema_params(s) for s in tools}
        blocks, content = _blocks(text, self.OPEN, self.CLOSE)
        calls = [self._call(body, raw, f"call_{k}", params) for k, (body, _, raw) in enumerate(blocks)]
        return ParsedTurn(content, calls)

    def _call(self, body: str, raw: str, call_id: str, params: dict[str, list[str]]) -> ParsedCall:
        m = _SIMPLE_CALL.fullmatch(body)
        if m is None:
            return ParsedCall("", {}, call_id, f"expected [name(arg,...)], got {raw!r}", raw)
        name, inner = m.group(1), m.group(2)
        values = [v.strip() for v in inner.split(",")] if inner.strip() else []
        names = params.get(name)
        if names is None:  # no schema (an unknown tool: the environment says so): keep the positions
            return ParsedCall(name, {f"arg{i}": v for i, v in enumerate(values)}, call_id, None, raw)
        if len(values) > len(names):
            error = f"{name} takes {len(names)} argument(s) ({', '.join(names) or 'none'}), got {len(values)}"
            return ParsedCall(name, {}, call_id, error, raw)
        return ParsedCall(name, dict(zip(names, values, strict=False)), call_id, None, raw)

    def format_call(self, name: str, arguments: dict[str, Any]) -> str:
        return f"{self.OPEN}{name}({','.join(str(v) for v in arguments.values())}){self.CLOSE}"
