"""A user's data files, read defensively: every fault (missing, empty, truncated, corrupt, pickled objects, wrong
dtype or shape, bad class ids) is a DataError naming the file, the array and the record, before any compilation."""

import logging
import os
import zipfile
import zlib

import numpy as np

from mlsys.errors import ConfigError, DataError

log = logging.getLogger("mlsys")
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)  # what numpy raises for a bad file


def read_npz(cfg) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of data=arrays: inputs (N, ...) floating point, targets (N,) class ids >= 0."""
    where, xk, yk = f"data.path={cfg.path!r}", cfg.inputs_key, cfg.targets_key
    fix = f"save it with np.savez(path, {xk}=..., {yk}=...)"
    if os.path.isfile(cfg.path) and os.path.getsize(cfg.path) == 0:
        raise DataError(f"{where}: the file is empty (0 bytes); {fix}")
    try:
        f = np.load(cfg.path, allow_pickle=False)  # never unpickle a user's file
    except READ_ERRORS as e:
        raise DataError(f"{where}: cannot read it as .npz ({e}); it is missing, truncated or not an .npz: "
                        f"{fix}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise DataError(f"{where}: holds a single .npy array, not an .npz archive of arrays; {fix}")
    with f:
        missing = [k for k in (xk, yk) if k not in f.files]
        if missing:
            raise DataError(f"{where} has no array {missing[0]!r}; it holds {sorted(f.files)} (set "
                            f"data.inputs_key / data.targets_key)")
        arrays = {}
        for key in (xk, yk):
            try:
                arrays[key] = f[key]
            except READ_ERRORS as e:
                raise DataError(f"{where}: array {key!r} cannot be read ({e}); the file is damaged (truncated, "
                                f"bad CRC) or holds Python objects, which are never unpickled; {fix}") from None
    x, y = arrays[xk], arrays[yk]
    if x.ndim < 1 or y.ndim < 1 or len(x) != len(y) or len(x) == 0:
        raise DataError(f"{where}: {len(x) if x.ndim else 0} inputs but {len(y) if y.ndim else 0} targets (arrays "
                        f"{xk!r} {x.shape} and {yk!r} {y.shape}); they must be equal and > 0, one record per row")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise DataError(f"{where}: array {yk!r} must hold integer class ids of shape (N,), got {y.dtype} {y.shape}; "
                        f"e.g. {yk}=labels.astype(np.int32)")
    if (bad := np.flatnonzero(y < 0)).size:
        raise DataError(f"{where}: array {yk!r} row {bad[0]} is {y[bad[0]]}; class ids must be integers >= 0 "
                        f"({bad.size} rows are negative)")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{where}: array {xk!r} must be floating point, got {x.dtype}; e.g. "
                        f"{xk}=x.astype(np.float32)")
    if x.ndim < 2:
        raise DataError(f"{where}: array {xk!r} has shape {x.shape}, one number per record; give (N, features...)"
                        f", e.g. {xk}=x.reshape(len(x), -1)")
    rows = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if rows.size:  # allowed, but said loudly: such rows give non-finite losses (see trainer.on_nan)
        log.warning("%s: array %r has %d rows with NaN/Inf (first: row %d); steps that read them have a "
                    "non-finite loss (trainer.on_nan=stop stops, skip skips them)", where, xk, rows.size, rows[0])
    return x, y


def check_batches(splits: dict, cfg) -> None:
    """Batches the splits can fill, known once the data is read: a training batch larger than the training split
    never completes (the pipeline drops the incomplete batch of every epoch and would spin on empty epochs); an
    evaluation batch chosen larger than a held-out split is almost all padding."""
    n = len(splits["train"])
    if cfg.batch_size > n:
        raise ConfigError(f"data.batch_size={cfg.batch_size}: larger than the training split of data={cfg.name} "
                          f"({n} examples); use at most {n}")
    for name in ("val", "test"):
        if cfg.eval_batch_size and name in splits and cfg.eval_batch_size > len(splits[name]):
            raise ConfigError(f"data.eval_batch_size={cfg.eval_batch_size}: larger than the {name} split of "
                              f"data={cfg.name} ({len(splits[name])} examples); use at most {len(splits[name])}")


def check_vocab(model_cfg, spec) -> None:
    """A language model must have an output for every id the tokenizer produces."""
    v = getattr(model_cfg, "vocab_size", 0)
    if spec.task == "lm" and v and v < spec.num_classes:
        raise DataError(f"model.vocab_size={v} is smaller than the tokenizer's vocabulary ({spec.num_classes} ids); "
                        f"set model.vocab_size=0 (= the tokenizer's) or >= {spec.num_classes}")
