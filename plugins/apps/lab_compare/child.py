"""How a sweep starts `lab` in a child process: the installed lab, whatever folder it runs in.

`python -m lab` puts the current folder first on sys.path, so run from the folder that holds a clone
(`git clone ... lab`, then work from its parent), `./lab` (the clone, not the package) is imported
instead. `python -P` (3.11+) leaves the current folder out; on 3.10, which has no -P, a one-line
program drops it before importing lab."""

from __future__ import annotations

import sys

DROP_CWD = "import sys; del sys.path[0]; from lab.commands.cli import main; raise SystemExit(main())"


def lab_argv(*args: str) -> list[str]:
    """argv that runs `lab ARGS...` with this Python and the lab installed in it."""
    if sys.version_info >= (3, 11):
        return [sys.executable, "-P", "-m", "lab", *args]
    return [sys.executable, "-c", DROP_CWD, *args]
