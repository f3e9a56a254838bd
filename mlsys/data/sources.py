"""Data sources: each turns its config into random-access splits of {"inputs", "targets"} examples plus the
DataSpec the model is built for. Deterministic: the same config gives the same examples in the same order."""

import json
import os
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from mlsys.data.checks import read_npz
from mlsys.data.packing import ConcatSource
from mlsys.errors import DataError
from mlsys.spec import DataSpec
from mlsys.tokenizer import ByteTokenizer, CharTokenizer, Tokenizer, load_file, train_bpe

SHIPPED_CORPUS = "tinyshakespeare.txt"  # in mlsys/assets, public domain


@dataclass
class DataConfig:
    name: str = "???"
    batch_size: int = 64  # global batch, split across processes and data-parallel devices
    eval_batch_size: int = 0  # 0 = batch_size
    eval_batches: int = 0  # batches per evaluation; 0 = the whole split


@dataclass
class DigitsConfig(DataConfig):
    name: str = "digits"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0  # fixed apart from the run's seed, so every run sees the same test set


@dataclass
class TextConfig(DataConfig):
    name: str = "text"
    path: str = SHIPPED_CORPUS  # a UTF-8 file; the bare name of a file in mlsys/assets also works
    level: str = "char"  # "char" (vocabulary = the file's characters) or "byte" (256 symbols)
    tokenizer: str = ""  # char | byte | bpe | <path to a tokenizer.json>; "" = data.level (see mlsys/tokenizer.py)
    vocab_size: int = 1024  # tokenizer=bpe: ids of the trained BPE (256 bytes + 3 specials + merges)
    cache_dir: str = "~/.cache/mlsys/data"  # trained tokenizers (and data=corpus token caches) are kept here
    seq_len: int = 64
    val_fraction: float = 0.1  # the last part of the file


@dataclass
class CorpusConfig(DataConfig):
    """Your own text files, tokenized once into a token cache (mlsys/data/corpus.py)."""

    name: str = "corpus"
    paths: list[str] = field(default_factory=lambda: ["???"])  # files or globs: .txt, .jsonl, .parquet
    text_field: str = "text"  # .jsonl / .parquet: the field holding each document's text
    txt_docs: str = "paragraph"  # .txt: a document is a "paragraph" (blank-line separated), a "line" or the "file"
    tokenizer: str = "bpe"  # char | byte | bpe | <path to a tokenizer.json>
    vocab_size: int = 1024  # tokenizer=bpe: ids of the trained BPE (256 bytes + 3 specials + merges)
    seq_len: int = 256
    packing: str = "concat"  # "concat" (joined with EOS, windows anywhere) or "segments" (one document per segment)
    val_fraction: float = 0.05  # held-out documents (evenly spread); ignored when val_paths is set
    val_paths: list[str] = field(default_factory=list)  # held-out files instead of a fraction
    cache_dir: str = "~/.cache/mlsys/data"  # token caches and trained tokenizers, keyed by content
    workers: int = 0  # tokenizing processes; 0 = one per CPU core, 1 = in this process


@dataclass
class SyntheticConfig(DataConfig):
    name: str = "synthetic"
    task: str = "lm"  # "lm" (random tokens) or "classify" (random images, random labels)
    seq_len: int = 64
    vocab_size: int = 256
    input_shape: list[int] = field(default_factory=lambda: [8, 8, 1])
    num_classes: int = 10
    size: int = 100_000  # examples per split


@dataclass
class ArraysConfig(DataConfig):
    name: str = "arrays"
    path: str = "???"  # a .npz file
    inputs_key: str = "inputs"
    targets_key: str = "targets"
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0


CONFIGS = {"digits": DigitsConfig, "text": TextConfig, "corpus": CorpusConfig, "synthetic": SyntheticConfig,
           "arrays": ArraysConfig}
LOADERS = {}  # name -> load(cfg, seed) -> Dataset; filled below and by register()


def register(name: str, config: type, loader) -> None:
    """Add a source: `data=<name>` selects `config` (a DataConfig subclass) and `loader(cfg, seed)` reads it."""
    CONFIGS[name], LOADERS[name] = config, loader


@dataclass
class Dataset:
    spec: DataSpec
    splits: dict  # name -> random-access source (len, getitem -> {"inputs", "targets"})
    meta: dict = field(default_factory=dict)  # saved into the run dir (e.g. the vocabulary)
    tokenizer: Tokenizer | None = None  # language models: the run's tokenizer (saved into the run dir)


class ArraySource:
    """Examples are rows of two aligned arrays."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray):
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i):
        return {"inputs": self.inputs[i], "targets": self.targets[i]}




class SyntheticSource:
    """Random examples generated from (seed, index): no memory, the same example every time it is read."""

    def __init__(self, cfg: SyntheticConfig, seed: int):
        self.cfg, self.seed = cfg, seed

    def __len__(self) -> int:
        return self.cfg.size

    def __getitem__(self, i):
        rng = np.random.default_rng((self.seed, int(i)))
        c = self.cfg
        if c.task == "lm":
            w = rng.integers(0, c.vocab_size, c.seq_len + 1, dtype=np.int32)
            return {"inputs": w[:-1], "targets": w[1:]}
        return {"inputs": rng.standard_normal(c.input_shape, dtype=np.float32),
                "targets": np.int32(rng.integers(0, c.num_classes))}


def split_rows(n: int, val: float, test: float, seed: int) -> dict:
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = int(round(n * test)), int(round(n * val))
    return {"train": order[n_test + n_val:], "val": order[n_test:n_test + n_val], "test": order[:n_test]}


def _array_dataset(x: np.ndarray, y: np.ndarray, cfg, task_meta: dict) -> Dataset:
    rows = split_rows(len(x), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    splits = {k: ArraySource(x[r], y[r]) for k, r in rows.items() if len(r)}
    spec = DataSpec("classify", tuple(x.shape[1:]), str(x.dtype), int(y.max()) + 1)
    return Dataset(spec, splits, task_meta)


def digits_file() -> str:
    """scikit-learn's packaged digits.csv.gz, found without importing sklearn: `import sklearn.datasets` costs
    seconds of CPU in every training process, and the file is all that load_digits reads."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # a top-level find_spec imports nothing
    path = (os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
            if spec and spec.submodule_search_locations else None)
    if not path or not os.path.isfile(path):
        raise DataError(f"data=digits reads scikit-learn's packaged digits.csv.gz, "
                        f"{'not found at ' + path if path else 'but scikit-learn is not installed'}; "
                        f"install scikit-learn (pip install scikit-learn)")
    return path


def load_digits(cfg: DigitsConfig) -> Dataset:
    import gzip

    # As sklearn.datasets.load_digits reads it: float64 rows of 64 pixels (0..16) then the label.
    with gzip.open(digits_file(), "rt", encoding="utf-8") as f:
        rows = np.loadtxt(f, delimiter=",")
    x = (rows[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32)[..., None]  # N 8 8 1, in [0, 1]
    return _array_dataset(x, rows[:, -1].astype(np.int32), cfg, {"normalization": "pixel / 16"})


def resolve_path(path: str) -> str:
    if not os.path.exists(path) and os.sep not in path:
        shipped = resources.files("mlsys") / "assets" / path
        if shipped.is_file():
            return str(shipped)
    return path


def load_text(cfg: TextConfig) -> Dataset:
    path = resolve_path(cfg.path)
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise DataError(f"data.path={cfg.path!r}: cannot read it ({e.strerror}); give an existing UTF-8 text file")
    if not raw:
        raise DataError(f"data.path={cfg.path!r}: the file is empty (0 bytes); give a UTF-8 text file of at least "
                        f"data.seq_len + 2 = {cfg.seq_len + 2} characters")
    kind = cfg.tokenizer or cfg.level
    if kind == "byte":
        tok = ByteTokenizer()
        parts = split_tail(np.frombuffer(raw, dtype=np.uint8).astype(np.uint16), cfg.val_fraction)
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise DataError(f"data.path={cfg.path!r} is not UTF-8 (line {line}, byte {e.start}: {e.reason}); "
                            f"convert it, or use data.tokenizer=byte") from None
        if kind == "char":
            tok = CharTokenizer(sorted(set(text)))
            parts = split_tail(tok.encode(text).astype(np.uint16), cfg.val_fraction)
        else:  # the split is cut in the text, then each part tokenized; BPE learns from the training part only
            cut = len(text) - int(len(text) * cfg.val_fraction)
            tok = (train_bpe([text[:cut]], cfg.vocab_size, cfg.cache_dir, text_digest(raw, cut)) if kind == "bpe"
                   else load_file(kind))
            parts = {"train": tok.encode(text[:cut]).astype(tok.dtype), "val": tok.encode(text[cut:]).astype(tok.dtype)}
    n_val = len(parts["val"])
    for name, part in parts.items():
        if len(part) < cfg.seq_len + 2 and (name == "train" or n_val):
            raise DataError(f"data.path={cfg.path!r}: the {name} split has {len(part)} tokens, fewer than "
                            f"data.seq_len + 2 = {cfg.seq_len + 2}; use a longer file or a smaller data.seq_len")
    splits = {k: ConcatSource(v, cfg.seq_len, token_bytes=tok.token_bytes) for k, v in parts.items()
              if len(v) >= cfg.seq_len + 2}
    spec = DataSpec("lm", (cfg.seq_len,), "int32", tok.vocab_size)
    meta = {"tokenizer": tok.describe(), "source": os.path.abspath(path)}
    if kind in ("char", "byte"):
        meta["vocab"] = {"level": kind, "chars": getattr(tok, "chars", None)}
    return Dataset(spec, splits, meta, tok)


def split_tail(tokens: np.ndarray, val_fraction: float) -> dict:
    n_val = int(len(tokens) * val_fraction)
    return {"train": tokens[: len(tokens) - n_val], "val": tokens[len(tokens) - n_val:]}


def text_digest(raw: bytes, cut: int) -> str:
    """Identifies a BPE's training text (the file's first `cut` characters) for the tokenizer cache."""
    import hashlib

    return hashlib.sha256(raw + str(cut).encode()).hexdigest()[:16]


def load_synthetic(cfg: SyntheticConfig, seed: int) -> Dataset:
    splits = {s: SyntheticSource(cfg, seed * 1000 + i) for i, s in enumerate(["train", "val"])}
    if cfg.task == "lm":
        spec = DataSpec("lm", (cfg.seq_len,), "int32", cfg.vocab_size)
    else:
        spec = DataSpec("classify", tuple(cfg.input_shape), "float32", cfg.num_classes)
    return Dataset(spec, splits)


def load_arrays(cfg: ArraysConfig) -> Dataset:
    x, y = read_npz(cfg)
    return _array_dataset(x.astype(np.float32), y.astype(np.int32), cfg, {})


def load(cfg, seed: int) -> Dataset:
    """The dataset a `data` config describes."""
    return LOADERS[cfg.name](cfg, seed)


def _load_corpus(cfg, seed: int) -> Dataset:
    from mlsys.data.corpus import load_corpus

    return load_corpus(cfg)


LOADERS.update(digits=lambda cfg, seed: load_digits(cfg), text=lambda cfg, seed: load_text(cfg),
               corpus=_load_corpus, synthetic=load_synthetic, arrays=lambda cfg, seed: load_arrays(cfg))


def save_meta(ds: Dataset, run_dir: str) -> None:
    """The run's tokenizer into its run dir: vocab.json (char, byte) or tokenizer.json (bpe, a file); image
    statistics of the training split: normalization.json."""
    if ds.tokenizer is not None:
        ds.tokenizer.save(run_dir)
    if isinstance(ds.meta.get("normalization"), dict):
        with open(os.path.join(run_dir, "normalization.json"), "w") as f:
            json.dump(ds.meta["normalization"], f)
