"""The one-way house (docs/architecture.md), checked on the code itself: import-linter's contracts
hold, a planted upward import breaks them, no two modules import each other in a loop (imports
inside functions included), and no module is a room with several jobs (over 700 lines)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
MAX_LINES = 700


def _lint_imports(src: Path) -> subprocess.CompletedProcess[str]:
    """import-linter's contracts (pyproject.toml) over the package found in ``src``."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[2], no_cache=True))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(src), str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_contracts_hold():
    done = _lint_imports(SRC)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_planted_upward_import_breaks_the_contract(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(SRC / "stepcache", copy / "stepcache", ignore=shutil.ignore_patterns("__pycache__"))
    schedule = copy / "stepcache" / "schedule.py"
    # An import inside a function, the way loops used to be dodged: it still counts.
    schedule.write_text(
        schedule.read_text() + "\n\ndef _planted():\n    from .policies import tune\n\n    return tune\n"
    )
    done = _lint_imports(copy)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "stepcache.schedule is not allowed to import stepcache.policies" in done.stdout


def test_no_import_cycle():
    sys.path.insert(0, str(SRC))
    try:
        graph = grimp.build_graph("stepcache", exclude_type_checking_imports=True, cache_dir=None)
    finally:
        sys.path.remove(str(SRC))
    # Tarjan's strongly connected components: any component of two or more modules is a loop.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    loops: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            loop = []
            while True:
                w = stack.pop()
                loop.append(w)
                if w == v:
                    break
            if len(loop) > 1:
                loops.append(sorted(loop))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    assert not loops, f"modules that import each other in a loop: {loops}"


def test_no_module_over_700_lines():
    long = {
        str(p.relative_to(SRC)): n
        for p in sorted(SRC.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them into rooms with one job): {long}"
