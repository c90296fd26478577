"""Files that appear whole or not at all, with the permissions any other new file of the user would get."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``.

    A failure leaves ``path`` as it was. ``mkstemp`` makes 0600 files; the result gets
    ``0666 & ~umask`` instead, like a file opened for writing.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # after writing: some writers (safetensors) replace the file they are given
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`text` into `path`, whole or not at all (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
