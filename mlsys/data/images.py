"""Images from disk (data=images): a folder with one subfolder per class (PNG/JPEG/... decoded with Pillow where the
pipeline reads them), or an .npz of an (N, H, W[, C]) image array and its labels.

Every image is resized (shorter side to data.image_size, then a centre crop) to a square, scaled to [0, 1], and
normalised per channel with the mean and standard deviation of the training split. Those statistics are computed
when the data is loaded (the same pass that proves every file decodes) and saved with the run
(normalization.json, and the export manifest); export folds them into the exported model, so that a served model
takes plain [0, 1] pixels. Augmentation (data.augment) happens on the device, in the train step: see augment.py.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mlsys.data.sources import DataConfig, Dataset, register, split_rows
from mlsys.errors import DataError
from mlsys.spec import DataSpec

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUGMENTS = ("crop", "flip")


@dataclass
class ImagesConfig(DataConfig):
    name: str = "images"
    path: str = "???"  # a folder of class subfolders (<path>/<class>/<image>.png), or an .npz
    image_size: int = 0  # the side of the square images the model sees; 0 = as stored (the first image's height)
    augment: list[str] = field(default_factory=list)  # training only, any of AUGMENTS: random resized crop, h-flip
    crop_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])  # crop area as a fraction of the image
    inputs_key: str = "inputs"  # .npz only: uint8 (0-255) or float ([0, 1]) images (N, H, W) or (N, H, W, C)
    targets_key: str = "targets"  # .npz only: integer class ids (N,)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0


def channels_of(mode: str) -> int:
    """Channels an image of this Pillow mode becomes: grey 1, colour 3, with alpha 4."""
    return 4 if "A" in mode else 3 if mode in ("RGB", "P", "CMYK", "YCbCr", "LAB", "HSV") else 1


def fit(img, size: int):
    """A Pillow image with its shorter side resized to `size`, centre-cropped to size x size."""
    from PIL import Image

    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.resize((nw, nh), Image.BILINEAR).crop((left, top, left + size, top + size))


def to_array(img, size: int, channels: int) -> np.ndarray:
    """A Pillow image → (size, size, channels) float32 in [0, 1]."""
    img = fit(img.convert({1: "L", 3: "RGB", 4: "RGBA"}[channels]), size)
    return (np.asarray(img, dtype=np.float32) / 255.0).reshape(size, size, channels)


def resize_array(x: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) float array → (size, size, C), resized as images are (per channel, as 32-bit float images)."""
    from PIL import Image

    if x.shape[0] == size and x.shape[1] == size:
        return x
    return np.stack([np.asarray(fit(Image.fromarray(x[..., c], mode="F"), size), np.float32)
                     for c in range(x.shape[-1])], axis=-1)


def open_image(path: str, where: str):
    """The decoded Pillow image, or a DataError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()  # decodes fully: a truncated file fails here, not in the middle of training
            return img
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: image {path!r} cannot be decoded ({e}); it is truncated, damaged or not an "
                        f"image: replace or remove it") from None


class ImageFiles:
    """A split of an image folder: decodes, resizes and normalises one file per read (in the pipeline's reader)."""

    def __init__(self, files: list[str], labels: np.ndarray, size: int, channels: int, mean, std, where: str):
        self.files, self.labels, self.size, self.channels = files, labels, size, channels
        self.mean, self.std, self.where = np.asarray(mean, np.float32), np.asarray(std, np.float32), where

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        x = to_array(open_image(self.files[i], self.where), self.size, self.channels)
        return {"inputs": (x - self.mean) / self.std, "targets": self.labels[i]}


class ImageArrays:
    """A split of in-memory images in [0, 1], normalised per read."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std):
        self.images, self.labels = images, labels
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return {"inputs": (self.images[i] - self.mean) / self.std, "targets": self.labels[i]}


def moments(x: np.ndarray) -> tuple:
    """(count, per-channel sum, per-channel sum of squares) of an (..., C) array, in float64."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return len(flat), flat.sum(0), (flat ** 2).sum(0)


def channel_stats(parts) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation from moments() of the parts."""
    n, s, s2 = (sum(p[i] for p in parts) for i in range(3))
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
    return mean.tolist(), np.where(std > 1e-6, std, 1.0).tolist()  # a constant channel is left unscaled


def scan_folder(cfg: ImagesConfig) -> tuple[list[str], np.ndarray, list[str]]:
    """(files, labels, class names) of a folder of class subfolders, in a fixed order."""
    where = f"data.path={cfg.path!r}"
    root = cfg.path
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    files, labels = [], []
    for k, c in enumerate(classes):
        names = sorted(f for f in os.listdir(os.path.join(root, c)) if f.lower().endswith(EXTENSIONS))
        if not names:
            raise DataError(f"{where}: class folder {c!r} holds no images ({', '.join(EXTENSIONS)}); add images or "
                            f"remove the folder")
        files += [os.path.join(root, c, f) for f in names]
        labels += [k] * len(names)
    if len(classes) < 2:
        loose = [f for f in os.listdir(root) if f.lower().endswith(EXTENSIONS)]
        found = (f"{len(classes)} class folder ({classes[0]!r})" if classes else
                 f"no class folders{f' but {len(loose)} loose images' if loose else ''}")
        raise DataError(f"{where}: {found}; an image folder needs one subfolder per class, at least 2: "
                        f"{root}/<class>/<image>.png")
    return files, np.asarray(labels, np.int32), classes


def load_folder(cfg: ImagesConfig) -> Dataset:
    where = f"data.path={cfg.path!r}"
    files, labels, classes = scan_folder(cfg)
    size = cfg.image_size or open_image(files[0], where).size[1]

    # One pass over every file before anything is compiled: each must decode, all must have one channel count;
    # the training split's statistics come from the same pass. Pillow decodes outside the GIL: threads help.
    rows = split_rows(len(files), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    train = np.zeros(len(files), bool)
    train[rows["train"]] = True

    def probe(i: int):
        img = open_image(files[i], where)
        c = channels_of(img.mode)
        return c, moments(to_array(img, size, c)) if train[i] else None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        probed = list(pool.map(probe, range(len(files))))
    modes = {}
    for path, (c, _) in zip(files, probed):
        modes.setdefault(c, path)
    if len(modes) > 1:
        seen = ", ".join(f"{c} in {p!r}" for c, p in sorted(modes.items()))
        raise DataError(f"{where}: images have different channel counts ({seen}); convert them all to one mode "
                        f"(e.g. all RGB, or all greyscale)")
    channels = next(iter(modes))
    mean, std = channel_stats([m for _, m in probed if m is not None])
    splits = {k: ImageFiles([files[i] for i in r], labels[r], size, channels, mean, std, where)
              for k, r in rows.items() if len(r)}
    return _dataset(splits, (size, size, channels), len(classes), mean, std,
                    {"classes": classes, "source": os.path.abspath(cfg.path)})


def read_image_npz(cfg: ImagesConfig) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, C) float32 in [0, 1], labels (N,) int32) from data.path's .npz."""
    where, xk, yk = f"data.path={cfg.path!r}", cfg.inputs_key, cfg.targets_key
    try:
        with np.load(cfg.path, allow_pickle=False) as f:  # never unpickle a user's file
            missing = [k for k in (xk, yk) if k not in f.files]
            if missing:
                raise DataError(f"{where} has no array {missing[0]!r}; it holds {sorted(f.files)} (set "
                                f"data.inputs_key / data.targets_key)")
            x, y = f[xk], f[yk]
    except (OSError, ValueError, EOFError, AttributeError) as e:
        raise DataError(f"{where}: cannot read it as an .npz of images ({e}); save it with "
                        f"np.savez(path, {xk}=images, {yk}=labels)") from None
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4) or len(x) != len(y) or y.ndim != 1 or not len(x):
        raise DataError(f"{where}: arrays {xk!r} {x.shape} and {yk!r} {y.shape}: need images (N, H, W) or (N, H, W, "
                        f"C) with C in 1, 3, 4, and N labels (N,)")
    if not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise DataError(f"{where}: array {yk!r} must hold integer class ids >= 0, got {y.dtype}")
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / (255.0 if x.max() <= 255 else 65535.0)
    return x.astype(np.float32), y.astype(np.int32)


def load_npz(cfg: ImagesConfig) -> Dataset:
    x, y = read_image_npz(cfg)
    if cfg.image_size:
        x = np.stack([resize_array(img, cfg.image_size) for img in x])
    rows = split_rows(len(x), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    mean, std = channel_stats([moments(x[rows["train"]])])
    splits = {k: ImageArrays(x[r], y[r], mean, std) for k, r in rows.items() if len(r)}
    return _dataset(splits, x.shape[1:], int(y.max()) + 1, mean, std, {"source": os.path.abspath(cfg.path)})


def _dataset(splits, shape, num_classes: int, mean, std, meta: dict) -> Dataset:
    spec = DataSpec("classify", tuple(int(s) for s in shape), "float32", num_classes)
    norm = {"pixels": "[0, 1] (8-bit value / 255)", "mean": mean, "std": std, "image_size": int(shape[0])}
    return Dataset(spec, splits, {**meta, "normalization": norm})


def load_images(cfg: ImagesConfig, seed: int) -> Dataset:
    where = f"data.path={cfg.path!r}"
    if os.path.isdir(cfg.path):
        return load_folder(cfg)
    if os.path.isfile(cfg.path):
        return load_npz(cfg)
    raise DataError(f"{where}: no such file or folder; give a folder of class subfolders or an .npz")


register("images", ImagesConfig, load_images)
