"""The package's shape: modules that import each other one way, small modules and functions; the
oldest versions of its dependencies, pinned where the suite is run with them."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "src" / "backbone_inspect"
MODULES = sorted(PACKAGE.glob("*.py"))
TESTS = sorted((REPO / "tests").glob("*.py"))


def relative_imports(path: Path) -> set[str]:
    """Sibling modules a module imports, at the top, lazily in a function or for type checking alone."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
    return found - {path.stem}


def test_no_module_imports_itself_through_others() -> None:
    graph = {path.stem: relative_imports(path) for path in MODULES}

    def reaches(start: str, target: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module == target:
                return True
            if module in graph and module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return False

    assert [module for module in graph if reaches(module, module)] == []


@pytest.mark.parametrize("path", MODULES + TESTS, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_modules_and_functions_stay_small(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    long = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 40
        # The command's Typer declaration: one line of parameters per few options.
        and (path.name, node.name) != ("cli.py", "inspect")
    ]
    assert long == []


def test_every_dependencys_floor_is_the_version_pinned_in_constraints_oldest() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dependencies = project["dependencies"] + project["optional-dependencies"]["timm"] + project["optional-dependencies"]["ray"]
    floors = dict(re.fullmatch(r"([\w-]+)(?:\[\w+\])?>=([\w.]+)", dependency).groups() for dependency in dependencies)
    pinned = dict(re.fullmatch(r"([\w-]+)==([\w.]+)", line).groups()
                  for line in (REPO / "constraints-oldest.txt").read_text().splitlines() if line and not line.startswith("#"))
    assert {name: ".".join((version.split(".") + ["0", "0"])[:3]) for name, version in floors.items()} == pinned
