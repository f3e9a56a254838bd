"""Hugging Face import: config mapping both ways, logits parity with `transformers` (fp32, 1e-4) on one device
and born sharded on the 8-device fsdp mesh, greedy generation token for token, a sharded (indexed) checkpoint, the
import command's run dir, and every bad input. The HF models are tiny random ones built here, never downloaded."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mlsys.errors import CheckpointError, ConfigError, MlsysError
from mlsys.hf.config import apply, from_hf, read_config, to_hf
from mlsys.hf.load import HFSource
from mlsys.models import REGISTRY
from mlsys.models.gpt import GPTConfig
from mlsys.models.llama import LlamaConfig
from mlsys.parallel import MeshConfig, make_mesh, param_shardings
from mlsys.spec import DataSpec
from mlsys.train.state import abstract_model, split_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: You are all "
        "resolved rather to die than to famish? All: Resolved. resolved. ") * 20


def make_tokenizer(vocab_size: int):
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return tok


def build_hf(kind: str, folder: str, **save):
    """A tiny random HF model (fp32, eval mode) saved with its tokenizer into `folder`."""
    torch.manual_seed(0)
    tok = make_tokenizer(280)
    v = tok.get_vocab_size()
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=v, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:  # grouped-query attention, untied embeddings, Llama 3 rope scaling, embedding rows beyond the tokenizer
        cfg = transformers.LlamaConfig(vocab_size=v + 8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=False, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0,
                                       rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                       rope_theta=10000.0)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # random norms and biases too, so that a misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    model.eval()
    model.save_pretrained(folder, **save)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """{"gpt2": (folder, torch model), "llama": ...}, built once for the module."""
    root = tmp_path_factory.mktemp("hf")
    return {kind: (str(root / kind), build_hf(kind, str(root / kind))) for kind in ("gpt2", "llama")}


def tokens(vocab: int, shape=(2, 12)) -> np.ndarray:
    return np.random.RandomState(0).randint(0, vocab, shape).astype(np.int32)


def reference_logits(model, toks: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(toks, dtype=torch.long)).logits.numpy()


def imported_model(folder: str, mesh, rules: dict, **model_keys):
    """The mlsys model of an HF folder, its parameters placed by `rules` on `mesh` (the born-sharded path)."""
    family, keys = from_hf(read_config(folder))
    cfg = REGISTRY[family].config(**(keys | model_keys))
    spec = DataSpec("lm", (16,), "int32", keys["vocab_size"])
    eval_def, params, rest = split_model(abstract_model(cfg, spec, 0), train=False)
    shardings = param_shardings({"params": params}, mesh, rules)["params"]
    with HFSource(folder, cfg, keys["vocab_size"]) as src:
        flat = [(p, v.replace(src.array(p, s.get_value(), v.dtype))) for (p, v), (_, s)
                in zip(nnx.to_flat_state(params), nnx.to_flat_state(shardings))]
    params = nnx.from_flat_state(flat)
    rest = jax.tree.map(lambda x: jax.random.key(0) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                        else jnp.zeros(x.shape, x.dtype), rest)
    return nnx.merge(eval_def, params, rest), shardings, cfg


# --- config.json <-> model config -------------------------------------------------------------------------------

def test_config_maps_both_ways():
    llama = LlamaConfig(n_layer=3, n_head=4, n_kv_head=2, d_model=64, d_ff=96, block_size=128, vocab_size=300,
                        rope_base=5e5, rope_scaling=8.0, rope_original_max_len=64, norm_eps=1e-6)
    gpt = GPTConfig(n_layer=2, n_head=4, d_model=32, d_ff=128, block_size=64, vocab_size=100, gelu_approximate=True,
                    tie_embeddings=False)
    qwen = LlamaConfig(n_layer=2, n_head=4, n_kv_head=4, d_model=32, d_ff=64, vocab_size=100, qkv_bias=True)
    for m in (llama, gpt, qwen):
        family, keys = from_hf(json.loads(json.dumps(to_hf(m, m.vocab_size))))
        assert family == m.name and all(getattr(m, k) == v for k, v in keys.items()), keys
    assert to_hf(qwen, 100)["model_type"] == "qwen2"
    # transformers 4's spelling of the rope settings reads the same
    v4 = to_hf(llama, 300)
    v4.pop("rope_parameters")
    v4["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}
    assert from_hf(v4)[1]["rope_scaling"] == 8.0
    # the user's model config: keys config.json decides are set, the others kept, contradictions refused
    base = to_hf(llama, 300)
    assert apply(LlamaConfig(remat="full", block_size=64), base).block_size == 64  # a lower limit is allowed
    assert apply(LlamaConfig(remat="full"), base).remat == "full"
    assert apply(REGISTRY["mlp"].config(), base).name == "llama"
    with pytest.raises(ConfigError, match=r"model.n_layer=5 .*model.d_model=16"):
        apply(LlamaConfig(n_layer=5, d_model=16), base)
    with pytest.raises(ConfigError, match="use model=llama"):
        apply(GPTConfig(), base)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "bert"}, r"model_type='bert' is not supported; mlsys imports gpt2 \(GPT2LMHeadModel\)"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "not a causal language model"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}, "rope_theta": 1e4}, "rope type 'yarn'"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 32}, "sliding_window=32"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 16}, "head_dim=16"),
    ({"attention_bias": True}, "attention_bias=True, mlp_bias=False"),
])
def test_config_refusals(change, match):
    cfg = to_hf(LlamaConfig(n_layer=2, n_head=4, d_model=32, block_size=128, vocab_size=100), 100) | change
    with pytest.raises(ConfigError, match=match):
        from_hf(cfg)
    with pytest.raises(ConfigError, match="model=mlp has no Hugging Face mapping"):
        to_hf(REGISTRY["mlp"].config(), 10)
    with pytest.raises(ConfigError, match="pos_emb='rope'"):
        to_hf(GPTConfig(pos_emb="rope"), 10)


def test_mistral_window_beyond_block_is_accepted():
    cfg = to_hf(LlamaConfig(n_layer=2, n_head=4, d_model=32, block_size=128, vocab_size=100), 100)
    cfg |= {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4096}
    assert from_hf(cfg)[1]["block_size"] == 128
    assert apply(LlamaConfig(block_size=64), cfg | {"sliding_window": 64}).block_size == 64


# --- weights: parity with transformers ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_logits_match_transformers(hf, kind):
    folder, ref = hf[kind]
    mesh = make_mesh(MeshConfig())
    model, _, cfg = imported_model(folder, mesh, MeshConfig().param_rules, vocab_multiple=16,
                                   scan_layers=kind == "llama")
    toks = tokens(cfg.vocab_size)
    ours = np.asarray(model(jnp.asarray(toks)))
    want = reference_logits(ref, toks)
    assert ours.shape[-1] == 16 * -(-cfg.vocab_size // 16)  # padded, and the padding never wins
    np.testing.assert_allclose(ours[..., :cfg.vocab_size], want, atol=1e-4, rtol=0)
    if kind == "gpt2":  # the torch mirror (torch export) computes the same tanh GELU
        from mlsys.export.torch_mirror import GPT_MIRROR

        state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        mirror = GPT_MIRROR.build({**cfg.__dict__}, None)
        mirror.load_state_dict({k: torch.tensor(np.array(v)) for k, v in GPT_MIRROR.state_dict(state).items()})
        with torch.no_grad():
            got = mirror(torch.tensor(toks, dtype=torch.long)).numpy()
        np.testing.assert_allclose(got[..., :cfg.vocab_size], want, atol=1e-4, rtol=0)
