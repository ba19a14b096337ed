"""One writer per run folder. Two `lab run` writing one folder would overwrite each other's
checkpoints and metrics, so a run holds an OS file lock on run_dir/.lock for as long as it writes
there, and a second one refuses at once, naming the first (its pid, command and start time are
written into the lock file).

The lock is flock(2): the kernel releases it when the process ends, however it ends, so a lock
left by a killed run never blocks the next one; the file itself stays and means nothing. Under
torchrun only rank 0 writes the run folder, so only rank 0 takes the lock. Where fcntl is missing
(Windows) runs are not locked. flock on a network file system works only where that file system
supports it (NFS v4 does).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from lab.errors import LabError
from lab.files import cannot_write
from lab.runs.layout import LOCK

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class RunLock:
    """`with RunLock(run_dir, command):` holds the run folder, creating it if needed (and removing it
    again on the way out if it was made here and nothing but the lock was written into it)."""

    def __init__(self, run_dir, command: str):
        self.run_dir, self.command = Path(run_dir), command
        self.fd = None
        self.created = False

    def __enter__(self) -> "RunLock":
        self.created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise cannot_write(self.run_dir, e, fix="Set train.out_dir to a folder you can write") from None
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_holder(self.fd)
                os.close(self.fd)
                self.fd = None
                raise LabError(in_use_message(self.run_dir, holder)) from None
        self.write_holder()
        return self

    def write_holder(self) -> None:
        """Who holds the lock, for the message another run prints. Best effort: on a full disk the
        lock holds all the same, and the write that matters fails later with its own message."""
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError:
            pass

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        if self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK]:
            (self.run_dir / LOCK).unlink()  # a run that failed before writing anything leaves no folder
            self.run_dir.rmdir()
        os.close(self.fd)  # releases the lock
        self.fd = None


def read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def in_use_message(run_dir: Path, holder: dict) -> str:
    pid = holder.get("pid", "?")
    who = (
        (
            f"process {pid} on {holder.get('host', '?')} (`{holder.get('command', '?')}`, started "
            f"{holder.get('started', '?')})"
        )
        if holder
        else "another process"
    )
    return (
        f"{run_dir} is in use by {who}. Two runs writing one folder would overwrite each other's "
        f"checkpoints. Wait for it to finish, stop it (kill {pid}), or give this run another folder "
        f"(--set train.out_dir=...)"
    )
