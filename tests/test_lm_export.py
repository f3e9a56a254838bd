"""The language models' KV-cache decoder (decoder.onnx, decoder.pt2): exported for llama and gpt runs (the latter:
the servers' shared export) and gated against mlsys.generate (64 greedy tokens, logits within 1e-4), INT8 agreement
reported, the runtime wrapper's
ragged and joined batches, a broken cache graph refused, and the server's start-up errors for exports missing a
piece."""

import json
import os
import shutil

import numpy as np
import pytest

from mlsys.errors import ConfigError
from mlsys.export import ExportError, export_run
from mlsys.export.manifest import verify, write_signed
from mlsys.serve.decoder import Decoder

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("signing_key")]


@pytest.fixture
def signing_key(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny llama run (BPE, rope, grouped-query), block 80 so that 64 tokens follow a 16-token prompt, exported
    once to ONNX with INT8 (module-scoped: training and export are the slow part; no end-of-run sample). decoder.pt2
    is gated in test_export (gpt, rope) and test_llama (llama), whose exports include torch."""
    from mlsys.train import train
    from tests.conftest import tiny, typed_cfg

    root = tmp_path_factory.mktemp("lm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(root / "config"))
        train(typed_cfg(tiny("shakespeare_bpe_llama", "model.block_size=80", "trainer.steps=6",
                             "trainer.sample_chars=0", "model.n_head=4", "model.n_kv_head=2")), str(root / "run"))
        return export_run(str(root / "run"), out=str(root / "export"), formats=("onnx",), quantize="int8")


def test_llama_decoder_is_exported_and_gated_against_generate(llama):
    m = verify(llama)
    d = m["decoder"]
    assert {"decoder.onnx", "decoder.int8.onnx", "model.onnx", "tokenizer.json"} <= set(m["files"])
    assert d["parity"]["tokens"] == 64 and d["parity"]["tokens_equal"] and d["parity"]["prompt_tokens"] == [16, 8]
    assert d["parity"]["onnx_max_abs_logit_diff"] <= 1e-4
    assert 0.0 <= d["int8_agreement"] <= 1.0
    assert (d["n_layer"], d["n_kv_head"], d["head_dim"], d["max_len"]) == (1, 2, 8, 80)
    assert d["inputs"]["attention_mask"] == ["B", "P+T"] and d["eos"] == 0  # the BPE's <|endoftext|>


def test_gpt_decoder_with_learned_positions_is_gated_within_its_block(serve_exports):
    """The servers' char GPT (learned positions, block 32): generation capped so positions stay in the block."""
    d = verify(serve_exports["gpt"])["decoder"]
    assert d["parity"]["prompt_tokens"] == [4, 2] and d["parity"]["tokens"] == 28 and d["parity"]["tokens_equal"]
    assert d["parity"]["onnx_max_abs_logit_diff"] <= 1e-4 and d["eos"] is None


def test_wrapper_joins_requests_into_one_batch(llama):
    """Continuous batching's primitive: two requests prefilled apart, then decoded in one batch (left-padded to a
    common past length), give the same logits as each alone; a row leaving keeps the other's logits."""
    dec = Decoder(llama)
    a, b = [5, 9, 17, 33, 4, 8], [40, 2]

    def prefill(ids):
        mask = np.ones((1, len(ids)), np.int32)
        logits, past = dec.step([ids], mask, Decoder.positions(mask, len(ids)), dec.empty_past(1))
        return logits[0, -1], past, mask

    def decode(tok, past, mask):
        mask = np.concatenate([mask, np.ones((len(tok), 1), np.int32)], 1)
        logits, past = dec.step(np.asarray(tok)[:, None], mask, Decoder.positions(mask, 1), past)
        return logits[:, -1], past, mask

    (_, pa, ma), (_, pb, mb) = prefill(a), prefill(b)
    alone_a, alone_b = decode([7], pa, ma), decode([7], pb, mb)
    past, mask = Decoder.concat_rows([(pa, ma), (pb, mb)])
    assert mask.tolist() == [[1] * 6, [0] * 4 + [1] * 2]
    together, past, mask = decode([7, 7], past, mask)
    np.testing.assert_allclose(together, np.concatenate([alone_a[0], alone_b[0]]), atol=1e-5)
    past, mask = Decoder.take_rows(past, mask, [1])  # request a leaves: b's history only, padding dropped
    assert mask.shape == (1, 3) and past[0][0].shape[2] == 3
    np.testing.assert_allclose(decode([3], past, mask)[0], decode([3], *alone_b[1:])[0], atol=1e-5)


def test_a_broken_cache_graph_fails_the_export(serve_exports, tmp_path, monkeypatch):
    """A decoder whose mask attends to padding (a real bug class for ragged batches) is caught by the gate on the
    left-padded prompt, and nothing is written."""
    import mlsys.models.decoder as decoder

    real = decoder.past_mask
    monkeypatch.setattr(decoder, "past_mask", lambda attention_mask, positions: real(attention_mask * 0 + 1,
                                                                                    positions))
    run_dir = verify(serve_exports["gpt"])["source"]["run_dir"]
    with pytest.raises(ExportError, match="parity failed: decoder.onnx"):
        export_run(run_dir, out=str(tmp_path / "e"), formats=("onnx",))
    assert not os.path.exists(tmp_path / "e") and not os.path.exists(tmp_path / "e.partial")


def _without(export: str, folder, *names, decoder_entry=True) -> str:
    """A copy of an export without some files, signed again (as an older or hand-assembled export would be)."""
    shutil.copytree(export, folder)
    m = json.load(open(os.path.join(folder, "manifest.json")))
    for name in names:
        os.remove(os.path.join(folder, name))
    if not decoder_entry:
        m.pop("decoder")
    for name in ("manifest.json", "manifest.sig", "public_key.pem"):
        os.remove(os.path.join(folder, name))
    m.pop("files")
    write_signed(str(folder), m)
    return str(folder)


def test_server_refuses_lm_exports_missing_the_decoder_or_tokenizer(serve_exports, tmp_path):
    from mlsys.serve.config import ServeConfig
    from mlsys.serve.model import ServedModel

    gpt = serve_exports["gpt"]
    served = ServedModel(ServeConfig(model=gpt))
    assert served.decoder.max_len == 32 and served.tokenizer.decode(served.tokenizer.encode("To be")) == "To be"
    old = _without(gpt, tmp_path / "old", "decoder.onnx", decoder_entry=False)
    rerun = r"has no decoder.onnx .*\(python -m experiments.export run=/.*\) or .* serve.completions=false"
    with pytest.raises(ConfigError, match=rerun):
        ServedModel(ServeConfig(model=old))
    assert ServedModel(ServeConfig(model=old, completions=False)).decoder is None  # logits only: still serves
    bare = _without(gpt, tmp_path / "bare", "vocab.json")
    with pytest.raises(ConfigError, match=r"no tokenizer \(vocab.json not in the manifest\)"):
        ServedModel(ServeConfig(model=bare))


def test_a_server_that_cannot_generate_says_why_on_v1_completions(serve_exports):
    """Not a bare 404: the answer names the reason (logits only, or not a language model) and the route to use."""
    import asyncio

    import httpx

    from mlsys.serve import create_app
    from mlsys.serve.config import ServeConfig
    from tests.conftest import SERVE_KEY

    def post(model: str, headers: dict, **settings) -> httpx.Response:
        app = create_app(ServeConfig(model=model, api_keys_file=serve_exports["keys"], **settings))

        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                return await client.post("/v1/completions", json={"prompt": "To be"}, headers=headers)

        return asyncio.run(go())

    auth = {"Authorization": f"Bearer {SERVE_KEY}"}
    logits_only = post(serve_exports["gpt"], auth, completions=False)
    assert logits_only.status_code == 404 and logits_only.json()["error"] == "no_completions"
    assert "serve.completions=false" in logits_only.json()["detail"] and "/v1/predict" in logits_only.json()["detail"]
    assert post(serve_exports["gpt"], {}, completions=False).status_code == 401  # the key is checked first
    mlp = post(serve_exports["mlp"], auth)
    assert mlp.status_code == 404 and "is not a language model" in mlp.json()["detail"]
