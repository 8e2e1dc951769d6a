"""`gptcore chat` as a user scripts it: piped stdin, the answers of `OnnxChat` printed, the history kept."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gptcore.runtime import load_model
from gptcore.runtime.terminal import PROMPT_MARKER
from tests.conftest import SUBPROCESS_ENV

MAX_TOKENS = 6
PROMPT_LINE = re.compile(r"\[prompt: (\d+) tokens, (\d+) oldest turns dropped: (\[[\d, ]*\])\]")


def gptcore_chat(model: str | Path, stdin: str, cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    """`gptcore chat` on `model`, greedy and verbose unless `flags` say otherwise, with `stdin` piped in."""
    cmd = [sys.executable, "-m", "gptcore.cli", "chat", "--model", str(model), "--device", "cpu"]
    cmd += ["--temperature", "0", "--max-tokens", str(MAX_TOKENS), "--verbose", *flags]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=SUBPROCESS_ENV, cwd=cwd, timeout=120)


def transcript(stdout: str) -> list[tuple[str, str]]:
    """(line asked, answer) pairs of a piped session's stdout; a command's or a refused turn's answer is ''."""
    pairs: list[tuple[str, list[str]]] = []
    for line in stdout.splitlines():
        if line.startswith(PROMPT_MARKER):
            pairs.append((line[len(PROMPT_MARKER) :], []))
        else:
            pairs[-1][1].append(line)
    return [(asked, "\n".join(lines)) for asked, lines in pairs]


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def bot(chat_package):
    return load_model(chat_package.package_dir, device="cpu")


def test_a_piped_session_answers_as_onnx_chat_and_keeps_the_history(chat_package, bot, tmp_path):
    long_turn = " ".join(["wave salt ship"] * 20)  # alone longer than the context of 32 tokens
    script = [
        "wave salt ship",
        "again?",
        long_turn,
        "/system Speak of the sea",
        "hill field",
        "/reset",
        "barn wheat",
        "",
        "/bogus",
        "/help",
        "/exit",
        "never asked",
    ]
    done = gptcore_chat(chat_package.package_dir, "\n".join(script) + "\n", tmp_path)
    assert done.returncode == 0, done.stderr
    turns = transcript(done.stdout)
    assert [asked for asked, _ in turns] == [line for line in script[:-1] if line]  # nothing after /exit, no blanks
    answers = dict(turns)

    # each answer is OnnxChat's greedy answer to the conversation so far, and its prompt holds that conversation
    system = {"role": "system", "content": "Speak of the sea"}
    first = bot.chat([user("wave salt ship")], MAX_TOKENS, temperature=0)
    conversations = [
        [user("wave salt ship")],
        [user("wave salt ship"), assistant(first), user("again?")],
        # the too-long turn joined nothing; /system keeps the history and puts the system turn first
        [
            system,
            user("wave salt ship"),
            assistant(first),
            user("again?"),
            assistant(answers["again?"]),
            user("hill field"),
        ],
        [system, user("barn wheat")],  # /reset forgot the turns, kept the system turn
    ]
    prompts = PROMPT_LINE.findall(done.stderr)
    assert len(prompts) == len(conversations)  # the too-long turn was refused before it had a prompt
    for messages, (n_tokens, dropped, ids) in zip(conversations, prompts):
        expected_ids, expected_dropped = bot.prompt(messages, MAX_TOKENS)
        assert ast.literal_eval(ids) == expected_ids and int(n_tokens) == len(expected_ids)
        assert int(dropped) == expected_dropped
        assert answers[messages[-1]["content"]] == bot.chat(messages, MAX_TOKENS, temperature=0)
    assert answers["wave salt ship"] == first

    # the refused turn printed OnnxChat's error naming the field, and the session went on
    assert "error: messages[4]: the last user turn takes" in done.stderr and answers[long_turn] == ""
    assert "[system turn: 'Speak of the sea']" in done.stderr
    assert "[history cleared, system turn kept]" in done.stderr
    assert "error: unknown command /bogus; /help lists them" in done.stderr
    assert "/reset         forget the conversation" in done.stderr


def test_end_of_input_ends_the_session_and_sampling_follows_the_seed(chat_package, bot, tmp_path):
    sampled = gptcore_chat(chat_package.package_dir, "hill field\n", tmp_path, "--temperature", "1", "--seed", "7")
    assert sampled.returncode == 0, sampled.stderr
    expected = bot.chat([user("hill field")], MAX_TOKENS, temperature=1.0, top_k=50, seed=7)
    assert transcript(sampled.stdout) == [("hill field", expected)]


def test_refuses_what_is_not_a_chat_model_or_settings_no_turn_can_meet(chat_package, lm_package, tmp_path):
    lm = gptcore_chat(lm_package.package_dir, "hi\n", tmp_path)
    assert lm.returncode == 2 and "is a language model, not a chat model" in lm.stderr
    assert "`gptcore generate --model" in lm.stderr and "Traceback" not in lm.stderr
    too_long = gptcore_chat(chat_package.package_dir, "hi\n", tmp_path, "--max-tokens", "32")
    assert too_long.returncode == 2
    assert "--max-tokens: the answer must leave the model's context of 32 tokens" in too_long.stderr
    bad = gptcore_chat(chat_package.package_dir, "hi\n", tmp_path, "--top-p", "1.5")
    assert bad.returncode == 2 and "top_p: must be in (0, 1]" in bad.stderr
