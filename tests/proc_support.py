"""Reading a process's state from /proc, for tests that watch commands die.

A process can exit between opening `/proc/<pid>/stat` and reading it; the read then
fails with ESRCH rather than ENOENT. Both mean the process is gone.
"""

from __future__ import annotations


def process_state(pid: int) -> str | None:
    """The state letter `ps` shows (R, S, Z, ...), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may hold spaces and parentheses: the fields after the last ')' are fixed
    return stat[stat.rindex(b")") + 2 :].split()[0].decode()


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie waiting to be reaped."""
    return process_state(pid) not in (None, "Z", "X")
