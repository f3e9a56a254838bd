"""Data faults in a user's files, made for real on disk: each is a DataError naming the file, and the array and
the record where there is one; through the command line (run in this process, tests/entry.py), one line and exit
code 2."""

import numpy as np
import pytest

from mlsys.data.sources import ArraysConfig, TextConfig, load
from mlsys.errors import DataError
from mlsys.models import CNNConfig, MLPConfig
from mlsys.models.family import check_fits
from tests.entry import run_main
from tests.test_cli import FAST


def good(n=50):
    return {"inputs": np.random.default_rng(0).random((n, 8), dtype=np.float32),
            "targets": (np.arange(n) % 4).astype(np.int32)}


def npz_bytes(tmp_path, **arrays):
    np.savez(tmp_path / "src.npz", **{**good(), **arrays})
    return (tmp_path / "src.npz").read_bytes()


def negative_row_17():
    t = good()["targets"]
    t[17] = -1
    return {"targets": t}


def corrupt_member(b: bytes) -> bytes:  # zero bytes inside the first member's data: its CRC no longer matches
    b = bytearray(b)
    b[200:260] = bytes(60)
    return bytes(b)


# (name, bytes of the file from a tmp dir, expected message)
NPZ = [
    ("empty", lambda p: b"", "the file is empty (0 bytes)"),
    ("truncated half", lambda p: npz_bytes(p)[: len(npz_bytes(p)) // 2], "cannot read it as .npz (File is not a zip"),
    ("truncated tail", lambda p: npz_bytes(p)[:-20], "truncated or not an .npz"),
    ("bad crc", lambda p: corrupt_member(npz_bytes(p)), "array 'inputs' cannot be read (Bad CRC-32"),
    ("not npz", lambda p: b"plain text, not a zip archive", "cannot read it as .npz"),
    ("pickled objects", lambda p: npz_bytes(p, inputs=np.array([{"a": 1}] * 50, dtype=object)),
     "array 'inputs' cannot be read (Object arrays cannot be loaded"),
    ("string inputs", lambda p: npz_bytes(p, inputs=np.array([["a"] * 8] * 50)), "array 'inputs' must be floating "
                                                                                 "point, got <U1"),
    ("integer inputs", lambda p: npz_bytes(p, inputs=np.zeros((50, 8), np.int64)), "must be floating point, got int64"),
    ("float targets", lambda p: npz_bytes(p, targets=np.zeros(50)), "array 'targets' must hold integer class ids of "
                                                                     "shape (N,), got float64 (50,)"),
    ("2-d targets", lambda p: npz_bytes(p, targets=np.zeros((50, 2), int)), "got int64 (50, 2)"),
    ("negative class id", lambda p: npz_bytes(p, **negative_row_17()), "array 'targets' row 17 is -1"),
    ("rank-1 inputs", lambda p: npz_bytes(p, inputs=np.zeros(50, np.float32)), "array 'inputs' has shape (50,)"),
    ("length mismatch", lambda p: npz_bytes(p, targets=np.zeros(49, int)), "50 inputs but 49 targets"),
    ("scalar targets", lambda p: npz_bytes(p, targets=np.int64(3)), "50 inputs but 0 targets"),
    ("no records", lambda p: npz_bytes(p, inputs=np.zeros((0, 8), np.float32), targets=np.zeros(0, int)),
     "0 inputs but 0 targets"),
    ("missing key", lambda p: (np.savez(p / "m.npz", x=np.zeros(3)), (p / "m.npz").read_bytes())[1],
     "has no array 'inputs'; it holds ['x']"),
    ("a .npy file", lambda p: (np.save(p / "a.npy", np.zeros(3)), (p / "a.npy").read_bytes())[1],
     "holds a single .npy array"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in NPZ], ids=[c[0] for c in NPZ])
def test_bad_npz_names_the_file_and_the_record(tmp_path, make, message):
    path = tmp_path / "user.npz"
    path.write_bytes(make(tmp_path))
    with pytest.raises(DataError) as e:
        load(ArraysConfig(path=str(path)), 0)
    assert f"data.path={str(path)!r}" in str(e.value) and message in str(e.value), str(e.value)


def test_nan_rows_are_allowed_but_named(tmp_path, caplog):
    arrays = good()
    arrays["inputs"][[3, 9], 1] = np.nan
    np.savez(tmp_path / "x.npz", **arrays)
    load(ArraysConfig(path=str(tmp_path / "x.npz")), 0)
    assert "array 'inputs' has 2 rows with NaN/Inf (first: row 3)" in caplog.text


def test_records_that_do_not_fit_the_model(tmp_path):
    np.savez(tmp_path / "x.npz", **good())
    cfg = ArraysConfig(path=str(tmp_path / "x.npz"))
    with pytest.raises(DataError, match=r"model=cnn needs image records \(H, W, C\), but each record has shape \(8,\)"):
        check_fits(CNNConfig(), load(cfg, 0).spec, cfg)
    check_fits(MLPConfig(), load(cfg, 0).spec, cfg)  # an MLP flattens any record


TEXT = [
    ("empty", b"", "the file is empty (0 bytes)"),
    ("too short", b"to be or not", "the train split has 11 tokens, fewer than data.seq_len + 2 = 18"),
    ("not utf-8", "first line\nsecond\ndéjà vu".encode("latin-1") * 20, "is not UTF-8 (line 3, byte 19: invalid"),
    ("cut mid-character", ("é" * 100).encode()[:-1], "is not UTF-8 (line 1, byte 198: unexpected end of data)"),
]


@pytest.mark.parametrize("raw, message", [c[1:] for c in TEXT], ids=[c[0] for c in TEXT])
def test_bad_text_names_the_file_and_the_place(tmp_path, raw, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(raw)
    with pytest.raises(DataError) as e:
        load(TextConfig(path=str(path), seq_len=16), 0)
    assert f"data.path={str(path)!r}" in str(e.value) and message in str(e.value), str(e.value)


@pytest.mark.parametrize("fault, message", [("truncated", "truncated or not an .npz"),
                                            ("cnn", "model=cnn needs image records")])
def test_data_faults_through_the_command_line(tmp_path, fault, message):
    path = tmp_path / "user.npz"
    if fault == "truncated":
        path.write_bytes(npz_bytes(tmp_path)[:300])
    else:
        np.savez(path, **good())
    args = [*FAST, "data=arrays", f"data.path={path}", "data.batch_size=8", "trainer.steps=2"]
    code, _, err = run_main("experiments.run", [*args, *(["model=cnn", "model.channels=[4]", "model.hidden=8"]
                                                         if fault == "cnn" else [])], tmp_path)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: data.path={str(path)!r}") and message in line
