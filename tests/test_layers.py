"""The three layers import only downward, no package imports one that imports it back, and no
module imports one that imports it back (directly or around a longer circle).

    core     mopd/ (without mopd/app, mopd/dist): config, types, objective, the loop, data, domains, ...
    dist     mopd/dist/: Ray actors, placement, runtime, devices, weight sync, vLLM shims, the plan;
             imports the core only
    workers  teachers/, rollout/, trainers/: each imports the core and dist only
    app      mopd/app/: the CLI, the run wiring, the quickstart, the report; the only importer of workers

Every import counts, also one inside a function and ``importlib.import_module("literal")``:
a lazy import is still a dependency. So for the circles between modules: a function-level import
only defers when the other module loads, the two still need each other (mopd.app.check imported
mopd.app.run at the top, and run imported check inside a function: a circle; now both take what
they share from mopd.models). Only an import under ``if TYPE_CHECKING:`` is left out of the module
check: it never runs, and annotations may refer both ways. Run against another checkout with
``python tests/test_layers.py PATH``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = ("teachers", "rollout", "trainers")
# Allowed imports between units: core <- dist <- each worker <- app.
ALLOWED = {
    "core": {"core"},
    "dist": {"core", "dist"},
    **{w: {"core", "dist", w} for w in WORKERS},
    "app": {"core", "dist", "app", *WORKERS},
}


def unit_of(module: str) -> str | None:
    """The layer unit of a dotted module name, or None for a module outside the project."""
    top = module.split(".")[0]
    if module == "mopd.app" or module.startswith("mopd.app."):
        return "app"
    if module == "mopd.dist" or module.startswith("mopd.dist."):
        return "dist"
    if top == "mopd":
        return "core"
    return top if top in WORKERS else None


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files(root: Path) -> Iterator[Path]:
    for top in ("mopd", *WORKERS):
        yield from sorted((root / top).rglob("*.py"))


def _package(path: Path, root: Path) -> str:
    """The package that relative imports in ``path`` start from."""
    name = module_name(path, root)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a ``from ... import`` names, a relative one made absolute."""
    base = node.module or ""
    if node.level:
        parent = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
    return base


def imported_modules(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in ``path``, at any depth, relative ones made absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package(path, root)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            yield node.lineno, base
            for alias in node.names:  # `from mopd import app` imports the app
                if unit_of(f"{base}.{alias.name}") != unit_of(base):
                    yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield node.lineno, arg.value


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )


def unit_edges(root: Path) -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> the imports that make that edge, as 'file:line module'."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in project_files(root):
        src = unit_of(module_name(path, root))
        for line, mod in imported_modules(path, root):
            dst = unit_of(mod)
            if dst is not None and src is not None and dst != src:
                where = f"{path.relative_to(root)}:{line} imports {mod}"
                edges.setdefault((src, dst), []).append(where)
    return {k: sorted(set(v)) for k, v in edges.items()}


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected groups of more than one unit (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (never run)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        test = node.test if isinstance(node, ast.If) else None
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            ids |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return ids


def _in_functions(tree: ast.Module) -> set[int]:
    """ids of the nodes inside a function body (they run when it is called)."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            ids |= {id(n) for n in ast.walk(node) if n is not node}
    return ids


def _project_module(name: str, modules: set[str]) -> str | None:
    """The project module a dotted name lies in (``mopd.domains.register_domain`` -> ``mopd.domains``)."""
    parts = name.split(".")
    return next((m for i in range(len(parts), 0, -1) if (m := ".".join(parts[:i])) in modules), None)


def module_edges(root: Path) -> dict[tuple[str, str], list[str]]:
    """(importing module, imported project module) -> the imports that make that edge, as
    'file:line' (with ' (in a function)' for a lazy one); imports under TYPE_CHECKING left out."""
    modules = {module_name(p, root) for p in project_files(root)}
    edges: dict[tuple[str, str], list[str]] = {}
    for path in project_files(root):
        src, package = module_name(path, root), _package(path, root)
        tree = ast.parse(path.read_text(), filename=str(path))
        typing_only, lazy = _type_checking_only(tree), _in_functions(tree)
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):  # `from pkg import mod` imports pkg.mod
                base = _absolute(node, package)
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
                arg = node.args[0]
                names = [arg.value] if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else []
            if id(node) in typing_only:
                continue
            for name in names:
                dst = _project_module(name, modules)
                if dst is not None and dst != src:
                    where = f"{path.relative_to(root)}:{node.lineno}" + (" (in a function)" if id(node) in lazy else "")
                    edges.setdefault((src, dst), []).append(where)
    return {k: sorted(set(v)) for k, v in edges.items()}


def layer_problems(root: Path = ROOT) -> list[str]:
    """Every import that goes against the layers, every import cycle between units, and every
    import cycle between modules (each with the imports that close it)."""
    edges = unit_edges(root)
    problems = []
    for (src, dst), where in sorted(edges.items()):
        if dst not in ALLOWED[src]:
            problems += [f"{src} -> {dst}: {w}" for w in where]
    for group in cycles(set(edges)):
        problems.append("import cycle between " + ", ".join(group))
    mod_edges = module_edges(root)
    for group in cycles(set(mod_edges)):
        inside = [f"{a} -> {b} ({', '.join(w)})" for (a, b), w in sorted(mod_edges.items()) if {a, b} <= set(group)]
        problems.append("import cycle between modules " + ", ".join(group) + ": " + "; ".join(inside))
    return problems


def test_imports_go_only_downward_and_form_no_cycle():
    problems = layer_problems()
    assert not problems, "\n".join(problems)


def test_importing_the_core_the_app_and_the_worker_packages_loads_no_ray_vllm_or_deepspeed():
    """Ray, vLLM and DeepSpeed load with the actors that need them (the worker packages resolve
    their names lazily), so `mopd validate` and the core's tests never pay for them."""
    modules = sorted(module_name(p, ROOT) for p in (ROOT / "mopd").rglob("*.py"))
    code = (
        "import importlib, sys\n"
        f"for m in {modules + list(WORKERS)!r}: importlib.import_module(m)\n"
        "print(sorted({'ray', 'vllm', 'deepspeed', 'transformers'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_the_check_sees_imports_inside_functions_and_import_module(tmp_path):
    (tmp_path / "mopd").mkdir()
    (tmp_path / "teachers").mkdir()
    (tmp_path / "mopd" / "__init__.py").write_text("")
    (tmp_path / "mopd" / "late.py").write_text("def f():\n    from rollout.pool import RolloutPool\n")
    (tmp_path / "mopd" / "named.py").write_text("import importlib\nimportlib.import_module('trainers')\n")
    (tmp_path / "teachers" / "__init__.py").write_text("from .common import x\nfrom rollout import x\n")
    (tmp_path / "teachers" / "common.py").write_text("from mopd import app\n")
    problems = "\n".join(layer_problems(tmp_path))
    assert "core -> rollout: mopd/late.py:2 imports rollout.pool" in problems
    assert "core -> trainers: mopd/named.py:2 imports trainers" in problems
    assert "teachers -> rollout: teachers/__init__.py:2 imports rollout" in problems
    assert "teachers -> app: teachers/common.py:1 imports mopd.app" in problems
    assert "teachers -> core" not in problems  # `from .common import x` stays inside teachers


def test_a_cycle_is_found():
    assert cycles({("core", "teachers"), ("teachers", "core"), ("app", "core")}) == [["core", "teachers"]]


def test_a_cycle_between_modules_of_one_unit_is_found_also_through_a_lazy_import(tmp_path):
    """Regression: mopd/app/check.py imported ``model_config`` from mopd/app/run.py at the top, and
    run.py imported ``check_teachers`` from check.py inside a function; both are the app unit, so
    the unit check could not see the circle."""
    app = tmp_path / "mopd" / "app"
    app.mkdir(parents=True)
    for init in (tmp_path / "mopd" / "__init__.py", app / "__init__.py"):
        init.write_text("")
    (app / "check.py").write_text("from mopd.app.run import model_config\n")
    (app / "run.py").write_text("def checked_teachers():\n    from mopd.app.check import check_teachers\n")
    (tmp_path / "mopd" / "a.py").write_text("from . import b\n")  # a longer circle, relative imports
    (tmp_path / "mopd" / "b.py").write_text("import importlib\nimportlib.import_module('mopd.c')\n")
    (tmp_path / "mopd" / "c.py").write_text("from mopd.a import x\n")
    # A circle only for the type checker (types -> d under TYPE_CHECKING) is none: it never runs.
    (tmp_path / "mopd" / "types.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    from mopd.d import y\n")
    (tmp_path / "mopd" / "d.py").write_text("from mopd.types import z\n")
    problems = layer_problems(tmp_path)
    assert problems == [
        "import cycle between modules mopd.a, mopd.b, mopd.c: mopd.a -> mopd.b (mopd/a.py:1); "
        "mopd.b -> mopd.c (mopd/b.py:2); mopd.c -> mopd.a (mopd/c.py:1)",
        "import cycle between modules mopd.app.check, mopd.app.run: mopd.app.check -> mopd.app.run "
        "(mopd/app/check.py:1); mopd.app.run -> mopd.app.check (mopd/app/run.py:2 (in a function))",
    ]


if __name__ == "__main__":
    found = layer_problems(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    print("\n".join(found) or "no layer problems")
    sys.exit(1 if found else 0)
