"""Writing files so that a crash never leaves half of one: write beside the target, fsync, rename."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lab.errors import LabError


@contextmanager
def replacing(path, mode: str = "w"):
    """`with replacing(path, "wb") as f:` a new file beside path, which replaces it (fsynced, with the
    usual permissions) when the block ends; if the block fails it is removed and path is untouched.
    So path holds the old contents or the new, never part of either."""
    if Path(path).is_dir():  # checked first: the work is not done only to fail at the rename
        raise LabError(f"{path} is a folder; give a file name to write to")
    fd, tmp = temporary(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        usual_mode(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomically(path, text: str) -> None:
    """path holds the old text or the new, never part of either."""
    with replacing(path) as f:
        f.write(text)


def sha256(path) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_folder() -> Path:
    """Where lab keeps what it can make again (tokenized corpora, timed peaks): $LAB_CACHE, else
    $XDG_CACHE_HOME/lab, else ~/.cache/lab."""
    if os.environ.get("LAB_CACHE"):
        return Path(os.environ["LAB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lab"


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


# Writes that fail ---------------------------------------------------------------------------------

DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def temporary(path) -> tuple[int, str]:
    """(fd, name) of a new hidden file beside `path`, named .NAME.PID.XXXXXXXX.tmp: the pid tells
    remove_stale_temporaries whether the process writing it is still alive."""
    path = Path(path)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")


def remove_stale_temporaries(folder) -> None:
    """Remove the hidden temporary files that processes killed while writing left in `folder`
    (those of live processes are being written, and stay)."""
    for path in Path(folder).glob(".*.tmp"):
        match = re.search(r"\.(\d+)\.[a-z0-9_]{8}\.tmp$", path.name)
        if match is None or not alive(int(match.group(1))):
            path.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process, alive
        pass
    return True


def disk_error(error: Exception, where, needed: int | None = None) -> OSError | None:
    """The OSError behind a failed write, or None if it was not one: the error itself, the one a Rust
    writer (safetensors) names in its text, or, for a C++ writer whose text says nothing useful
    (torch.save: 'unexpected pos'), a full disk when less than `needed` bytes are free at `where`."""
    if isinstance(error, OSError):
        return error
    match = re.search(r"os error (\d+)", str(error))
    if match:
        return OSError(int(match.group(1)), os.strerror(int(match.group(1))))
    if needed is not None and free_bytes(where) < needed:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


@contextmanager
def writing(path, fix: str = ""):
    """An OSError in the block becomes cannot_write's one message about `path`."""
    try:
        yield
    except OSError as e:
        raise cannot_write(path, e, fix=fix) from None


def cannot_write(path, error: OSError, needed: int | None = None, fix: str = "", what: str = "") -> LabError:
    """One message for a write that failed: what and its path, why, the space needed where known, the fix."""
    code = error.errno
    if code is None and free_bytes(path) < max(needed or 0, 1 << 20):
        code = errno.ENOSPC  # numpy's tofile: OSError('N requested and 0 written'), no errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        need = f", about {size(needed)} needed" if needed else ""
        why = f"the disk is full ({size(free_bytes(path))} free{need})"
        how = "free some space (old runs, checkpoints, caches)"
    elif code in (errno.EACCES, errno.EPERM):
        why, how = "permission denied", "make the folder writable (chmod u+w) or write somewhere else"
    elif code == errno.EROFS:
        why, how = "the file system is read-only", "write to a folder on a writable disk"
    else:
        why, how = error.strerror or str(error), "check the disk and the folder, or write somewhere else"
    return LabError(f"cannot write {what}{path}: {why}. {fix or how[0].upper() + how[1:]}")


def free_bytes(path) -> int:
    """Free space on the disk that holds path (or the nearest folder above it that exists)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def size(n: float) -> str:
    """1234567 -> '1.2 MB'."""
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            break
        n /= 1000
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
