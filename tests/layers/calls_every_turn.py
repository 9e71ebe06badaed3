"""A tool-call format for tests: every student turn is one ``lookup`` call whose argument is the
turn's text, so that an untrained student still rolls out several turns (most calls come back as
a "no entry" error message, which is context like any tool result)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mopd.envs import ParsedTurn, ToolCallParser, register_parser
from mopd.envs.base import ParsedCall


@register_parser("calls_every_turn")
class CallsEveryTurn(ToolCallParser):
    def parse(self, text: str, tools: Sequence[dict[str, Any]] = ()) -> ParsedTurn:
        return ParsedTurn(content="", calls=[ParsedCall("lookup", {"name": text.strip()})])

    def format_call(self, name: str, arguments: dict[str, Any]) -> str:
        return str(arguments.get("name", ""))
