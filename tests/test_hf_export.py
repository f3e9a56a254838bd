"""Export to Hugging Face: mlsys tokenizers as fast tokenizers that transformers loads and that encode and decode
exactly like mlsys; manifests that sign subfolders; a gpt run exported (format=hf) and loaded with
AutoModelForCausalLM and AutoTokenizer, with parity; every bad input."""

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


def saved_config(folder, *overrides) -> str:
    """A run dir holding only config.yaml: what format=hf decides from the config alone, before any restore."""
    from omegaconf import OmegaConf

    from tests.conftest import typed_cfg

    os.makedirs(folder)
    OmegaConf.save(OmegaConf.structured(typed_cfg(list(overrides))), os.path.join(folder, "config.yaml"))
    return str(folder)


@pytest.mark.parametrize("overrides, message", [
    (["+exp=digits_mlp"], r"^format=hf: model=mlp has no Hugging Face mapping; the families that export to Hugging "
                          r"Face are gpt, llama \(use format=onnx,torch for mlp\)$"),
    (["+exp=shakespeare_char", "model.pos_emb=rope"], r"^format=hf: model=gpt maps to GPT-2, which cannot hold "
                                                       r"model.pos_emb='rope' \(needs 'learned'\)"),
    (["+exp=shakespeare_char", "model.mlp=swiglu", "model.bias=false"], r"model.mlp='swiglu' \(needs 'gelu'\), "
                                                                        r"model.bias=False \(needs True\)"),
])
def test_format_hf_refuses_what_hugging_face_cannot_hold(tmp_path, overrides, message):
    from mlsys.export import ExportError, export_run

    run = saved_config(tmp_path / "run", *overrides)
    with pytest.raises(ExportError, match=message):
        export_run(run, formats=("onnx", "hf"), out=str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


def test_format_peft_needs_a_lora_run(tmp_path):
    from mlsys.export import ExportError, export_run

    run = saved_config(tmp_path / "run", "+exp=shakespeare_char")
    with pytest.raises(ExportError, match=r"^format=peft exports a LoRA fine-tune's adapter, but this run has "
                                          r"lora.rank=0 \(no adapter\); use format=hf"):
        export_run(run, formats=("peft",), out=str(tmp_path / "out"))


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """A tiny char-level gpt trained from scratch, its vocabulary (65) padded to 80 rows (module-scoped)."""
    from mlsys.train import train
    from tests.conftest import tiny, typed_cfg

    run_dir = str(tmp_path_factory.mktemp("runs") / "gpt")
    train(typed_cfg(tiny("shakespeare_char", "model.n_layer=2", "model.vocab_multiple=16")), run_dir)
    return run_dir


def test_gpt_run_exports_a_folder_transformers_loads(gpt_run, tmp_path, signing_key, capsys):
    import json

    import jax.numpy as jnp
    import numpy as np
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments.export import main
    from mlsys.export.restore import load_run

    main([f"run={gpt_run}", "format=hf", f"out={tmp_path / 'e'}"])  # the command line, in this process
    out = str(tmp_path / "e")
    assert capsys.readouterr().out.strip() == f"export: {out}"
    m = verify(out)
    hf_files = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json"}
    assert {f"hf/{f}" for f in hf_files} <= set(m["files"]) and m["formats"] == ["hf"]
    assert m["hf"]["architecture"] == "GPT2LMHeadModel" and m["parity"]["hf_max_abs_diff"] <= 1e-4
    assert load_file(os.path.join(out, "hf", "model.safetensors"))["transformer.wte.weight"].shape == (65, 32)
    config = json.load(open(os.path.join(out, "hf", "config.json")))
    assert config["activation_function"] == "gelu" and config["vocab_size"] == 65  # exact GELU; padding cut

    # What a user of transformers does, checked here against the run itself (not the manifest's numbers).
    run = load_run(gpt_run)
    text = "ROMEO:\nWhat light through yonder window breaks?"
    tok, model = AutoTokenizer.from_pretrained(f"{out}/hf"), AutoModelForCausalLM.from_pretrained(f"{out}/hf")
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == run.dataset.tokenizer.encode(text).tolist()
    with torch.no_grad():
        got = model(ids).logits.numpy()
    want = np.asarray(run.model(jnp.asarray(ids.numpy(), jnp.int32)))[..., :65]
    assert np.max(np.abs(got - want)) <= 1e-4
    assert tok.decode(model.generate(ids, max_new_tokens=1, do_sample=False)[0, -1:]) == \
        run.dataset.tokenizer.decode([int(want[0, -1].argmax())])


def test_transformers_disagreeing_fails_the_export_and_writes_nothing(gpt_run, tmp_path, signing_key):
    from mlsys.export import ExportError, export_run

    with pytest.raises(ExportError, match=r"^parity failed: transformers differs from JAX by max \|diff\| = .* > "
                                          r"1e-12 on held-out inputs; the export was not written$"):
        export_run(gpt_run, formats=("hf",), out=str(tmp_path / "e"), tol=1e-12)
    assert not os.path.exists(tmp_path / "e") and not os.path.exists(tmp_path / "e.partial")
