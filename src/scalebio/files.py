"""Whole files: the one way this package writes one (atomically), and the digest it identifies one by.

Readers see the old content or the new one, never a partial file: the text goes to a temporary file beside the
target (a unique name, so two writers never share it), is flushed and fsynced, then renamed over the target.
``results.write_text`` adds a kill point before the rename for the crash tests; everything else calls this.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable


def _process_umask() -> int:
    umask = os.umask(0)  # reading it means setting it: done once, at import, before any thread writes
    os.umask(umask)
    return umask


_FILE_MODE = 0o666 & ~_process_umask()


def write_text(path: str | Path, text: str, before_replace: Callable[[], None] | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its folder; ``before_replace()`` runs just before
    the rename. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _FILE_MODE)  # mkstemp's file is private (0600): the result gets a file's usual mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
