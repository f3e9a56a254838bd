"""The language models' KV-cache decoder (decoder.onnx, decoder.pt2): exported for gpt and llama runs and gated
against mlsys.generate (64 greedy tokens, logits within 1e-4), INT8 agreement reported, the runtime wrapper's
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
def exports(tmp_path_factory):
    """A tiny gpt (char, learned positions; ONNX only) and llama (BPE, rope, grouped-query; ONNX and torch) run,
    block 80 so that 64 tokens follow a 16-token prompt, each exported once with INT8 (module-scoped: training and
    export are the slow part; no end-of-run sample)."""
    from mlsys.train import train
    from tests.conftest import tiny, typed_cfg

    root = tmp_path_factory.mktemp("lm")
    os.environ["XDG_CONFIG_HOME"] = str(root / "config")
    out = {}
    for family, exp, formats, extra in [
            ("gpt", "shakespeare_char", ("onnx",), ["model.n_layer=2"]),
            ("llama", "shakespeare_bpe_llama", ("onnx", "torch"), ["model.n_head=4", "model.n_kv_head=2"])]:
        run_dir = str(root / family)
        train(typed_cfg(tiny(exp, "model.block_size=80", "trainer.steps=6", "trainer.sample_chars=0", *extra)),
              run_dir)
        out[family] = export_run(run_dir, out=str(root / f"{family}_export"), formats=formats, quantize="int8")
    return out


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_decoder_is_exported_and_gated_against_generate(exports, family):
    m = verify(exports[family])
    d = m["decoder"]
    assert {"decoder.onnx", "decoder.int8.onnx", "model.onnx"} <= set(m["files"])
    assert d["parity"]["tokens"] == 64 and d["parity"]["tokens_equal"] and d["parity"]["prompt_tokens"] == [16, 8]
    assert d["parity"]["onnx_max_abs_logit_diff"] <= 1e-4
    if family == "llama":  # the torch program, gated the same way
        assert "decoder.pt2" in m["files"] and d["parity"]["torch_max_abs_logit_diff"] <= 1e-4
    assert 0.0 <= d["int8_agreement"] <= 1.0
    assert (d["n_layer"], d["n_kv_head"]) == ((2, 2) if family == "gpt" else (1, 2))
    assert d["inputs"]["attention_mask"] == ["B", "P+T"] and d["max_len"] == 80


def test_wrapper_joins_requests_into_one_batch(exports):
    """Continuous batching's primitive: two requests prefilled apart, then decoded in one batch (left-padded to a
    common past length), give the same logits as each alone; a row leaving keeps the other's logits."""
    dec = Decoder(exports["llama"])
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


def test_torch_program_steps_a_ragged_batch_like_onnx(exports):
    import torch

    dec = Decoder(exports["llama"])
    program = torch.export.load(os.path.join(exports["llama"], "decoder.pt2")).module()
    mask, ids = Decoder.left_pad([[5, 9, 17], [40]])
    want, present = dec.step(ids, mask, Decoder.positions(mask, 3), dec.empty_past(2))
    past = [torch.from_numpy(a) for pair in dec.empty_past(2) for a in pair]
    got = program(*(torch.from_numpy(a.astype(np.int64)) for a in (ids, mask, Decoder.positions(mask, 3))), *past)
    np.testing.assert_allclose(got[0].detach().numpy(), want, atol=1e-5)
    np.testing.assert_allclose(got[1].detach().numpy(), present[0][0], atol=1e-5)


def test_a_broken_cache_graph_fails_the_export(exports, tmp_path, monkeypatch):
    """A decoder whose mask attends to padding (a real bug class for ragged batches) is caught by the gate on the
    left-padded prompt, and nothing is written."""
    import mlsys.models.decoder as decoder

    real = decoder.past_mask
    monkeypatch.setattr(decoder, "past_mask", lambda attention_mask, positions: real(attention_mask * 0 + 1,
                                                                                    positions))
    run_dir = verify(exports["gpt"])["source"]["run_dir"]
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


def test_server_refuses_lm_exports_missing_the_decoder_or_tokenizer(exports, tmp_path):
    from mlsys.serve.config import ServeConfig
    from mlsys.serve.model import ServedModel

    served = ServedModel(ServeConfig(model=exports["gpt"]))
    assert served.decoder.max_len == 80 and served.tokenizer.decode(served.tokenizer.encode("To be")) == "To be"
    old = _without(exports["gpt"], tmp_path / "old", "decoder.onnx", "decoder.int8.onnx", decoder_entry=False)
    rerun = r"has no decoder.onnx .*\(python -m experiments.export run=/.*\) or .* serve.completions=false"
    with pytest.raises(ConfigError, match=rerun):
        ServedModel(ServeConfig(model=old))
    bare = _without(exports["gpt"], tmp_path / "bare", "vocab.json")
    with pytest.raises(ConfigError, match=r"no tokenizer \(vocab.json not in the manifest\)"):
        ServedModel(ServeConfig(model=bare))
