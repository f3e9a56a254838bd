"""What data a run saw, as a fingerprint: the sha256 of every file the source reads (or, for generated data, the
generator and its settings) and of the split settings. Recorded in env.json, the export manifest and the report;
`trainer.resume` and `trainer.init_from` warn, naming the files, when the data changed since. A data path that DVC
tracks (a `<path>.dvc` file beside it) records DVC's own hash too, read from that YAML file. Nothing is copied."""

import glob
import hashlib
import json
import logging
import os
from dataclasses import asdict

import yaml

from mlsys.hashing import sha256_file

log = logging.getLogger("mlsys")

# Keys that say how the data is read, not what it is: they do not change the fingerprint.
READING = {"batch_size", "eval_batch_size", "eval_batches", "num_workers", "prefetch", "workers", "cache_dir"}
# Keys that decide which example lands in which split.
SPLIT = {"val_fraction", "test_fraction", "split_seed"}
GENERATED = {"synthetic": "mlsys.data.sources.SyntheticSource v1"}  # bump when the generator's output changes
_CACHE: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256: a file hashed once per process


def _sha256_file(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = sha256_file(path)
    return _CACHE[key]


def _sha256_tree(path: str) -> str:
    """A directory: every file's relative path and content, in sorted order."""
    h = hashlib.sha256()
    for here, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(here, name)
            h.update(f"{os.path.relpath(full, path)}\0{_sha256_file(full)}\n".encode())
    return h.hexdigest()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def dvc_hash(path: str) -> dict | None:
    """DVC's record of `path` from `<path>.dvc` (its md5 and size), if DVC tracks it."""
    dvc = path.rstrip(os.sep) + ".dvc"
    if not os.path.isfile(dvc):
        return None
    try:
        outs = (yaml.safe_load(open(dvc)) or {}).get("outs") or []
    except (OSError, yaml.YAMLError) as e:
        log.warning("%s: cannot read it as a DVC file (%s); recording no DVC hash", dvc, e)
        return None
    for out in outs:
        if isinstance(out, dict) and os.path.basename(str(out.get("path", ""))) == os.path.basename(path.rstrip(os.sep)):
            found = {k: out[k] for k in ("md5", "etag", "hash", "size", "nfiles") if k in out}
            return {"file": dvc, **found}
    return None


def _path_key(key: str) -> bool:
    return key in ("path", "paths") or key.endswith(("_path", "_paths", "files", "_dir"))


def data_files(cfg) -> list[str]:
    """The files a data config reads: its path-valued keys that exist on disk (a shipped corpus resolved), and
    scikit-learn's own file for the digits."""
    from mlsys.data.sources import digits_file, resolve_path

    if cfg.name == "digits":
        return [digits_file()]
    found = []
    for key, value in asdict(cfg).items():
        if key in READING:  # where caches go is not what the data is
            continue
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and _path_key(key):
                p = resolve_path(v)
                if glob.has_magic(p):  # data=corpus globs: the files they match
                    found += [os.path.abspath(h) for h in sorted(glob.glob(p, recursive=True)) if os.path.isfile(h)]
                elif os.path.exists(p):
                    found.append(os.path.abspath(p))
    return found


def fingerprint(cfg, seed: int) -> dict:
    """The data fingerprint of a data config: {"digest", "split", "files", "generator", "settings"}. Two runs have
    the same "digest" exactly when they read the same bytes (or generate the same examples) with the same split."""
    files = []
    for path in data_files(cfg):
        entry = {"path": path, "bytes": os.path.getsize(path) if os.path.isfile(path) else None,
                 "sha256": _sha256_file(path) if os.path.isfile(path) else _sha256_tree(path)}
        if (dvc := dvc_hash(path)) is not None:
            entry["dvc"] = dvc
        files.append(entry)
    settings = {k: v for k, v in asdict(cfg).items() if k not in READING}
    generator = None
    if cfg.name in GENERATED:  # generated from the run's seed: the generator, its settings and the seed say it all
        generator = {"name": GENERATED[cfg.name], "seed": seed}
    split = {k: v for k, v in settings.items() if k in SPLIT}
    # The content, not where it lies: a moved copy of the same file has the same fingerprint.
    content = {k: v for k, v in settings.items() if k not in SPLIT and not _path_key(k)}
    return {"digest": _digest({"files": [f["sha256"] for f in files], "settings": content, "generator": generator,
                               "split": split}),
            "split": _digest(split), "files": files, "generator": generator, "settings": settings}


def changes(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, in words (empty when the data is the same)."""
    if old.get("digest") == new.get("digest"):
        return []
    out = []
    before = {os.path.basename(f["path"]): f for f in old.get("files", [])}
    for f in new.get("files", []):
        was = before.pop(os.path.basename(f["path"]), None)
        if was is None:
            out.append(f"{f['path']} is new")
        elif was["sha256"] != f["sha256"]:
            out.append(f"{f['path']} changed (sha256 {was['sha256'][:12]} then, {f['sha256'][:12]} now)")
    out += [f"{f['path']} is no longer read" for f in before.values()]
    if old.get("split") != new.get("split"):
        out.append("the split settings changed")
    differ = [f"data.{k}={old.get('settings', {}).get(k)!r} then, {v!r} now"
              for k, v in new.get("settings", {}).items()
              if k not in SPLIT and not _path_key(k) and old.get("settings", {}).get(k) != v]
    out += differ
    if old.get("generator") != new.get("generator"):
        out.append(f"the generator changed ({old.get('generator')} then, {new.get('generator')} now)")
    return out or ["the data fingerprint changed"]


def warn_if_changed(fp: dict, run_dir: str, key: str) -> list[str]:
    """Warn when the data differs from what `run_dir` (the run that `key` continues) recorded in its env.json."""
    path = os.path.join(run_dir, "env.json")
    try:
        old = json.load(open(path)).get("data")
    except (OSError, ValueError):
        old = None
    if not old:
        return []
    diff = changes(old, fp)
    if diff:
        log.warning("%s=%s: the data changed since that run: %s", key, run_dir, "; ".join(diff))
    return diff


def short(fp: dict | None) -> str:
    return fp["digest"][:12] if fp else "-"
