"""The chat template: how a conversation becomes token ids, for training and for serving alike.

A conversation is a list of (role, content) turns, role `system`, `user` or `assistant`. Each
turn is wrapped in special tokens that chat SFT adds to the tokenizer:

    <|system|>Speak as Hamlet<|end|><|user|>To be, or not to be<|end|><|assistant|>that is the question<|end|>

Contents are encoded with special-token matching off: text that spells `<|end|>` stays text and
cannot forge a turn boundary (the template's tokens enter only by id). A generation prompt ends
with `<|assistant|>`; the model's `<|end|>` closes its answer. `HF_CHAT_TEMPLATE` writes the same
text as a Jinja template for `transformers`' `apply_chat_template`, so an app that formats with
the Hugging Face tokenizer gets the same ids (for contents that spell no template token).

History that does not fit the context (`fit_history`): the system turn stays, the newest turns
stay whole, the oldest go; a last user turn that alone does not fit is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = [SYSTEM, USER, ASSISTANT, END]
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

Conversation = list[tuple[str, str]]  # (role, content) turns

# The same text as `render` produces, for transformers' tokenizer.apply_chat_template.
HF_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role ' + message['role'] + ': system, user or assistant') }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>' }}{%- endif -%}"
)


def add_chat_tokens(tok) -> dict[str, int]:
    """Add the template's special tokens to `tok` (a no-op when present); their ids by token.

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


def turn_ids(conversation: Conversation, tok, chat_ids: dict[str, int]) -> list[list[int]]:
    """Each turn's ids: its role token, its content, `<|end|>`."""
    contents = tok.encode_batch([content for _, content in conversation], add_special_tokens=False)
    return [[chat_ids[ROLES[role]], *enc.ids, chat_ids[END]] for (role, _), enc in zip(conversation, contents)]


def render(conversation: Conversation, tok, chat_ids: dict[str, int]) -> Rendered:
    """Token ids of a conversation in the chat template, and which of them carry loss: the
    assistant's content and the `<|end|>` that closes it (so the model learns to stop)."""
    ids, loss = [], []
    for (role, _), turn in zip(conversation, turn_ids(conversation, tok, chat_ids)):
        trained = role == "assistant"
        ids += turn
        loss += [False, *[trained] * (len(turn) - 1)]
    return Rendered(ids, loss)


def prompt_ids(conversation: Conversation, tok, chat_ids: dict[str, int]) -> list[int]:
    """The conversation up to its last assistant turn, then `<|assistant|>`: what generation starts from."""
    head = conversation[:-1] if conversation[-1][0] == "assistant" else conversation
    return [*render(head, tok, chat_ids).ids, chat_ids[ASSISTANT]]


def fit_history(conversation: Conversation, tok, chat_ids: dict[str, int], budget: int) -> tuple[list[int], int]:
    """The generation prompt of a conversation ending in a user turn, in at most `budget` tokens.

    Keeps a leading system turn and the newest turns whole, dropping the oldest; returns the ids
    and how many turns were dropped. ValueError when the system turn and the last user turn alone
    do not fit.
    """
    turns = turn_ids(conversation, tok, chat_ids)
    system = turns[0] if conversation[0][0] == "system" else []
    rest = turns[1:] if system else turns
    used = len(system) + len(rest[-1]) + 1  # + <|assistant|>
    if used > budget:
        raise ValueError(
            f"messages[{len(conversation) - 1}]: the last user turn{' with the system turn' if system else ''} "
            f"takes {used - 1} tokens; the context leaves room for at most {budget - 1} before the answer"
        )
    kept = [rest[-1]]
    for turn in reversed(rest[:-1]):
        if used + len(turn) > budget:
            break
        used += len(turn)
        kept.insert(0, turn)
    ids = [*system, *(t for turn in kept for t in turn), chat_ids[ASSISTANT]]
    return ids, len(rest) - len(kept)


def parse_messages(messages: Any, max_messages: int, field: str = "messages") -> Conversation:
    """OpenAI-style `[{"role", "content"}, ...]` as a conversation to answer; ValueError naming the field.

    The last message is the user's; a system message may only come first.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError(f"{field}: must be a non-empty list of messages")
    if len(messages) > max_messages:
        raise ValueError(f"{field}: {len(messages)} messages; at most {max_messages}")
    conversation = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"{where}.content: must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"{where}.role: a system message may only come first")
        conversation.append((role, content))
    if conversation[-1][0] != "user":
        raise ValueError(f"{field}[{len(messages) - 1}].role: the last message must be the user's")
    return conversation
