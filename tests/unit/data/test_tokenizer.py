import json
import random
import string
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from gptcore.config import IngestConfig, TokenizerConfig
from gptcore.data.ingest import ingest
from gptcore.data.tokenizer import token_dtype, train_bpe, train_tokenizer
from gptcore.errors import InputError
from gptcore.fsutil import sha256_file
from gptcore.layout import EOT, PAD, SPLITS
from gptcore.results import load_tokenizer, read_split, read_tokens, token_byte_lengths

N_DOCS = 24
LITERAL_EOT_DOC = 5  # this document's text contains the string "<|endoftext|>"


def marker_words(n: int, seed: int = 0) -> list[str]:
    """Distinct random 6-letter words, one per document."""
    rng = random.Random(seed)
    words: list[str] = []
    while len(words) < n:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(6))
        if word not in words:
            words.append(word)
    return words


def document(i: int, marker: str) -> str:
    literal = f" It mentions {EOT} in passing." if i == LITERAL_EOT_DOC else ""
    return (
        f"The quick brown fox jumps over the lazy dog, number {i}.{literal}\n"
        + " ".join([marker] * 50)
        + "\nThe end.\n"
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 documents, each with its own marker word 50 times; ingested, then a 512-token BPE."""
    root = tmp_path_factory.mktemp("tok")
    markers = marker_words(N_DOCS)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i, marker in enumerate(markers):
            f.write(json.dumps({"text": document(i, marker), "marker": marker}) + "\n")
    data = ingest(
        IngestConfig(
            sources=[str(root / "corpus.jsonl")], metadata_fields=["marker"], val_fraction=0.15, test_fraction=0.15
        ),
        root / "data",
        tracking=None,
    )
    result = train_tokenizer(TokenizerConfig(vocab_size=512), root / "data", root / "tok", tracking=None)
    return {
        "data": data,
        "result": result,
        "tok": load_tokenizer(root / "tok"),
        "splits": {s: read_split(root / "data", s).to_pylist() for s in SPLITS},
    }


def test_tokenizer_json_loads_with_special_tokens(corpus):
    result = corpus["result"]
    tok = Tokenizer.from_file(result.tokenizer_path)
    assert 258 < tok.get_vocab_size() == result.vocab_size <= 512  # a small corpus runs out of merges first
    assert tok.token_to_id(EOT) is not None and tok.token_to_id(PAD) is not None
    assert tok.token_to_id(EOT) != tok.token_to_id(PAD)
    manifest = json.loads((Path(result.out_dir) / "tokens.json").read_text(encoding="utf-8"))
    assert (manifest["eot_id"], manifest["pad_id"]) == (tok.token_to_id(EOT), tok.token_to_id(PAD))
    assert result.tokenizer_digest == sha256_file(result.tokenizer_path)
    assert result.data_digest == corpus["data"].digest


@pytest.mark.parametrize(
    "text",
    [
        "emoji: 👩‍👩‍👧 family 🎉🇫🇷",
        "CJK: 日本語のテキスト、中文字符、한국어",
        "combining marks stay decomposed: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",
        "whitespace\tand\ncontrol\r\x00\x01\x1b[0m\x7f\u200b\u2028 chars",
        "   leading and trailing spaces   \n\n\n",
        "never seen in training: Zyzzyva QWXJ 0x1F!? ∮ E⋅da = Q",
        f"the special strings as text: {EOT} {PAD}",
        "",
    ],
)
def test_round_trips_any_utf8_exactly(corpus, text):
    tok = corpus["tok"]
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_token_shards_are_uint16_with_the_manifest_counts_and_digests(corpus):
    result = corpus["result"]
    manifest = json.loads((Path(result.out_dir) / "tokens.json").read_text(encoding="utf-8"))
    assert result.dtype == "uint16"
    for split in SPLITS:
        shards = manifest["splits"][split]["shards"]
        assert [s["file"] for s in shards] == [f"{split}_00000.bin"]
        path = Path(result.out_dir) / shards[0]["file"]
        ids = np.memmap(path, dtype=np.uint16, mode="r")
        assert len(ids) == result.tokens[split] == shards[0]["tokens"] > 0
        assert path.stat().st_size == 2 * result.tokens[split]
        assert sha256_file(path) == shards[0]["sha256"]
        assert ids.max() < result.vocab_size
        assert np.array_equal(np.asarray(read_tokens(result, split)), ids)


def test_every_document_is_followed_by_eot(corpus):
    """The .bin is each document of the split, in order, each followed by one <|endoftext|>."""
    result, tok = corpus["result"], corpus["tok"]
    eot = tok.token_to_id(EOT)
    for split in SPLITS:
        ids = np.asarray(read_tokens(result, split))
        texts = [row["text"] for row in corpus["splits"][split]]
        assert int((ids == eot).sum()) == len(texts) == corpus["data"].documents[split]
        assert ids[-1] == eot
        ends = np.flatnonzero(ids == eot)
        pieces = np.split(ids, ends + 1)[:-1]
        assert [tok.decode(p[:-1].tolist(), skip_special_tokens=False) for p in pieces] == texts


def test_literal_special_token_in_a_document_is_encoded_as_text(corpus):
    result, tok = corpus["result"], corpus["tok"]
    where = [s for s in SPLITS for row in corpus["splits"][s] if EOT in row["text"]]
    assert len(where) == 1
    ids = np.asarray(read_tokens(result, where[0]))
    assert int((ids == tok.token_to_id(EOT)).sum()) == len(corpus["splits"][where[0]])


def test_tokenizer_is_trained_on_the_train_split_only(corpus):
    tok = corpus["tok"]

    def single_token(marker: str) -> bool:
        return len(tok.encode(" " + marker, add_special_tokens=False).ids) == 1

    held_out = [row["marker"] for s in ("val", "test") for row in corpus["splits"][s]]
    train = [row["marker"] for row in corpus["splits"]["train"]]
    assert len(held_out) >= 2 and len(train) >= 12
    assert all(single_token(m) for m in train)  # 50 repeats are enough to become one token...
    assert not any(single_token(m) for m in held_out)  # ...but only where the tokenizer could see them


def test_marker_check_would_catch_a_leak(corpus):
    """Control: a tokenizer trained on all splits does make the held-out markers single tokens."""
    everything = [row["text"] for s in SPLITS for row in corpus["splits"][s]]
    leaky = train_bpe(everything, 512)
    held_out = [row["marker"] for s in ("val", "test") for row in corpus["splits"][s]]
    assert all(len(leaky.encode(" " + m, add_special_tokens=False).ids) == 1 for m in held_out)


def test_token_byte_lengths_sum_to_utf8_bytes(corpus):
    tok = corpus["tok"]
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (tok.get_vocab_size(),)
    assert lengths[tok.token_to_id(EOT)] == 0 and lengths[tok.token_to_id(PAD)] == 0
    for text in ["plain ascii", "日本語 and émoji 🎉", "tabs\tnew\nlines", corpus["splits"]["val"][0]["text"]]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_manifest_bytes_match_the_ingested_bytes(corpus):
    manifest = json.loads((Path(corpus["result"].out_dir) / "tokens.json").read_text(encoding="utf-8"))
    for split in SPLITS:
        entry = manifest["splits"][split]
        assert entry["bytes"] == corpus["data"].bytes[split]
        assert entry["documents"] == corpus["data"].documents[split]
        assert entry["bytes_per_token"] == pytest.approx(entry["bytes"] / entry["tokens"])


def test_token_dtype_widens_above_65536():
    assert token_dtype(512) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32


def test_missing_inputs_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="missing manifest.json"):
        train_tokenizer(TokenizerConfig(vocab_size=300), tmp_path / "nodata", tmp_path / "tok", tracking=None)
    assert not (tmp_path / "tok").exists()
    with pytest.raises(InputError, match=r"tokenizer\.json: tokenizer not found"):
        load_tokenizer(tmp_path)
