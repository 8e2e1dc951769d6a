"""A full disk for real: a small tmpfs mount that fills during a checkpoint and during scoring.

Each case writes onto its own tmpfs, filled with a filler file to just the point where the write
under test runs out of space; then it checks the error names the output and says why, that the
previous outputs read back unchanged, and that the run completes once space is back (the
filler deleted, or the mount grown). Mounting needs root: as another user each test runs again
as root of a user and mount namespace (`unshare -rm`), and is skipped, saying why, where
neither is possible.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gptcore.errors import DiskFullError
from gptcore.fsutil import sha256_file
from gptcore.runtime import score_file
from gptcore.runtime.batch import parts_dir
from gptcore.train.checkpoint import complete_checkpoints, read_checkpoint
from gptcore.train.pretrain import pretrain
from gptcore.weights import load_lm
from tests.conftest import REPO, SUBPROCESS_ENV, input_file, tiny_model, tiny_train
from tests.unit.runtime.test_batch import Interrupted, stop_after

pytestmark = pytest.mark.slow  # mounts, and as another user starts pytest again in a namespace

IN_NAMESPACE = "GPTCORE_TEST_IN_NAMESPACE"
PAGE = 4096  # tmpfs counts whole pages


class SmallDisk:
    """A tmpfs mounted at `path`, with a filler file to take its space away and give it back."""

    def __init__(self, path: Path, size: int):
        self.path, self.filler = path, path / "filler"
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)

    def free(self) -> int:
        usage = os.statvfs(self.path)
        return usage.f_bavail * usage.f_frsize

    def leave_free(self, free: int) -> None:
        """Fill the disk until `free` bytes (rounded down to pages) are left."""
        free = free // PAGE * PAGE
        self.filler.unlink(missing_ok=True)
        with open(self.filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, max(PAGE, self.free() - free))
        assert self.free() <= free

    def empty_filler(self) -> None:
        self.filler.unlink()

    def grow(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        gc.collect()  # a caught error's traceback holds the failed writer's open file until collected
        subprocess.run(["umount", str(self.path)], check=True)


def cannot_mount_here() -> str:
    """Why no tmpfs can be mounted in this process ('' when it can)."""
    if os.geteuid() != 0:
        return f"not root (uid {os.geteuid()})"
    return ""


@pytest.fixture
def small_disk(request, tmp_path):
    """A 16 MiB tmpfs (None when the test was run again, and passed, inside `unshare -rm`)."""
    if not cannot_mount_here():
        disk = SmallDisk(tmp_path / "disk", 16 << 20)
        yield disk
        disk.unmount()
        return
    if os.environ.get(IN_NAMESPACE):
        pytest.skip(f"cannot mount a tmpfs even inside the namespace: {cannot_mount_here()}")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{cannot_mount_here()}, and no user namespace (unshare -rm: {probe.stderr.strip()})")
    proc = subprocess.run(
        [
            *("unshare", "-rm", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
            *("--basetemp", str(tmp_path / "namespace"), request.node.nodeid),
        ],
        env={**SUBPROCESS_ENV, IN_NAMESPACE: "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"run again inside `unshare -rm`, it failed:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}")
    yield None


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def disk_bytes(directory: Path) -> int:
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in directory.rglob("*") if p.is_file())


MODEL, TRAIN = tiny_model(), tiny_train()


@pytest.fixture(scope="module")
def straight_run(small_corpus, tmp_path_factory) -> Path:
    """The 20-step pretraining never interrupted: checkpoints at steps 10 and 20."""
    out = tmp_path_factory.mktemp("straight") / "pre"
    pretrain(MODEL, TRAIN, small_corpus["tokenizer"], out)
    return out


def test_a_checkpoint_that_fills_the_disk_fails_clearly_and_keeps_the_previous_outputs(
    small_disk, straight_run, small_corpus
):
    if small_disk is None:
        return  # passed, run again as root of a user namespace
    out = small_disk.path / "pre"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight_run / "checkpoints" / "step_000010", out / "checkpoints" / "step_000010")
    shutil.copytree(straight_run / "best", out / "best")
    step10 = out / "checkpoints" / "step_000010"
    # Room for best/ written again beside the old one and half a checkpoint's state, not all of it.
    best_bytes, state_bytes = disk_bytes(out / "best"), disk_bytes(step10) - disk_bytes(out / "best")
    small_disk.leave_free(best_bytes + state_bytes // 2)
    kept = digests(step10)

    with pytest.raises(DiskFullError) as caught:
        pretrain(MODEL, TRAIN, small_corpus["tokenizer"], out, resume=True)
    error = caught.value
    assert isinstance(error, OSError) and "No space left on device" in str(error)
    assert error.filename == str(out / "checkpoints" / "step_000020")  # the checkpoint, by its final name
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step_000010"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000010"]  # no half-written one
    assert digests(step10) == kept and read_checkpoint(step10)[1]["step"] == 10
    load_lm(out / "best")  # whole, whether the run's last evaluation replaced it or not

    small_disk.empty_filler()
    result = pretrain(MODEL, TRAIN, small_corpus["tokenizer"], out, resume=True)
    assert result.steps == 20
    resumed, _ = read_checkpoint(out / "checkpoints" / "step_000020")
    straight, _ = read_checkpoint(straight_run / "checkpoints" / "step_000020")
    assert resumed.keys() == straight.keys() and all((resumed[k] == straight[k]).all() for k in straight)


@pytest.mark.parametrize("fills", ["writing a part", "assembling the output"])
def test_scoring_that_fills_the_disk_fails_clearly_and_keeps_the_previous_output(
    small_disk, onnx_classifier, tmp_path, fills
):
    if small_disk is None:
        return  # passed, run again as root of a user namespace
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first, second = input_file(tmp_path / "a", ".jsonl", n=45), input_file(tmp_path / "b", ".parquet", n=60)
    out = small_disk.path / "scores.parquet"
    score_file(onnx_classifier, first, out, chunk_rows=8)
    previous = pq.read_table(out)
    expected = pq.read_table(score_file(onnx_classifier, second, tmp_path / "fresh.parquet", chunk_rows=8).output_path)

    # The next run over `second` scores chunks 0 and 1, is stopped, then resumes on a full disk.
    with pytest.raises(Interrupted):
        last = 1 if fills == "writing a part" else 7
        score_file(onnx_classifier, second, out, chunk_rows=8, on_chunk=stop_after(last))
    kept = digests(parts_dir(out))
    small_disk.leave_free(0)  # the run writes nothing before its part 2, or before the output when all are kept

    with pytest.raises(DiskFullError) as caught:
        score_file(onnx_classifier, second, out, chunk_rows=8)
    error = caught.value
    assert isinstance(error, OSError) and "No space left on device" in str(error)
    named = parts_dir(out) / "part-00002.parquet" if fills == "writing a part" else out
    assert error.filename == str(named)
    assert pq.read_table(out).equals(previous)  # the previous output, untouched
    assert {k: v for k, v in digests(parts_dir(out)).items() if k in kept} == kept  # parts scored before, too
    assert not list(small_disk.path.rglob(".*")), "temporary files left behind"

    small_disk.grow(32 << 20)  # space back, the filler still there
    result = score_file(onnx_classifier, second, out, chunk_rows=8)
    assert result.chunks_skipped == (2 if fills == "writing a part" else 8)
    assert pq.read_table(out).equals(expected)
    assert not parts_dir(out).exists()
