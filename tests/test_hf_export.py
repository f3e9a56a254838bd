"""Export to Hugging Face: mlsys tokenizers as fast tokenizers that transformers loads and that encode and decode
exactly like mlsys; manifests that sign subfolders."""

import os

import pytest

from mlsys.export.manifest import VerifyError, verify, write_signed

SAMPLE = "First Citizen:\nBefore we proceed  any further, hear me speak.\n\nAll: Zé ünï 😀 x\t"


@pytest.fixture
def signing_key(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def test_mlsys_tokenizers_load_in_transformers_and_agree(tmp_path):
    from transformers import AutoTokenizer

    from mlsys.data.sources import resolve_path
    from mlsys.export.hf_tokenizer import save_hf_tokenizer
    from mlsys.tokenizer import ByteTokenizer, CharTokenizer, train_bpe

    text = open(resolve_path("tinyshakespeare.txt"), encoding="utf-8").read()[:20_000]
    cases = {"char": CharTokenizer(sorted(set(text)), ("eos",)), "byte": ByteTokenizer(("eos",)),
             "bpe": train_bpe([text], 300)}
    for kind, tok in cases.items():
        folder = tmp_path / kind
        folder.mkdir()
        assert set(save_hf_tokenizer(tok, str(folder), 64)) == {p.name for p in folder.iterdir()}
        hf = AutoTokenizer.from_pretrained(str(folder))
        for sample in (SAMPLE, text[5_000:5_600]):
            ids = tok.encode(sample).tolist()
            assert hf(sample)["input_ids"] == ids, kind  # nothing added: mlsys adds no BOS/EOS either
            assert hf.decode(ids) == tok.decode(ids), kind
        assert len(hf) == tok.vocab_size and hf.eos_token_id == tok.specials["eos"], kind
        assert hf.eos_token == "<|endoftext|>" and hf.model_max_length == 64
    # char: a character the corpus lacks is dropped by both; byte: every byte survives
    assert "😀" not in cases["char"].decode(cases["char"].encode(SAMPLE))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "byte")).decode(cases["byte"].encode(SAMPLE)) == SAMPLE


def test_manifest_signs_and_checks_subfolders(tmp_path, signing_key):
    tmp_path = tmp_path / "export"
    (tmp_path / "hf").mkdir(parents=True)
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "hf" / "config.json").write_text("{}")
    write_signed(str(tmp_path), {})
    assert set(verify(str(tmp_path))["files"]) == {"model.onnx", "hf/config.json"}
    (tmp_path / "hf" / "config.json").write_text('{"n_layer": 1}')
    with pytest.raises(VerifyError, match=r"hf/config.json: sha256 differs"):
        verify(str(tmp_path))
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "extra.bin").write_bytes(b"x")
    with pytest.raises(VerifyError, match=r"hf/extra.bin: not in the manifest"):
        verify(str(tmp_path))
    os.remove(tmp_path / "hf" / "extra.bin")
    verify(str(tmp_path))
