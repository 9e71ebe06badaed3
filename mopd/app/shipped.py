"""The recipes that ship with mopd, and how the command line names them.

The checkout's top-level ``recipes/`` (YAML only) is installed as the package data ``mopd/recipes/``
(setup.cfg maps ``mopd.recipes`` to it), so a wheel carries them. A command's RECIPE argument is a
file when one exists at that path, else the bare name of a shipped recipe:

    mopd validate quickstart             # the shipped recipes/quickstart.yaml, from any directory
    mopd validate tiny.yaml              # the same by file name, unless ./tiny.yaml exists
    mopd validate recipes/tiny.yaml      # a path: always that file
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

from mopd.config import ConfigError

SUFFIX = ".yaml"


def recipes_dir() -> Path:
    """Where the shipped recipes lie: ``mopd/recipes/`` of an installed wheel, else (a checkout,
    also when installed editable: setuptools' editable finder does not map a directory without
    ``__init__.py``) the ``recipes/`` beside the ``mopd`` package."""
    installed = files("mopd").joinpath("recipes")
    if installed.is_dir():
        return Path(str(installed))  # a wheel installs into a directory, never a zip
    return Path(__file__).resolve().parents[2] / "recipes"


def shipped_recipes() -> list[str]:
    """The names of the shipped recipes (file names without ``.yaml``), sorted."""
    return sorted(p.stem for p in recipes_dir().glob(f"*{SUFFIX}"))


def resolve_recipe(arg: str) -> str:
    """The RECIPE argument as a file path: ``arg`` itself if it names a file or a path (it holds a
    directory separator), else the shipped recipe of that name (with or without ``.yaml``)."""
    if Path(arg).is_file() or os.sep in arg or (os.altsep and os.altsep in arg):
        return arg  # load_config reports a missing file
    stem = arg.removesuffix(SUFFIX)
    if stem in shipped_recipes():
        return str(recipes_dir() / f"{stem}{SUFFIX}")
    raise ConfigError(
        f"recipe file not found: {arg} (a RECIPE is a YAML file or the name of a shipped recipe: "
        f"{', '.join(shipped_recipes())})"
    )
