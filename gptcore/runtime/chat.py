"""A chat model over its ONNX package: conversations in, answers out, formatted as SFT trained it.

A chat package is an LM package (the same graph, KV cache and variants) whose description adds
the chat template's token ids (`gptcore.runtime.template`). `chat` takes OpenAI-style messages
(system, user and assistant turns, the last the user's), keeps what fits the context with room
for the answer (the system turn and the newest turns; the oldest go), and decodes until the
model's `<|end|>`, a stop string, or max_new_tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gptcore.runtime.lm import OnnxLM, check_sampling
from gptcore.runtime.package import ModelPackage
from gptcore.runtime.session import SessionOptions
from gptcore.runtime.stop import check_stops, decoded_text
from gptcore.runtime.template import END, fit_history, parse_messages

MAX_MESSAGES = 256


class OnnxChat(OnnxLM):
    KIND, WHAT = "chat", "chat model"

    def __init__(self, package: ModelPackage, options: SessionOptions | None = None, variant: str = "auto"):
        super().__init__(package, options, variant)
        from tokenizers import Tokenizer

        self.chat_ids: dict[str, int] = package.meta["chat"]["tokens"]
        self.end_id = self.chat_ids[END]
        self.stop_ids = {self.eos_id, self.end_id}
        # Contents are text: a copy of the tokenizer that never reads a template token in them.
        self.content_tokenizer = Tokenizer.from_str(self.tokenizer.to_str())
        self.content_tokenizer.encode_special_tokens = True

    def prompt(self, messages: list[dict[str, Any]], max_new_tokens: int) -> tuple[list[int], int]:
        """The generation prompt of `messages` with room for max_new_tokens, and how many turns were dropped."""
        conversation = parse_messages(messages, MAX_MESSAGES)
        if not 1 <= max_new_tokens < self.block_size:
            raise ValueError(
                f"max_new_tokens: the answer must leave the context of {self.block_size} tokens room for "
                f"the question: at most {self.block_size - 1}, got {max_new_tokens}"
            )
        return fit_history(conversation, self.content_tokenizer, self.chat_ids, self.block_size - max_new_tokens)

    def stream_chat(
        self,
        messages: list[dict[str, Any]],
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> Iterator[str]:
        """The answer to `messages` as text pieces while it is decoded; the pieces join to `chat`'s answer."""
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        stops = check_stops(stop)
        ids, _ = self.prompt(messages, max_new_tokens)
        return decoded_text(self, ids, max_new_tokens, temperature, top_k, top_p, seed, stops)

    def chat(
        self,
        messages: list[dict[str, Any]],
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> str:
        """The assistant's answer to `messages` (OpenAI-style: role system, user or assistant; content text)."""
        return "".join(self.stream_chat(messages, max_new_tokens, temperature, top_k, top_p, seed, stop))
