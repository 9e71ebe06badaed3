"""mopd installed from its wheel works without the checkout (issue 24: `mopd quickstart` read
``parents[2]/recipes/quickstart.yaml``, which a wheel does not have).

The slow tests build the wheel from a copy of the checkout, install it into a fresh virtual
environment and run the CLI from a directory outside the checkout. The fresh environment borrows the test
environment's dependencies (torch, omegaconf, transformers, ...) through a ``.pth`` file that lists
their site-packages as a plain directory: such a line only extends ``sys.path``, it does not run
that directory's own ``.pth`` files, so the editable install of mopd there stays out of the way
(asserted: ``mopd`` imports from the fresh environment). 24-50 s on 2 busy cores, most of it
``mopd validate`` importing torch and transformers (the build ~3 s, the install ~2 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from mopd.app.cli import main
from mopd.app.shipped import recipes_dir, resolve_recipe, shipped_recipes
from mopd.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mopd", "teachers", "rollout", "trainers")
# What the build's copy of the checkout leaves out (.gitignore): at the top the environment, build
# outputs, runs and git; anywhere, caches and egg-info.
TOP_LEVEL_NOT_SOURCE = {".git", ".venv", "build", "runs", "results", ".gpu_deps"}


def _not_source(directory: str, names: list[str]) -> list[str]:
    top = TOP_LEVEL_NOT_SOURCE if Path(directory) == ROOT else set()
    return [
        n
        for n in names
        if n in top or n == "__pycache__" or n.endswith((".pyc", ".egg-info")) or (n[0] == "." and n.endswith("_cache"))
    ]


def test_a_recipe_is_a_file_or_the_name_of_a_shipped_one(tmp_path, monkeypatch, capsys):
    """In the checkout (installed editable) the shipped recipes are recipes/; a name resolves to
    one of them unless a file of that name exists; a path is taken as it is."""
    assert recipes_dir() == ROOT / "recipes"
    assert shipped_recipes() == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("tiny") == resolve_recipe("tiny.yaml") == str(ROOT / "recipes" / "tiny.yaml")
    (tmp_path / "tiny.yaml").write_text("run: {total_steps: 1}\n")
    assert resolve_recipe("tiny.yaml") == "tiny.yaml"  # the file in the working directory wins
    assert resolve_recipe("recipes/tiny.yaml") == "recipes/tiny.yaml"  # a path: load_config reports it missing
    with pytest.raises(ConfigError, match="recipe file not found: tinny .*quickstart, .*tiny"):
        resolve_recipe("tinny")
    assert main(["validate", "tinny"]) == 2
    assert "mopd: error: recipe file not found: tinny" in capsys.readouterr().err


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the checkout: an in-tree build would write build/ and
    *.egg-info into the checkout and pack whatever stale modules an earlier build left in build/."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_not_source)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp), str(src)]
    built = _run(cmd)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (built,) = tmp.glob("mopd-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed (no pip of its own: the test's pip
    installs into it) and the test environment's dependencies importable."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index"]
    installed = _run([*install, str(wheel)])
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    # Only after the install: with the test environment on its path, pip would take that
    # environment's (editable) mopd for the installed one and uninstall it.
    (_site_packages(env_dir) / "_mopd_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir


def _site_packages(env_dir: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(_run([str(env_dir / "bin" / "python"), "-c", code]).stdout.strip())


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_wheel_holds_every_module_and_recipe(wheel):
    """Every module of the four packages, every recipe and every chat template under recipes/templates/
    is in the wheel (setup.cfg lists the packages by hand: a new subpackage missing there would be
    missing from the wheel)."""
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    expected |= {f"mopd/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")}
    expected |= {f"mopd/recipes/templates/{p.name}" for p in (ROOT / "recipes" / "templates").glob("*.jinja")}
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel (a package missing from setup.cfg [options] packages?): {missing}"
    assert not [n for n in names if n.startswith(("recipes/", "tests/"))], "recipes/ ships as mopd/recipes/ only"


@pytest.mark.slow
def test_cli_from_the_wheel_outside_the_checkout(venv, tmp_path):
    site = _site_packages(venv)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = _run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import mopd; from mopd.app.quickstart import RECIPE; print(mopd.__file__); print(RECIPE)",
        ],
        cwd=elsewhere,
    )
    assert probe.returncode == 0, probe.stderr
    module, recipe = probe.stdout.split()
    assert Path(module) == site / "mopd" / "__init__.py", f"mopd imported from {module}, not the wheel"
    assert Path(recipe) == site / "mopd" / "recipes" / "quickstart.yaml" and Path(recipe).is_file()

    validate = _run([str(venv / "bin" / "mopd"), "validate", "quickstart", "trainer.world_size=1"], cwd=elsewhere)
    assert validate.returncode == 0, validate.stderr[-3000:]
    assert "name: quickstart" in validate.stdout and "world_size: 1" in validate.stdout

    helped = _run([str(venv / "bin" / "mopd"), "quickstart", "--help"], cwd=elsewhere)
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert "--from-stage" in helped.stdout and "--output-dir" in helped.stdout

    unknown = _run([str(venv / "bin" / "mopd"), "validate", "no_such_recipe"], cwd=elsewhere)
    assert unknown.returncode == 2 and "quickstart" in unknown.stderr and "tiny" in unknown.stderr, unknown.stderr
    assert not list(elsewhere.iterdir()), "validate wrote into the working directory"
