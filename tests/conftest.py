"""Test set-up: 8 simulated CPU devices, jaxtyping shape checks on every mlsys function, tiny configs, one
compilation cache for the whole session (tests/compile_cache.py)."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")

# Test-only speed settings, set before jax is imported so that this process, the xdist workers and every process the
# tests start inherit them (none of them applies to `make run` or `make bench`):
# - XLA's optimisation passes cost more than they save on the tests' tiny computations: a ResNet mesh test's
#   compiles fell from 67 to 29 CPU-s. Numerics are compared with tolerances everywhere, and pass either way.
# (Modules import this file again as tests.conftest: by then the variable is set, and that import warns of nothing.)
_JAX_IMPORTED_EARLY = "jax" in sys.modules and "JAX_DISABLE_MOST_OPTIMIZATIONS" not in os.environ
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# - XLA:CPU's fusion emitters compile each fusion through MLIR: a tiny GPT step's compile is 1.9 CPU-s with them and
#   0.6 without, with bit-identical losses. (XLA aborts on a flag it does not know: recheck on a jaxlib upgrade.)
if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"
# - 3 xdist workers share 2 cores: a thread pool per process (OpenMP in torch, onnxruntime) only oversubscribes them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# - Some environments set PYTHONDONTWRITEBYTECODE=1 and installers write no .pyc: every process the tests start
#   would then compile jax, flax, torch... from source (`import experiments.run`: 5.7 CPU-s against 2.2).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

from jaxtyping import install_import_hook  # noqa: E402

# Every annotated function in mlsys is checked (shapes included) while tests run; at trace time only under jit.
install_import_hook("mlsys", "beartype.beartype")

import pytest  # noqa: E402

from tests import compile_cache  # noqa: E402

if _JAX_IMPORTED_EARLY:  # a plugin imported jax before this file: the settings above came too late for this process
    import warnings

    warnings.warn("jax was imported before tests/conftest.py: JAX_DISABLE_MOST_OPTIMIZATIONS and XLA_FLAGS set "
                  "there apply to child processes only; this run is slower than it need be")

# MLSYS_CPUTIME=out.tsv records CPU seconds per test (tests/cputime.py); off by default.
if os.environ.get("MLSYS_CPUTIME"):
    pytest_plugins = ["tests.cputime"]
from hydra import compose, initialize_config_dir  # noqa: E402

from mlsys.config import register, to_typed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")
PRESETS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "exp")) if f.endswith(".yaml"))

# Small enough to train in seconds, big enough to exercise every part of the loop.
TINY = {
    "digits_mlp": ["trainer.steps=20", "trainer.log_every=5", "trainer.eval_every=10", "model.hidden=[32]"],
    "digits_cnn": ["trainer.steps=10", "trainer.log_every=5", "model.channels=[4,8]", "model.hidden=16"],
    "gpt2_124m": ["trainer.steps=4", "trainer.log_every=2", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
                  "model.block_size=16", "model.vocab_size=256", "data.vocab_size=256", "data.seq_len=16",
                  "data.batch_size=4", "data.eval_batches=1", "optim.warmup_steps=1"],
    "shakespeare_char": ["trainer.steps=10", "trainer.log_every=5", "trainer.eval_every=0", "trainer.ckpt_every=0",
                         "model.n_layer=1", "model.d_model=32", "model.n_head=2", "data.seq_len=16",
                         "data.batch_size=4", "data.eval_batches=2", "trainer.sample_chars=20"],
}
TINY["digits_resnet"] = ["trainer.steps=10", "trainer.log_every=5", "model.stages=[1]", "model.width=8"]
TINY["digits_vit"] = ["trainer.steps=10", "trainer.log_every=5", "model.n_layer=2", "model.d_model=16",
                      "model.n_head=2"]
TINY["images_resnet"] = ["trainer.steps=10", "trainer.log_every=5", "model.depth=0", "model.stages=[1]",
                         "model.width=8", "data.image_size=16", "data.batch_size=16"]
TINY["shakespeare_bpe_llama"] = ["trainer.steps=10", "trainer.log_every=5", "trainer.eval_every=0",
                                 "trainer.ckpt_every=0", "model.n_layer=1", "model.d_model=32", "model.n_head=2",
                                 "model.n_kv_head=1", "data.seq_len=16", "data.batch_size=4", "data.eval_batches=2",
                                 "data.vocab_size=300", "trainer.sample_chars=20"]
# Presets that fine-tune another preset's run (trainer.init_from): the tests train that one first.
BASE = {"shakespeare_char_lora": "shakespeare_char"}
TINY["shakespeare_char_lora"] = TINY["shakespeare_char"]
TINY["corpus_llama"] = ["trainer.steps=6", "trainer.log_every=3", "trainer.eval_every=0", "trainer.ckpt_every=0",
                        "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_kv_head=1",
                        "model.block_size=32", "data.seq_len=32", "data.batch_size=8", "data.eval_batches=2",
                        "data.vocab_size=300", "data.workers=1", "trainer.sample_chars=8"]
# Presets that fine-tune an imported Hugging Face model: a tiny random one, built once (tests/fixtures/hf_tiny.py).
BASE["hf_lora"] = "shakespeare_char"  # for the tests that only compose (any gpt run's dir would do)
TINY["hf_lora"] = ["trainer.steps=6", "trainer.log_every=3", "trainer.eval_every=0", "trainer.ckpt_every=0",
                   "data.seq_len=16", "data.batch_size=4", "data.eval_batches=2", "trainer.sample_chars=20",
                   "optim.warmup_steps=1"]
# Presets whose end-to-end training (and more) is tested in another file: test_train leaves them out (CI time).
TRAINED_ELSEWHERE = {"hf_lora": "tests/test_hf_export.py"}
# Presets whose data.paths the user points at their files: the tests write a small corpus for them.
CORPUS_PRESETS = {"corpus_llama"}


def write_corpus(folder) -> str:
    """A small corpus of tiny Shakespeare's paragraphs as .jsonl documents; returns the file's path."""
    import json

    from mlsys.data.sources import resolve_path

    text = open(resolve_path("tinyshakespeare.txt"), encoding="utf-8").read()[:60_000]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "docs.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"text": p}) + "\n" for p in text.split("\n\n") if p)
    return path


def compose_cfg(overrides: list[str]):
    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def typed_cfg(overrides: list[str]):
    return to_typed(compose_cfg(overrides))


_image_folder = []


def image_folder() -> str:
    """A small labelled folder of PNGs (3 classes x 20, 16x16 RGB), generated once per session."""
    if not _image_folder:
        import tempfile

        from tests.fixtures.images import make_image_folder

        _image_folder.append(make_image_folder(os.path.join(tempfile.mkdtemp(prefix="mlsys-images-"), "images")))
    return _image_folder[0]


def hf_init(kind: str = "gpt2") -> list[str]:
    """trainer.init_from=hf:<a tiny random HF model> for a run to start from (its tokenizer.json comes along)."""
    from tests.fixtures.hf_tiny import hf_model

    return [f"trainer.init_from=hf:{hf_model(kind)}"]


# Presets that read data (or start from weights) the tests generate.
DATA = {"images_resnet": lambda: [f"data.path={image_folder()}"], "hf_lora": hf_init}


def tiny(exp: str | None, *extra: str) -> list[str]:
    """Overrides for a tiny run of a preset (or of the root config when exp is None)."""
    preset = [f"+exp={exp}", *TINY[exp], *(DATA[exp]() if exp in DATA else [])] if exp else []
    return [*preset, "logger=jsonl", "trainer.progress=false", *extra]


@pytest.fixture
def train_tiny(tmp_path):
    """Train a tiny preset in-process into a fresh run dir; returns (results, run_dir)."""
    from mlsys.train import train

    def run(exp: str, *extra: str, run_dir=None):
        run_dir = str(run_dir or tmp_path / "run")
        given = (*extra, *(DATA[exp]() if exp in DATA else []))
        if exp in BASE and not any(e.startswith("trainer.init_from=") for e in given):
            _, base_dir = run(BASE[exp], run_dir=f"{run_dir}_base")
            extra = (*extra, f"trainer.init_from={base_dir}")
        if exp in CORPUS_PRESETS:
            extra = (f"data.paths=[{write_corpus(tmp_path / 'corpus')}]", f"data.cache_dir={tmp_path / 'cache'}", *extra)
        return train(typed_cfg(tiny(exp, *extra)), run_dir), run_dir

    return run


@pytest.fixture(scope="session")
def serve_exports(tmp_path_factory):
    """A tiny digits MLP and char GPT (with its KV-cache decoder graph), trained and exported once per session, and
    a keys file: the model servers' tests share them (training+export is the slow part)."""
    from mlsys.export import export_run
    from mlsys.serve.auth import digest
    from mlsys.train import train

    root = tmp_path_factory.mktemp("serve")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(root / "config"))  # a signing key of the test's own
        for name, exp, extra in [("mlp", "digits_mlp", ["trainer.steps=60"]),
                                 ("gpt", "shakespeare_char", ["model.block_size=32"])]:
            train(typed_cfg(tiny(exp, *extra)), str(root / name))
            out[name] = export_run(str(root / name), formats=("onnx",), out=str(root / name / "export"),
                                   quantize="int8" if name == "mlp" else None)
    keys = root / "keys.txt"
    keys.write_text(f"# digests of the accepted keys\n{digest(SERVE_KEY)}\n")
    out["keys"] = str(keys)
    return out


SERVE_KEY = "test-key-1d4f9"  # the API key whose digest serve_exports' keys file holds


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """A tiny run trained once per session (per xdist worker) and shared by every test asking for the same preset
    and overrides; returns (results, run_dir). Read-only: a test that changes a run dir trains its own (train_tiny)."""
    import copy

    from mlsys.train import train

    done: dict = {}

    def get(exp: str, *extra: str):
        key = (exp, *extra)
        if key not in done:
            run_dir = str(tmp_path_factory.mktemp(f"shared-{exp}") / "run")
            done[key] = (train(typed_cfg(tiny(exp, *extra)), run_dir), run_dir)
        results, run_dir = done[key]
        return copy.deepcopy(results), run_dir

    return get


def pytest_configure(config):
    if config.getvalue("dist") == "loadgroup" and not _xdist_can_group():
        raise pytest.UsageError(f"--dist loadgroup: pytest {pytest.__version__} ignores the test ids pytest-xdist "
                                f"rewrites to group tests, so every module fixture would be built on every worker; "
                                f"install the pinned set (make install; constraints.txt pins pytest)")
    compile_cache.start()  # before xdist starts its workers: they, and every process the tests start, share it


def pytest_unconfigure(config):
    compile_cache.stop()


# --- pytest-xdist (`make test` runs `-n 3 --dist loadgroup`): a module whose tests share a module-scoped fixture
# runs on one worker, so that the fixture is built once; every other test goes to whichever worker is free, the
# dearest first (a long test started last would leave the other workers idle at the end).
FIRST = [  # the longest (wall time: subprocesses, waits), longest first; prefixes of node ids
    "tests/test_faults.py::test_sigkill",  # 26 launches of experiments.run
    "tests/test_multihost.py",  # process groups, module-scoped runs
    "tests/test_sweep.py::test_optuna_sweep_resumes",
    "tests/test_faults.py::test_full_disk",
    "tests/test_serve.py",
    "tests/test_completions.py",
    "tests/test_export.py",
    "notebooks/",
    "tests/test_preemption.py",
    "tests/test_bench.py",
]


# Session fixtures dear enough that their tests, in whatever file, share one worker (and so one build).
SESSION_GROUPS = {"serve_exports": "serve_exports"}


def _group(item) -> str | None:
    info = getattr(item, "_fixtureinfo", None)
    if not info:
        return None
    for name in info.name2fixturedefs:
        if name in SESSION_GROUPS:
            return SESSION_GROUPS[name]
    scopes = {d.scope for defs in info.name2fixturedefs.values() for d in defs}
    return item.nodeid.split("::")[0] if scopes & {"module", "class", "package"} else None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for item in items:
        if group := _group(item):
            item.add_marker(pytest.mark.xdist_group(group))

    def rank(item):
        return next((i for i, prefix in enumerate(FIRST) if item.nodeid.startswith(prefix)), len(FIRST))

    items.sort(key=rank)  # stable: the rest keep their order



def _xdist_can_group() -> bool:
    """xdist 3.8 groups a test by setting `item._nodeid = "<id>@<group>"`; pytest 9.2's Node.nodeid no longer reads
    that attribute, and the groups were then silently ignored. Asked of pytest's own property, not its version."""
    probe = type("Probe", (), {"nodeid": pytest.Item.nodeid})()
    probe._nodeid, probe._id = "t@group", "t"
    try:
        return probe.nodeid == "t@group"
    except Exception:
        return False
