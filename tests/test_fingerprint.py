"""Data fingerprints: they change when one byte of the data (or the split) changes and not otherwise; DVC's hash
is recorded; a resumed run whose data changed is warned, naming the file."""

import json
import os

import numpy as np
import pytest

from mlsys.data.fingerprint import changes, fingerprint, warn_if_changed
from mlsys.data.sources import ArraysConfig, DigitsConfig, SyntheticConfig, TextConfig


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"to be or not to be, that is the question\n" * 20)
    return path


def test_one_changed_byte_changes_the_fingerprint_and_nothing_else_does(corpus, tmp_path):
    cfg = TextConfig(path=str(corpus))
    a = fingerprint(cfg, seed=0)
    assert a == fingerprint(cfg, seed=0)
    # How the data is read, the run's seed, or a copy elsewhere: the same data.
    copy = tmp_path / "elsewhere.txt"
    copy.write_bytes(corpus.read_bytes())
    assert fingerprint(TextConfig(path=str(copy), batch_size=7, eval_batches=3), seed=5)["digest"] == a["digest"]
    raw = bytearray(corpus.read_bytes())
    raw[100] ^= 1
    corpus.write_bytes(bytes(raw))
    b = fingerprint(cfg, seed=0)
    assert b["digest"] != a["digest"] and b["split"] == a["split"]
    assert changes(a, b) == [f"{corpus} changed (sha256 {a['files'][0]['sha256'][:12]} then, "
                             f"{b['files'][0]['sha256'][:12]} now)"]
    c = fingerprint(TextConfig(path=str(corpus), val_fraction=0.2), seed=0)
    assert c["split"] != b["split"] and "the split settings changed" in changes(b, c)


def test_generated_and_shipped_data(tmp_path):
    digits = fingerprint(DigitsConfig(), 0)
    assert digits["files"][0]["path"].endswith("digits.csv.gz")  # scikit-learn's own file, hashed
    assert fingerprint(DigitsConfig(split_seed=1), 0)["digest"] != digits["digest"]
    syn = fingerprint(SyntheticConfig(), 0)
    assert syn["files"] == [] and syn["generator"]["seed"] == 0
    assert fingerprint(SyntheticConfig(), 1)["digest"] != syn["digest"]
    assert fingerprint(SyntheticConfig(size=10), 0)["digest"] != syn["digest"]


def test_a_dvc_tracked_path_records_dvcs_hash(tmp_path):
    np.savez(tmp_path / "data.npz", inputs=np.zeros((4, 2)), targets=np.arange(4))
    (tmp_path / "data.npz.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef\n  size: 9\n"
                                           "  hash: md5\n  path: data.npz\n")
    entry = fingerprint(ArraysConfig(path=str(tmp_path / "data.npz")), 0)["files"][0]
    assert entry["dvc"] == {"file": str(tmp_path / "data.npz.dvc"), "md5": "0123456789abcdef0123456789abcdef",
                            "size": 9, "hash": "md5"}


def test_warn_if_changed_reads_the_earlier_runs_env(corpus, tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / "env.json").write_text(json.dumps({"data": fingerprint(TextConfig(path=str(corpus)), 0)}))
    assert warn_if_changed(fingerprint(TextConfig(path=str(corpus)), 0), str(run), "trainer.resume") == []
    corpus.write_bytes(corpus.read_bytes() + b"!")
    with caplog.at_level("WARNING", logger="mlsys"):
        warn_if_changed(fingerprint(TextConfig(path=str(corpus)), 0), str(run), "trainer.resume")
    assert f"trainer.resume={run}: the data changed since that run: {corpus} changed" in caplog.text


@pytest.mark.slow
def test_resume_on_changed_data_warns_naming_the_file(train_tiny, tmp_path, caplog):
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, inputs=rng.standard_normal((64, 8, 8, 1)).astype(np.float32), targets=rng.integers(0, 3, 64))
    data = ("data=arrays", f"data.path={path}", "data.batch_size=16", "trainer.steps=10")
    _, first = train_tiny("digits_mlp", *data, run_dir=tmp_path / "a")
    env = json.load(open(os.path.join(first, "env.json")))
    assert env["data"]["files"][0]["path"] == str(path)
    x = np.load(path)["inputs"]
    x[0, 0, 0, 0] += 1
    np.savez(path, inputs=x, targets=np.load(path)["targets"])
    with caplog.at_level("WARNING", logger="mlsys"):
        train_tiny("digits_mlp", *data, "trainer.steps=15", f"trainer.resume={first}", run_dir=tmp_path / "b")
    assert f"trainer.resume={first}: the data changed since that run: {path} changed" in caplog.text
