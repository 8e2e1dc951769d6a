"""Exclusive locks on a work directory or an output, naming who holds them.

A lock is a file taken with `flock(LOCK_EX | LOCK_NB)` holding a JSON record of its holder (pid,
host, command, start time). A second taker is refused at once with `LockedError`, which names
the lock, the holder and since when; nothing waits. The kernel drops a flock when its process
dies, however it dies, so a killed holder never blocks the next run: its lock file, left
behind, is simply taken again and its record rewritten (a warning names the holder that died).

Scope: processes on one machine, on a local filesystem. On NFS and other network filesystems
flock is emulated or local to the client, so a run on another machine is not kept out; put a
work directory shared between machines behind one orchestrator (the deployments' concurrency
limits) instead. Torch-free, beside fsutil.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from gptcore.errors import GptcoreError

log = logging.getLogger("gptcore")

WORKDIR_LOCK = ".gptcore.lock"  # inside the work directory
OUTPUT_LOCK_SUFFIX = ".lock"  # beside an output file: scores.parquet.lock
COMMAND_CHARS = 200  # a holder's command line is kept this long at most


class LockedError(GptcoreError):
    """Another process holds the lock on a work directory or an output."""


def process_command() -> str:
    """This process's command line, as a holder's record names it."""
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    return " ".join(argv)[:COMMAND_CHARS]


def describe_holder(record: dict | None) -> str:
    """`gptcore pipeline` pid 1234 on host X since 2024-05-01 05:40:12, from a holder's record."""
    if not record:
        return "another process (its record is not written yet)"
    since = record.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, int | float) else "?"
    return f"`{record.get('command', '?')}` pid {record.get('pid', '?')} on host {record.get('host', '?')} since {when}"


def _read_record(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 1 << 16):
        data += chunk
    try:
        record = json.loads(data)
    except ValueError:  # empty, or being written this instant
        return None
    return record if isinstance(record, dict) else None


def _write_record(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)


def _open_locked(path: Path, what: str) -> int:
    """An fd holding the flock of `path`, the file still under that name (retried if it was replaced)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # not inherited by subprocesses (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = describe_holder(_read_record(fd))
            os.close(fd)
            raise LockedError(f"{what} is in use by {holder} (lock file {path})") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        # The holder released it (unlinking the file) between our open and our flock: this fd
        # locks a file no longer under that name, so a third process may hold the one that is.
        os.close(fd)


@contextlib.contextmanager
def hold(path: str | Path, what: str, command: str | None = None) -> Iterator[Path]:
    """Hold the lock file `path` for the block, or raise LockedError naming `what` and its holder.

    `command` names this holder in the record (default: this process's command line). The
    file is removed on release; one a dead process left behind is taken over.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_locked(path, what)
    try:
        left = _read_record(fd)
        if left is not None:  # the flock was free: whoever wrote this record is gone
            log.warning("%s: taken over from %s, which ended without releasing it", path, describe_holder(left))
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": (command or process_command())[:COMMAND_CHARS],
            "since": time.time(),
        }
        _write_record(fd, record)
        yield path
    finally:
        # Unlinked while still locked, so no newcomer locks this file once it is nameless
        # (and `_open_locked` retries a newcomer that opened it before the unlink).
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def workdir_lock(workdir: str | Path, command: str | None = None) -> contextlib.AbstractContextManager[Path]:
    """The lock every run that writes `workdir` holds: the pipeline flow and each stage verb."""
    return hold(Path(workdir) / WORKDIR_LOCK, f"work dir {workdir}", command)


def output_lock(output: str | Path, command: str | None = None) -> contextlib.AbstractContextManager[Path]:
    """The lock a run writing the output file `output` holds (beside it: its parts may not exist yet)."""
    output = Path(output)
    return hold(output.with_name(output.name + OUTPUT_LOCK_SUFFIX), f"output {output}", command)


def refuse_if_held(workdir: str | Path) -> None:
    """Raise LockedError now if `workdir` is in use: a fast answer before slow start-up work, which
    then takes the lock itself (a run that starts in between is still refused there)."""
    with workdir_lock(workdir, "a check"):
        pass
