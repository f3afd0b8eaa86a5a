"""The layout's one-way boundary: the library (src/scalebio) imports nothing from experiments/ or benchmarks/.

Every module is parsed with ast, so imports inside functions and under ``if`` count too, and nothing is run.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "src" / "scalebio"
FORBIDDEN = ("experiments", "benchmarks")


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in ``tree``; ``importlib.import_module("x")`` and ``__import__("x")``
    with a literal name count too."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value))
    return out


def boundary_violations(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, module in imported_modules(tree):
            if module.split(".")[0] in FORBIDDEN:
                bad.append(f"{path.relative_to(root.parent.parent)}:{line}: imports {module}")
    return bad


def test_library_imports_nothing_from_experiments_or_benchmarks():
    modules = list(LIBRARY.rglob("*.py"))
    assert len(modules) > 10  # the walk really found the library
    assert boundary_violations(LIBRARY) == []


@pytest.mark.parametrize("line", ["import experiments.gpt2.pipeline", "from benchmarks import table",
                                  "def f():\n    from experiments.llama3 import tasks",
                                  "import importlib\nimportlib.import_module('benchmarks.run')"])
def test_the_check_sees_each_kind_of_import(tmp_path, line):
    pkg = tmp_path / "src" / "lib"
    pkg.mkdir(parents=True)
    (pkg / "ok.py").write_text("import json\nfrom . import sibling\n")
    (pkg / "bad.py").write_text(line + "\n")
    found = boundary_violations(pkg)
    assert len(found) == 1 and found[0].startswith("src/lib/bad.py:")
