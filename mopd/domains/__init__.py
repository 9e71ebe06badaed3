"""The registries of domains: a verifier per domain name, and prompt generators by name.

A verifier scores a response to a row of its domain (looked up by ``row.domain``: evaluation, the
outcome reward of ``objective.alpha``, the sandbox preflight); a generator makes synthetic prompts
for a data source that names it (``generator: math_l3``; the rows take the source's ``domain``).
The built-in domains (``mopd/domains/math.py``, ``code.py``, ``agent.py``; what they share in
``common.py``) register themselves when a registry is first read: a verifier and a generator as
``<name>`` (the default level), a generator ``<name>_l<k>`` for every level k; prompts are short,
answers exact, and the train and eval splits are disjoint by a hash of the prompt. A user adds a
domain with ``register_domain`` (both), ``register_verifier`` or ``register_generator`` in a module
listed in the recipe's ``run.plugins``. A name is registered once: a second registration under it
(a plugin shadowing ``math``) raises ``ValueError`` unless it passes ``replace=True``.
"""

from __future__ import annotations

import importlib
import importlib.util
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from mopd.types import PromptRow

# generate(rng, n, split) -> rows; split is "train" or "eval" (disjoint prompt sets).
GenerateFn = Callable[[random.Random, int, str], list[PromptRow]]
# verify(row, response) -> reward in [0, 1].
VerifyFn = Callable[[PromptRow, str], float]


def _never(row: PromptRow) -> bool:
    return False


@dataclass(frozen=True)
class Verifier:
    name: str  # the domain whose rows it scores
    verify: VerifyFn
    # Whether verifying this row executes the response (mopd.sandbox): such a run needs the
    # sandbox's kernel layer or sandbox.allow_unisolated (checked before the run starts).
    executes: Callable[[PromptRow], bool] = _never
    kind: ClassVar[str] = "verifier"

    @property
    def function(self) -> Callable[..., Any]:
        return self.verify


@dataclass(frozen=True)
class Generator:
    name: str  # what a data source's ``generator`` names
    generate: GenerateFn
    kind: ClassVar[str] = "generator"

    @property
    def function(self) -> Callable[..., Any]:
        return self.generate


_VERIFIERS: dict[str, Verifier] = {}
_GENERATORS: dict[str, Generator] = {}
_BUILTINS_LOADED = False
# The built-in domain modules, in the order they register.
BUILTINS = ("mopd.domains.agent", "mopd.domains.code", "mopd.domains.math")

E = TypeVar("E", Verifier, Generator)


def _origin(fn: Any) -> str:
    """``module.qualname`` of a registered function (of the function a ``partial`` wraps)."""
    fn = getattr(fn, "func", fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _check_free(registry: dict[str, E], entry: E, replace: bool) -> None:
    """Refuse ``entry`` if its name is taken by another (the very same one again is no conflict)."""
    old = registry.get(entry.name)
    if old is None or replace or old == entry:
        return
    raise ValueError(
        f"a {entry.kind} named {entry.name!r} is already registered ({_origin(old.function)}), so "
        f"{_origin(entry.function)} would shadow it; choose another name, or pass replace=True to replace it on purpose"
    )


def register_verifier(
    name: str, verify: VerifyFn, executes: Callable[[PromptRow], bool] | None = None, *, replace: bool = False
) -> Verifier:
    """Register the verifier of domain ``name``; ``executes(row)`` says whether it runs the response
    for that row (a verifier that calls ``mopd.sandbox.run_untrusted``). A taken name raises
    ``ValueError`` unless ``replace``."""
    _load_builtins()  # a plugin registering before the first read still meets the built-ins
    entry = Verifier(name, verify, executes or _never)
    _check_free(_VERIFIERS, entry, replace)
    _VERIFIERS[name] = entry
    return entry


def register_generator(name: str, generate: GenerateFn, *, replace: bool = False) -> Generator:
    """Register a prompt generator under ``name``. A taken name raises ``ValueError`` unless ``replace``."""
    _load_builtins()
    entry = Generator(name, generate)
    _check_free(_GENERATORS, entry, replace)
    _GENERATORS[name] = entry
    return entry


def register_domain(
    name: str,
    generate: GenerateFn,
    verify: VerifyFn,
    executes: Callable[[PromptRow], bool] | None = None,
    *,
    replace: bool = False,
) -> None:
    """``register_generator`` and ``register_verifier`` under one ``name``: both or (on a taken
    name, without ``replace``) neither."""
    _load_builtins()
    _check_free(_GENERATORS, Generator(name, generate), replace)
    _check_free(_VERIFIERS, Verifier(name, verify, executes or _never), replace)
    register_generator(name, generate, replace=replace)
    register_verifier(name, verify, executes, replace=replace)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        for module in BUILTINS:
            importlib.import_module(module)


def verifiers() -> dict[str, Verifier]:
    """Every registered verifier by domain name (the built-in ones included)."""
    _load_builtins()
    return dict(_VERIFIERS)


def generators() -> dict[str, Generator]:
    """Every registered prompt generator by name (the built-in ones included)."""
    _load_builtins()
    return dict(_GENERATORS)


def get_verifier(domain: str) -> Verifier:
    found = verifiers()
    if domain not in found:
        raise KeyError(f"no verifier for domain {domain!r}; registered: {', '.join(sorted(found))}")
    return found[domain]


def get_generator(name: str) -> Generator:
    found = generators()
    if name not in found:
        raise KeyError(f"unknown generator {name!r}; registered: {', '.join(sorted(found))}")
    return found[name]


def load_plugins(modules: list[str]) -> None:
    """Import user modules that register domains (``run.plugins`` in a recipe): a module name on
    the Python path (``my_pkg.domains``) or a ``.py`` file path (``plugins/echo.py``, relative to
    the current directory). A module that cannot be imported, or registers a name already taken,
    is an ``ImportError`` naming it."""
    for mod in modules:
        try:
            if mod.endswith(".py"):
                _import_file(Path(mod))
            else:
                importlib.import_module(mod)
        except (ImportError, FileNotFoundError, ValueError) as e:  # ValueError: a taken name
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
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # else the next load_plugins would take the half-run module as loaded
        raise
