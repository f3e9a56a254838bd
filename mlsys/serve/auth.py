"""API keys. The server keeps only sha256 digests: from a file of hex digests (one per line, `#` comments) and/or
from MLSYS_API_KEYS (comma-separated keys, hashed as they are read). A request's key is hashed and compared with
every digest in constant time. Keys are never logged or echoed."""

import hashlib
import hmac
import os
import re
import secrets

from mlsys.errors import ConfigError
from mlsys.serve.config import KEYS_ENV

HEX64 = re.compile(r"^[0-9a-f]{64}$")
HOW = (f"set {KEYS_ENV}=<key>[,<key>...] or serve.api_keys_file=<file of sha256 hex digests>; "
       "python -m experiments.serve keygen prints a new key and its digest")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    key = secrets.token_urlsafe(32)
    return key, digest(key)


def load_digests(keys_file: str = "", env: dict | None = None) -> list[bytes]:
    """Every accepted key's digest; refuses to return none (a server without keys would be open to anyone)."""
    env = os.environ if env is None else env
    out = []
    if keys_file:
        try:
            lines = open(keys_file).read().splitlines()
        except OSError as e:
            raise ConfigError(f"serve.api_keys_file={keys_file!r}: cannot read it ({e.strerror})") from None
        for n, line in enumerate(lines, 1):
            line = line.split("#", 1)[0].strip().lower()
            if not line:
                continue
            if not HEX64.match(line):
                # the line's content is not shown: it may be a key pasted by mistake
                raise ConfigError(f"serve.api_keys_file={keys_file!r}, line {n}: not a sha256 hex digest (64 hex "
                                  f"characters); store digests, never keys: {HOW}")
            out.append(line.encode())
    for key in (k.strip() for k in env.get(KEYS_ENV, "").split(",")):
        if key:
            out.append(digest(key).encode())
    if not out:
        raise ConfigError(f"no API keys: {HOW}")
    return out


class KeyChecker:
    def __init__(self, digests: list[bytes]):
        self._digests = digests

    def check(self, authorization: str | None) -> bool:
        """True if the header is `Bearer <key>` with an accepted key. Every digest is compared (no early exit), each
        with hmac.compare_digest, so the time taken does not tell which key or how much of it matched."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        got = digest(key.strip()).encode()
        ok = False
        for d in self._digests:
            ok |= hmac.compare_digest(got, d)
        return ok
