"""The token cache of data=corpus: every document of the files, tokenized once, as one memmapped array of ids
(uint16, or uint32 for vocabularies over 65,536) with an EOS after each document, plus the documents' start
offsets. Keyed by the files' content, how documents are read from them and the tokenizer: a second run maps it
without tokenizing, a changed file gives a new key.

Building it: the files are cut into work units of about 16 MiB at document boundaries (or row groups of a
.parquet), tokenized in worker processes, each unit into its own part file, then joined in order into
tokens.bin: memory stays flat whatever the corpus size. Everything is written into a temporary folder renamed
into place at the end, so a cache is either whole or absent; a cache found truncated or edited (sizes and
sha256 in meta.json) is rebuilt with a warning.
"""

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from multiprocessing import get_context

import numpy as np
from tqdm import tqdm

from mlsys.errors import DataError
from mlsys.hashing import sha256_file

log = logging.getLogger("mlsys")
FORMAT = 1  # bump when the layout or the document rules change: old caches are then never read
BLOCK = 16 << 20  # bytes per work unit
FORMATS = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Unit:
    """A part of one file that a worker tokenizes: bytes [start, end) of a .txt/.jsonl, or one parquet row group.
    `continues`: its first piece continues the previous unit's last document; `ends`: its last document ends here."""

    path: str
    start: int
    end: int
    first_line: int = 1
    continues: bool = False
    ends: bool = True
    row_group: int = -1


@dataclass(frozen=True)
class Reading:
    """How documents are read from the files (part of the cache key)."""

    text_field: str
    txt_docs: str  # paragraph | line | file


def expand(patterns: list[str], key: str) -> list[str]:
    """Files named by `patterns` (paths or globs), in order, each once."""
    out = []
    for pattern in patterns:
        p = os.path.expanduser(pattern)
        hits = sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) else [p]
        hits = [h for h in hits if os.path.isfile(h)]
        if not hits:
            raise DataError(f"{key}: {pattern!r} matches no file; give existing {'/'.join(FORMATS)} files or globs, "
                            f"e.g. {key}=[data/*.jsonl]")
        for h in hits:
            if not h.endswith(FORMATS):
                raise DataError(f"{key}: {h!r} is not one of {list(FORMATS)}; convert it or narrow the glob")
            if h not in out:
                out.append(h)
    return out


def scan(files: list[str], reading: Reading) -> tuple[list[Unit], str]:
    """Cut the files into units, hashing their content on the way: (units, digest of all files)."""
    digest, units = hashlib.sha256(), []
    for path in files:
        h = hashlib.sha256()
        if path.endswith(".parquet"):
            units += _parquet_units(path, h)
        else:
            units += _text_units(path, reading, h)
        digest.update(f"{os.path.basename(path)}:{h.hexdigest()};".encode())
    return units, digest.hexdigest()


def _text_units(path: str, reading: Reading, h) -> list[Unit]:
    sep = b"\n" if path.endswith(".jsonl") or reading.txt_docs == "line" else (
        b"\n\n" if reading.txt_docs == "paragraph" else None)
    units, pos, line, continues = [], 0, 1, False
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            block = f.read(BLOCK)
            if pos + len(block) >= size:
                n, ends = len(block), True
            elif sep and (k := block.rfind(sep)) >= 0:
                n, ends = k + len(sep), True
            elif path.endswith(".jsonl"):
                raise DataError(f"{path}:{line}: a line longer than {BLOCK >> 20} MiB; one JSON object per line, "
                                f"each document shorter than that")
            else:  # a document longer than a block: cut after a newline, else between two UTF-8 characters
                k = block.rfind(b"\n")
                n, ends = (k + 1 if k >= 0 else _utf8_boundary(block)), False
            h.update(block[:n])
            units.append(Unit(path, pos, pos + n, line, continues, ends))
            line += block.count(b"\n", 0, n)
            pos, continues = pos + n, not ends
    return units


def _utf8_boundary(block: bytes) -> int:
    n = len(block)
    for back in range(1, 4):  # continuation bytes are 0b10xxxxxx
        if n - back > 0 and block[n - back] & 0xC0 != 0x80:
            return n - back if block[n - back] >= 0xC0 else n
    return n


def _parquet_units(path: str, h) -> list[Unit]:
    import pyarrow.parquet as pq

    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    try:
        groups = pq.ParquetFile(path).num_row_groups
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise DataError(f"{path}: cannot read it as parquet ({str(e).splitlines()[0]}); rewrite the file") from None
    return [Unit(path, 0, 0, row_group=g) for g in range(groups)]


def read_pieces(unit: Unit, reading: Reading) -> list[str]:
    """The texts of a unit's documents (the first and last may be pieces of documents spanning units)."""
    if unit.row_group >= 0:
        return _parquet_pieces(unit, reading.text_field)
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        raw = f.read(unit.end - unit.start)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{unit.path}: not UTF-8 at byte {unit.start + e.start} ({e.reason}); convert the file, "
                        f"e.g. iconv -f latin1 -t utf-8") from None
    if unit.path.endswith(".jsonl"):
        return _jsonl_pieces(text, unit, reading.text_field)
    if reading.txt_docs == "file":
        return [text]
    return text.split("\n" if reading.txt_docs == "line" else "\n\n")


def _jsonl_pieces(text: str, unit: Unit, field: str) -> list[str]:
    out = []
    for i, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        where = f"{unit.path}:{unit.first_line + i}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not a JSON object ({e}); a .jsonl file holds one JSON object per line")
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{where}: no text field {field!r} (the row has {keys}); set data.text_field to the "
                            f"field that holds the text")
        out.append(row[field])
    return out


def _parquet_pieces(unit: Unit, field: str) -> list[str]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(unit.path)
    if field not in f.schema_arrow.names:
        raise DataError(f"{unit.path}: no column {field!r} (it has {f.schema_arrow.names}); set data.text_field to "
                        f"the column that holds the text")
    column = f.read_row_group(unit.row_group, columns=[field]).column(0).to_pylist()
    for i, value in enumerate(column):
        if not isinstance(value, str):
            row = sum(f.metadata.row_group(g).num_rows for g in range(unit.row_group)) + i
            raise DataError(f"{unit.path}: row {row} of column {field!r} is {type(value).__name__}, not text; "
                            f"drop or fill such rows")
    return column


def assign(pieces: list, unit: Unit, state: dict) -> list[tuple[int, bool]]:
    """(document index or -1 for a dropped empty document, whether the document ends here) of each piece; `state`
    ({"next", "open"}) carries the open document from one unit to the next. The one rule that numbers documents:
    the cache and the tokenizer's training pass both use it."""
    out, last = [], len(pieces) - 1
    for j, piece in enumerate(pieces):
        closes = not (j == last and not unit.ends)
        if j == 0 and unit.continues and state["open"]:
            idx = state["next"] - 1
        elif not piece and closes:
            idx = -1  # an empty document (consecutive separators, a blank row) is no document
        else:
            idx, state["next"] = state["next"], state["next"] + 1
        if idx >= 0:
            state["open"] = not closes
        out.append((idx, closes))
    return out


def documents(units: list[Unit], reading: Reading):
    """(document index, text piece) of every document, in order, read in this process (tokenizer training)."""
    state = {"next": 0, "open": False}
    for unit in units:
        pieces = read_pieces(unit, reading)
        for (idx, _), piece in zip(assign(pieces, unit, state), pieces):
            if idx >= 0 and piece:
                yield idx, piece


# --- Workers: one unit each, tokens into a part file --------------------------------------------------------

_TOKENIZERS = {}


def _tokenize_unit(unit: Unit, reading: Reading, tok_spec: tuple, part: str) -> np.ndarray:
    from mlsys.tokenizer import from_spec

    key = hashlib.sha256(repr(tok_spec).encode()).hexdigest()
    tok = _TOKENIZERS.get(key) or _TOKENIZERS.setdefault(key, from_spec(tok_spec))
    pieces, lengths = read_pieces(unit, reading), []
    with open(part, "wb") as out:
        # About 1 MiB of text per call: a tokenizer's per-token objects for a whole 16 MiB unit would be the
        # largest thing in memory (measured: a worker's peak grew from 380 to 580 MB between 25 and 100 MB corpora).
        start, size = 0, 0
        for end, piece in enumerate(pieces, 1):
            size += len(piece)
            if size >= 1 << 20 or end == len(pieces):
                ids = tok.encode_batch(pieces[start:end])
                lengths += [len(x) for x in ids]
                if ids:
                    np.concatenate(ids).astype(tok.dtype).tofile(out)
                start, size = end, 0
    return np.asarray(lengths, np.int64)


def _init_worker():
    os.environ["RAYON_NUM_THREADS"] = "1"  # one worker per core: no thread pool inside each


def build(units: list[Unit], reading: Reading, tok, cache_dir: str, key: str, workers: int) -> str:
    """Tokenize into <cache_dir>/tokens-<key> (atomically) and return that folder."""
    final = os.path.join(cache_dir, f"tokens-{key}")
    tmp = tempfile.mkdtemp(prefix=f"tokens-{key}.", suffix=".partial", dir=cache_dir)
    try:
        _build_into(tmp, units, reading, tok, workers)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same cache first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _build_into(tmp: str, units: list[Unit], reading: Reading, tok, workers: int) -> None:
    parts = [os.path.join(tmp, f"part-{i:06d}.bin") for i in range(len(units))]
    sizes = [(u.end - u.start) if u.row_group < 0 else os.path.getsize(u.path) // max(1, _groups(u, units))
             for u in units]
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="tokenizing", disable=None, leave=False)
    spec = tok.spec()
    lengths = []
    if workers > 1 and len(units) > 1:
        # Spawned, not forked: this process may hold JAX's and the tokenizer's threads. A script that starts
        # training needs the usual `if __name__ == "__main__":` guard.
        try:
            with ProcessPoolExecutor(min(workers, len(units)), mp_context=get_context("spawn"),
                                     initializer=_init_worker) as pool:
                futures = [pool.submit(_tokenize_unit, u, reading, spec, p) for u, p in zip(units, parts)]
                for f, size in zip(futures, sizes):
                    lengths.append(f.result())
                    bar.update(size)
        except BrokenProcessPool as e:
            log.warning("tokenizer worker processes failed (%s); tokenizing in this process instead", e)
            lengths = []
            bar.reset()
    if not lengths:
        for u, p, size in zip(units, parts, sizes):
            lengths.append(_tokenize_unit(u, reading, spec, p))
            bar.update(size)
    bar.close()
    eos = tok.specials["eos"]
    state, doc_lengths, h = {"next": 0, "open": False}, [], hashlib.sha256()
    with open(os.path.join(tmp, "tokens.bin"), "wb") as out:
        for unit, part, lens in zip(units, parts, lengths):
            ids = np.fromfile(part, tok.dtype)
            os.remove(part)
            ends = np.cumsum(lens)
            eos_at = []
            for (idx, closes), n, end in zip(assign([bool(n) for n in lens], unit, state), lens, ends):
                if idx < 0:
                    continue
                if idx == len(doc_lengths):
                    doc_lengths.append(0)
                doc_lengths[idx] += int(n) + closes
                if closes:
                    eos_at.append(end)
            chunk = np.insert(ids, np.asarray(eos_at, np.int64), np.asarray(eos, tok.dtype))
            h.update(chunk.tobytes())
            chunk.tofile(out)
    starts = np.concatenate([[0], np.cumsum(doc_lengths, dtype=np.int64)])
    np.save(os.path.join(tmp, "docs.npy"), starts)
    meta = {"format": FORMAT, "n_tokens": int(starts[-1]), "n_docs": len(doc_lengths),
            "dtype": np.dtype(tok.dtype).name, "tokens_sha256": h.hexdigest(),
            "docs_sha256": sha256_file(os.path.join(tmp, "docs.npy")), "tokenizer": tok.describe(),
            "reading": asdict(reading), "files": sorted({u.path for u in units})}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def _groups(unit: Unit, units: list[Unit]) -> int:
    return sum(1 for u in units if u.path == unit.path)


def problem(folder: str) -> str | None:
    """Why a cache folder cannot be used (truncated, edited, unreadable), or None when it is whole."""
    try:
        meta = json.load(open(os.path.join(folder, "meta.json")))
        tokens = os.path.join(folder, "tokens.bin")
        want = meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
        if meta.get("format") != FORMAT:
            return f"format {meta.get('format')}, not {FORMAT}"
        if os.path.getsize(tokens) != want:
            return f"tokens.bin has {os.path.getsize(tokens)} bytes, {want} expected (truncated)"
        if sha256_file(tokens) != meta["tokens_sha256"] or sha256_file(os.path.join(folder, "docs.npy")) != meta["docs_sha256"]:
            return "its content does not match the checksum in meta.json (edited)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable ({e})"
    return None


def open_cache(folder: str) -> tuple[np.memmap, np.ndarray]:
    """(tokens memmap, document start offsets with the end appended) of a whole cache."""
    meta = json.load(open(os.path.join(folder, "meta.json")))
    tokens = np.memmap(os.path.join(folder, "tokens.bin"), dtype=meta["dtype"], mode="r", shape=(meta["n_tokens"],))
    docs = os.path.join(folder, "docs.npy")
    return tokens, np.load(docs, allow_pickle=False)


def cached(units: list[Unit], digest: str, reading: Reading, tok, cache_dir: str, workers: int):
    """The corpus's token cache, built when missing and rebuilt (with a warning) when damaged."""
    key = hashlib.sha256(f"{FORMAT}|{digest}|{reading}|{tok.fingerprint}".encode()).hexdigest()[:20]
    folder = os.path.join(cache_dir, f"tokens-{key}")
    if os.path.isdir(folder):
        why = problem(folder)
        if why is None:
            return open_cache(folder)
        log.warning("token cache %s is damaged: %s; rebuilding it", folder, why)
        shutil.rmtree(folder, ignore_errors=True)
    return open_cache(build(units, reading, tok, cache_dir, key, workers))
