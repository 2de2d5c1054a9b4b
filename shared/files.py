"""Files that several processes may create at once (local mode's keys): the first complete writer wins."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_once(path: Path, data: bytes, *, mode: int) -> None:
    """Create `path` with `data` unless it exists; concurrent writers agree on the first complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600; the data is complete on disk before the file gets its public name.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, mode)
        # link() refuses to replace an existing file (rename would not): the first process wins.
        with contextlib.suppress(FileExistsError):
            os.link(tmp_name, path)
    finally:
        os.unlink(tmp_name)
