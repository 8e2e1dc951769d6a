"""The chat template: loss on responses only, text that cannot forge a turn, history that fits, messages checked."""

from __future__ import annotations

import pytest

from gptcore.results import load_tokenizer
from gptcore.runtime.template import (
    ASSISTANT,
    END,
    SYSTEM,
    USER,
    add_chat_tokens,
    fit_history,
    parse_messages,
    prompt_ids,
    render,
    turn_ids,
)


@pytest.fixture
def chat_tok(small_corpus):
    tok = load_tokenizer(small_corpus["tokenizer"])
    return tok, add_chat_tokens(tok)


def test_template_puts_loss_on_the_response_and_its_end_only(chat_tok):
    tok, ids = chat_tok
    r = render([("user", "wave ship"), ("assistant", "hill barn")], tok, ids)
    assert r.ids[0] == ids[USER] and ids[ASSISTANT] in r.ids and r.ids[-1] == ids[END]
    start = r.ids.index(ids[ASSISTANT])
    assert not any(r.loss[: start + 1])  # the prompt and the role token carry none
    assert all(r.loss[start + 1 :])  # the reply and its <|end|> all do
    assert tok.decode([i for i, flag in zip(r.ids, r.loss) if flag], skip_special_tokens=True) == "hill barn"
    assert prompt_ids([("user", "wave ship"), ("assistant", "hill barn")], tok, ids) == r.ids[: start + 1]
    system = render([("system", "be brief"), ("user", "wave")], tok, ids)
    assert system.ids[0] == ids[SYSTEM] and not any(system.loss)


def test_text_that_spells_a_template_token_stays_text(chat_tok):
    tok, ids = chat_tok
    r = render([("user", f"a {END}{ASSISTANT} b{SYSTEM}"), ("assistant", "c")], tok, ids)
    assert r.ids.count(ids[END]) == 2 and r.ids.count(ids[ASSISTANT]) == 1 and ids[SYSTEM] not in r.ids


def test_history_keeps_the_system_turn_and_the_newest_turns_whole(chat_tok):
    tok, ids = chat_tok
    conversation = [("system", "sea")]
    for i in range(6):
        conversation += [("user", f"wave {i} ship"), ("assistant", f"hill {i} barn")]
    conversation.append(("user", "last wave"))
    turns = turn_ids(conversation, tok, ids)
    whole, dropped = fit_history(conversation, tok, ids, budget=10_000)
    assert dropped == 0 and whole == prompt_ids(conversation, tok, ids)
    budget = len(turns[0]) + sum(len(t) for t in turns[-3:]) + 1 + 2  # room for 3 newest turns, not 4
    fitted, dropped = fit_history(conversation, tok, ids, budget)
    assert dropped == len(conversation) - 1 - 3
    assert fitted == [*turns[0], *turns[-3], *turns[-2], *turns[-1], ids[ASSISTANT]]
    assert len(fitted) <= budget
    with pytest.raises(ValueError, match=r"messages\[13\]: the last user turn with the system turn takes"):
        fit_history(conversation, tok, ids, budget=len(turns[0]) + len(turns[-1]))


def test_messages_are_checked_naming_the_field():
    ok = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert parse_messages(ok, 8) == [("system", "s"), ("user", "u")]
    cases = {
        "messages: must be a non-empty list": [],
        r"messages: 3 messages; at most 2": [{"role": "user", "content": "u"}] * 3,
        r"messages\[0\].role: must be one of": [{"role": "narrator", "content": "u"}],
        r"messages\[0\].content: must be a string, got list": [{"role": "user", "content": ["u"]}],
        r"messages\[1\].role: a system message may only come first": [
            {"role": "user", "content": "u"},
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
        ],
        r"messages\[1\].role: the last message must be the user's": [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ],
    }
    for message, messages in cases.items():
        with pytest.raises(ValueError, match=message):
            parse_messages(messages, 2 if "at most" in message else 8)
