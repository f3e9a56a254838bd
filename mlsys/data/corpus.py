"""data=corpus: a language-modelling dataset from your own files.

files (data.paths: .txt, .jsonl with data.text_field, .parquet) → tokenizer (data.tokenizer, mlsys/tokenizer.py)
→ token cache (mlsys/data/cache.py) → held-out documents → packed rows (data.packing, mlsys/data/packing.py).
The training and validation splits are random-access sources over the memmapped cache, so the grain pipeline
shuffles, checkpoints and shards them across processes like any other source (each process reads only its rows).

Documents: a .jsonl row, a parquet row, or in a .txt a paragraph (blank-line separated; data.txt_docs=line or
file change that). Validation: every document i with floor((i + 1) f) > floor(i f) for f = data.val_fraction
(evenly spread, exactly floor(n f) of n), or all the documents of data.val_paths instead.
"""

import json
import os
import tempfile

import numpy as np

from mlsys.data.cache import Reading, cached, documents, expand, scan
from mlsys.data.packing import ConcatSource, SegmentSource
from mlsys.errors import ConfigError, DataError
from mlsys.spec import DataSpec
from mlsys.tokenizer import KINDS, ByteTokenizer, CharTokenizer, check_vocab_size, from_spec, load_file, train_bpe

PACKINGS = ("concat", "segments")
TXT_DOCS = ("paragraph", "line", "file")


def check_lm_data(d) -> None:
    """Config checks of the language-model data keys (before anything is read or compiled)."""
    kind = d.tokenizer or getattr(d, "level", "")
    if kind not in KINDS and not kind.endswith(".json"):
        raise ConfigError(f"data.tokenizer={kind!r}: must be one of {list(KINDS)} or the path of a tokenizer.json")
    if kind not in KINDS and not os.path.isfile(os.path.expanduser(kind)):
        raise ConfigError(f"data.tokenizer={kind!r}: no such file; give the path of a tokenizer.json, or one of "
                          f"{list(KINDS)}")
    if kind == "bpe":
        check_vocab_size(d.vocab_size)
    if d.name != "corpus":
        return
    if not d.paths or "???" in d.paths:
        raise ConfigError("data.paths is not set: give your files or globs, e.g. data.paths=[corpus/*.jsonl]")
    if d.packing not in PACKINGS:
        raise ConfigError(f"data.packing={d.packing!r}: must be one of {list(PACKINGS)}")
    if d.txt_docs not in TXT_DOCS:
        raise ConfigError(f"data.txt_docs={d.txt_docs!r}: must be one of {list(TXT_DOCS)}")
    if not d.val_paths and not 0 < d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={d.val_fraction!r}: must be in (0, 1), or give data.val_paths")
    if d.workers < 0:
        raise ConfigError(f"data.workers={d.workers}: must be >= 0 (0 = one per CPU core, 1 = no worker processes)")


def writable_cache(cache_dir: str) -> str:
    path = os.path.abspath(os.path.expanduser(cache_dir))
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise DataError(f"data.cache_dir={cache_dir!r}: cannot write there ({e.strerror}); set data.cache_dir to a "
                        f"writable folder") from None
    return path


def is_val(index, fraction: float):
    """The held-out documents: evenly spread, floor(n * fraction) of the first n."""
    index = np.asarray(index, np.int64)
    return np.floor((index + 1) * fraction) > np.floor(index * fraction)


def make_tokenizer(cfg, units, digest: str, reading: Reading, cache_dir: str, has_val_files: bool):
    """The corpus's tokenizer. Every one has an end-of-text id (documents are joined or ended with it)."""
    kind = cfg.tokenizer
    if kind == "byte":
        return ByteTokenizer(("eos",))
    if kind in ("char", "bpe"):
        saved = os.path.join(cache_dir, f"{kind}-{cfg.vocab_size if kind == 'bpe' else 0}-{cfg.val_fraction}-"
                                        f"{has_val_files}-{digest[:16]}.json")
        if kind == "char":
            if os.path.isfile(saved):
                return from_spec(tuple(json.load(open(saved))))
            chars = set()
            for _, text in documents(units, reading):  # every document's characters, held-out ones too
                chars.update(text)
            tok = CharTokenizer(sorted(chars), ("eos",))
            with open(saved + ".tmp", "w") as f:
                json.dump(tok.spec(), f)
            os.replace(saved + ".tmp", saved)
            return tok
        # BPE learns from the training documents only (streamed: memory does not grow with the corpus)
        texts = (text for i, text in documents(units, reading) if has_val_files or not is_val(i, cfg.val_fraction))
        return train_bpe(texts, cfg.vocab_size, cache_dir, f"{cfg.val_fraction}-{has_val_files}-{digest[:16]}")
    tok = load_file(os.path.expanduser(kind))
    if "eos" not in tok.specials:
        raise ConfigError(f"data.tokenizer={kind!r} has no end-of-text token (looked for "
                          f"{', '.join(('<|endoftext|>', '</s>', '<|end_of_text|>'))}); add one to its "
                          f"added_tokens, or use data.tokenizer=bpe")
    return tok


class DocStream:
    """Chosen documents of the cache joined end to end, sliceable like an array (only what a slice covers is
    read from the memmap)."""

    def __init__(self, tokens, starts: np.ndarray, lengths: np.ndarray):
        self.tokens, self.starts = tokens, np.asarray(starts, np.int64)
        self.cum = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.cum[-1])

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b = sl.start or 0, min(sl.stop, len(self))
        i, parts = int(np.searchsorted(self.cum, a, "right")) - 1, []
        while a < b:
            take = min(b, int(self.cum[i + 1])) - a
            s = int(self.starts[i] + a - self.cum[i])
            parts.append(np.asarray(self.tokens[s: s + take]))
            a, i = a + take, i + 1
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def split_source(tokens, starts, lengths, cfg, tok, split: str):
    if cfg.packing == "segments":
        return SegmentSource(tokens, starts, lengths, cfg.seq_len, tok.token_bytes, tok.specials.get("pad", 0))
    # Training windows start anywhere; validation windows tile the split, so that an evaluation of the whole
    # split covers each token once.
    stride = 1 if split == "train" else cfg.seq_len
    return ConcatSource(DocStream(tokens, starts, lengths), cfg.seq_len, stride, tok.token_bytes)


def load_corpus(cfg):
    """The Dataset of data=corpus (see the module docstring)."""
    from mlsys.data.sources import Dataset

    cache_dir = writable_cache(cfg.cache_dir)
    reading = Reading(cfg.text_field, cfg.txt_docs)
    units, digest = scan(expand(cfg.paths, "data.paths"), reading)
    val_units, val_digest = scan(expand(cfg.val_paths, "data.val_paths"), reading) if cfg.val_paths else ([], "")
    tok = make_tokenizer(cfg, units + val_units, digest + val_digest, reading, cache_dir, bool(cfg.val_paths))
    workers = cfg.workers or os.cpu_count() or 1
    tokens, offsets = cached(units, digest, reading, tok, cache_dir, workers)
    starts, lengths = offsets[:-1], np.diff(offsets)
    if cfg.val_paths:
        v_tokens, v_offsets = cached(val_units, val_digest, reading, tok, cache_dir, workers)
        parts = {"train": (tokens, starts, lengths), "val": (v_tokens, v_offsets[:-1], np.diff(v_offsets))}
    else:
        held = is_val(np.arange(len(starts)), cfg.val_fraction)
        parts = {"train": (tokens, starts[~held], lengths[~held]), "val": (tokens, starts[held], lengths[held])}
    splits = {name: split_source(*part, cfg, tok, name) for name, part in parts.items()}
    check_size(splits, parts, cfg)
    spec = DataSpec("lm", (cfg.seq_len,), "int32", tok.vocab_size)
    meta = {"tokenizer": tok.describe(), "documents": {k: int(len(p[1])) for k, p in parts.items()},
            "tokens": {k: int(np.sum(p[2])) for k, p in parts.items()}, "packing": cfg.packing}
    return Dataset(spec, splits, meta, tok)


def check_size(splits: dict, parts: dict, cfg) -> None:
    """One training batch and one validation row at least, said in documents and tokens."""
    need = {"train": cfg.batch_size, "val": 1}
    for name, src in splits.items():
        if len(src) < need[name]:
            docs, toks = len(parts[name][1]), int(np.sum(parts[name][2]))
            what = "one batch (data.batch_size)" if name == "train" else "one validation row"
            fix = ("add documents, or lower data.batch_size or data.seq_len" if name == "train" else
                   "add documents, raise data.val_fraction, or give data.val_paths")
            raise DataError(f"data.paths: the {name} split has {docs} documents, {toks} tokens = {len(src)} rows of "
                            f"data.seq_len={cfg.seq_len}, fewer than {what} needs ({need[name]}); {fix}")
