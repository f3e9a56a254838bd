"""Tokenizers: the one place where text becomes token ids and back, for every language-model path (data, the
end-of-run sample, notebooks, export manifests, reports).

`data.tokenizer` selects one:
  char   the characters of the training text, in sorted order (data=corpus adds an end-of-text id after them)
  byte   the 256 byte values (data=corpus adds end-of-text = 256)
  bpe    a byte-level BPE of data.vocab_size trained on the training split with Hugging Face `tokenizers`
         (deterministic; cached by the training text's content), saved as tokenizer.json in the run dir
  PATH   any tokenizer.json on disk (GPT-2's, Llama 3's, a user's)
A run saves its tokenizer (tokenizer.json for bpe/PATH, vocab.json for char/byte); `from_run_dir` loads it back.
Special tokens (bos, eos, pad) are recorded as `specials`; `token_bytes` gives the UTF-8 bytes each id stands
for, so losses convert to bits per byte (tokenizer-independent).
"""

import hashlib
import json
import os
import re

import numpy as np

from mlsys.errors import ConfigError, DataError

SPECIALS = {"eos": "<|endoftext|>", "bos": "<|bos|>", "pad": "<|pad|>"}  # what a trained BPE reserves (ids 0-2)
# How the specials of a tokenizer.json from elsewhere are recognised (GPT-2, Llama 2/3, T5, BERT-style names).
KNOWN_SPECIALS = {"eos": ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]"),
                  "bos": ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "[CLS]"),
                  "pad": ("<|pad|>", "<pad>", "[PAD]")}
KINDS = ("char", "byte", "bpe")


class Tokenizer:
    """text ⇄ ids. vocab_size counts every id (specials included); specials maps "eos"/"bos"/"pad" to ids."""

    kind: str
    vocab_size: int
    specials: dict
    token_bytes: np.ndarray  # int64 [vocab_size]: UTF-8 bytes each id stands for; 0 for specials

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def to_json(self) -> str:
        raise NotImplementedError

    def spec(self) -> tuple:
        """A picklable description that `from_spec` turns back into the same tokenizer (worker processes)."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """Identifies the tokenizer's behaviour (token caches are keyed by it)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    @property
    def dtype(self):
        """The smallest unsigned dtype that holds every id (token caches)."""
        return np.uint16 if self.vocab_size <= 2**16 else np.uint32

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "specials": dict(self.specials),
                "file": self.filename}

    filename = "vocab.json"

    def save(self, run_dir: str) -> str:
        return self.save_as(os.path.join(run_dir, self.filename))

    def save_as(self, path: str) -> str:
        with open(path + ".tmp", "w") as f:  # written whole, then renamed: never half a file
            f.write(self.to_json())
        os.replace(path + ".tmp", path)
        return path


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: list[str], specials: tuple = ()):
        self.chars = list(chars)
        self.specials = {name: len(self.chars) + i for i, name in enumerate(specials)}
        self.vocab_size = len(self.chars) + len(self.specials)
        self._points = np.array([ord(c) for c in self.chars], np.int64)  # sorted: chars are sorted
        self.token_bytes = np.array([len(c.encode("utf-8")) for c in self.chars] + [0] * len(self.specials))

    def encode(self, text: str) -> np.ndarray:
        """Characters outside the vocabulary are dropped (a prompt may hold characters the corpus lacks)."""
        points = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
        idx = np.minimum(np.searchsorted(self._points, points), max(len(self.chars) - 1, 0))
        known = self._points[idx] == points if len(self.chars) else np.zeros(len(points), bool)
        return idx[known].astype(np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids if int(i) < len(self.chars))

    def to_json(self) -> str:
        return json.dumps({"level": "char", "chars": self.chars, "specials": self.specials})

    def spec(self) -> tuple:
        return ("char", tuple(self.chars), tuple(self.specials))


class ByteTokenizer(Tokenizer):
    kind = "byte"

    def __init__(self, specials: tuple = ()):
        self.specials = {name: 256 + i for i, name in enumerate(specials)}
        self.vocab_size = 256 + len(self.specials)
        self.token_bytes = np.array([1] * 256 + [0] * len(self.specials))

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"level": "byte", "chars": None, "specials": self.specials})

    def spec(self) -> tuple:
        return ("byte", tuple(self.specials))


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (a trained BPE, or any tokenizer.json)."""

    filename = "tokenizer.json"

    def __init__(self, tok, kind: str = "bpe"):
        self.tok, self.kind = tok, kind
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        vocab = tok.get_vocab(with_added_tokens=True)
        self.specials = {}
        for name, names in KNOWN_SPECIALS.items():  # the first known spelling present names each special
            hit = next((vocab[t] for t in names if t in vocab), None)
            if hit is not None:
                self.specials[name] = hit
        special_ids = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        raw = json.loads(tok.to_str())
        byte_level = '"ByteLevel"' in json.dumps([raw.get("decoder"), raw.get("pre_tokenizer")])
        inv = {i: s for s, i in vocab.items()}
        lengths = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            piece = inv.get(i)
            if piece is None or piece in special_ids:
                continue
            if byte_level:  # every character of a byte-level token stands for one byte
                lengths[i] = len(piece)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # byte fallback (Llama 2, sentencepiece)
                lengths[i] = 1
            else:
                lengths[i] = len(piece.replace("\u2581", " ").replace("##", "").encode("utf-8"))
        self.token_bytes = lengths

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_json(self) -> str:
        return self.tok.to_str()

    def spec(self) -> tuple:
        return ("hf", self.to_json(), self.kind)


def _hf():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("data.tokenizer=bpe or a tokenizer.json needs Hugging Face `tokenizers`: pip install "
                          "'.[lm]' (make test installs it)") from None
    return tokenizers


def load_file(path: str) -> HFTokenizer:
    """Any tokenizer.json from disk."""
    tokenizers = _hf()
    try:
        return HFTokenizer(tokenizers.Tokenizer.from_file(path), kind="file")
    except Exception as e:  # the Rust side raises a bare Exception for every parse failure
        what = "no such file" if not os.path.isfile(path) else str(e).splitlines()[0][:200]
        raise ConfigError(f"data.tokenizer={path!r}: cannot load it as a Hugging Face tokenizer.json ({what}); "
                          f"give a tokenizer.json saved by `tokenizers` / `transformers`, or char|byte|bpe") from None


def check_vocab_size(vocab_size: int) -> None:
    low = 256 + len(SPECIALS)
    if vocab_size < low:
        raise ConfigError(f"data.vocab_size={vocab_size}: a byte-level BPE needs at least 256 byte tokens + "
                          f"{len(SPECIALS)} specials = {low}; e.g. data.vocab_size=1024")


def train_bpe(texts, vocab_size: int, cache_dir: str | None = None, key: str = "") -> HFTokenizer:
    """A byte-level BPE of `vocab_size` ids trained on the iterable `texts` (streamed). Specials take ids 0-2.
    Deterministic; with `cache_dir` and `key` (a digest of the training text) a second call loads the result."""
    check_vocab_size(vocab_size)
    tokenizers = _hf()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    cached = os.path.join(os.path.expanduser(cache_dir), f"bpe-{vocab_size}-{key}.json") if cache_dir and key else None
    if cached and os.path.isfile(cached):
        try:
            return HFTokenizer(tokenizers.Tokenizer.from_file(cached))
        except Exception:
            pass  # a damaged cache entry is retrained and rewritten
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out = HFTokenizer(tok)
    if cached:
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            out.save_as(cached)
        except OSError:
            pass  # only a cache: training again next time is correct, just slower
    return out


def from_run_dir(run_dir: str) -> Tokenizer | None:
    """The tokenizer a run saved (tokenizer.json, else vocab.json), or None for runs without one."""
    path = os.path.join(run_dir, "tokenizer.json")
    if os.path.isfile(path):
        return HFTokenizer(_hf().Tokenizer.from_file(path), kind="file")
    path = os.path.join(run_dir, "vocab.json")
    return from_vocab(json.load(open(path))) if os.path.isfile(path) else None


def from_vocab(vocab: dict) -> Tokenizer:
    """char/byte tokenizers from their vocab.json contents ({"level", "chars", "specials"})."""
    specials = tuple(sorted(vocab.get("specials") or {}, key=vocab.get("specials", {}).get))
    if vocab.get("chars") is None:
        return ByteTokenizer(specials)
    return CharTokenizer(vocab["chars"], specials)


def from_spec(spec: tuple) -> Tokenizer:
    if spec[0] == "char":
        return CharTokenizer(list(spec[1]), spec[2])
    if spec[0] == "byte":
        return ByteTokenizer(spec[1])
    return HFTokenizer(_hf().Tokenizer.from_str(spec[1]), kind=spec[2])
