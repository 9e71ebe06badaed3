"""tests/features.py: a missing optional feature skips its tests, unless ``MOPD_REQUIRE`` names it,
and then they fail with the feature's name and how to install it. Each case runs pytest in a
subprocess on a small suite with a stand-in feature ("widget") that is never there.

    pytest tests/test_features.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from features import FEATURES, Feature, pytest_configure, pytest_runtest_setup

FEATURES["widget"] = Feature(lambda: "no widget on this machine", "apt-get install widget")
FEATURES["gadget"] = Feature(lambda: None, "never needed: it is always there")
"""

SUITE = """
import pytest
from features import require


@pytest.mark.requires("widget")
def test_marked():
    pass


@pytest.mark.parametrize("kind", [pytest.param("w", marks=pytest.mark.requires("widget")), "plain"])
def test_param(kind):
    pass


def test_called():
    require("widget")


@pytest.mark.requires("gadget")
def test_present():
    require("gadget")
"""


@pytest.fixture
def suite(tmp_path) -> Path:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_suite.py").write_text(SUITE)
    return tmp_path


def run(suite: Path, require: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MOPD_REQUIRE"}
    if require is not None:
        env["MOPD_REQUIRE"] = require
    cmd = [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider", str(suite)]
    return subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True, timeout=120)


def test_a_missing_feature_skips_its_tests(suite):
    proc = run(suite, None)
    assert proc.returncode == 0, proc.stdout
    assert "2 passed, 3 skipped" in proc.stdout, proc.stdout
    assert "widget unavailable: no widget on this machine (to install: apt-get install widget" in proc.stdout


@pytest.mark.parametrize("names", ["gadget, widget", "all"])
def test_a_required_missing_feature_fails_its_tests(suite, names):
    proc = run(suite, names)
    assert proc.returncode == 1, proc.stdout
    # A marker fails the test in its setup (reported as an error: no fixture of it is built).
    assert "1 failed, 2 passed, 2 errors" in proc.stdout, proc.stdout
    message = "required feature 'widget' is missing (MOPD_REQUIRE="
    assert proc.stdout.count(message) >= 3, proc.stdout
    assert "no widget on this machine; to install: apt-get install widget" in proc.stdout


def test_requiring_only_other_features_still_skips(suite):
    proc = run(suite, "gadget")
    assert proc.returncode == 0 and "2 passed, 3 skipped" in proc.stdout, proc.stdout


def test_an_unknown_feature_stops_the_run_and_names_the_valid_ones(suite):
    proc = run(suite, "widget,vlm")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "MOPD_REQUIRE names vlm; valid: all, bwrap, gadget, sandbox, smollm2, vllm, widget" in proc.stderr
