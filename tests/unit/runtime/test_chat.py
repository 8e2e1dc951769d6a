"""The chat model over its ONNX package: it answers as SFT taught it, streams, stops, and keeps what fits."""

from __future__ import annotations

import pytest

from gptcore.errors import InputError
from gptcore.runtime import OnnxChat, load_model, load_package
from gptcore.runtime.stop import StopAt
from gptcore.runtime.template import END


@pytest.fixture(scope="module")
def bot(chat_package) -> OnnxChat:
    return load_model(chat_package.package_dir, device="cpu", threads=1)


def test_a_chat_package_describes_its_template_and_loads_as_a_chat_model(bot, chat_package):
    package = load_package(chat_package.package_dir)
    assert package.kind == "chat" and isinstance(bot, OnnxChat)
    assert package.meta["chat"]["tokens"][END] == bot.tokenizer.token_to_id(END)
    assert package.meta["parity"]["max_abs_logit_diff"] < 1e-3
    with pytest.raises(InputError, match="holds a chat, not a language model"):
        from gptcore.runtime import OnnxLM

        OnnxLM(package)


def test_the_chat_model_answers_as_trained_and_streams_the_same_text(bot):
    messages = [{"role": "user", "content": "wave salt ship sail tide gull"}]
    answer = bot.chat(messages, max_new_tokens=6, temperature=0)
    assert answer.startswith("sea")  # the learnt reply starts with the topic
    assert "".join(bot.stream_chat(messages, max_new_tokens=6, temperature=0)) == answer
    assert bot.chat(messages, max_new_tokens=6, temperature=0, stop=":") == "sea"


def test_history_beyond_the_context_keeps_the_newest_turns(bot):
    long = [{"role": "user", "content": "hill " * 40}, {"role": "assistant", "content": "land: hill hill"}]
    messages = [{"role": "system", "content": "be brief"}, *long * 3, {"role": "user", "content": "wave ship"}]
    ids, dropped = bot.prompt(messages, max_new_tokens=8)
    assert dropped > 0 and len(ids) <= bot.block_size - 8
    assert bot.chat(messages, max_new_tokens=8, temperature=0)  # still answers
    with pytest.raises(ValueError, match=r"messages\[1\]: the last user turn with the system turn takes"):
        bot.prompt([messages[0], {"role": "user", "content": "wave " * 100}], max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens: .* at most 31"):
        bot.prompt(messages, max_new_tokens=bot.block_size)


def test_stop_strings_split_over_pieces_are_held_back_and_cut():
    cut = StopAt(["<|end|>", "xyz"])
    shown = [cut.feed(p) for p in ["ab", "c<", "|e", "nd|> more"]]
    assert "".join(shown) == "abc" and cut.stopped and "<" not in "".join(shown)
    cut = StopAt(["xyz"])
    assert cut.feed("abx") == "ab" and cut.flush() == "x"  # generation ended: the held tail is text


def test_the_package_formats_conversations_for_transformers_as_gptcore_does(bot, chat_package):
    transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency only")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(chat_package.package_dir)
    messages = [
        {"role": "system", "content": "sea"},
        {"role": "user", "content": "wave"},
        {"role": "assistant", "content": "sea"},
        {"role": "user", "content": "ship"},
    ]
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert bot.prompt(messages, max_new_tokens=4) == (ids, 0)  # the whole conversation, nothing dropped
