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


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_llama_like_models_match_transformers(tmp_path, kind):
    """Qwen2 (biases on q, k, v only: model.qkv_bias) and Mistral (a sliding window longer than the block) map as
    Llama does."""
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=kind == "qwen2")
    if kind == "qwen2":
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        ref = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=64))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p))
    ref.eval().save_pretrained(str(tmp_path))
    model, _, cfg = imported_model(str(tmp_path), make_mesh(MeshConfig()), MeshConfig().param_rules)
    assert cfg.qkv_bias == (kind == "qwen2") and not cfg.bias
    toks = tokens(96)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(toks))), reference_logits(ref, toks), atol=1e-4, rtol=0)


def test_born_sharded_on_fsdp_through_init_from(hf):
    """trainer.init_from=hf: on the 8-device fsdp mesh: every parameter lands in the trainer's own sharding, and
    the model computes transformers' logits."""
    from mlsys.train.build import build
    from mlsys.train.pretrained import apply_hf_model, load_pretrained
    from tests.conftest import typed_cfg

    folder, ref = hf["llama"]
    cfg = typed_cfg(["model=llama", "data=synthetic", "data.seq_len=16", "data.batch_size=8", "mesh=fsdp",
                     "model.remat=full", f"trainer.init_from=hf:{folder}", "logger=jsonl"])
    apply_hf_model(cfg)
    assert (cfg.model.n_kv_head, cfg.model.d_model, cfg.model.remat) == (2, 48, "full")
    spec = DataSpec("lm", (16,), "int32", cfg.model.vocab_size)
    mesh = make_mesh(cfg.mesh)
    run = build(cfg, spec, mesh, 1)
    state, step = load_pretrained(cfg.trainer.init_from, cfg, spec, run.state, mesh)
    got = {p: v.get_value().sharding for p, v in nnx.to_flat_state(state.params)}
    want = {p: s.get_value() for p, s in nnx.to_flat_state(run.shardings.params)}
    assert got == want and step == 0
    assert any("fsdp" in str(s.spec) for s in got.values())  # really split, not replicated
    toks = tokens(cfg.model.vocab_size)
    ours = nnx.merge(run.eval_def, state.params, state.rest)(jnp.asarray(toks))
    np.testing.assert_allclose(np.asarray(ours), reference_logits(ref, toks), atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(hf):
    """Llama: rotary positions and grouped-query heads through mlsys's KV cache (gpt shares the cache code)."""
    from mlsys.generate import generate

    folder, ref = hf["llama"]
    model, _, cfg = imported_model(folder, make_mesh(MeshConfig()), MeshConfig().param_rules)
    prompts = tokens(cfg.vocab_size, (2, 5))
    ours = generate(model, prompts.tolist(), 12, temperature=0)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(prompts, dtype=torch.long), max_new_tokens=12, do_sample=False,
                              min_new_tokens=12, pad_token_id=0, eos_token_id=None)
    assert ours == theirs[:, 5:].tolist()


def test_sharded_checkpoint_imports_like_one_file(hf, tmp_path):
    folder, ref = hf["gpt2"]
    split = str(tmp_path / "split")
    ref.save_pretrained(split, max_shard_size="40KB")
    assert len([f for f in os.listdir(split) if f.endswith(".safetensors")]) >= 2
    assert os.path.isfile(os.path.join(split, "model.safetensors.index.json"))
    mesh = make_mesh(MeshConfig())
    one, _, _ = imported_model(folder, mesh, MeshConfig().param_rules)
    two, _, _ = imported_model(split, mesh, MeshConfig().param_rules)
    for a, b in zip(jax.tree.leaves(nnx.state(one, nnx.Param)), jax.tree.leaves(nnx.state(two, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_import_command_writes_a_run_every_tool_reads(hf, tmp_path, kind):
    """experiments.import_hf → a run dir that load_run (export, generate, serve) reads: same logits, its tokenizer;
    exported back with format=hf, every tensor is bit for bit the one imported (HF → mlsys → HF)."""
    from safetensors.numpy import load_file

    from experiments.import_hf import main
    from mlsys.export import export_run
    from mlsys.export.restore import load_run

    folder, ref = hf[kind]
    out = str(tmp_path / "imported")
    main([folder, f"out={out}"])
    run = load_run(out)
    assert run.cfg.model.gelu_approximate == (kind == "gpt2") and run.dataset.tokenizer.vocab_size == 280
    toks = tokens(run.cfg.model.vocab_size)
    np.testing.assert_allclose(np.asarray(run.model(jnp.asarray(toks))), reference_logits(ref, toks), atol=1e-4,
                               rtol=0)
    with pytest.raises(SystemExit):  # nothing is overwritten
        main([folder, f"out={out}"])
    exported = export_run(out, formats=("hf",), out=str(tmp_path / "export"))
    back = load_file(os.path.join(exported, "hf", "model.safetensors"))
    original = load_file(os.path.join(folder, "model.safetensors"))
    assert set(back) == set(original)
    for name, value in original.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.slow
def test_fine_tune_starts_from_an_hf_folder(hf, tmp_path):
    from mlsys.config import load_saved
    from mlsys.train import train
    from tests.conftest import typed_cfg

    folder, _ = hf["llama"]
    cfg = typed_cfg(["data=synthetic", "data.vocab_size=280", "data.seq_len=16", "data.batch_size=8",
                     "data.eval_batches=1", "trainer.steps=1", "trainer.log_every=1", "trainer.sample_chars=0",
                     "logger=jsonl", "trainer.progress=false", f"trainer.init_from=hf:{folder}"])
    train(cfg, str(tmp_path / "run"))
    saved = load_saved(str(tmp_path / "run"))
    assert saved.model.name == "llama" and saved.model.n_kv_head == 2 and saved.trainer.init_from == f"hf:{folder}"
    assert json.load(open(tmp_path / "run" / "env.json"))["init_from"] == f"hf:{folder}"


# --- bad input: one line naming the file or key and the fix; nothing written -------------------------------------

def _copy(folder: str, dst) -> str:
    import shutil

    shutil.copytree(folder, dst)
    return str(dst)


def _rewrite(folder: str, change):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("case, match", [
    ("no_config", r"config.json: missing"),
    ("bert", r"model_type='bert' is not supported; mlsys imports gpt2 \(GPT2LMHeadModel\), llama"),
    ("missing", r"tensor transformer.h.1.mlp.c_fc.bias missing from the safetensors files"),
    ("extra", r"tensor score.weight \(model.safetensors\) is not part of the model"),
    ("shape", r"tensor transformer.wpe.weight is \[32, 32\] in model.safetensors, config.json implies \[64, 32\]"),
    ("pickle", r"only pytorch_model.bin \(pickled torch weights.*save_pretrained"),
    ("tokenizer", r"tokenizer.json has \d+ ids but the model has 200 embedding rows"),
])
def test_bad_folders_fail_with_one_line_and_write_nothing(hf, tmp_path, capsys, case, match):
    from experiments.import_hf import main

    folder = _copy(hf["gpt2"][0], tmp_path / "src")
    config = os.path.join(folder, "config.json")
    raw = json.load(open(config))
    if case == "no_config":
        os.remove(config)
    elif case in ("bert", "tokenizer"):
        raw |= {"model_type": "bert"} if case == "bert" else {"vocab_size": 200}
        json.dump(raw, open(config, "w"))
    elif case == "missing":
        _rewrite(folder, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    elif case == "extra":
        _rewrite(folder, lambda t: t.update({"score.weight": np.zeros((2, 32), np.float32)}))
    elif case == "shape":
        _rewrite(folder, lambda t: t.update({"transformer.wpe.weight": t["transformer.wpe.weight"][:32]}))
    elif case == "pickle":
        os.replace(os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin"))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main([folder, f"out={out}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert pytest.importorskip("re").search(match, err), err
    assert not out.exists() and not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_overrides_that_contradict_config_json_are_named(hf):
    from mlsys.train.pretrained import apply_hf_model
    from tests.conftest import typed_cfg

    folder, _ = hf["llama"]
    cfg = typed_cfg(["model=llama", "model.n_head=8", "model.norm_eps=0.1", f"trainer.init_from=hf:{folder}"])
    with pytest.raises(ConfigError, match=r"config.json contradicts the model overrides given with it: "
                                          r"model.n_head=8 \(config.json: 4\); model.norm_eps=0.1"):
        apply_hf_model(cfg)
    # the folder's tokenizer is the data's unless one was chosen (its ids are the embedding rows' meaning)
    for given, want in ([], f"{folder}/tokenizer.json"), (["data.tokenizer=byte"], "byte"):
        cfg = typed_cfg(["data=text", *given, f"trainer.init_from=hf:{folder}"])
        apply_hf_model(cfg)
        assert cfg.data.tokenizer == want and cfg.model.name == "llama"


def test_reader_streams_bf16_rows_and_columns(tmp_path):
    """bfloat16 (most published checkpoints) is read as such; a block reads only its rows."""
    from safetensors.torch import save_file

    from mlsys.hf.files import Weights

    w = torch.randn(6, 5).to(torch.bfloat16)
    save_file({"w": w, "b": torch.arange(3, dtype=torch.float16)}, str(tmp_path / "model.safetensors"))
    with Weights(str(tmp_path)) as f:
        np.testing.assert_array_equal(f.read("w", (slice(2, 5), slice(1, 3))).astype(np.float32),
                                      w[2:5, 1:3].float().numpy())
        np.testing.assert_array_equal(f.read("b", (slice(None),)), np.arange(3, dtype=np.float16))
