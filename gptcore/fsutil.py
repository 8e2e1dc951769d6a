"""Files that are either fully written or not there: write to a temporary sibling, then rename.

Each temporary file is fsynced before its rename and the directory after it, so a power loss
leaves the old output or the new one, never an empty file under the final name. Temporary files
and directories get the permissions a plain open/mkdir would (the umask decides), not
mkstemp's 0600. A write that fails because the disk is full raises `DiskFullError`, naming the
output, and leaves the previous output in place.

Also the content digests that name what a stage read and wrote (lineage, registry tags).
Torch-free: the runtime uses it too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gptcore.errors import DiskFullError

log = logging.getLogger("gptcore")

# A write that failed with this little left on its filesystem failed for want of space, whatever
# the writer said (torch.save reports a full disk as "unexpected pos 576 vs 534").
FULL_BELOW_BYTES = 1 << 20
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_MESSAGES = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def _temporary_sibling(final: Path, make: Callable[[Path], None]) -> Path:
    """`make` a new file or directory beside `final`, under a name no other writer holds."""
    for _ in range(100):
        candidate = final.with_name(f".{final.name}.tmp-{secrets.token_hex(4)}")
        try:
            make(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(final))


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for open()


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            if not os.path.islink(path := os.path.join(directory, name)):  # a link's target is not ours to flush
                fsync_path(path)
        fsync_path(directory)


def _is_disk_full(exc: BaseException, directory: Path) -> bool:
    if isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS):
        return True
    if any(text in str(exc).lower() for text in _FULL_MESSAGES):
        return True
    if not isinstance(exc, OSError | RuntimeError):  # a writer's own bug, even on a nearly full disk
        return False
    try:
        usage = os.statvfs(directory)
    except OSError:
        return False
    return usage.f_bavail * usage.f_frsize < FULL_BELOW_BYTES


@contextlib.contextmanager
def _disk_full_named(final: Path, kept: str = "what was there is unchanged") -> Iterator[None]:
    """Re-raise a write that ran out of space as DiskFullError naming `final` (the outermost
    output, when one atomic write holds another)."""
    try:
        yield
    except Exception as e:
        if not _is_disk_full(e, final.parent):
            raise
        message = f"No space left on device: {final.name} not written, {kept}"
        raise DiskFullError(errno.ENOSPC, message, str(final)) from e


def _restore_set_aside(final: Path) -> None:
    """Put back a previous output that a process killed between atomic_dir's two renames left aside."""
    prefix = f".{final.name}.old-"
    for old in sorted(p for p in final.parent.iterdir() if p.name.startswith(prefix)):
        pid = old.name[len(prefix) :]
        if pid.isdigit() and _alive(int(pid)):
            continue  # that process is still replacing it: its second rename is next
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)  # a clean-up cut short after a complete swap
        else:
            os.replace(old, final)
            log.warning("%s: restored the previous output from %s (a process died while replacing it)", final, old)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces `final` only if the block succeeds.

    On error (in the block, or in the renames) the temporary directory is removed and an
    existing `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _restore_set_aside(final)
    tmp = _temporary_sibling(final, lambda p: p.mkdir(0o777))  # the umask applies, as for mkdir
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        with _disk_full_named(final):
            yield tmp
            _fsync_tree(tmp)
            _swap_in(tmp, final, old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _swap_in(tmp: Path, final: Path, old: Path) -> None:
    """Rename `tmp` onto `final` (a directory: os.replace cannot overwrite a non-empty one), the
    previous `final` set aside meanwhile and moved back if the second rename fails."""
    had_old = final.exists()
    if had_old:
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if had_old:
            os.replace(old, final)
        raise
    fsync_path(final.parent)


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same directory; it is renamed onto `final` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final, _create_file)
    try:
        with _disk_full_named(final):
            yield tmp
            fsync_path(tmp)
            os.replace(tmp, final)
            fsync_path(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def append_jsonl(path: str | Path, record: dict) -> None:
    """One JSON line, flushed to disk: a log that survives the process being killed."""
    path = Path(path)
    with _disk_full_named(path, "its earlier lines are unchanged"), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_jsonl(path: str | Path, keep) -> None:
    """Rewrite a JSON-lines file (atomically) with only the records `keep(record)` accepts."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a process killed mid-write
            continue
        if keep(record):
            kept.append(json.dumps(record) + "\n")
    with atomic_file(path) as tmp:
        tmp.write_text("".join(kept), encoding="utf-8")
