"""Hugging Face `datasets` from disk (data=hf): a folder written by `save_to_disk`, local parquet/json/csv files,
or an image folder, read through `datasets` and served to grain as random-access sources. Nothing is fetched from
the Hub (offline mode is forced).

data.input_column holds images (a datasets Image feature: decoded, resized and normalised as data=images does,
statistics from the training split) or numbers (a scalar, list or array per row, used as they are);
data.label_column holds class ids (ClassLabel or integers) or class names (strings, numbered in sorted order).
Splits named train / validation (or val, valid) / test are used as they are; a dataset with a train split only is
divided by data.val_fraction / data.test_fraction.
"""

import os
from dataclasses import dataclass, field

import numpy as np

from mlsys.data.images import channel_stats, channels_of, moments, to_array
from mlsys.data.sources import DataConfig, Dataset, register, split_rows
from mlsys.errors import DataError
from mlsys.spec import DataSpec

FORMATS = ("auto", "disk", "parquet", "json", "csv", "imagefolder")
FILE_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


@dataclass
class HFConfig(DataConfig):
    name: str = "hf"
    path: str = "???"  # a save_to_disk folder, a .parquet/.json/.jsonl/.csv file or folder of them, an image folder
    format: str = "auto"  # one of FORMATS; auto = from what path holds
    input_column: str = "image"
    label_column: str = "label"
    image_size: int = 0  # image columns: the side of the square images; 0 = the first image's height
    augment: list[str] = field(default_factory=list)  # image columns: as data=images (crop, flip; training only)
    crop_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])
    val_fraction: float = 0.1  # used only when the dataset has a train split alone
    test_fraction: float = 0.1
    split_seed: int = 0
    cache_dir: str = ""  # where `datasets` converts parquet/json/csv to arrow; "" = its default (HF_DATASETS_CACHE)


def detect_format(path: str) -> str:
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext in FILE_FORMATS:
            return FILE_FORMATS[ext]
    elif os.path.isdir(path):
        names = os.listdir(path)
        if {"dataset_dict.json", "dataset_info.json", "state.json"} & set(names):
            return "disk"
        kinds = {FILE_FORMATS[e] for e in (os.path.splitext(n)[1].lower() for n in names) if e in FILE_FORMATS}
        if len(kinds) == 1:
            return kinds.pop()
        if any(os.path.isdir(os.path.join(path, n)) for n in names):
            return "imagefolder"
    raise DataError(f"data.path={path!r}: not a dataset saved with save_to_disk, a .parquet/.json/.jsonl/.csv file "
                    f"or folder of them, nor an image folder; give one of those, or set data.format")


def open_dataset(cfg: HFConfig) -> dict:
    """{split name: datasets.Dataset} as stored."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never the Hub: local files only
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    if not os.path.exists(cfg.path):
        raise DataError(f"data.path={cfg.path!r}: no such file or folder")
    fmt = detect_format(cfg.path) if cfg.format == "auto" else cfg.format
    try:
        if fmt == "disk":
            ds = datasets.load_from_disk(cfg.path)
        elif fmt == "imagefolder":
            ds = datasets.load_dataset("imagefolder", data_dir=cfg.path, cache_dir=cfg.cache_dir or None)
        else:
            files = (cfg.path if os.path.isfile(cfg.path) else
                     sorted(os.path.join(cfg.path, n) for n in os.listdir(cfg.path)
                            if FILE_FORMATS.get(os.path.splitext(n)[1].lower()) == fmt))
            ds = datasets.load_dataset(fmt, data_files=files, cache_dir=cfg.cache_dir or None)
    except Exception as e:  # datasets raises many kinds; all mean "this is not a readable dataset"
        raise DataError(f"data.path={cfg.path!r}: datasets cannot read it as {fmt} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]})") from None
    return dict(ds) if isinstance(ds, datasets.DatasetDict) else {"train": ds}


def pick_splits(stored: dict, cfg: HFConfig) -> dict:
    """{"train": (dataset, rows), "val": ..., "test": ...}: the stored splits, or the train split divided."""
    found = {k: next((stored[n] for n in names if n in stored), None) for k, names in SPLIT_NAMES.items()}
    if found["train"] is None:
        raise DataError(f"data.path={cfg.path!r} has splits {sorted(stored)} but no 'train' split")
    if found["val"] is None and found["test"] is None:
        train = found["train"]
        rows = split_rows(len(train), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
        return {k: (train, r) for k, r in rows.items() if len(r)}
    return {k: (d, np.arange(len(d))) for k, d in found.items() if d is not None and len(d)}


class HFSource:
    """Rows of a datasets.Dataset: inputs converted (images decoded and normalised), labels as class ids."""

    def __init__(self, ds, rows: np.ndarray, cfg: HFConfig, convert, labels):
        self.ds, self.rows, self.convert, self.labels = ds, rows, convert, labels
        self.x_col, self.y_col = cfg.input_column, cfg.label_column

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        ex = self.ds[int(self.rows[i])]
        return {"inputs": self.convert(ex[self.x_col]), "targets": np.int32(self.labels(ex[self.y_col]))}


def check_columns(splits: dict, cfg: HFConfig) -> None:
    for name, (ds, _) in splits.items():
        for key in ("input_column", "label_column"):
            col = getattr(cfg, key)
            if col not in ds.column_names:
                raise DataError(f"data.{key}={col!r}: the {name} split of {cfg.path!r} has no such column; its "
                                f"columns are {ds.column_names}")


def label_map(splits: dict, cfg: HFConfig):
    """(row label → class id, number of classes, class names or None)."""
    import datasets

    ds = splits["train"][0]
    feature = ds.features[cfg.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return int, feature.num_classes, list(feature.names)
    values = [v for d, r in splits.values() for v in np.asarray(d[cfg.label_column], dtype=object)[r]]
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        ids = {n: i for i, n in enumerate(names)}
        return ids.__getitem__, len(names), names
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in values):
        bad = next(v for v in values if not (isinstance(v, (int, np.integer)) and v >= 0))
        raise DataError(f"data.label_column={cfg.label_column!r}: labels must be class ids (integers >= 0) or class "
                        f"names (strings); found {bad!r}")
    return int, int(max(values)) + 1, None


def image_converter(splits: dict, cfg: HFConfig):
    """Decode every image once (channel counts agree, nothing truncated), the training split's statistics, and
    the per-row conversion. Returns (convert, input shape, normalization meta)."""
    col, where = cfg.input_column, f"data.path={cfg.path!r}"
    modes, parts, size = {}, [], cfg.image_size
    for name, (ds, rows) in splits.items():
        for r in rows:
            try:
                img = ds[int(r)][col]
                img.load()
            except Exception as e:  # a damaged image fails when datasets decodes it
                raise DataError(f"{where}: row {int(r)} of the {name} split: column {col!r} cannot be decoded as an "
                                f"image ({type(e).__name__}: {e}); replace or remove it") from None
            c = channels_of(img.mode)
            size = size or img.size[1]
            modes.setdefault(c, f"row {int(r)} of {name}")
            if len(modes) > 1:
                seen = ", ".join(f"{k} in {v}" for k, v in sorted(modes.items()))
                raise DataError(f"{where}: images in column {col!r} have different channel counts ({seen}); convert "
                                f"them to one mode (all RGB, or all greyscale)")
            if name == "train":
                parts.append(moments(to_array(img, size, c)))
    channels = next(iter(modes))
    mean, std = channel_stats(parts)
    m, s = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def convert(img):
        return (to_array(img, size, channels) - m) / s

    norm = {"pixels": "[0, 1] (8-bit value / 255)", "mean": mean, "std": std, "image_size": size}
    return convert, (size, size, channels), norm


def load_hf(cfg: HFConfig, seed: int) -> Dataset:
    import datasets

    splits = pick_splits(open_dataset(cfg), cfg)
    check_columns(splits, cfg)
    labels, num_classes, names = label_map(splits, cfg)
    feature = splits["train"][0].features[cfg.input_column]
    meta = {"source": os.path.abspath(cfg.path), "columns": [cfg.input_column, cfg.label_column]}
    if names is not None:
        meta["classes"] = names
    if isinstance(feature, datasets.Image):
        convert, shape, meta["normalization"] = image_converter(splits, cfg)
    else:
        if cfg.augment:
            raise DataError(f"data.augment={list(cfg.augment)}: column {cfg.input_column!r} of {cfg.path!r} holds "
                            f"numbers, not images; set data.augment=[]")
        first = splits["train"][0][0][cfg.input_column]
        if isinstance(first, str) or not np.issubdtype(np.asarray(first).dtype, np.number):
            raise DataError(f"data.input_column={cfg.input_column!r} holds {type(first).__name__} values; data=hf "
                            f"reads image or numeric columns (text: use data=text)")

        def convert(v):
            return np.asarray(v, np.float32)

        shape = np.asarray(first).shape or (1,)
        if not np.asarray(first).shape:
            convert = (lambda v: np.asarray([v], np.float32))  # noqa: E731  one number per row: a 1-vector
    sources = {k: HFSource(d, r, cfg, convert, labels) for k, (d, r) in splits.items()}
    return Dataset(DataSpec("classify", tuple(int(s) for s in shape), "float32", num_classes), sources, meta)


register("hf", HFConfig, load_hf)
