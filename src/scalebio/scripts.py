"""A module of a package tree that is not installed (experiments/) run by its path as well as with ``-m``.

The experiments are modules of the package ``experiments`` at the repository root, importing the installed library
(``scalebio``) and each other by their full names (``from experiments.llama3.tasks import evaluate_model``).
``python -m experiments.llama3.protocol`` from the repository root runs one as such. Run by its path instead
(``python experiments/llama3/protocol.py``, from any folder: the command a campaign's processes and STATUS.md use),
Python puts the file's own folder first on ``sys.path`` and runs the file outside its package, so those imports
would fail. A module that imports another experiment module therefore has, after its other imports and before
those,

    if __name__ == "__main__" and not __package__:  # run by its path: run it as the module it is
        from scalebio.scripts import run_as_module
        run_as_module(__file__)

    from experiments.llama3.tasks import evaluate_model  # noqa: E402

which runs the file as its module, with the folder above the package tree first on ``sys.path`` where Python had
put the file's folder: what ``-m`` from the repository root does. Imported (tests, other modules), it does nothing.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import NoReturn


def module_name(file: str | Path) -> tuple[Path, str]:
    """(the folder above ``file``'s package tree, ``file``'s dotted module name): each folder with an __init__.py
    above the file is a package."""
    path = Path(file).resolve()
    parts = [path.stem]
    folder = path.parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    return folder, ".".join(parts)


def run_as_module(file: str | Path) -> NoReturn:
    """Run ``file`` as its module under ``__main__`` (``python -m`` with the tree's root first on the path), then
    exit; the module's own ``sys.exit(main())`` ends the process as it would under ``-m``."""
    root, name = module_name(file)
    here = Path(file).resolve().parent
    if sys.path and Path(sys.path[0] or ".").resolve() == here:
        sys.path[0] = str(root)  # the file's own folder would let its siblings shadow installed modules
    elif str(root) not in sys.path:
        sys.path.insert(0, str(root))
    runpy.run_module(name, run_name="__main__", alter_sys=True)
    sys.exit(0)
