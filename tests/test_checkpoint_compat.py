"""Restore tells a damaged step (skipped for the one before it) from a healthy step written under other conditions
(another process count, an older or newer mlsys, another data config): never a quiet fall back to an older step."""

import json
import os
import shutil

import pytest

from mlsys.errors import CheckpointError, ConfigError

EXTRA = ("trainer.steps=20", "trainer.ckpt_every=10", "trainer.max_to_keep=5")


@pytest.fixture
def saved(train_tiny, tmp_path):
    _, run_dir = train_tiny("digits_mlp", *EXTRA, run_dir=tmp_path / "a")
    return run_dir


def start_step(run_dir):
    return json.load(open(os.path.join(run_dir, "env.json")))["start_step"]


def test_a_step_with_another_process_counts_iterator_files_is_healthy(saved, train_tiny, tmp_path, caplog):
    """Steps of an older mlsys hold grain's per-process iterator files (here: of 2 processes): still the newest."""
    for step in ("10", "20"):
        d = os.path.join(saved, "checkpoints", step)
        shutil.rmtree(os.path.join(d, "data_position"))
        os.makedirs(os.path.join(d, "data"))
        for p in range(2):
            json.dump({"next_index": int(step)}, open(os.path.join(d, "data", f"process_{p}-of-2.json"), "w"))
    _, resumed = train_tiny("digits_mlp", *EXTRA, "trainer.steps=25", f"trainer.resume={saved}",
                            run_dir=tmp_path / "b")
    assert start_step(resumed) == 20 and "damaged" not in caplog.text


def test_a_step_of_a_newer_mlsys_stops_instead_of_falling_back(saved, train_tiny, tmp_path):
    meta = os.path.join(saved, "checkpoints", "20", "data_position", "metadata")
    json.dump({**json.load(open(meta)), "format": 99}, open(meta, "w"))
    with pytest.raises(CheckpointError, match="newer mlsys .*format 99.*upgrade mlsys"):
        train_tiny("digits_mlp", *EXTRA, "trainer.steps=25", f"trainer.resume={saved}", run_dir=tmp_path / "b")


def test_a_damaged_data_position_is_skipped_with_a_warning(saved, train_tiny, tmp_path, caplog):
    open(os.path.join(saved, "checkpoints", "20", "data_position", "metadata"), "w").write('{"format": 1, "ne')
    _, resumed = train_tiny("digits_mlp", *EXTRA, "trainer.steps=25", f"trainer.resume={saved}",
                            run_dir=tmp_path / "b")
    assert start_step(resumed) == 10 and "step 20: its data position cannot be read" in caplog.text


def test_resuming_with_another_data_config_names_the_keys(saved, train_tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"data config changed .*data\.batch_size=64 there, 32 here; seed=0 there, "
                                          r"1 here"):
        train_tiny("digits_mlp", *EXTRA, "data.batch_size=32", "seed=1", f"trainer.resume={saved}",
                   run_dir=tmp_path / "b")
    # evaluation keys do not change the training order: allowed
    _, resumed = train_tiny("digits_mlp", *EXTRA, "trainer.steps=25", "data.eval_batch_size=32",
                            f"trainer.resume={saved}", run_dir=tmp_path / "c")
    assert start_step(resumed) == 20


def test_a_process_count_or_device_count_that_does_not_fit_is_one_line():
    from mlsys.validate import validate
    from tests.conftest import typed_cfg

    cfg = typed_cfg(["+exp=digits_mlp", "mesh.shape={data:2,fsdp:4}", "data.batch_size=32"])
    with pytest.raises(ConfigError, match=r"data\.batch_size=32: .*data-parallel size 8 .* 3 process\(es\); "
                                          r"e\.g\. data\.batch_size=24"):
        validate(cfg, 8, 3)
    with pytest.raises(ConfigError, match=r"mesh\.shape=.* needs 8 devices but only 4 exist"):
        validate(cfg, 4, 1)
