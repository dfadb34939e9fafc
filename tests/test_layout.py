"""The shape of the house: import-linter's contracts (pyproject.toml), no import circle between
modules, and no function longer than a screenful or two."""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "tbps"
MAX_FUNCTION_LINES = 100

pytest.importorskip("importlinter")
grimp = pytest.importorskip("grimp")


def lint_imports(src_root: pathlib.Path) -> subprocess.CompletedProcess:
    """Run import-linter on the package below ``src_root`` with the repository's contracts."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))"
    env = dict(os.environ, PYTHONPATH=str(src_root))
    return subprocess.run([sys.executable, "-c", code, str(REPO / "pyproject.toml")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_import_contracts_hold():
    res = lint_imports(SRC.parent)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


def test_an_upward_import_breaks_the_contracts(tmp_path):
    """The contracts have teeth: one import from the bottom layer up to the CLI fails them."""
    shutil.copytree(SRC, tmp_path / "tbps", ignore=shutil.ignore_patterns("__pycache__"))
    files = tmp_path / "tbps" / "files.py"
    files.write_text(files.read_text() + "\n\ndef _up():\n    from tbps.cli.common import UserError  # noqa: F401\n")
    res = lint_imports(tmp_path)
    assert res.returncode != 0
    assert "tbps.files is not allowed to import tbps.cli" in res.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    adj = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in adj:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            if i < len(adj[v]):
                work.append((v, i + 1))
                w = adj[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return found


def test_no_import_circle_between_modules():
    sys.path.insert(0, str(SRC.parent))
    graph = grimp.build_graph("tbps", cache_dir=None)
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_circle():
    class Graph:  # a -> b -> c -> a, and d -> a
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        modules = set(edges)

        def find_modules_directly_imported_by(self, m):
            return self.edges[m]

    assert _cycles(Graph()) == [["a", "b", "c"]]


def test_no_function_longer_than_a_screenful():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: {long}"
