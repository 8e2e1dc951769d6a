"""Resuming from what an earlier run left: training checkpoints and scoring parts.

`--resume` against checkpoints of other work, and against ones marked complete that do not
read back: one tiny pretraining (checkpoints at steps 10 and 20) is copied into each test, which
then resumes it with a changed setting, other tokens, or a damaged latest checkpoint. And an
interrupted scoring run whose kept parts are damaged before it resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from gptcore.config import FinetuneConfig, TokenizerConfig
from gptcore.errors import ConfigError, InputError
from gptcore.fsutil import sha256_file
from gptcore.runtime import score_file
from gptcore.runtime.batch import PART_RECORDS, parts_dir
from gptcore.train.checkpoint import complete_checkpoints, read_checkpoint
from gptcore.train.finetune import finetune
from gptcore.train.pretrain import pretrain
from tests.conftest import input_file, tiny_model, tiny_train
from tests.unit.runtime.test_batch import Interrupted, stop_after


@pytest.fixture(scope="module")
def base_run(small_corpus, tmp_path_factory):
    """(output dir, model config, train config) of a 20-step pretraining with checkpoints at 10 and 20."""
    model_cfg, train_cfg = tiny_model(), tiny_train()
    out = tmp_path_factory.mktemp("resume_base") / "pre"
    pretrain(model_cfg, train_cfg, small_corpus["tokenizer"], out)
    return out, model_cfg, train_cfg


@pytest.fixture
def run_copy(base_run, tmp_path):
    out, model_cfg, train_cfg = base_run
    copy = shutil.copytree(out, tmp_path / "pre")
    return copy, model_cfg, train_cfg


def digests(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_refuses_changed_training_settings_naming_each(run_copy, small_corpus):
    out, model_cfg, train_cfg = run_copy
    before = digests(out)
    changed = dataclasses.replace(train_cfg, lr=2e-3, batch_size=4)
    with pytest.raises(ConfigError) as caught:
        pretrain(model_cfg, changed, small_corpus["tokenizer"], out, resume=True)
    message = str(caught.value)
    assert "step_000020" in message
    assert "pretrain.lr: checkpoint has 0.003, config has 0.002" in message
    assert "pretrain.batch_size: checkpoint has 8, config has 4" in message
    assert "max_steps" not in message and "tokens_digest" not in message
    assert digests(out) == before  # refused before anything was written


def test_resume_refuses_other_tokens_naming_the_digest(run_copy, small_corpus, tmp_path):
    from gptcore.data.tokenizer import train_tokenizer

    out, model_cfg, train_cfg = run_copy
    other = tmp_path / "other_tokens"  # the same corpus, BPE trained on a smaller sample: other merges
    train_tokenizer(TokenizerConfig(vocab_size=300, min_frequency=1, sample_bytes=20_000), small_corpus["data"], other)
    with pytest.raises(InputError) as caught:
        pretrain(model_cfg, train_cfg, other, out, resume=True)
    message = str(caught.value)
    assert "tokens_digest: checkpoint has '" in message and "tokenizer_digest: checkpoint has '" in message
    assert "model.vocab_size" not in message  # same vocabulary size: only the digests tell
    assert "pretrain." not in message


def test_resume_allows_the_stopping_evaluation_and_logging_settings_to_change(run_copy, small_corpus, caplog):
    out, model_cfg, train_cfg = run_copy
    longer = dataclasses.replace(train_cfg, max_steps=30, eval_interval=5, log_interval=2, keep_checkpoints=3)
    with caplog.at_level(logging.INFO, logger="gptcore"):
        result = pretrain(model_cfg, longer, small_corpus["tokenizer"], out, resume=True)
    assert "resumed from" in caplog.text and "step_000020 (step 20)" in caplog.text
    assert result.steps == 30
    assert [p.name for p in complete_checkpoints(out / "checkpoints")][-1] == "step_000030"


def test_finetune_resume_names_its_own_section(trained, tmp_path):
    out = shutil.copytree(trained["ft"], tmp_path / "ft")
    cfg = FinetuneConfig(
        label_field="label",
        passage_tokens=16,  # the fixture's run used 24
        max_steps=80,
        batch_size=16,
        warmup_steps=5,
        eval_interval=40,
        checkpoint_interval=80,
        device="cpu",
    )
    with pytest.raises(ConfigError, match=r"finetune\.passage_tokens: checkpoint has 24, config has 16") as caught:
        finetune(cfg, trained["pre"], trained["data"], trained["tokenizer"], out, resume=True)
    assert "passage_tokens: checkpoint has 24, this run has 16" in str(caught.value)  # model.json's record too


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated weights": lambda ckpt: truncate(ckpt / "model.safetensors"),
    "truncated state": lambda ckpt: truncate(ckpt / "state.pt"),
    "corrupt model.json": lambda ckpt: (ckpt / "model.json").write_text('{"kind": "lm", "model": {'),
    "missing weights": lambda ckpt: (ckpt / "model.safetensors").unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(run_copy, small_corpus, caplog, damage):
    out, model_cfg, train_cfg = run_copy
    ckpts = out / "checkpoints"
    DAMAGE[damage](ckpts / "step_000020")  # still marked COMPLETE
    with caplog.at_level(logging.INFO, logger="gptcore"):
        result = pretrain(model_cfg, train_cfg, small_corpus["tokenizer"], out, resume=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step_000020 is marked complete but unreadable" in w for w in warnings), warnings
    assert "step_000010 (step 10)" in caplog.text  # resumed from the one before
    assert result.steps == 20
    weights, state = read_checkpoint(ckpts / "step_000020")  # written again, whole
    assert state["step"] == 20 and weights


def test_no_readable_checkpoint_is_an_error_naming_them(run_copy, small_corpus):
    out, model_cfg, train_cfg = run_copy
    for step in ("step_000010", "step_000020"):
        truncate(out / "checkpoints" / step / "model.safetensors")
    with pytest.raises(InputError, match=r"none of the complete checkpoints \(step_000010, step_000020\) is readable"):
        pretrain(model_cfg, train_cfg, small_corpus["tokenizer"], out, resume=True)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


PART_DAMAGE = {
    "truncated": lambda parts: truncate(parts / "part-00001.parquet"),
    "a flipped byte": lambda parts: flip_a_byte(parts / "part-00001.parquet"),
    # a valid part of as many rows, but another chunk's: only the checksum tells
    "replaced by another part": lambda parts: shutil.copy(parts / "part-00000.parquet", parts / "part-00001.parquet"),
    "its record lost": lambda parts: (parts / PART_RECORDS).write_text(
        "".join(line + "\n" for line in (parts / PART_RECORDS).read_text().splitlines() if '"part": 1,' not in line)
    ),
}


@pytest.mark.parametrize("damage", sorted(PART_DAMAGE))
def test_a_damaged_kept_part_is_scored_again(onnx_classifier, tmp_path, caplog, damage):
    src = input_file(tmp_path, ".parquet")
    whole = pq.read_table(score_file(onnx_classifier, src, tmp_path / "whole.parquet", chunk_rows=8).output_path)
    out = tmp_path / "out.parquet"
    with pytest.raises(Interrupted):
        score_file(onnx_classifier, src, out, chunk_rows=8, on_chunk=stop_after(2))
    PART_DAMAGE[damage](parts_dir(out))

    scored_now = []
    with caplog.at_level(logging.WARNING, logger="gptcore"):
        result = score_file(onnx_classifier, src, out, chunk_rows=8, on_chunk=scored_now.append)
    assert scored_now == [1, 3, 4, 5] and result.chunks_skipped == 2  # parts 0 and 2 were sound
    assert "part-00001.parquet" in caplog.text and "scoring chunk 1 again" in caplog.text
    assert pq.read_table(out).equals(whole)
