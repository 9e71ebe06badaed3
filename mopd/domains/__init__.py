"""The registry of domains: a synthetic prompt generator and a verifier per name.

The built-in domains (``mopd/domains/math.py``, ``code.py``, ``agent.py``; what they share in
``common.py``) register themselves when the registry is first read: each as ``<name>`` (its
default level) and ``<name>_l<k>`` for every level k; prompts are short, answers exact, and the
train and eval splits are disjoint by a hash of the prompt. A user adds a domain by calling
``register_domain`` in a module listed in the recipe's ``run.plugins``.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mopd.types import PromptRow

# generate(rng, n, split) -> rows; split is "train" or "eval" (disjoint prompt sets).
Generator = Callable[[random.Random, int, str], list[PromptRow]]
# verify(row, response) -> reward in [0, 1].
Verifier = Callable[[PromptRow, str], float]


def _never(row: PromptRow) -> bool:
    return False


@dataclass(frozen=True)
class Domain:
    name: str
    generate: Generator
    verify: Verifier
    # Whether verifying this row executes the response (mopd.sandbox): such a run needs the
    # sandbox's kernel layer or sandbox.allow_unisolated (checked before the run starts).
    executes: Callable[[PromptRow], bool] = _never


_REGISTRY: dict[str, Domain] = {}
_BUILTINS_LOADED = False
# The built-in domain modules, in the order they register.
BUILTINS = ("mopd.domains.agent", "mopd.domains.code", "mopd.domains.math")


def register_domain(
    name: str, generate: Generator, verify: Verifier, executes: Callable[[PromptRow], bool] | None = None
) -> Domain:
    """Register (or replace) a domain under ``name``; ``executes(row)`` says whether its verifier
    runs the response for that row (a verifier that calls ``mopd.sandbox.run_untrusted``)."""
    dom = Domain(name, generate, verify, executes or _never)
    _REGISTRY[name] = dom
    return dom


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        for module in BUILTINS:
            importlib.import_module(module)


def registered_generators() -> dict[str, Domain]:
    _load_builtins()
    return dict(_REGISTRY)


def get_domain(name: str) -> Domain:
    doms = registered_generators()
    if name not in doms:
        raise KeyError(f"unknown domain {name!r}; registered: {', '.join(sorted(doms))}")
    return doms[name]


def load_plugins(modules: list[str]) -> None:
    """Import user modules that register domains (``run.plugins`` in a recipe): a module name on
    the Python path (``my_pkg.domains``) or a ``.py`` file path (``plugins/echo.py``)."""
    for mod in modules:
        try:
            if mod.endswith(".py"):
                _import_file(Path(mod))
            else:
                importlib.import_module(mod)
        except (ImportError, FileNotFoundError) as e:
            raise ImportError(f"run.plugins: cannot import {mod!r}: {e}") from e


def _import_file(path: Path) -> None:
    name = "mopd_plugin_" + path.stem
    if name in sys.modules:
        return
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
