"""An mlsys tokenizer as Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json) that `transformers.AutoTokenizer.from_pretrained` loads as a fast tokenizer with no custom
code, encoding and decoding exactly as mlsys does:

  char  a BPE model with the characters as its vocabulary and no merges: every character is one token, a character
        outside the vocabulary is dropped (as mlsys drops it); the Fuse decoder joins tokens with nothing between
  byte  a byte-level BPE of the 256 byte values (id = byte value) and no merges
  bpe / a tokenizer.json   the run's own tokenizer.json, unchanged
Specials (mlsys ids after the characters or bytes) become added special tokens with mlsys's spelling
(mlsys.tokenizer.SPECIALS) at the same ids.
"""

import json
import os

from mlsys.tokenizer import SPECIALS, ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _added(tok, specials: dict) -> None:
    from tokenizers import AddedToken

    for name in sorted(specials, key=specials.get):  # in id order: each lands at the next id
        tok.add_special_tokens([AddedToken(SPECIALS[name], special=True, normalized=False)])
        assert tok.token_to_id(SPECIALS[name]) == specials[name], (name, specials)


def hf_tokenizer_json(tok: Tokenizer) -> str:
    """The tokenizers-library JSON that encodes and decodes like `tok`."""
    if isinstance(tok, HFTokenizer):
        return tok.to_json()
    from tokenizers import Tokenizer as Rust
    from tokenizers import decoders, models, pre_tokenizers

    if isinstance(tok, CharTokenizer):
        out = Rust(models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))
        out.decoder = decoders.Fuse()
    elif isinstance(tok, ByteTokenizer):
        alphabet = _byte_alphabet()
        out = Rust(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
        out.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        out.decoder = decoders.ByteLevel()
    else:
        raise TypeError(f"no Hugging Face form for a {type(tok).__name__}")
    _added(out, tok.specials)
    return out.to_str()


def _byte_alphabet() -> dict:
    """GPT-2's byte → printable character table (the one ByteLevel pre-tokenizers and decoders use)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def special_tokens(tok: Tokenizer) -> dict:
    """{"eos_token": "<|endoftext|>", ...}: the spelling of each special the tokenizer has."""
    if isinstance(tok, HFTokenizer):
        vocab = {i: s for s, i in tok.tok.get_vocab(with_added_tokens=True).items()}
        return {f"{name}_token": vocab[i] for name, i in tok.specials.items()}
    return {f"{name}_token": SPECIALS[name] for name in tok.specials}


def save_hf_tokenizer(tok: Tokenizer, folder: str, max_length: int) -> list[str]:
    """Write the tokenizer files into `folder`; returns their names."""
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write(hf_tokenizer_json(tok))
    specials = special_tokens(tok)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              # mlsys decodes token by token, exactly: no clean-up of spaces before punctuation
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False, **specials}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2, sort_keys=True)
    return list(FILES)
