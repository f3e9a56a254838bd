"""Image data: a generated folder of PNGs trained end to end (+exp=images_resnet), exported with its normalisation
inside the ONNX model and served on plain pixels; .npz images; Hugging Face datasets from disk; augmentation as a
function of (seed, step); every bad input as one line."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from mlsys import data
from mlsys.data.augment import augmenter
from mlsys.data.hf import HFConfig
from mlsys.data.images import ImagesConfig, to_array
from mlsys.errors import DataError
from tests.conftest import image_folder
from tests.fixtures.images import make_image_folder


@pytest.mark.slow
def test_image_folder_trains_exports_and_serves(train_tiny, tmp_path, monkeypatch):
    from PIL import Image

    from mlsys.export import export_run
    from mlsys.export.onnx_export import ort_run, ort_session
    from mlsys.serve.config import ServeConfig
    from mlsys.serve.model import ServedModel

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))  # a signing key of the test's own
    results, run_dir = train_tiny("images_resnet", "trainer.steps=40", "trainer.log_every=10",
                                  "data.augment=[crop,flip]", "optim.lr=3e-3", "optim.warmup_steps=5")
    assert results["test"]["accuracy"] == 1.0 and results["val"]["accuracy"] == 1.0, results
    norm = json.load(open(os.path.join(run_dir, "normalization.json")))
    assert len(norm["mean"]) == 3 and all(s > 0 for s in norm["std"])

    out = export_run(run_dir, formats=("onnx",), out=str(tmp_path / "export"))
    m = json.load(open(os.path.join(out, "manifest.json")))
    assert m["parity"]["onnx_max_abs_diff"] <= 1e-4 and m["preprocessing"]["normalization"]["in_onnx_model"]
    # Served on plain [0, 1] pixels decoded from the files: the server needs no statistics of its own.
    files = [os.path.join(image_folder(), f"class_{k}", "0.png") for k in range(3)]
    pixels = np.stack([to_array(Image.open(f), 16, 3) for f in files])
    served = ServedModel(ServeConfig(model=out))
    assert served.input.shape == (16, 16, 3) and served.input.lo <= 0.0 and served.input.hi >= 1.0
    logits = served.run(pixels)
    np.testing.assert_allclose(logits, ort_run(ort_session(os.path.join(out, "model.onnx")), pixels), atol=1e-6)
    assert logits.argmax(-1).tolist() == [0, 1, 2]


def test_folder_source_splits_statistics_and_grain_batches():
    ds = data.load(ImagesConfig(path=image_folder(), image_size=12), 0)
    assert ds.spec.input_shape == (12, 12, 3) and ds.spec.num_classes == 3
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 48, "val": 6, "test": 6}
    assert ds.meta["classes"] == ["class_0", "class_1", "class_2"]
    train = np.stack([ds.splits["train"][i]["inputs"] for i in range(48)])
    np.testing.assert_allclose(train.mean((0, 1, 2)), 0, atol=1e-4)  # normalised by the training split's stats
    np.testing.assert_allclose(train.std((0, 1, 2)), 1, atol=1e-3)
    batch = next(data.train_iterator(ds.splits["train"], 8, seed=0))
    assert batch["inputs"].shape == (8, 12, 12, 3) and batch["targets"].dtype == np.int32


def test_npz_images(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "imgs.npz")
    np.savez(path, inputs=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), targets=rng.integers(0, 4, 40))
    ds = data.load(ImagesConfig(path=path, val_fraction=0.1, test_fraction=0.1), 0)
    assert ds.spec.input_shape == (8, 8, 1) and ds.spec.num_classes == 4 and len(ds.splits["train"]) == 32
    x = np.stack([ds.splits["train"][i]["inputs"] for i in range(32)])
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-3
    assert data.load(ImagesConfig(path=path, image_size=4), 0).spec.input_shape == (4, 4, 1)


def test_augmentation_depends_on_seed_and_step_only():
    x = jnp.asarray(np.random.default_rng(0).random((4, 8, 8, 1), np.float32))
    both = augmenter(["crop", "flip"], [0.25, 1.0], seed=0)
    a, b, c = both(x, 3), both(x, 3), both(x, 4)
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and not np.allclose(a, c) and not np.allclose(a, x)
    assert not np.allclose(a, augmenter(["crop", "flip"], [0.25, 1.0], seed=1)(x, 3))
    flipped = np.asarray(augmenter(["flip"], [0.25, 1.0], seed=0)(x, 0))
    for row, orig in zip(flipped, np.asarray(x)):  # each row is the image or its mirror
        assert np.array_equal(row, orig) or np.array_equal(row, orig[:, ::-1])
    assert augmenter([], [0.25, 1.0], seed=0) is None


def hf_images(tmp_path, n=12):
    import datasets
    from PIL import Image

    from tests.fixtures.images import pattern

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray((pattern(i % 2, 8, rng) * 255).astype(np.uint8)) for i in range(n)]
    features = datasets.Features({"img": datasets.Image(), "kind": datasets.ClassLabel(names=["h", "v"])})
    ds = datasets.Dataset.from_dict({"img": imgs, "kind": [i % 2 for i in range(n)]}, features=features)
    path = str(tmp_path / "saved")
    datasets.DatasetDict({"train": ds, "test": ds.select(range(4))}).save_to_disk(path)
    return path


def test_hf_datasets_from_disk_as_grain_sources(tmp_path):
    import datasets

    ds = data.load(HFConfig(path=hf_images(tmp_path), input_column="img", label_column="kind"), 0)
    assert ds.spec.input_shape == (8, 8, 1) and ds.spec.num_classes == 2 and ds.meta["classes"] == ["h", "v"]
    assert set(ds.splits) == {"train", "test"} and len(ds.splits["test"]) == 4
    assert len(ds.meta["normalization"]["mean"]) == 1
    batch = next(data.train_iterator(ds.splits["train"], 4, seed=0))
    assert batch["inputs"].shape == (4, 8, 8, 1) and batch["targets"].dtype == np.int32

    # numbers and string labels from a parquet file (one split: divided by the fractions)
    rows = {"x": [[float(i), float(-i)] for i in range(20)], "y": ["b" if i % 3 else "a" for i in range(20)]}
    path = str(tmp_path / "table.parquet")
    datasets.Dataset.from_dict(rows).to_parquet(path)
    cfg = HFConfig(path=path, input_column="x", label_column="y", cache_dir=str(tmp_path / "cache"))
    ds = data.load(cfg, 0)
    assert ds.spec.input_shape == (2,) and ds.meta["classes"] == ["a", "b"] and len(ds.splits["train"]) == 16
    ex = ds.splits["train"][0]
    assert ex["inputs"].dtype == np.float32 and int(ex["targets"]) in (0, 1)


# -- bad input: one line each, before anything is compiled ---------------------------------------------------------


def test_folder_without_classes(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders; an image folder needs one subfolder per class"):
        data.load(ImagesConfig(path=str(tmp_path / "empty")), 0)


def test_truncated_image_is_named(tmp_path):
    root = make_image_folder(str(tmp_path / "imgs"), classes=2, per_class=3)
    bad = os.path.join(root, "class_1", "2.png")
    raw = open(bad, "rb").read()
    open(bad, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=f"image '{bad}' cannot be decoded"):
        data.load(ImagesConfig(path=root), 0)


def test_mixed_channel_counts(tmp_path):
    root = make_image_folder(str(tmp_path / "imgs"), classes=2, per_class=3)
    make_image_folder(str(tmp_path / "grey"), classes=1, per_class=1, channels=1)
    os.replace(str(tmp_path / "grey" / "class_0" / "0.png"), os.path.join(root, "class_1", "grey.png"))
    with pytest.raises(DataError, match=r"different channel counts \(1 in .*grey.png', 3 in "):
        data.load(ImagesConfig(path=root), 0)


def test_datasets_folder_missing_the_column(tmp_path):
    with pytest.raises(DataError, match=r"data.label_column='label': the train split of .* has no such column; "
                                        r"its columns are \['img', 'kind'\]"):
        data.load(HFConfig(path=hf_images(tmp_path), input_column="img"), 0)
