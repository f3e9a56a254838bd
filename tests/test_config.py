"""Every preset composes and validates; schemas reject unknown keys and wrong types at compose time."""

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from mlsys.config import Config, validate
from mlsys.errors import ConfigError
from mlsys.models import CNNConfig, GPTConfig, MLPConfig
from tests.conftest import BASE, PRESETS, compose_cfg, typed_cfg


def test_presets_exist():
    assert {"digits_mlp", "digits_cnn", "shakespeare_char"} <= set(PRESETS)


@pytest.mark.parametrize("exp", PRESETS)
def test_every_preset_composes_and_validates(exp):
    cfg = typed_cfg([f"+exp={exp}", *([f"trainer.init_from=runs/{BASE[exp]}/x"] if exp in BASE else [])])
    assert isinstance(cfg, Config) and cfg.name == exp
    validate(cfg, n_devices=8)


def test_model_schema_is_typed():
    assert isinstance(typed_cfg(["+exp=digits_mlp"]).model, MLPConfig)
    assert isinstance(typed_cfg(["+exp=digits_cnn"]).model, CNNConfig)
    cfg = typed_cfg(["+exp=shakespeare_char"])
    assert isinstance(cfg.model, GPTConfig) and cfg.model.n_layer == 4 and cfg.optim.b2 == 0.99


def test_overrides_reach_every_group():
    cfg = typed_cfg(["+exp=digits_mlp", "optim.lr=3e-3", "trainer.steps=500", "model.hidden=[256,256]",
                     "mesh=data", "data.batch_size=32"])
    assert cfg.optim.lr == 3e-3 and cfg.trainer.steps == 500 and cfg.model.hidden == [256, 256]
    assert cfg.mesh.shape["data"] == -1 and cfg.data.batch_size == 32


@pytest.mark.parametrize("override", ["model.not_a_key=1", "trainer.stepz=5", "+optim.foo=1", "+model.widths=[3]"])
def test_unknown_key_fails_before_training(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ConfigError)) as e:
        typed_cfg(["+exp=digits_mlp", override])
    assert override.lstrip("+").split("=")[0].split(".")[-1] in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("override", ["optim.lr=fast", "trainer.steps=ten", "model.hidden=12"])
def test_wrong_type_fails_at_compose(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg(["+exp=digits_mlp", override])


@pytest.mark.parametrize("overrides, message", [
    (["trainer.steps=0"], "trainer.steps=0"),
    (["optim.lr=-1"], "optim.lr=-1"),
    (["optim.lr=0"], "optim.lr=0"),
    (["optim.name=adagrad"], "optim.name='adagrad'"),
    (["model.activation=swish"], "model.activation='swish'"),
    (["data.batch_size=30", "mesh=data"], "data.batch_size=30"),
    (["mesh.shape={data:16}"], "needs 16 devices"),
    (["mesh.shape={data:3,fsdp:-1}"], "do not divide"),
    (["model.name=gpt"], "model.name='gpt'"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps=-5"),
])
def test_semantic_errors_name_key_and_value(overrides, message):
    cfg = typed_cfg(["+exp=digits_mlp", *overrides])
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("(", r"\(")):
        validate(cfg, n_devices=8)


def test_model_and_data_must_fit_each_other():
    with pytest.raises(ConfigError, match="language model, but data=digits"):
        validate(typed_cfg(["model=gpt"]), n_devices=1)
    with pytest.raises(ConfigError, match="language-modelling task; use model=gpt"):
        validate(typed_cfg(["data=text"]), n_devices=1)


def test_unknown_mesh_axis():
    from mlsys.parallel import MeshConfig, resolve_shape

    with pytest.raises(ConfigCompositionException, match="mesh.shape"):
        compose_cfg(["+exp=digits_mlp", "mesh.shape={pipeline:2}"])
    with pytest.raises(ConfigError, match=r"unknown axes \['pipeline'\]"):
        resolve_shape(MeshConfig(shape={"pipeline": 2}), 8)


def test_sequence_longer_than_model_maximum():
    cfg = typed_cfg(["+exp=shakespeare_char", "data.seq_len=128"])
    with pytest.raises(ConfigError, match=r"data.seq_len=128: is above the model's maximum model.block_size=64"):
        validate(cfg, n_devices=1)


def test_mesh_minus_one_fills_devices():
    from mlsys.parallel import resolve_shape

    cfg = typed_cfg(["+exp=digits_mlp", "mesh=data"])
    assert resolve_shape(cfg.mesh, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    cfg = typed_cfg(["+exp=digits_mlp", "mesh.shape={data:2,fsdp:-1,tensor:2}"])
    assert resolve_shape(cfg.mesh, 8) == {"data": 2, "fsdp": 2, "tensor": 2}


def _saved_run(folder, data) -> str:
    """A run dir holding only the config.yaml a run writes (enough for what reads the config before weights)."""
    from omegaconf import OmegaConf

    from mlsys.models import LlamaConfig

    folder.mkdir()
    OmegaConf.save(OmegaConf.structured(Config(model=LlamaConfig(), data=data)), folder / "config.yaml")
    return str(folder)


def test_a_moved_run_dir_finds_its_own_tokenizer(tmp_path):
    """An imported HF run names its tokenizer.json by absolute path; moved elsewhere, the run's copy is used."""
    from mlsys.config import load_saved
    from mlsys.data.sources import TextConfig

    gone = str(tmp_path / "was_here" / "tokenizer.json")
    run = _saved_run(tmp_path / "moved", TextConfig(tokenizer=gone))
    assert load_saved(run).data.tokenizer == gone  # the run has no copy of its own: left as written
    (tmp_path / "moved" / "tokenizer.json").write_text("{}")
    assert load_saved(run).data.tokenizer == str(tmp_path / "moved" / "tokenizer.json")


def test_generate_refuses_a_run_without_a_tokenizer_before_restoring(tmp_path, capsys):
    from experiments import generate
    from mlsys.data.sources import SyntheticConfig

    run = _saved_run(tmp_path / "imported", SyntheticConfig(task="lm"))  # no checkpoint: refused before reading one
    with pytest.raises(SystemExit) as e:
        generate.main([f"run={run}", "prompt=ROMEO:"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "data=synthetic (random token ids): it has no tokenizer" in err
    assert "import it again (python -m experiments.import_hf <folder>)" in err
