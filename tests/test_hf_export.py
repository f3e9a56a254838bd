"""Export to Hugging Face: mlsys tokenizers as fast tokenizers that transformers loads and that encode and decode
exactly like mlsys; manifests that sign subfolders; +exp=hf_lora on a tiny random GPT-2 imported with
trainer.init_from=hf: exported merged (format=hf) and as a PEFT adapter (format=peft), loaded with transformers and
PEFT, with parity; HF -> mlsys -> HF bitwise (Qwen2 here; GPT-2 and Llama in test_hf.py); every bad input.
Nothing is downloaded."""

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
def lora_run(tmp_path_factory):
    """+exp=hf_lora on a tiny random GPT-2 imported with trainer.init_from=hf: (its vocabulary, 66, padded to 80
    rows), a few steps (module-scoped)."""
    from mlsys.train import train
    from tests.conftest import tiny, typed_cfg

    run_dir = str(tmp_path_factory.mktemp("runs") / "hf_lora")
    train(typed_cfg(tiny("hf_lora", "model.vocab_multiple=16")), run_dir)
    return run_dir


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


@pytest.mark.slow
def test_imported_model_fine_tuned_with_lora_goes_back_merged_and_as_peft_adapter(lora_run, tmp_path, signing_key,
                                                                                   capsys):
    import json

    import jax.numpy as jnp
    import numpy as np
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments.export import main
    from mlsys.export.restore import load_run
    from tests.fixtures.hf_tiny import hf_model

    out, original = str(tmp_path / "e"), hf_model("gpt2")
    main([f"run={lora_run}", "format=hf,peft", f"out={out}"])  # the command line, in this process
    assert capsys.readouterr().out.strip().endswith(f"export: {out}")
    m = verify(out)
    for folder in ("hf", "hf_base"):
        assert {f"{folder}/{f}" for f in ("config.json", "model.safetensors", "generation_config.json",
                                          "tokenizer.json", "tokenizer_config.json")} <= set(m["files"])
    assert {"hf_adapter/adapter_config.json", "hf_adapter/adapter_model.safetensors"} <= set(m["files"])
    assert m["formats"] == ["hf", "peft"] and m["hf"]["architecture"] == "GPT2LMHeadModel"
    assert m["parity"]["hf_max_abs_diff"] <= 1e-4 and m["parity"]["peft_max_abs_diff"] <= 1e-4
    assert m["peft"]["init_from"] == f"hf:{original}" and m["lora"]["merged"]

    # The frozen base went through import, LoRA and export unchanged: every tensor bitwise equal to the original.
    base, before = load_file(f"{out}/hf_base/model.safetensors"), load_file(f"{original}/model.safetensors")
    assert set(base) == set(before) and all(np.array_equal(base[k], before[k]) for k in before)
    merged = load_file(f"{out}/hf/model.safetensors")
    assert merged["transformer.wte.weight"].shape == (66, 32)  # vocabulary padding (80 rows) cut off
    assert json.load(open(f"{out}/hf/config.json"))["activation_function"] == "gelu"

    # What a transformers user does, checked against the run itself (not the manifest's numbers).
    run = load_run(lora_run)
    text = "ROMEO:\nWhat light through yonder window breaks?"
    tok = AutoTokenizer.from_pretrained(f"{out}/hf")
    ids = tok(text, return_tensors="np")["input_ids"]
    assert ids[0].tolist() == run.dataset.tokenizer.encode(text).tolist()
    want = np.asarray(run.model(jnp.asarray(ids, jnp.int32)))[..., :66]
    got = hf_logits(AutoModelForCausalLM.from_pretrained(f"{out}/hf"), ids)
    assert np.max(np.abs(got - want)) <= 1e-4
    plain = AutoModelForCausalLM.from_pretrained(f"{out}/hf_base")
    assert np.max(np.abs(hf_logits(plain, ids) - want)) > 1e-3  # the adapter changed the model...
    peft = PeftModel.from_pretrained(plain, f"{out}/hf_adapter").eval()
    assert np.max(np.abs(hf_logits(peft, ids) - want)) <= 1e-4  # ... and PEFT applies exactly that change
    config = json.load(open(f"{out}/hf_adapter/adapter_config.json"))
    assert config["r"] == 8 and config["fan_in_fan_out"] and len(config["target_modules"]) == 2 * 4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2"])  # GPT-2 and Llama: tests/test_hf.py's import-command test
def test_hugging_face_to_mlsys_to_hugging_face_is_bitwise(tmp_path, signing_key, kind):
    """A Qwen2 (grouped-query attention, biases on q, k, v only, tied embeddings): imported with
    experiments.import_hf, exported with format=hf, every tensor bitwise equal and the config the same model."""
    import json

    import numpy as np
    from safetensors.numpy import load_file

    from experiments.import_hf import main as import_hf
    from mlsys.export import export_run
    from tests.fixtures.hf_tiny import make_hf_model

    original = make_hf_model(kind, str(tmp_path / kind))
    import_hf([original, f"out={tmp_path / 'run'}"])
    out = export_run(str(tmp_path / "run"), formats=("hf",), out=str(tmp_path / "e"))
    assert verify(out)["parity"]["hf_max_abs_diff"] <= 1e-4
    got, want = load_file(f"{out}/hf/model.safetensors"), load_file(f"{original}/model.safetensors")
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name
    a, b = json.load(open(f"{out}/hf/config.json")), json.load(open(f"{original}/config.json"))
    for key in ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "intermediate_size", "tie_word_embeddings",
                "rms_norm_eps", "max_position_embeddings"):
        assert a[key] == b[key], key


@pytest.mark.slow
def test_transformers_disagreeing_fails_the_export_and_writes_nothing(lora_run, tmp_path, signing_key,
                                                                       monkeypatch):
    from mlsys.export import ExportError, export_run

    import mlsys.export.hf_export as hf_export

    real = hf_export.transformers_logits  # injected: a tiny tolerance alone fails only where the two differ at all
    monkeypatch.setattr(hf_export, "transformers_logits", lambda model, x: real(model, x) + 1e-3)
    with pytest.raises(ExportError, match=r"^parity failed: transformers differs from JAX by max \|diff\| = .* > "
                                          r"0.0001 on held-out inputs; the export was not written$"):
        export_run(lora_run, formats=("hf",), out=str(tmp_path / "e"))
    assert not os.path.exists(tmp_path / "e") and not os.path.exists(tmp_path / "e.partial")
