"""Tokenizers (mlsys/tokenizer.py): BPE training and loading, char/byte compatibility, bytes per token."""

import json
import os

import numpy as np
import pytest

from mlsys import tokenizer
from mlsys.data.corpus import check_lm_data
from mlsys.data.sources import CorpusConfig, TextConfig, load, resolve_path
from mlsys.errors import ConfigError

TEXT = open(resolve_path("tinyshakespeare.txt"), encoding="utf-8").read()[:60_000] + " café ∑ 🙂\n"


@pytest.fixture(scope="module")
def bpe():
    return tokenizer.train_bpe(TEXT.split("\n\n"), 300)


def test_bpe_is_deterministic_round_trips_and_counts_bytes(bpe, tmp_path):
    assert bpe.vocab_size == 300 and bpe.specials == {"eos": 0, "bos": 1, "pad": 2}
    assert tokenizer.train_bpe(TEXT.split("\n\n"), 300).to_json() == bpe.to_json()  # same text, same merges
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT and len(ids) < 0.8 * len(TEXT)  # merges learned: fewer tokens than bytes
    assert bpe.token_bytes[ids].sum() == len(TEXT.encode("utf-8"))  # bits per byte need this exactly
    assert (bpe.token_bytes[list(bpe.specials.values())] == 0).all()
    # saved into a run dir and loaded back (as any tokenizer.json): the same ids, the specials recognised
    bpe.save(str(tmp_path))
    back = tokenizer.from_run_dir(str(tmp_path))
    assert back.kind == "file" and back.specials == bpe.specials
    np.testing.assert_array_equal(back.encode(TEXT), ids)
    np.testing.assert_array_equal(back.token_bytes, bpe.token_bytes)
    # a worker process rebuilds it from its picklable spec
    np.testing.assert_array_equal(tokenizer.from_spec(bpe.spec()).encode("To be"), bpe.encode("To be"))


def test_bpe_cache_reuses_a_trained_tokenizer(tmp_path):
    a = tokenizer.train_bpe(["abc abd abe"] * 20, 270, str(tmp_path), "k1")
    assert os.listdir(tmp_path) == ["bpe-270-k1.json"]
    assert tokenizer.train_bpe(iter(()), 270, str(tmp_path), "k1").to_json() == a.to_json()  # no text needed


def test_char_and_byte_keep_the_text_path_and_its_vocab_json(tmp_path):
    ds = load(TextConfig(seq_len=8), 0)
    tok = ds.tokenizer
    assert tok.kind == "char" and tok.vocab_size == 65 and tok.specials == {}
    assert tokenizer.from_vocab(ds.meta["vocab"]).decode(tok.encode("ROMEO:\n")) == "ROMEO:\n"
    assert tok.decode(tok.encode("Hi€!")) == "Hi!"  # characters outside the vocabulary are dropped
    tok.save(str(tmp_path))
    assert json.load(open(tmp_path / "vocab.json"))["chars"] == tok.chars
    assert tokenizer.from_run_dir(str(tmp_path)).encode("ROMEO").tolist() == tok.encode("ROMEO").tolist()
    ex = ds.splits["train"][0]
    assert ex["target_bytes"] == 8  # one byte per ASCII character
    byte = tokenizer.ByteTokenizer(("eos",))
    assert byte.vocab_size == 257 and byte.decode(byte.encode("é")) == "é"


def test_text_with_a_bpe_tokenizer(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    ds = load(TextConfig(path=str(path), tokenizer="bpe", vocab_size=300, seq_len=16, cache_dir=str(tmp_path)), 0)
    assert ds.spec.num_classes == 300 and ds.tokenizer.kind == "bpe"
    ex = ds.splits["val"][0]
    assert ex["target_bytes"] == ds.tokenizer.token_bytes[ex["targets"]].sum() > 16


def test_bad_tokenizers(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ConfigError, match=f"data.tokenizer='{bad}': cannot load it as a Hugging Face tokenizer.json"):
        tokenizer.load_file(str(bad))
    with pytest.raises(ConfigError, match="no such file"):
        check_lm_data(TextConfig(tokenizer=str(tmp_path / "missing.json")))
    with pytest.raises(ConfigError, match=r"data.vocab_size=200: .* 256 byte tokens \+ 3 specials = 259"):
        check_lm_data(CorpusConfig(paths=["x.txt"], tokenizer="bpe", vocab_size=200))
    with pytest.raises(ConfigError, match="data.tokenizer='wordpiece': must be one of"):
        check_lm_data(TextConfig(tokenizer="wordpiece"))
