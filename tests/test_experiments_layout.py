"""experiments/ is a package tree beside the library: its modules import the installed ``scalebio`` and each other by
their full names (``experiments.llama3.tasks``), never through ``sys.path``; a module runs by its path (the command a
campaign's STATUS.md gives) as well as with ``python -m`` (``scalebio.scripts``). Library and experiments write a
whole file one way, ``scalebio.files.write_text`` (atomic), except inside a temporary folder that replaces its target
whole."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import scalebio
from scalebio.scripts import module_name

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
MODULES = sorted(EXPERIMENTS.rglob("*.py"))
SRC = str(Path(scalebio.__file__).resolve().parents[1])


def _env() -> dict:
    """This checkout's library first, as the tests import it."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def layout_violations(root: Path) -> list[str]:
    """sys.path used, a relative import, or an import of a module of the tree by its bare name (``import tasks``)."""
    stems = {p.stem for p in root.rglob("*.py")} - {"__init__"}
    bad = []
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root.parent)
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                bad.append(f"{where}:{node.lineno}: uses sys.path")
            elif isinstance(node, ast.ImportFrom) and node.level:
                bad.append(f"{where}:{node.lineno}: relative import")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                bad += [f"{where}:{node.lineno}: imports {n} by its bare name" for n in names if n.split(".")[0] in stems]
    return bad


TEMPORARY_FOLDER = "# inside a temporary folder that replaces the target whole"
"""The comment, on the line above, that allows a plain ``Path.write_text`` / ``write_bytes``."""


def unsafe_writes(root: Path) -> list[str]:
    """``<path>.write_text(...)`` / ``.write_bytes(...)`` calls (a reader can see half a file, a kill leaves one) not
    marked as writing inside a temporary folder; ``files.write_text`` is the atomic writer."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("write_text", "write_bytes")
                    and getattr(node.func.value, "id", None) != "files"
                    and not (node.lineno >= 2 and lines[node.lineno - 2].strip() == TEMPORARY_FOLDER)):
                bad.append(f"{path.relative_to(root.parent)}:{node.lineno}: {node.func.attr} is not atomic")
    return bad


def test_every_whole_file_write_is_atomic(tmp_path):
    assert unsafe_writes(Path(SRC) / "scalebio") == [] and unsafe_writes(EXPERIMENTS) == []
    tree = tmp_path / "experiments"
    tree.mkdir()
    (tree / "ok.py").write_text("from scalebio import files\nfrom scalebio.files import write_text\n"
                                "files.write_text(p, 'a')\nwrite_text(p, 'a')\n"
                                f"{TEMPORARY_FOLDER}\n(tmp / 'x').write_bytes(b'a')\n")
    (tree / "bad.py").write_text("(out / 'summary.json').write_text('{}')\n# a comment\nout.write_bytes(b'a')\n")
    assert unsafe_writes(tree) == ["experiments/bad.py:1: write_text is not atomic",
                                   "experiments/bad.py:3: write_bytes is not atomic"]


def test_experiments_import_the_package_and_each_other_by_full_name():
    assert len(MODULES) > 15  # the walk found the drivers
    assert layout_violations(EXPERIMENTS) == []
    folders = {p.parent for p in MODULES}
    assert [f for f in folders if not (f / "__init__.py").is_file()] == []  # every folder of modules is a package


@pytest.mark.parametrize("line", ["import sys\nsys.path.insert(0, 'src')", "from . import common",
                                  "import common", "from tasks import offline_tasks"])
def test_the_check_sees_each_violation(tmp_path, line):
    tree = tmp_path / "experiments"
    (tree / "llama3").mkdir(parents=True)
    for d in (tree, tree / "llama3"):
        (d / "__init__.py").write_text("")
    (tree / "common.py").write_text("from experiments.llama3 import tasks\n")
    (tree / "llama3" / "tasks.py").write_text("import json\n")
    (tree / "llama3" / "bad.py").write_text(line + "\n")
    found = layout_violations(tree)
    assert len(found) == 1 and found[0].startswith("experiments/llama3/bad.py:")


def test_module_name_walks_up_the_packages():
    assert module_name(EXPERIMENTS / "llama3" / "protocol.py") == (REPO, "experiments.llama3.protocol")
    assert module_name(EXPERIMENTS / "gpt2" / "denoising" / "build_data.py") == (
        REPO, "experiments.gpt2.denoising.build_data")


def test_a_module_runs_by_its_path_from_anywhere_and_with_m(tmp_path):
    """A module importing a sibling by its full name runs by its path from another folder (as the module it is,
    with its arguments and exit status), and with -m from the tree's root; a sibling named like an installed module
    (``json``) does not shadow it."""
    root = tmp_path / "root"
    sub = root / "tree" / "sub"
    sub.mkdir(parents=True)
    for d in (root / "tree", sub):
        (d / "__init__.py").write_text("")
    (sub / "helper.py").write_text("VALUE = 42\n")
    (sub / "json.py").write_text("raise ImportError('the sibling json.py shadowed the standard library')\n")
    (sub / "tool.py").write_text(
        "import sys\n\n"
        "if __name__ == '__main__' and not __package__:\n"
        "    from scalebio.scripts import run_as_module\n"
        "    run_as_module(__file__)\n\n"
        "import json  # noqa: E402\n\n"
        "from tree.sub.helper import VALUE  # noqa: E402\n\n\n"
        "def main():\n"
        "    print(json.dumps([__name__, __package__, VALUE, sys.argv[1:]]))\n"
        "    return 3\n\n\n"
        "if __name__ == '__main__':\n"
        "    sys.exit(main())\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    expected = '["__main__", "tree.sub", 42, ["a", "--b"]]\n'
    by_path = subprocess.run([sys.executable, str(sub / "tool.py"), "a", "--b"], cwd=elsewhere, env=_env(),
                             capture_output=True, text=True)
    assert (by_path.returncode, by_path.stdout) == (3, expected), by_path.stderr
    with_m = subprocess.run([sys.executable, "-m", "tree.sub.tool", "a", "--b"], cwd=root, env=_env(),
                            capture_output=True, text=True)
    assert (with_m.returncode, with_m.stdout) == (3, expected), with_m.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["path", "module"])
def test_the_documented_campaign_command_runs(tmp_path, how):
    """``python experiments/llama3/protocol.py ...`` (README, STATUS.md, the campaign's own processes) from any folder,
    and ``python -m experiments.llama3.protocol`` from the repository root."""
    cmd = [str(EXPERIMENTS / "llama3" / "protocol.py")] if how == "path" else ["-m", "experiments.llama3.protocol"]
    run = subprocess.run([sys.executable, *cmd, "status", "--help"], cwd=tmp_path if how == "path" else REPO,
                         env=_env(), capture_output=True, text=True)
    assert run.returncode == 0 and "status" in run.stdout and "--runs" in run.stdout, run.stderr
