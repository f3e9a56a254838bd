"""Reading a Hugging Face folder's safetensors weights region by region: one tensor's rows at a time, with plain
positioned reads (no mmap, so pages read once are not held in the process; bfloat16 read as such). A sharded
checkpoint (`model.safetensors.index.json` + its files) reads like one file. Pickles are never opened.

The safetensors layout: 8 bytes little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}}, then the data, row-major, offsets relative to the end of the header."""

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np

from mlsys.errors import CheckpointError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
INDEX = "model.safetensors.index.json"


def convert_hint(folder: str) -> str:
    return (f"convert it to safetensors first (transformers reads .bin with weights_only): python -c \"from "
            f"transformers import AutoModelForCausalLM as M; M.from_pretrained('{folder}')"
            f".save_pretrained('{folder}')\"")


def weight_files(folder: str) -> tuple[list[str], dict | None]:
    """The safetensors files holding the weights, and the index's name -> file map (None for one file)."""
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: cannot read its weight_map ({type(e).__name__}: {e}); give the index "
                                  f"transformers wrote with the shards") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise CheckpointError(f"{index} names {missing[0]}, which is not in {folder}; copy every shard the "
                                  f"index lists ({len(files)} files)")
        return [os.path.join(folder, f) for f in files], weight_map
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single], None
    found = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if len(found) == 1:
        return found, None
    if len(found) > 1:
        raise CheckpointError(f"{folder}: {len(found)} .safetensors files but no {INDEX}; give the index that "
                              f"lists which tensor is in which file")
    pickles = [os.path.basename(p) for p in sorted(glob.glob(os.path.join(folder, "*.bin")) +
                                                   glob.glob(os.path.join(folder, "*.pt")))]
    if pickles:
        raise CheckpointError(f"{folder}: only {', '.join(pickles)} (pickled torch weights, which mlsys never "
                              f"unpickles); {convert_hint(folder)}")
    raise CheckpointError(f"{folder}: no model.safetensors (or sharded *.safetensors + {INDEX}); save the model "
                          f"with save_pretrained")


def read_header(path: str) -> tuple[dict, int]:
    """{name: {"dtype", "shape", "data_offsets"}} of one safetensors file, and where its data starts."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} in a file of {size} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {str(e)[:200]}); "
                              f"save it again with save_pretrained") from None
    header.pop("__metadata__", None)
    for name, t in header.items():
        begin, end = t["data_offsets"]
        if t["dtype"] not in DTYPES or end > size - 8 - n or \
                end - begin != int(np.prod(t["shape"], dtype=np.int64)) * np.dtype(DTYPES[t["dtype"]]).itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} ({t['dtype']} {t['shape']}) does not fit the file "
                                  f"(truncated or damaged); save it again")
    return header, 8 + n


class Weights:
    """Every tensor of a folder's safetensors checkpoint: names, shapes, and reads of row ranges."""

    def __init__(self, folder: str):
        self.folder = folder
        files, weight_map = weight_files(folder)
        self.tensors: dict[str, tuple[str, dict, int]] = {}  # name -> (file, header entry, data start)
        for path in files:
            header, start = read_header(path)
            for name, t in header.items():
                if weight_map is None or weight_map.get(name) == os.path.basename(path):
                    self.tensors[name] = (path, t, start)
        self._fds: dict[str, int] = {}

    def shape(self, name: str) -> tuple:
        return tuple(self.tensors[name][1]["shape"])

    def where(self, name: str) -> str:
        return os.path.basename(self.tensors[name][0])

    def read(self, name: str, index: tuple) -> np.ndarray:
        """tensor[index] (index: slices, one per leading dimension at most), reading only its rows from disk."""
        path, t, start = self.tensors[name]
        shape, dtype = tuple(t["shape"]), np.dtype(DTYPES[t["dtype"]])
        if not shape:
            r0, r1 = 0, 1
        else:
            r0, r1, _ = (index[0] if index else slice(None)).indices(shape[0])
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        buf = bytearray((r1 - r0) * row)
        view, offset, done = memoryview(buf), start + t["data_offsets"][0] + r0 * row, 0
        while done < len(buf):  # pread returns at most ~2 GB per call
            chunk = os.preadv(fd, [view[done:done + (1 << 30)]], offset + done)
            if chunk <= 0:
                raise CheckpointError(f"{path}: tensor {name!r} ends early (truncated file); save it again")
            done += chunk
        rows = np.frombuffer(buf, dtype).reshape((r1 - r0, *shape[1:]) if shape else ())
        if not shape:
            return rows
        cols = rows[(slice(None), *index[1:])]
        # A column block is copied out, so that the rows read for it are freed now: make_array_from_callback
        # keeps every device's block until it has them all.
        return cols if cols.size == rows.size else cols.copy()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
