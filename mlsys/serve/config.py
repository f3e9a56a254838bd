"""The server's settings: one typed dataclass, filled from `serve.<key>=<value>` arguments and checked before
anything loads, so a wrong value fails with the key, what was given and what would work."""

import os
from dataclasses import dataclass, fields

from mlsys.errors import ConfigError

KEYS_ENV = "MLSYS_API_KEYS"  # comma-separated API keys (e.g. from a Kubernetes Secret); hashed on load


@dataclass
class ServeConfig:
    model: str = ""  # the export folder (…/export/step_N) written by experiments.export
    host: str = "127.0.0.1"  # 0.0.0.0 inside a container
    port: int = 8000
    max_batch: int = 64  # rows per ONNX Runtime call
    max_delay_ms: float = 10.0  # the longest a request waits for others to join its batch
    # Also stop waiting as soon as every request the server has accepted is in the queue: nobody else is about to
    # join, so waiting would only add latency (at concurrency 1 a request runs at once).
    adaptive: bool = True
    max_rows: int = 256  # examples in one request
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    api_keys_file: str = ""  # a file of sha256 hex digests of the accepted keys, one per line
    public_key: str = ""  # a PEM ed25519 key you trust; default: the export folder's own public_key.pem
    precision: str = "fp32"  # fp32 (model.onnx) or int8 (model.int8.onnx)
    threads: int = 1  # ONNX Runtime intra-op threads (1 leaves the other cores to HTTP on small machines)
    range_tolerance: float = 0.1  # accepted values: training [min, max] widened by this fraction of its span
    drift_threshold: float = 0.2  # PSI above this logs a warning (0.1-0.25 moderate shift, > 0.25 large)
    drift_window: int = 1000  # recent examples the PSI is computed over
    drift_min_rows: int = 100  # no PSI before this many examples arrived
    drain_timeout_s: float = 30.0  # after SIGTERM, how long accepted requests may take to finish
    # Completions (/v1/completions, language-model exports with a decoder graph; max_batch is the decode batch)
    completions: bool = True  # false: serve /v1/predict only (e.g. an LM export written before decoder graphs)
    max_tokens: int = 256  # the most new tokens one completion may ask for (its `max_tokens`)
    max_queue: int = 256  # completions waiting while every decode slot is taken; past it, 429 with Retry-After
    log_level: str = "info"
    access_log: bool = False  # one log line per request; requests are counted in /metrics either way

    def __post_init__(self):
        def bad(key, given, want):
            raise ConfigError(f"serve.{key}={given!r}: {want}")

        if not self.model:
            raise ConfigError("model=<export dir> is required, e.g. python -m experiments.serve "
                              "model=runs/digits_mlp/<time>/export/step_N")
        if not 0 < self.port < 65536:
            bad("port", self.port, "a TCP port between 1 and 65535")
        for key in ("max_batch", "max_rows", "max_body_bytes", "threads", "drift_window", "max_tokens", "max_queue"):
            if getattr(self, key) < 1:
                bad(key, getattr(self, key), "must be at least 1")
        for key in ("max_delay_ms", "range_tolerance", "drift_threshold", "drain_timeout_s", "drift_min_rows"):
            if getattr(self, key) < 0:
                bad(key, getattr(self, key), "must be >= 0")
        if self.precision not in ("fp32", "int8"):
            bad("precision", self.precision, "fp32 or int8")
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            bad("log_level", self.log_level, "critical, error, warning, info or debug")
        if self.api_keys_file and not os.path.isfile(self.api_keys_file):
            bad("api_keys_file", self.api_keys_file, "no such file; give a file of sha256 hex digests, one per "
                "line (python -m experiments.serve keygen prints a key and its digest)")
        if self.public_key and not os.path.isfile(self.public_key):
            bad("public_key", self.public_key, "no such file; give the PEM public key the export was signed with")


def _parse(name: str, kind: type, text: str):
    if kind is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"serve.{name}={text!r}: expected true or false")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"serve.{name}={text!r}: expected {kind.__name__}") from None


def from_args(values: dict) -> ServeConfig:
    """`{"model": ..., "serve.port": "8000", ...}` → a checked ServeConfig."""
    types = {f.name: f.type for f in fields(ServeConfig)}
    kwargs = {}
    for key, text in values.items():
        name = key.removeprefix("serve.")
        if name not in types:
            raise ConfigError(f"{key}={text!r}: unknown key; serve.* keys are {', '.join(sorted(types))}")
        kwargs[name] = _parse(name, types[name], text) if types[name] is not str else text
    return ServeConfig(**kwargs)


ARGS = {"model": "the export folder"} | {f"serve.{f.name}": f"default {f.default!r}" for f in fields(ServeConfig)
                                        if f.name != "model"}
