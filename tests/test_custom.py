"""model=custom: NNX models written as flax's examples write them, mlsys-aware ones, and Linen modules train,
resume, move between meshes and export; what cannot work fails in one line before compiling."""

import json
import os
import shutil

import numpy as np
import pytest

from mlsys.errors import ConfigError
from mlsys.export import export_run, verify
from mlsys.validate import validate
from tests.conftest import typed_cfg

FIXTURES = "tests.fixtures.user_model"
CASES = {  # target, extra overrides, (first run's mesh, resumed run's mesh)
    "flax_style": ("FlaxStyleNet", ["+model.kwargs.width=16"], ("single", "single")),
    "spec_style": ("TinyNet", ["+model.kwargs.width=16"], ("data", "single")),  # built as TinyNet(spec, rngs=...)
    "linen": ("LinenNet", ["+model.kwargs.width=16"], ("fsdp", "data")),
}


def rows(run_dir):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r["split"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_custom_model_trains_resumes_and_exports(case, train_tiny, tmp_path):
    """Dropout and batch statistics are on in training and frozen in evaluation: the resumed run repeats the
    uninterrupted one (RNG streams and statistics come back), and ONNX matches JAX on held-out digits."""
    cls, extra, (mesh, resume_mesh) = CASES[case]
    args = ["model=custom", f"model.target={FIXTURES}:{cls}", *extra, "trainer.steps=6", "trainer.log_every=3",
            "trainer.ckpt_every=3", "trainer.eval_every=0", "data.batch_size=16"]
    full, full_dir = train_tiny(None, *args, f"mesh={mesh}", run_dir=tmp_path / "full")
    half_dir = str(tmp_path / "half")
    shutil.copytree(full_dir, half_dir)
    shutil.rmtree(os.path.join(half_dir, "checkpoints", "6"))  # as if stopped after step 3's checkpoint
    resumed, resumed_dir = train_tiny(None, *args, f"mesh={resume_mesh}", f"trainer.resume={half_dir}",
                                      run_dir=tmp_path / "resumed")
    np.testing.assert_allclose([r["loss"] for r in rows(resumed_dir)], [r["loss"] for r in rows(full_dir)][1:],
                               rtol=1e-5)
    np.testing.assert_allclose(resumed["test"]["loss"], full["test"]["loss"], rtol=1e-5)
    m = verify(export_run(resumed_dir, out=str(tmp_path / "export"), formats=("onnx",)))
    assert m["parity"]["onnx_max_abs_diff"] < 1e-4 and m["source"]["step"] == 6


@pytest.mark.parametrize("cls", ["LinenNet", "LinenFieldNet"])  # the mode as a call argument, or as a field
def test_linen_dropout_and_batch_statistics_follow_the_mode(cls):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mlsys.models import CustomConfig, build_model
    from mlsys.spec import DataSpec
    from mlsys.train.state import split_model

    model = build_model(CustomConfig(target=f"{FIXTURES}:{cls}", kwargs={"width": 8} if cls == "LinenNet" else {}),
                        DataSpec("classify", (8, 8, 1), "float32", 10), nnx.Rngs(params=0, dropout=1))
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))

    def stats(m):
        return [np.array(v.get_value()) for _, v in nnx.to_flat_state(nnx.state(m, nnx.BatchStat))]

    for train in (True, False):
        graphdef, params, rest = split_model(model, train)
        m = nnx.merge(graphdef, params, rest)
        before = stats(m)
        a, b = m(x), m(x)
        changed = any(np.abs(u - v).max() > 0 for u, v in zip(before, stats(m)))
        assert changed == train and bool(jnp.any(a != b)) == train  # training: new masks, statistics move


BAD = [
    ("not_a_class", [], "is <function not_a_class at .*>, not a class"),
    ("NotAModule", [], "not a flax.nnx.Module or flax.linen.Module subclass"),
    ("NeedsDepth", [], "NeedsDepth needs the argument 'depth', which neither model.kwargs nor the data gives; "
                       r"set \+model.kwargs.depth=..."),
    ("TinyNet", ["+model.kwargs.widht=8"], r"model.kwargs.widht: TinyNet takes no argument 'widht'; its arguments "
                                           r"are \['spec', 'width'\]"),
]


@pytest.mark.parametrize("cls, extra, message", BAD, ids=[b[0] for b in BAD])
def test_bad_targets_fail_in_one_line_before_anything_is_built(cls, extra, message):
    with pytest.raises(ConfigError, match=message):
        validate(typed_cfg(["model=custom", f"model.target={FIXTURES}:{cls}", *extra]), 1)


def test_a_constructor_that_fails_names_the_class_and_its_arguments(train_tiny):
    with pytest.raises(ConfigError) as e:
        train_tiny(None, "model=custom", f"model.target={FIXTURES}:FailsInside", "+model.kwargs.width=4")
    assert str(e.value).startswith(f"model.target='{FIXTURES}:FailsInside': FailsInside(in_features=64, "
                                   "num_classes=10, width=4, rngs) failed: TypeError: dot_general requires")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=100000", r"data.batch_size=100000: larger than the training split of data=digits \(1258 "
                               r"examples\); use at most 1258"),
    ("data.eval_batch_size=256", r"data.eval_batch_size=256: larger than the val split of data=digits \(180 "
                                 r"examples\); use at most 180"),
])
def test_batches_larger_than_a_split_fail_before_compiling(train_tiny, override, message):
    with pytest.raises(ConfigError, match=message):
        train_tiny("digits_mlp", override)


def test_a_preset_with_another_model_group_names_the_keys_that_do_not_apply():
    from mlsys.config import check_preset_model
    from tests.conftest import CONF

    with pytest.raises(ConfigError, match=r"^\+exp=digits_mlp sets model.hidden, model.dropout, which model=custom "
                                          r"does not have .*: data=digits name=digits_mlp data.batch_size=64 "):
        check_preset_model(["+exp=digits_mlp", "model=custom", f"model.target={FIXTURES}:TinyNet"], CONF)
    check_preset_model(["+exp=digits_mlp", "model=mlp"], CONF)  # the preset's own model: nothing to say
    check_preset_model(["+exp=digits_cnn", "model=cnn", "model.hidden=8"], CONF)
