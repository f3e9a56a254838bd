"""sha256 of a file, read in chunks: export manifests, token caches and data fingerprints all prove files by it."""

import hashlib


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    """Hex sha256 of the file's bytes; memory stays at one chunk whatever the file's size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
