"""Tokenization throughput and peak memory of data=corpus: a corpus generated here (Zipf-distributed pseudo-words,
~2 KB documents in .jsonl files), tokenized from scratch into a fresh token cache with a byte-level BPE of 4,096
ids, in one worker process per core. Two arms differ only in the corpus size, so that the peak resident memory
(this process, and the largest worker) shows whether it grows with the corpus (it must not).

    python -m benchmarks.run --suite tokenize               # 25 MB and 100 MB, 5 repeats
    python -m benchmarks.tokenize --arm tokenize-large      # one run, one JSON line

--steps N (tests): N MB for the large arm, N / 4 for the small one. The BPE is trained on 2 MB of the same
generator beforehand and loaded from its tokenizer.json; training is not timed.
"""

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

import numpy as np

SIZES_MB = {"tokenize-small": 25, "tokenize-large": 100}
DOC_BYTES = 2000


def words(seed: int = 0, n: int = 8000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = 1.0 / np.arange(1, 27)
    return np.array(["".join(rng.choice(letters, rng.integers(1, 10), p=p / p.sum())) for _ in range(n)])


def write_corpus(folder: str, mb: float, seed: int = 1) -> int:
    """~mb MB of .jsonl documents in up to 4 files, generated and written chunk by chunk (memory stays small)."""
    vocab, rng = words(), np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    target, written, k = int(mb * 1e6), 0, 0
    files = [open(os.path.join(folder, f"part{i}.jsonl"), "w") for i in range(4)]
    while written < target:
        n = int(min(400_000, max(2_000, target / 20)))  # ~5 bytes a word: 4+ chunks (files), each at most ~2 MB
        text = " ".join(vocab[rng.choice(len(vocab), n, p=zipf)])
        docs = [text[i: i + DOC_BYTES] for i in range(0, len(text), DOC_BYTES)]
        chunk = "".join(json.dumps({"text": d}) + "\n" for d in docs)
        # Files filled one after another (25 MB each): both arms then have work units of the full 16 MiB, so their
        # peak memory differs only by what grows with the corpus.
        files[min(3, int(written // 25e6)) if mb >= 4 else k % 4].write(chunk)
        written, k = written + len(chunk), k + 1
    for f in files:
        f.close()
    return sum(os.path.getsize(os.path.join(folder, f"part{i}.jsonl")) for i in range(4))


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the tokenizing workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last reset (VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass


def measure(arm: str, steps: int) -> dict:
    from mlsys.data.corpus import load_corpus
    from mlsys.data.sources import CorpusConfig
    from mlsys.tokenizer import train_bpe

    mb = (steps / (4 if arm == "tokenize-small" else 1)) if steps else SIZES_MB[arm]
    work = tempfile.mkdtemp(prefix="mlsys-tokbench-")
    try:
        os.makedirs(os.path.join(work, "train"))
        os.makedirs(os.path.join(work, "corpus"))
        write_corpus(os.path.join(work, "train"), 2, seed=0)
        texts = (json.loads(line)["text"] for line in open(os.path.join(work, "train", "part0.jsonl")))
        tok_path = train_bpe(texts, 4096).save(work)
        size = write_corpus(os.path.join(work, "corpus"), mb)
        cfg = CorpusConfig(paths=[os.path.join(work, "corpus", "*.jsonl")], tokenizer=tok_path, seq_len=256,
                           batch_size=1, cache_dir=os.path.join(work, "cache"), workers=0)
        reset_peak_rss()
        base = peak_rss_mb()
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        ds = load_corpus(cfg)
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
        tokens = sum(ds.meta["tokens"].values())
        return {"arm": arm, "corpus_mb": size / 1e6, "seconds": seconds, "mb_per_s": size / 1e6 / seconds,
                "tokens_per_s": tokens / seconds, "tokens": tokens, "workers": os.cpu_count(),
                "cpu_s_per_mb": cpu / (size / 1e6),  # all processes' CPU time: less sensitive to a loaded machine
                "peak_rss_mb": peak_rss_mb(), "rss_before_mb": base,
                "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "ms_per_step": 1e3 * seconds}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def table(suite: str, rows: dict, note: str) -> str:
    import statistics

    keys = ("corpus_mb", "mb_per_s", "cpu_s_per_mb", "tokens_per_s", "peak_rss_mb", "worker_peak_rss_mb")
    lines = [f"### {suite}", "", note, "", "| arm | repeats | " + " | ".join(f"median {k}" for k in keys) + " |",
             "|---" * (len(keys) + 2) + "|"]
    for arm, reps in rows.items():
        lines.append(f"| {arm} | {len(reps)} | " + " | ".join(f"{statistics.median(r[k] for r in reps):.4g}"
                                                              for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=sorted(SIZES_MB), required=True)
    p.add_argument("--size", default="cpu", help="unused (the suite runner passes it)")
    p.add_argument("--steps", type=int, default=0, help="corpus MB of the large arm (0 = 100)")
    a = p.parse_args()
    print(json.dumps(measure(a.arm, a.steps)))


if __name__ == "__main__":
    main()
