"""Atomic writes (`gptcore.fsutil`): durable, all or nothing, the umask's permissions, a full disk named."""

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import gptcore.fsutil as fsutil
from gptcore.errors import DiskFullError, GptcoreError
from gptcore.fsutil import append_jsonl, atomic_dir, atomic_file, read_json, write_json


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_new_files_and_directories_get_the_umasks_mode(tmp_path, umask_027):
    write_json(tmp_path / "a.json", {"x": 1})
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "inner").mkdir()
        with atomic_file(tmp / "inner" / "w.bin") as f:
            f.write_bytes(b"w")
    assert mode(tmp_path / "a.json") == 0o640  # not mkstemp's 0600
    assert mode(tmp_path / "d") == 0o750  # not mkdtemp's 0700
    assert mode(tmp_path / "d" / "inner" / "w.bin") == 0o640
    os.umask(0o002)
    write_json(tmp_path / "b.json", {})
    assert mode(tmp_path / "b.json") == 0o664


def record_fsyncs_and_renames(monkeypatch) -> list[tuple[str, str]]:
    """('fsync', path) and ('replace', src) events in order, the real calls still made."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    monkeypatch.setattr(fsutil.os, "replace", replace)
    return events


def test_atomic_file_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = record_fsyncs_and_renames(monkeypatch)
    write_json(tmp_path / "out.json", {"x": 1})
    (kind0, tmp), (kind1, renamed), (kind2, directory) = events
    assert (kind0, kind1, kind2) == ("fsync", "replace", "fsync")
    assert tmp == renamed and Path(tmp).name.startswith(".out.json.tmp-")
    assert directory == str(tmp_path)
    assert read_json(tmp_path / "out.json") == {"x": 1}


def test_atomic_dir_fsyncs_every_file_and_directory_before_the_rename(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old.txt").write_text("old")
    events = record_fsyncs_and_renames(monkeypatch)
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "a.txt").write_text("a")
        (tmp / "sub" / "b.txt").write_text("b")
    first_replace = next(i for i, (kind, _) in enumerate(events) if kind == "replace")
    synced_before = {Path(p).relative_to(tmp).as_posix() for kind, p in events[:first_replace] if kind == "fsync"}
    assert synced_before == {".", "a.txt", "sub", "sub/b.txt"}
    assert events[-1] == ("fsync", str(tmp_path))  # the renames themselves made durable
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a.txt", "sub"]


def failing_replace_onto(final: Path, monkeypatch):
    """os.replace fails (EIO) when it would put a new output in place at `final`."""
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == final and ".tmp-" in Path(src).name:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)


def test_a_failed_final_rename_keeps_the_previous_directory(tmp_path, monkeypatch):
    final = tmp_path / "best"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("old")
    failing_replace_onto(final, monkeypatch)
    with pytest.raises(OSError, match="Input/output error"), atomic_dir(final) as tmp:
        (tmp / "weights").write_text("new")
    assert (final / "weights").read_text() == "old"  # moved aside for the swap, then moved back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporary or set-aside left


def test_a_failed_final_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    final = tmp_path / "out.json"
    write_json(final, {"v": "old"})
    failing_replace_onto(final, monkeypatch)
    with pytest.raises(OSError, match="Input/output error"):
        write_json(final, {"v": "new"})
    assert read_json(final) == {"v": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_previous_output_left_aside_by_a_killed_swap_is_put_back(tmp_path):
    final = tmp_path / "best"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".best.old-{int(dead.stdout)}"  # killed between the two renames: no `best` now
    aside.mkdir()
    (aside / "weights").write_text("previous")
    with pytest.raises(RuntimeError), atomic_dir(final):
        raise RuntimeError("the new write fails too")
    assert (final / "weights").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_write_that_runs_out_of_space_names_the_output(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        (tmp / "w").write_text("old")

    with pytest.raises(DiskFullError) as caught, atomic_dir(final) as tmp:
        write_json(tmp / "model.json", {})  # an inner atomic write: the outer output is the one named
        raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(caught.value, GptcoreError) and caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(final) and "No space left on device" in str(caught.value)
    assert (final / "w").read_text() == "old"

    # Libraries that do not raise OSError: safetensors says "os error 28" in its message.
    with pytest.raises(DiskFullError, match="out.json"), atomic_file(tmp_path / "out.json"):
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(ValueError, match="a bug"), atomic_file(tmp_path / "out.json"):
        raise ValueError("a bug, with the disk far from full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_appending_to_a_full_disk_names_the_log(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    append_jsonl(log, {"step": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", full)
    with pytest.raises(DiskFullError, match="metrics.jsonl"):
        append_jsonl(log, {"step": 2})
    assert log.read_text().splitlines()[0] == '{"step": 1}'
