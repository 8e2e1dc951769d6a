"""The locks on a work directory or an output (`gptcore.locks`), in one process: flock treats each
open of the file on its own, so a second taker here is refused as one in another process is
(tests/faults/test_concurrency.py takes them across real processes)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket

import pytest

from gptcore.errors import GptcoreError
from gptcore.locks import LockedError, hold, output_lock, workdir_lock


def test_the_holder_is_on_record_while_it_holds_and_the_file_goes_with_it(tmp_path):
    with workdir_lock(tmp_path / "w", "gptcore ingest") as path:
        assert path == tmp_path / "w" / ".gptcore.lock"
        record = json.loads(path.read_text())
        assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
        assert record["command"] == "gptcore ingest"
    assert not path.exists()


def test_a_second_taker_is_refused_naming_the_lock_the_holder_and_since_when(tmp_path):
    with workdir_lock(tmp_path, "gptcore pipeline") as path:
        with pytest.raises(LockedError) as refused, workdir_lock(tmp_path, "gptcore pretrain"):
            pytest.fail("a second holder got in")
        assert json.loads(path.read_text())["command"] == "gptcore pipeline"  # the holder's record stands
    message = str(refused.value)
    assert isinstance(refused.value, GptcoreError)  # the CLI prints it as one line
    assert message.startswith(f"work dir {tmp_path} is in use by `gptcore pipeline` pid {os.getpid()} on host ")
    assert f"(lock file {path})" in message and " since 20" in message


def test_an_output_lock_sits_beside_the_output_and_names_it(tmp_path):
    out = tmp_path / "scores" / "hourly.parquet"
    with output_lock(out, "scoring of a.jsonl") as path:
        assert path == tmp_path / "scores" / "hourly.parquet.lock"
        refused = rf"^output {re.escape(str(out))} is in use by `scoring of a\.jsonl` pid {os.getpid()} "
        with pytest.raises(LockedError, match=refused), output_lock(out):
            pass
        with workdir_lock(tmp_path / "scores"):  # another lock: no conflict
            pass


def test_a_lock_left_by_a_dead_holder_is_taken_over_and_its_record_rewritten(tmp_path, caplog):
    path = tmp_path / "x.lock"
    # what a SIGKILLed holder leaves: its record, and no flock (the kernel dropped it with the process)
    path.write_text(json.dumps({"pid": 999999, "host": "elsewhere", "command": "gptcore sft", "since": 0}))
    with caplog.at_level(logging.WARNING, logger="gptcore"), hold(path, "thing", "me"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "taken over from `gptcore sft` pid 999999 on host elsewhere" in caplog.text


def test_the_lock_is_released_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), workdir_lock(tmp_path):
        raise RuntimeError("boom")
    with workdir_lock(tmp_path):
        pass


def test_a_holder_whose_record_is_not_written_yet_is_still_refused(tmp_path):
    path = tmp_path / "x.lock"
    with hold(path, "thing"):
        path.write_text("")  # as between the holder's flock and its record's write
        unknown = r"thing is in use by another process \(its record is not written yet\)"
        with pytest.raises(LockedError, match=unknown), hold(path, "thing"):
            pass
