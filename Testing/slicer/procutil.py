"""Process helpers for the tests."""

import os


def _stat_fields(pid: int) -> list[str] | None:
    """The fields after the command name in /proc/<pid>/stat (state, ppid, pgrp, ...), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """True if a process exists and is not a zombie (containers may not reap orphans)."""
    try:
        fields = _stat_fields(pid)
        return fields is not None and fields[0] not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``: what a cancelled worker must not leave behind."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                members.append(int(name))
    return members
