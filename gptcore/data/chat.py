"""Chat data for supervised fine-tuning: conversations, the chat template, packing.

A conversation is a list of (role, content) turns, role `user` or `assistant`. The template
wraps each turn in special tokens that SFT adds to the tokenizer:

    <|user|>To be, or not to be<|end|><|assistant|>HAMLET: that is the question<|end|>

Loss falls on the assistant's tokens and the `<|end|>` that closes them (so the model learns
to stop), never on the user's. Turn contents are encoded with special-token matching off:
text that spells `<|end|>` stays text and cannot forge a turn boundary.

Sources: a JSONL file of `{"prompt": ..., "response": ...}` or `{"messages": [{"role": ...,
"content": ...}, ...]}` records, or the built-in example from the ingested plays: each speech
as the prompt, the next character's reply, with the speaker's name, as the response.
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

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = [USER, ASSISTANT, END]
ROLES = {"user": USER, "assistant": ASSISTANT}

Conversation = list[tuple[str, str]]  # (role, content) turns


def add_chat_tokens(tok) -> dict[str, int]:
    """Add the template's special tokens to `tok` (a no-op when present); their ids by role.

    From then on `tok` encodes text that spells a special token as plain text: the template's
    tokens enter only by id, where `render` puts them. (The flag is not saved with the tokenizer.)
    """
    tok.add_special_tokens(CHAT_TOKENS)
    tok.encode_special_tokens = True
    return {t: tok.token_to_id(t) for t in CHAT_TOKENS}


@dataclass
class Rendered:
    ids: list[int]
    loss: list[bool]  # loss[i]: ids[i] is a target the model is trained to predict


def render(conversation: Conversation, tok, chat_ids: dict[str, int]) -> Rendered:
    """Token ids of a conversation in the chat template, and which of them carry loss."""
    contents = tok.encode_batch([content for _, content in conversation], add_special_tokens=False)
    ids, loss = [], []
    for (role, _), enc in zip(conversation, contents):
        trained = role == "assistant"
        ids += [chat_ids[ROLES[role]], *enc.ids, chat_ids[END]]
        loss += [False, *[trained] * len(enc.ids), trained]
    return Rendered(ids, loss)


def prompt_ids(conversation: Conversation, tok, chat_ids: dict[str, int]) -> list[int]:
    """The conversation up to its last assistant turn, then `<|assistant|>`: what generation starts from."""
    head = conversation[:-1] if conversation[-1][0] == "assistant" else conversation
    return [*render(head, tok, chat_ids).ids, chat_ids[ASSISTANT]]


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
                    f"{where}: messages[{i}] must be {{'role': 'user'|'assistant', 'content': str}}, "
                    f"got {json.dumps(turn)[:120]}"
                )
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
    """Speech -> reply pairs from the ingested plays: the reply, by another character, names its speaker."""
    conversations = []
    for scene in read_split(data_dir, split, ["text"]).column("text").to_pylist():
        previous = None
        for speaker, speech in speeches(scene):
            if previous is not None and previous[0] != speaker:
                conversations.append([("user", f"{previous[0]}: {previous[1]}"), ("assistant", f"{speaker}: {speech}")])
            previous = (speaker, speech)
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
