"""Reports over a real little sweep: sorted table (Markdown, CSV), curves and objective plots; clear errors."""

import csv

import pytest

from mlsys.errors import MlsysError
from mlsys.report import find_runs, write_report
from tests.entry import run_main


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from mlsys.train import train
    from tests.conftest import tiny, typed_cfg

    root = tmp_path_factory.mktemp("sweep")
    for i, lr in enumerate(["1e-4", "3e-3", "3e-2"]):
        train(typed_cfg(tiny("digits_mlp", f"optim.lr={lr}", "optim.warmup_steps=0", "trainer.steps=40")),
              str(root / str(i)))
    return root


def test_report_sorts_runs_and_plots(sweep):
    md = write_report(str(sweep), metric="val.accuracy", mode="max")
    rows = list(csv.reader(open(sweep / "report.csv")))
    assert rows[0] == ["rank", "run", "val.accuracy", "optim.lr", "data", "usd", "device_hours", "overrides"]
    assert len({r[4] for r in rows[1:]}) == 1  # the same data fingerprint for every run
    assert all(float(r[5]) > 0 and float(r[6]) > 0 for r in rows[1:])  # each run's cost (the CPU table price)
    accs = [float(r[2]) for r in rows[1:]]
    assert len(accs) == 3 and accs == sorted(accs, reverse=True)
    assert float(rows[-1][3]) == 1e-4  # the smallest learning rate learns least in 40 steps
    text = open(md).read()
    assert f"Total: ${sum(float(r[5]) for r in rows[1:]):.4g}" in text
    assert "| 1 |" in text and "curves.png" in text and "objective_optim_lr.png" in text
    for png in ("curves.png", "objective_optim_lr.png"):
        assert open(sweep / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_report_on_a_single_run(sweep, tmp_path):
    md = write_report(str(sweep / "0"), out=str(tmp_path))
    assert "1 run(s)" in open(md).read() and (tmp_path / "curves.png").exists()


def test_report_errors(sweep, tmp_path):
    with pytest.raises(MlsysError, match="holds no runs"):
        write_report(str(tmp_path))
    with pytest.raises(MlsysError, match=r"metric='val.f1': no run logged it; the runs logged \[.*'val.accuracy'"):
        write_report(str(sweep), metric="val.f1", out=str(tmp_path))
    code, _, err = run_main("experiments.report", [str(tmp_path / "none")], tmp_path)  # `python -m`, in-process
    assert code == 2 and "no such directory" in err and "Traceback" not in err


def test_curves_name_runs_by_swept_values_with_validation_and_markers(sweep):
    from mlsys.report import Run, curves_figure

    runs = find_runs(str(sweep))
    ax = curves_figure(runs, str(sweep), ["optim.lr"]).axes[0]
    names = [line.get_label() for line in ax.lines]
    assert {"lr=0.0001", "lr=0.0001 (val)", "lr=0.003", "lr=0.03"} <= set(names)
    single = Run("x", [{"step": 5, "split": "train", "loss": 1.0}, {"step": 5, "split": "val", "loss": 1.1}], {}, [],
                 {})
    ax = curves_figure([single], "x", []).axes[0]
    assert [line.get_marker() for line in ax.lines] == ["o", "s"]  # one point each: drawn, as markers
