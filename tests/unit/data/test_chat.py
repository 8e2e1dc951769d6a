"""Chat data: the template, loss only on responses, safe contents, sources with clear errors, packing."""

from __future__ import annotations

import json

import pytest

from gptcore.data.chat import pack, parse_record, play_dialogues, read_chat_jsonl, speeches, split_of
from gptcore.errors import InputError
from gptcore.results import load_tokenizer
from gptcore.runtime.template import ASSISTANT, END, add_chat_tokens, render

SCENE = """### SCENE I. A platform.

_Enter BERNARDO and FRANCISCO_

**BERNARDO**  
Who's there?

**FRANCISCO**  
Nay, answer me: stand,  
and unfold yourself.

_Exit_

**BERNARDO**  
Long live the king!

**BERNARDO**  
He.
"""


@pytest.fixture
def chat_tok(small_corpus):
    tok = load_tokenizer(small_corpus["tokenizer"])
    return tok, add_chat_tokens(tok)


def test_records_in_both_shapes_and_clear_errors(tmp_path):
    assert parse_record({"prompt": "p", "response": "r"}, "x") == [("user", "p"), ("assistant", "r")]
    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    assert len(parse_record({"messages": turns}, "x")) == 4
    system = [{"role": "system", "content": "be brief"}, *turns]
    assert parse_record({"messages": system}, "x")[0] == ("system", "be brief")
    with pytest.raises(InputError, match=r"x: messages\[0\] must be"):
        parse_record({"messages": [{"role": "narrator", "content": "a"}, *turns]}, "x")
    path = tmp_path / "chat.jsonl"
    path.write_text(
        json.dumps({"prompt": "p", "response": "r"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}]})
        + "\n"
    )
    with pytest.raises(InputError, match=r"chat.jsonl:2: messages\[1\]: a system turn may only come first"):
        read_chat_jsonl(path)
    path.write_text("{not json\n")
    with pytest.raises(InputError, match=r"chat.jsonl:1: not JSON"):
        read_chat_jsonl(path)
    with pytest.raises(InputError, match="must end with a non-empty assistant turn"):
        parse_record({"messages": [{"role": "user", "content": "a"}]}, "x")


def test_split_depends_on_the_conversation_alone():
    conversations = [[("user", f"q{i}"), ("assistant", f"a{i}")] for i in range(2000)]
    splits = [split_of(c, 0.1, 0.1) for c in conversations]
    assert splits == [split_of(c, 0.1, 0.1) for c in reversed(conversations)][::-1]
    assert 0.07 < splits.count("test") / 2000 < 0.13 and 0.07 < splits.count("val") / 2000 < 0.13


def test_speeches_of_a_scene_and_multi_turn_conversations(tmp_path):
    assert list(speeches(SCENE)) == [
        ("BERNARDO", "Who's there?"),
        ("FRANCISCO", "Nay, answer me: stand,\nand unfold yourself."),
        ("BERNARDO", "Long live the king!"),
        ("BERNARDO", "He."),
    ]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [SCENE]}), tmp_path / "train.parquet")
    conversations = play_dialogues(tmp_path, "train")
    # A character speaking twice in a row speaks once; turns alternate user and assistant.
    assert conversations == [
        [
            ("user", "BERNARDO: Who's there?"),
            ("assistant", "FRANCISCO: Nay, answer me: stand,\nand unfold yourself."),
        ],
    ]
    pq.write_table(
        pa.table({"text": [SCENE + "\n**FRANCISCO**  \nYou come most carefully.\n"]}), tmp_path / "test.parquet"
    )
    three = play_dialogues(tmp_path, "test")
    assert [[role for role, _ in c] for c in three] == [["user", "assistant"] * 2, ["user", "assistant"]]
    assert three[0][2] == ("user", "BERNARDO: Long live the king!\nHe.")
    assert three[1][0] == three[0][2]  # every other speech starts a conversation
    pq.write_table(pa.table({"text": ["plain prose, no speakers"]}), tmp_path / "val.parquet")
    with pytest.raises(InputError, match="val.parquet: no dialogue found"):
        play_dialogues(tmp_path, "val")


def test_packing_keeps_conversations_whole_and_cuts_long_ones_from_the_left(chat_tok):
    tok, ids = chat_tok
    short = [render([("user", "wave"), ("assistant", f"hill {i}")], tok, ids) for i in range(30)]
    long = render([("user", "wave " * 200), ("assistant", "barn")], tok, ids)
    rows = pack([*short, long], block_size=32, pad_id=tok.token_to_id("<|pad|>"))
    assert rows.ids.shape[1] == 33 and rows.truncated == 1
    assert rows.loss.sum() == sum(sum(r.loss) for r in short) + sum(long.loss)  # no target lost, none split
    assert rows.ids[-1][-1] == ids[END] and rows.loss[-1][-1]  # the long one kept its answer
    for row, flags in zip(rows.ids, rows.loss):
        assert sum(1 for t in row if t == ids[ASSISTANT]) == sum(
            1 for i in range(1, len(row)) if flags[i] and not flags[i - 1]
        )  # every reply starts in its row
