"""The three layers import only downward, and no package imports one that imports it back.

    core     mopd/ (without mopd/app, mopd/dist): config, types, objective, the loop, data, domains, ...
    dist     mopd/dist/: Ray actors, placement, runtime, devices, weight sync, vLLM shims, the plan;
             imports the core only
    workers  teachers/, rollout/, trainers/: each imports the core and dist only
    app      mopd/app/: the CLI, the run wiring, the quickstart, the report; the only importer of workers

Every import counts, also one inside a function and ``importlib.import_module("literal")``:
a lazy import is still a dependency. Run against another checkout with
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


def imported_modules(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in ``path``, at any depth, relative ones made absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
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


def layer_problems(root: Path = ROOT) -> list[str]:
    """Every import that goes against the layers, and every import cycle between units."""
    edges = unit_edges(root)
    problems = []
    for (src, dst), where in sorted(edges.items()):
        if dst not in ALLOWED[src]:
            problems += [f"{src} -> {dst}: {w}" for w in where]
    for group in cycles(set(edges)):
        problems.append("import cycle between " + ", ".join(group))
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


if __name__ == "__main__":
    found = layer_problems(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
    print("\n".join(found) or "no layer problems")
    sys.exit(1 if found else 0)
