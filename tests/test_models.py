"""Each model family: output shapes, a gradient step that lowers the loss, dtypes, and shape checks."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from mlsys.models import CNN, GPT, MLP, CNNConfig, GPTConfig, MLPConfig, build_model, import_target
from mlsys.spec import DataSpec
from mlsys.errors import ConfigError
from mlsys.models import CustomConfig

IMG = DataSpec("classify", (8, 8, 1), "float32", 10)
LM = DataSpec("lm", (16,), "int32", 37)


def inputs(spec, b=4):
    if spec.task == "lm":
        return jax.random.randint(jax.random.key(1), (b, *spec.input_shape), 0, spec.num_classes)
    return jax.random.uniform(jax.random.key(1), (b, *spec.input_shape))


def targets(spec, b=4):
    shape = (b, *spec.input_shape) if spec.task == "lm" else (b,)
    return jax.random.randint(jax.random.key(2), shape, 0, spec.num_classes)


CASES = [
    (MLP, MLPConfig(hidden=[32, 16], dropout=0.1), IMG, (4, 10)),
    (CNN, CNNConfig(channels=[4, 8], hidden=16), IMG, (4, 10)),
    (CNN, CNNConfig(channels=[4], norm="layer", pool="avg", hidden=8), IMG, (4, 10)),
    (GPT, GPTConfig(n_layer=2, n_head=2, d_model=16, block_size=16), LM, (4, 16, 37)),
    (GPT, GPTConfig(n_layer=1, n_head=2, d_model=16, block_size=16, pos_emb="rope", tie_embeddings=False,
                    dropout=0.1, bias=False), LM, (4, 16, 37)),
]


@pytest.mark.parametrize("cls, cfg, spec, out_shape", CASES)
def test_shapes_and_a_gradient_step_lowers_the_loss(cls, cfg, spec, out_shape):
    model = cls(cfg, spec, rngs=nnx.Rngs(params=0, dropout=1))
    x, y = inputs(spec), targets(spec)
    assert model(x).shape == out_shape and model(x).dtype == jnp.float32
    model.eval()  # dropout off, batch statistics frozen: the loss before and after is comparable
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    before = loss_fn(model)
    for _ in range(3):
        grads = nnx.grad(loss_fn)(model)
        opt.update(model, grads)
    assert loss_fn(model) < before


def test_gpt_is_causal():
    model = GPT(GPTConfig(n_layer=2, n_head=2, d_model=16, block_size=16), LM, rngs=nnx.Rngs(0))
    x = inputs(LM)
    changed = x.at[:, 10].set((x[:, 10] + 1) % LM.num_classes)
    a, b = model(x), model(changed)
    assert jnp.allclose(a[:, :10], b[:, :10], atol=1e-6) and not jnp.allclose(a[:, 10:], b[:, 10:])


def test_gpt_tied_embeddings_share_one_matrix():
    tied = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16), LM, rngs=nnx.Rngs(0))
    untied = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, tie_embeddings=False), LM, rngs=nnx.Rngs(0))
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert count(untied) - count(tied) == 16 * 37


def test_bf16_compute_keeps_fp32_params_and_logits():
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16, dtype="bfloat16"), LM, rngs=nnx.Rngs(0))
    assert model.wte.embedding[...].dtype == jnp.float32
    assert model(inputs(LM)).dtype == jnp.float32


def test_params_carry_logical_axis_names():
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16), LM, rngs=nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(specs["blocks"]["mlp"]["fc"]["kernel"].get_value()) == (None, "embed", "mlp")  # scanned: layer axis
    assert tuple(specs["wte"]["embedding"].get_value()) == ("vocab", "embed")


def test_shape_checks_are_active():
    """jaxtyping checks every annotated mlsys function during tests: a wrong-rank input fails by name."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, d_model=16), LM, rngs=nnx.Rngs(0))
    with pytest.raises(Exception, match="tokens|Int\\[Array"):
        model(jnp.zeros((4,), jnp.int32))


def test_custom_model_by_import_path():
    cfg = CustomConfig(target="tests.fixtures.user_model:TinyNet", kwargs={"width": 8})
    model = build_model(cfg, IMG, nnx.Rngs(0))
    assert model(inputs(IMG)).shape == (4, 10) and model.fc.out_features == 8


@pytest.mark.parametrize("target, message", [
    ("tests.fixtures.nope:TinyNet", "cannot be imported"),
    ("tests.fixtures.user_model:Missing", "cannot be imported"),
    ("tests.fixtures.user_model:NotAModule", "not a flax.nnx.Module"),
])
def test_custom_model_errors(target, message):
    with pytest.raises(ConfigError, match=message):
        import_target(target)


def test_dense_layer_arithmetic_matches_jax():
    """mlsys.models.dense (the transformer's linear layers and GELU, arranged for XLA:CPU's fast matmuls): the same
    values and gradients as jax.lax.dot_general and jax.nn.gelu(approximate=False); other contractions pass through."""
    from mlsys.models import dense

    x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    k = jax.random.normal(jax.random.key(1), (8, 6))
    dims = (((2,), (0,)), ((), ()))

    def loss(dg):
        return lambda x, k: jnp.sum(jnp.sin(dg(x, k, dims)))

    want, got = jax.grad(loss(jax.lax.dot_general), (0, 1))(x, k), jax.grad(loss(dense.dot_general), (0, 1))(x, k)
    for a, b in zip(want, got):
        assert a.shape == b.shape and jnp.allclose(a, b, atol=1e-5)
    assert jnp.allclose(dense.dot_general(x, k, dims), x @ k, atol=1e-6)
    y = jax.random.normal(jax.random.key(2), (4, 8))  # a contraction that is not a linear layer's: plain dot_general
    assert jnp.allclose(dense.dot_general(y.T, y, (((1,), (0,)), ((), ()))), y.T @ y, atol=1e-5)
    # The arrangement itself: dW is one 2-D product contracting the (flattened) token axis, with no transpose in
    # front (a materialised Xᵀ cost the nanoGPT-size CPU step ~15%) and no contraction over two axes (~40%).
    eqns = jax.make_jaxpr(jax.grad(loss(dense.dot_general), 1))(x, k).jaxpr.eqns
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert not [e for e in eqns if e.primitive.name == "transpose"]
    assert [e.params["dimension_numbers"] for e in dots if e.invars[0].aval.shape == (15, 8)] == [(((0,), (0,)),
                                                                                                ((), ()))]
    h = jnp.linspace(-8.0, 8.0, 101)
    assert jnp.allclose(dense.gelu(h), jax.nn.gelu(h, approximate=False), atol=1e-6)
    assert jnp.allclose(jax.grad(lambda h: dense.gelu(h).sum())(h),
                        jax.grad(lambda h: jax.nn.gelu(h, approximate=False).sum())(h), atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_causal_attention_matches_jax(dtype):
    """mlsys.models.attention (the decoder's training attention on CPU): jax.nn.dot_product_attention's values and
    gradients, and a backward pass that takes the softmax's row sums over the head dimension, never a reduction
    over the (B, H, T, T) probabilities (what made JAX's backward slow on XLA:CPU)."""
    from mlsys.models import attention

    t = 16
    q, k, v = (jax.random.normal(jax.random.key(i), (3, t, 4, 8)).astype(dtype) for i in range(3))

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))

    def jax_attention(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert jnp.allclose(attention.causal(q, k, v).astype(jnp.float32),
                        jax_attention(q, k, v).astype(jnp.float32), atol=tol)
    want = jax.grad(loss(jax_attention), (0, 1, 2))(q, k, v)
    got = jax.grad(loss(attention.causal), (0, 1, 2))(q, k, v)
    for a, b in zip(want, got):
        assert a.dtype == b.dtype and jnp.allclose(a.astype(jnp.float32), b.astype(jnp.float32), atol=tol)

    def key_axis_sums(fn):  # sums over the keys of a (..., T, T) operand, forward and backward
        eqns = jax.make_jaxpr(jax.grad(loss(fn), (0, 1, 2)))(q, k, v).jaxpr.eqns
        return len([e for e in eqns if e.primitive.name == "reduce_sum" and e.invars[0].aval.shape[-2:] == (t, t)])

    # Only the forward softmax's denominator is left.
    assert key_axis_sums(attention.causal) == 1 < key_axis_sums(jax_attention)
    with pytest.raises(Exception, match="one shape|parameter .k."):  # ValueError; the tests' jaxtyping hook is first
        attention.causal(q, k[:, :8], v[:, :8])


def test_transformer_uses_cpu_attention_only_for_auto(monkeypatch):
    """model.attention=auto trains with mlsys.models.attention on a CPU backend; model.attention=xla keeps JAX's.
    Both give the same loss gradients."""
    from mlsys.models import attention
    from mlsys.models.transformer import Block, TransformerConfig

    calls = []
    causal = attention.causal
    monkeypatch.setattr(attention, "causal", lambda *a: calls.append(1) or causal(*a))

    def grads(impl):
        calls.clear()
        block = Block(TransformerConfig(n_head=2, d_model=16, attention=impl), rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (2, 8, 16))
        return nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(block), len(calls)

    (auto, auto_calls), (xla, xla_calls) = grads("auto"), grads("xla")
    assert auto_calls == 1 and xla_calls == 0
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(xla)):
        assert jnp.allclose(a, b, atol=1e-5)
