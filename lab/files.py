"""Writing files so that a crash never leaves half of one: write beside the target, fsync, rename."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomically(path, text: str) -> None:
    """path holds the old text or the new, never part of either."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        usual_mode(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def fsync(path) -> None:
    """Flush a file, or a folder's entries (so renames in it survive a crash), to disk. Folders are
    skipped where they cannot be opened (Windows, where a rename is durable by itself)."""
    path = Path(path)
    if path.is_dir() and not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def usual_mode(path) -> None:
    """Give a file the permissions open() gives a new one: 0666 less the umask (usually rw-r--r--).
    tempfile.mkstemp and safetensors make files only their owner can read, and on a shared machine a
    run's metrics or weights should be as readable as the rest of the run folder."""
    umask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
