"""`gptcore chat`: a conversation with a chat model in the terminal, each answer streamed as it decodes.

Every line typed is a user turn; the answer is printed token by token and both join the history,
so the next answer sees the conversation (`OnnxChat` keeps the system turn and the newest turns
that fit the context). Lines starting with `/` are commands (`HELP`): /system, /reset, /help, /exit.
A turn the model refuses (too long for the context, say) prints the error and the session goes
on without it; Ctrl-C during an answer drops that answer.

When stdin is not a terminal it reads line by line, so it scripts
(`printf 'hi\\n/exit\\n' | gptcore chat --model DIR`): each line is echoed after the prompt marker
`>>> `, and its answer printed on the line after. The transcript goes to stdout; notices
(command acknowledgements, errors) go to stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from gptcore.errors import ConfigError, InputError
from gptcore.runtime.chat import OnnxChat
from gptcore.runtime.lm import OnnxLM, check_sampling

PROMPT_MARKER = ">>> "
HELP = """commands:
  /system TEXT   set the system turn (no TEXT: remove it)
  /reset         forget the conversation, keep the system turn
  /help          this list
  /exit          quit (so do Ctrl-D and Ctrl-C at the prompt)
any other line is your turn; Ctrl-C during an answer drops it"""


@dataclass
class Sampling:
    """How each answer is decoded (`OnnxChat.stream_chat`'s settings)."""

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    seed: int | None = None


class History:
    """The system turn and the user and assistant turns so far, as `OnnxChat` takes them."""

    def __init__(self, system: str | None = None):
        self.system, self.turns = system, []

    def messages(self, user: str) -> list[dict[str, Any]]:
        """The conversation with `user`'s new turn last."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.turns, {"role": "user", "content": user}]

    def add(self, user: str, answer: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    def reset(self) -> None:
        self.turns = []


def check_chat_model(model: Any, uri: str) -> OnnxChat:
    """`model` if it is a chat model; else an error saying which verb fits it."""
    if isinstance(model, OnnxChat):
        return model
    if isinstance(model, OnnxLM):
        raise InputError(
            f"{uri}: is a language model, not a chat model; `gptcore generate --model {uri} --prompt TEXT` "
            "continues text with it"
        )
    raise InputError(f"{uri}: is a {model.package.kind}; `gptcore chat` needs a chat model (kind 'chat')")


def check_settings(chat: OnnxChat, sampling: Sampling) -> None:
    """Refuse settings every turn would fail on before the session starts, naming the flag."""
    try:
        check_sampling(sampling.max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p)
    except ValueError as e:
        raise ConfigError(str(e).replace("max_new_tokens:", "--max-tokens:")) from None
    if sampling.max_new_tokens >= chat.block_size:
        raise ConfigError(
            f"--max-tokens: the answer must leave the model's context of {chat.block_size} tokens room for "
            f"the conversation: at most {chat.block_size - 1}, got {sampling.max_new_tokens}"
        )


class Session:
    """One terminal conversation: reads lines, runs the commands, streams the answers."""

    def __init__(
        self,
        chat: OnnxChat,
        sampling: Sampling,
        read_line: Callable[[], str | None],
        echo: bool,
        out: TextIO,
        err: TextIO,
        verbose: bool = False,
        system: str | None = None,
    ):
        self.chat, self.sampling, self.read_line = chat, sampling, read_line
        self.echo, self.out, self.err, self.verbose = echo, out, err, verbose
        self.history = History(system)

    def notice(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    def run(self) -> None:
        """Turns until /exit or the end of input."""
        while (line := self.read_line()) is not None:
            line = line.strip()
            if not line:
                continue
            if self.echo:  # piped: the transcript shows what was asked
                print(f"{PROMPT_MARKER}{line}", file=self.out, flush=True)
            if line.startswith("/"):
                if not self.command(line):
                    return
            else:
                self.answer(line)

    def command(self, line: str) -> bool:
        """Run a /command; False when it ends the session."""
        name, _, text = line.partition(" ")
        if name == "/exit":
            return False
        if name == "/reset":
            self.history.reset()
            self.notice("[history cleared" + (", system turn kept]" if self.history.system else "]"))
        elif name == "/system":
            self.history.system = text.strip() or None
            self.notice(f"[system turn: {self.history.system!r}]" if text.strip() else "[system turn removed]")
        elif name == "/help":
            self.notice(HELP)
        else:
            self.notice(f"error: unknown command {name}; /help lists them")
        return True

    def answer(self, user: str) -> None:
        """Stream the answer to `user`'s turn; on success both join the history."""
        messages, s = self.history.messages(user), self.sampling
        pieces = []
        try:
            if self.verbose:
                ids, dropped = self.chat.prompt(messages, s.max_new_tokens)
                self.notice(f"[prompt: {len(ids)} tokens, {dropped} oldest turns dropped: {ids}]")
            for piece in self.chat.stream_chat(messages, s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.seed):
                pieces.append(piece)
                print(piece, end="", file=self.out, flush=True)
        except ValueError as e:  # the turn does not fit the context, or the like: OnnxChat names the field
            self.notice(f"error: {e}")
            return
        except KeyboardInterrupt:
            print(file=self.out, flush=True)
            self.notice("[answer interrupted: dropped from the history]")
            return
        print(file=self.out, flush=True)
        self.history.add(user, "".join(pieces))


def terminal_reader(stdin: TextIO) -> tuple[Callable[[], str | None], bool]:
    """How to read the next line (None at the end of input) and whether to echo it.

    A terminal gets an `input()` prompt with line editing; anything else is read line by line.
    """
    if stdin.isatty():
        try:
            import readline  # noqa: F401  (input() gets line editing and history once it is imported)
        except ImportError:
            pass

        def read_line() -> str | None:
            try:
                return input(PROMPT_MARKER)
            except (EOFError, KeyboardInterrupt):
                print()
                return None

        return read_line, False

    def read_piped() -> str | None:
        line = stdin.readline()
        return line if line else None

    return read_piped, True


def chat_in_terminal(
    uri: str,
    sampling: Sampling,
    device: str = "auto",
    threads: int | None = None,
    variant: str = "auto",
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    system: str | None = None,
    verbose: bool = False,
) -> None:
    """Load the chat model behind `uri` (a package directory, models:/ or runs:/) and talk with it on stdin/stdout."""
    from gptcore.runtime import load_model

    model = load_model(
        uri, device=device, threads=threads, variant=variant, tracking_uri=tracking_uri, registry_uri=registry_uri
    )
    chat = check_chat_model(model, uri)
    check_settings(chat, sampling)
    read_line, echo = terminal_reader(sys.stdin)
    session = Session(chat, sampling, read_line, echo, sys.stdout, sys.stderr, verbose, system)
    if not echo:
        session.notice(
            f"gptcore chat: {uri} ({chat.variant}, context {chat.block_size} tokens); /help lists the commands, "
            "/exit or Ctrl-D quits"
        )
    session.run()
