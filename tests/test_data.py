"""Sources and the grain pipeline: determinism, epochs, iterator resume, per-process rows, bad files."""

import json

import numpy as np
import pytest

from mlsys.data import eval_batches, load, train_iterator
from mlsys.data.sources import ArraysConfig, DigitsConfig, SyntheticConfig, TextConfig
from mlsys.errors import DataError


def take(it, n):
    return [next(it) for _ in range(n)]


def test_digits_splits_are_fixed_and_disjoint():
    a, b = load(DigitsConfig(), seed=0), load(DigitsConfig(), seed=7)
    assert {k: len(v) for k, v in a.splits.items()} == {"train": 1258, "val": 180, "test": 359}
    np.testing.assert_array_equal(a.splits["test"].inputs, b.splits["test"].inputs)  # run seed: same test set
    assert a.spec.input_shape == (8, 8, 1) and a.spec.num_classes == 10
    assert 0.0 <= a.splits["train"].inputs.min() and a.splits["train"].inputs.max() <= 1.0


def test_digits_read_without_sklearn_are_sklearns_digits():
    """mlsys reads digits.csv.gz itself (importing sklearn costs seconds per process): same arrays, dtypes, order."""
    from sklearn.datasets import load_digits

    from mlsys.data.sources import split_rows

    ref, cfg = load_digits(), DigitsConfig()
    x, y = (ref.images / 16.0).astype(np.float32)[..., None], ref.target.astype(np.int32)
    got = load(cfg, seed=0)
    for name, rows in split_rows(len(x), cfg.val_fraction, cfg.test_fraction, cfg.split_seed).items():
        split = got.splits[name]
        assert split.inputs.dtype == np.float32 and split.targets.dtype == np.int32
        np.testing.assert_array_equal(split.inputs, x[rows])
        np.testing.assert_array_equal(split.targets, y[rows])


def test_digits_without_the_packaged_file_is_a_clear_error(tmp_path, monkeypatch):
    import importlib.util
    import types

    from mlsys.data import sources

    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    with pytest.raises(DataError, match=r"digits.csv.gz, not found at .*datasets/data/digits.csv.gz; install sci"):
        sources.load_digits(DigitsConfig())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="but scikit-learn is not installed"):
        sources.load_digits(DigitsConfig())


def test_same_seed_same_batches_other_seed_other_batches():
    split = load(DigitsConfig(), 0).splits["train"]
    a, b, c = (take(train_iterator(split, 16, s), 3) for s in (0, 0, 1))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    assert not np.array_equal(a[0]["targets"], c[0]["targets"])


def test_reshuffled_each_epoch_and_covers_everything():
    split = load(SyntheticConfig(task="classify", size=32), 0).splits["train"]
    it = train_iterator(split, 8, seed=0)
    epochs = [np.concatenate([b["targets"] for b in take(it, 4)]) for _ in range(2)]
    first = [split[i]["targets"] for i in range(32)]
    assert sorted(epochs[0].tolist()) == sorted(first) == sorted(epochs[1].tolist())
    assert not np.array_equal(epochs[0], epochs[1])


def test_iterator_state_resumes_exactly():
    split = load(TextConfig(seq_len=8), 0).splits["train"]
    it = train_iterator(split, 4, seed=3)
    take(it, 5)
    state = it.get_state()
    expected = take(it, 3)
    fresh = train_iterator(split, 4, seed=3)
    fresh.set_state(json.loads(json.dumps(state)))  # the state survives serialisation
    for x, y in zip(expected, take(fresh, 3)):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_each_process_reads_its_own_rows_of_the_global_batch():
    split = load(DigitsConfig(), 0).splits["train"]
    whole = take(train_iterator(split, 8, seed=0), 3)
    parts = [take(train_iterator(split, 8, seed=0, process_index=p, process_count=2), 3) for p in range(2)]
    for b in range(3):
        joined = np.concatenate([parts[0][b]["targets"], parts[1][b]["targets"]])
        np.testing.assert_array_equal(joined, whole[b]["targets"])


def test_text_windows_and_vocabulary():
    ds = load(TextConfig(seq_len=8), 0)
    chars = ds.meta["vocab"]["chars"]
    assert len(chars) == ds.spec.num_classes == 65 and ds.spec.task == "lm"
    ex = ds.splits["train"][100]
    np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])
    assert "".join(chars[i] for i in ds.splits["train"][0]["inputs"]) == "First Ci"


def test_eval_batches_cover_the_split_once_with_a_mask():
    split = load(DigitsConfig(), 0).splits["test"]
    batches = list(eval_batches(split, 64))
    assert sum(b["mask"].sum() for b in batches) == len(split) == 359
    assert all(b["inputs"].shape[0] == 64 for b in batches)


def test_text_missing_file(tmp_path):
    with pytest.raises(DataError, match="cannot read it"):
        load(TextConfig(path=str(tmp_path / "nope.txt")), 0)


def test_text_not_utf8(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("café ".encode("latin-1") * 100)
    with pytest.raises(DataError, match="is not UTF-8.*data.tokenizer=byte"):
        load(TextConfig(path=str(p)), 0)
    assert load(TextConfig(path=str(p), level="byte", seq_len=8), 0).spec.num_classes == 256


def test_text_too_short(tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("hello")
    with pytest.raises(DataError, match="fewer than data.seq_len"):
        load(TextConfig(path=str(p)), 0)


def test_arrays_source(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, inputs=np.random.rand(50, 3).astype(np.float32), targets=np.arange(50) % 4)
    ds = load(ArraysConfig(path=str(p)), 0)
    assert ds.spec.input_shape == (3,) and ds.spec.num_classes == 4 and len(ds.splits["train"]) == 40


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((4, 2))}, "has no array 'inputs'"),
    ({"inputs": np.zeros((4, 2), np.float32), "targets": np.zeros(3, int)}, "4 inputs but 3 targets"),
    ({"inputs": np.zeros((4, 2), np.float32), "targets": np.zeros(4)}, "integer class ids"),
    ({"inputs": np.zeros((4, 2), np.int64), "targets": np.zeros(4, int)}, "floating point"),
])
def test_arrays_bad_contents(tmp_path, arrays, message):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=message):
        load(ArraysConfig(path=str(p)), 0)


def test_arrays_not_npz(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="cannot read it as .npz"):
        load(ArraysConfig(path=str(p)), 0)


class _Ids:
    """A split whose examples are their own ids, to follow every example through process-count changes."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"id": np.int64(i)}


def _read(iters, n: int) -> list[int]:
    """n global batches read by these processes' iterators (all at the same position), in global order."""
    return [int(i) for _ in range(n) for it in iters for i in next(it)["id"]]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 4)])
def test_resume_on_another_process_count_skips_and_repeats_no_example(before, after):
    """The saved position (a global batch index) means the same examples whoever reads them: 7 batches on `before`
    processes, then the saved state on `after` processes, read exactly what one uninterrupted reader reads."""
    whole = _read([train_iterator(_Ids(), 8, seed=5)], 12)
    first = [train_iterator(_Ids(), 8, 5, p, before) for p in range(before)]
    ids = _read(first, 7)
    state = json.loads(json.dumps(first[0].get_state()))
    assert all(it.get_state() == state for it in first) and state["next_batch"] == 7
    then = [train_iterator(_Ids(), 8, 5, p, after) for p in range(after)]
    for it in then:
        it.set_state(state)
    ids += _read(then, 5)
    assert ids == whole
    assert sorted(ids[:40]) == list(range(40))  # the first epoch holds every example once


@pytest.mark.parametrize("process_count", [1, 2])
def test_batches_are_grains_shuffled_stream(process_count):
    """The iterator computes its indices itself (no per-element pipeline layers): the rows must be exactly those of
    grain's source → seed → shuffle → repeat stream, across epoch boundaries, for every process's part."""
    import grain

    stream = grain.MapDataset.source(_Ids()).seed(5).shuffle().repeat(None)
    its = [train_iterator(_Ids(), 8, 5, p, process_count) for p in range(process_count)]
    assert _read(its, 16) == [int(stream[i]["id"]) for i in range(16 * 8)]  # 3.2 epochs of 40
