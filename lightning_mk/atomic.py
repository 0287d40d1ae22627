"""Write files so that readers never see a partial one."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it to ``path``.

    ``path`` may be any URL fsspec knows, as with Lightning's checkpoints (``s3://``, ``memory://``):
    there ``write`` fills a buffer first, which is stored in one write inside the file system's
    transaction (object stores publish an object only once it is complete). If ``write`` fails, the
    temporary file is removed and an existing ``path`` is left as it was.
    """
    fs, path = url_to_fs(os.fspath(path))
    if not isinstance(fs, LocalFileSystem):
        buffer = io.BytesIO()
        write(buffer)
        with fs.transaction:
            fs.pipe_file(path, buffer.getvalue())
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
