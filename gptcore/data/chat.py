"""Chat data for supervised fine-tuning: conversations from a file or the plays, and packing.

The chat template (the special tokens around each turn, loss on the assistant's tokens only)
is `gptcore.runtime.template`'s: serving formats a conversation with the same code.

Sources: a JSONL file of `{"prompt": ..., "response": ...}` or `{"messages": [{"role": ...,
"content": ...}, ...]}` records (roles system, user, assistant), or the built-in example from
the ingested plays: runs of consecutive speeches in a scene, each with its speaker's name, the
turns alternating user and assistant, so the model learns to answer with the scene so far in view.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptcore.config import SFTConfig
from gptcore.errors import InputError
from gptcore.metrics import IGNORE_INDEX
from gptcore.results import read_split
from gptcore.runtime.template import ROLES, Conversation, Rendered

# Speeches per built-in conversation, and the step between the first speeches of two of them:
# every other speech starts one, so each speech is answered with one and with three before it.
PLAY_TURNS, PLAY_STRIDE = 4, 2


# --- sources -----------------------------------------------------------------------------------


def parse_record(record: object, where: str) -> Conversation:
    """One JSONL record as a conversation; a clear error naming `where` when it is not one."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list) or not turns:
            raise InputError(f"{where}: 'messages' must be a non-empty list")
        conversation = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
                raise InputError(
                    f"{where}: messages[{i}] must be {{'role': 'system'|'user'|'assistant', 'content': str}}, "
                    f"got {json.dumps(turn)[:120]}"
                )
            if turn["role"] == "system" and i != 0:
                raise InputError(f"{where}: messages[{i}]: a system turn may only come first")
            conversation.append((turn["role"], turn["content"]))
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        conversation = [("user", record["prompt"]), ("assistant", record["response"])]
    else:
        raise InputError(f"{where}: needs 'messages', or 'prompt' and 'response' strings (keys: {sorted(record)})")
    if conversation[-1][0] != "assistant" or not conversation[-1][1].strip():
        raise InputError(f"{where}: must end with a non-empty assistant turn")
    return conversation


def read_chat_jsonl(path: str | Path) -> list[Conversation]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: chat data not found")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{line_no}: not JSON ({e.msg})") from None
            conversations.append(parse_record(record, f"{path}:{line_no}"))
    if not conversations:
        raise InputError(f"{path}: holds no conversations")
    return conversations


def split_of(conversation: Conversation, val_fraction: float, test_fraction: float) -> str:
    """A conversation's split from a hash of its text: stable whatever the file order."""
    digest = hashlib.blake2b(json.dumps(conversation).encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def conversations(cfg: SFTConfig, data_dir: str | Path, split: str) -> list[Conversation]:
    """A split's conversations: of the chat file (split by hash), or the built-in plays' dialogues."""
    if cfg.data is None:
        return play_dialogues(data_dir, split)
    chosen = [c for c in read_chat_jsonl(cfg.data) if split_of(c, cfg.val_fraction, cfg.test_fraction) == split]
    if not chosen:
        raise InputError(
            f"{cfg.data}: no conversation falls in the {split} split; add more or raise sft.{split}_fraction"
        )
    return chosen


def spread(items: list, n: int) -> list:
    """At most `n` items, evenly spread (not just the first ones)."""
    if len(items) <= n:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, num=n).astype(np.int64)]


SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def speeches(scene: str) -> Iterator[tuple[str, str]]:
    """(speaker, speech) in order from a scene in the plays' markdown; stage directions dropped."""
    speaker, lines = None, []
    for raw in scene.splitlines():
        line = raw.strip()
        if (match := SPEAKER.match(line)) is not None or (not line and lines):
            if speaker and lines:
                yield speaker, "\n".join(lines)
            speaker, lines = (match.group(1).strip(), []) if match else (None, [])
        elif speaker and line and not (line.startswith("_") and line.endswith("_")) and not line.startswith("#"):
            lines.append(line)
    if speaker and lines:
        yield speaker, "\n".join(lines)


def play_dialogues(data_dir: str | Path, split: str) -> list[Conversation]:
    """Conversations from the ingested plays: PLAY_TURNS consecutive speeches of a scene, named by
    their speakers, alternating user and assistant; a new one starts every PLAY_STRIDE speeches."""
    conversations = []
    for scene in read_split(data_dir, split, ["text"]).column("text").to_pylist():
        said: list[list[str]] = []  # [speaker, speech]: a character speaking twice in a row speaks once
        for speaker, speech in speeches(scene):
            if said and said[-1][0] == speaker:
                said[-1][1] += "\n" + speech
            else:
                said.append([speaker, speech])
        said = [f"{speaker}: {speech}" for speaker, speech in said]
        for start in range(0, len(said) - 1, PLAY_STRIDE):
            run = said[start : start + PLAY_TURNS]
            run = run[: len(run) // 2 * 2]  # end on an assistant turn
            conversations.append([("user" if i % 2 == 0 else "assistant", text) for i, text in enumerate(run)])
    if not conversations:
        raise InputError(
            f"{Path(data_dir) / (split + '.parquet')}: no dialogue found (speeches under **SPEAKER** "
            "lines, as in the built-in plays); give SFT a chat JSONL file instead (sft.data)"
        )
    return conversations


# --- packing -----------------------------------------------------------------------------------


@dataclass
class PackedRows:
    """Conversations packed into fixed rows of block_size + 1 tokens for next-token training."""

    ids: np.ndarray  # (N, block_size + 1) token ids
    loss: np.ndarray  # (N, block_size + 1) bool: a target that carries loss
    truncated: int  # conversations cut to fit a row

    def __len__(self) -> int:
        return len(self.ids)


def inputs_and_targets(ids: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, T + 1) ids and loss flags -> (N, T) inputs, (N, T) targets with IGNORE_INDEX where no loss falls."""
    return ids[:, :-1], np.where(loss[:, 1:], ids[:, 1:], IGNORE_INDEX)


def fit_row(r: Rendered, width: int) -> tuple[Rendered, bool]:
    """A rendering cut to `width` tokens from the left: the answer stays, the prompt's start goes."""
    if len(r.ids) <= width:
        return r, False
    return Rendered(r.ids[-width:], r.loss[-width:]), True


def pack(renderings: list[Rendered], block_size: int, pad_id: int) -> PackedRows:
    """Whole conversations, in order, into rows of block_size + 1 (padding, without loss, ends a
    row the next one does not fit). Packed neighbours can attend to each other, as in most SFT
    packers: the template tokens mark where each begins."""
    width = block_size + 1
    rows_ids, rows_loss, current_ids, current_loss, truncated = [], [], [], [], 0
    for r in renderings:
        r, cut = fit_row(r, width)
        truncated += cut
        if len(current_ids) + len(r.ids) > width:
            rows_ids.append(current_ids + [pad_id] * (width - len(current_ids)))
            rows_loss.append(current_loss + [False] * (width - len(current_loss)))
            current_ids, current_loss = [], []
        current_ids += r.ids
        current_loss += r.loss
    if current_ids:
        rows_ids.append(current_ids + [pad_id] * (width - len(current_ids)))
        rows_loss.append(current_loss + [False] * (width - len(current_loss)))
    return PackedRows(np.asarray(rows_ids, dtype=np.int64), np.asarray(rows_loss, dtype=bool), truncated)
