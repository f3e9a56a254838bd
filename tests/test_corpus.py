"""data=corpus: files → token cache → held-out documents → packed rows; each bad input named in one line."""

import json
import logging
import os

import numpy as np
import pytest

import mlsys.data.cache as cache
from mlsys.data.corpus import is_val, load_corpus
from mlsys.data.sources import CorpusConfig, resolve_path
from mlsys.errors import DataError

PARAS = [p for p in open(resolve_path("tinyshakespeare.txt"), encoding="utf-8").read()[:40_000].split("\n\n") if p]


def write_corpus(folder, paras=PARAS):
    """The same documents as a .txt (paragraphs), a .jsonl and a .parquet, a third each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    k = len(paras) // 3
    (folder / "a.txt").write_text("\n\n".join(paras[:k]) + "\n\n", encoding="utf-8")
    rows = [json.dumps({"text": p, "id": i}) + "\n" for i, p in enumerate(paras[k:2 * k])]
    (folder / "b.jsonl").write_text("".join(rows))
    pq.write_table(pa.table({"text": paras[2 * k:]}), folder / "c.parquet", row_group_size=50)
    return [str(folder / "a.txt"), str(folder / "*.jsonl"), str(folder / "c.parquet")]


def cfg(tmp_path, **kw):
    base = dict(paths=write_corpus(tmp_path / "corpus"), tokenizer="byte", seq_len=32, batch_size=4,
                cache_dir=str(tmp_path / "cache"), workers=1, val_fraction=0.1)
    return CorpusConfig(**{**base, **kw})


def test_formats_documents_and_held_out_split(tmp_path):
    ds = load_corpus(cfg(tmp_path, packing="segments"))
    assert ds.meta["documents"] == {"train": len(PARAS) - len(PARAS) // 10, "val": len(PARAS) // 10}
    # every document, in order, each ended by EOS: the joined stream is the paragraphs' bytes
    tokens = ds.splits["train"].tokens
    eos = ds.tokenizer.specials["eos"]
    docs = np.split(np.asarray(tokens), np.flatnonzero(tokens == eos) + 1)[:-1]
    assert [ds.tokenizer.decode(d) for d in docs] == PARAS
    assert is_val(np.arange(20), 0.1).tolist() == [False] * 9 + [True] + [False] * 9 + [True]


def test_cache_reused_invalidated_and_repaired(tmp_path, caplog):
    c = cfg(tmp_path)
    load_corpus(c)
    (folder,) = [tmp_path / "cache" / d for d in os.listdir(tmp_path / "cache") if d.startswith("tokens-")]
    stamp = os.stat(folder / "tokens.bin").st_mtime_ns
    load_corpus(c)
    assert os.stat(folder / "tokens.bin").st_mtime_ns == stamp  # reused, not re-tokenized
    with open(tmp_path / "corpus" / "a.txt", "a") as f:
        f.write("A new paragraph.\n\n")
    load_corpus(c)
    assert len([d for d in os.listdir(tmp_path / "cache") if d.startswith("tokens-")]) == 2  # a changed file
    os.truncate(folder / "tokens.bin", 100)
    (tmp_path / "corpus" / "a.txt").write_text("\n\n".join(PARAS[: len(PARAS) // 3]) + "\n\n")  # back to the first
    with caplog.at_level(logging.WARNING, logger="mlsys"):
        ds = load_corpus(c)
    assert "damaged" in caplog.text and "truncated" in caplog.text
    whole = np.array(ds.splits["train"].tokens.tokens)  # a copy: the memmap would see the edit below
    data = bytearray(open(folder / "tokens.bin", "rb").read())
    data[10] ^= 1
    open(folder / "tokens.bin", "wb").write(bytes(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlsys"):
        again = load_corpus(c)
    assert "edited" in caplog.text
    np.testing.assert_array_equal(np.asarray(again.splits["train"].tokens.tokens), whole)
    assert not [d for d in os.listdir(tmp_path / "cache") if d.endswith(".partial")]  # nothing half-written


@pytest.mark.slow
def test_worker_processes_and_small_units_give_the_same_cache(tmp_path, monkeypatch):
    one = load_corpus(cfg(tmp_path, tokenizer="bpe", vocab_size=300))
    monkeypatch.setattr(cache, "BLOCK", 2000)  # many units, documents (paragraphs) spanning them
    two = load_corpus(cfg(tmp_path, tokenizer="bpe", vocab_size=300, workers=2, cache_dir=str(tmp_path / "c2")))
    np.testing.assert_array_equal(np.asarray(one.splits["train"].tokens.tokens),
                                  np.asarray(two.splits["train"].tokens.tokens))
    assert one.meta == two.meta


def test_val_paths_and_concat_windows(tmp_path):
    c = cfg(tmp_path, val_paths=[str(tmp_path / "corpus" / "c.parquet")],
            paths=write_corpus(tmp_path / "corpus")[:2], tokenizer="char")
    ds = load_corpus(c)
    assert ds.meta["documents"]["val"] == len(PARAS) - 2 * (len(PARAS) // 3)
    val = ds.splits["val"]  # validation windows tile the split
    assert len(val) == (ds.meta["tokens"]["val"] - 1) // 32
    ex = val[1]
    np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])
    assert ex["target_bytes"] == ds.tokenizer.token_bytes[ex["targets"]].sum()


def test_bad_inputs(tmp_path):
    c = cfg(tmp_path)
    with pytest.raises(DataError, match=r"data.paths: '.*/nothing/\*.txt' matches no file"):
        load_corpus(CorpusConfig(**{**c.__dict__, "paths": [str(tmp_path / "nothing" / "*.txt")]}))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latin.txt").write_bytes(b"hello\n\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin.txt: not UTF-8 at byte 10 "):
        load_corpus(CorpusConfig(**{**c.__dict__, "paths": [str(bad / "latin.txt")]}))
    (bad / "rows.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: no text field 'text' \(the row has \['body'\]\)"):
        load_corpus(CorpusConfig(**{**c.__dict__, "paths": [str(bad / "rows.jsonl")]}))
    (bad / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: not a JSON object"):
        load_corpus(CorpusConfig(**{**c.__dict__, "paths": [str(bad / "broken.jsonl")]}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), bad / "cols.parquet")
    with pytest.raises(DataError, match=r"cols.parquet: no column 'text' \(it has \['body'\]\)"):
        load_corpus(CorpusConfig(**{**c.__dict__, "paths": [str(bad / "cols.parquet")]}))
    (bad / "tiny.txt").write_text("one\n\ntwo\n\nthree\n\nfour\n\n")
    with pytest.raises(DataError, match=r"the train split has 3 documents, .* fewer than one batch"):
        load_corpus(CorpusConfig(**{**c.__dict__, "paths": [str(bad / "tiny.txt")], "val_fraction": 0.25}))
    with pytest.raises(DataError, match=r"the val split has 0 documents.*one validation row"):
        load_corpus(CorpusConfig(**{**c.__dict__, "batch_size": 1, "seq_len": 2, "paths": [str(bad / "tiny.txt")]}))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(DataError, match=r"data.cache_dir='.*a_file/cache': cannot write there"):
        load_corpus(CorpusConfig(**{**c.__dict__, "cache_dir": str(blocker / "cache")}))


GPT_TINY = ["model=gpt", "data=corpus", "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.block_size=32",
            "data.seq_len=32", "data.batch_size=8", "data.eval_batches=2", "data.workers=1", "trainer.steps=6",
            "trainer.log_every=3", "trainer.sample_chars=8", "logger=jsonl", "trainer.progress=false"]


@pytest.mark.slow
def test_corpus_run_end_to_end(tmp_path):
    """A tiny GPT on a corpus of .txt/.jsonl/.parquet, packed into segments with a trained BPE: bits per byte are
    logged, the tokenizer is saved beside the run, and a model vocabulary below the tokenizer's is refused."""
    from conftest import typed_cfg
    from mlsys.train import train

    paths = ",".join(write_corpus(tmp_path / "corpus"))
    over = [*GPT_TINY, f"data.paths=[{paths}]", f"data.cache_dir={tmp_path / 'cache'}", "data.packing=segments",
            "data.tokenizer=bpe", "data.vocab_size=300"]
    results = train(typed_cfg(over), str(tmp_path / "run"))
    assert 0 < results["val"]["bits_per_byte"] < 12 and "bits_per_byte" in results["train"]
    assert os.path.isfile(tmp_path / "run" / "tokenizer.json") and isinstance(results["sample"], str)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert {x["split"] for x in lines if "bits_per_byte" in x} == {"train", "val"}
    from mlsys.report import write_report

    report = open(write_report(str(tmp_path / "run"), out=str(tmp_path / "report"))).read()
    assert "| val.loss | val.bits_per_byte |" in report and f"{results['val']['bits_per_byte']:.4g}" in report
    with pytest.raises(DataError, match=r"model.vocab_size=256 is smaller than the tokenizer's vocabulary \(300"):
        train(typed_cfg([*over, "model.vocab_size=256"]), str(tmp_path / "run2"))
