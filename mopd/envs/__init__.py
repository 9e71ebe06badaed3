"""Tool environments for multi-turn rollouts: the interface and registry (``base``), tool-call
parsers (``parsers``) and the built-in environments (``builtin``: ``lookup``, ``shell``). The pool
that runs them on Ray workers is ``mopd.dist.env_pool.EnvPool``. Importing this package starts
no Ray, vLLM or DeepSpeed."""

from mopd.envs.base import (
    Env,
    EnvError,
    Message,
    ParsedCall,
    StepResult,
    apply_step,
    get_env,
    register_env,
    registered_envs,
    resolve_env,
)
from mopd.envs.parsers import ParsedTurn, ToolCallParser, get_parser, register_parser

__all__ = [
    "Env",
    "EnvError",
    "Message",
    "ParsedCall",
    "ParsedTurn",
    "StepResult",
    "ToolCallParser",
    "apply_step",
    "get_env",
    "get_parser",
    "register_env",
    "register_parser",
    "registered_envs",
    "resolve_env",
]
