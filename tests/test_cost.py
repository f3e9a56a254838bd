"""Cost per run: device-hours, dollars and examples per dollar, consistent with the wall time; restarts and
preemptions add up across resumed runs; the sweep report's cost column and total."""

import json
import os
import time

import pytest

from mlsys.cli import summary
from mlsys.config import TrainerConfig
from mlsys.cost import describe, run_cost
from mlsys.report import find_runs, total_cost


def test_price_sources_and_restart_arithmetic():
    t = TrainerConfig()
    fresh = run_cost(t, "NVIDIA H200", 8, 3600.0, 1000, 0, {}, preempted=True)
    assert fresh["usd_per_device_hour"] == t.cost_table["NVIDIA H200"][0] and fresh["device_hours"] == 8.0
    assert fresh["usd"] == pytest.approx(8 * fresh["usd_per_device_hour"]) and fresh["restarts"] == 0
    spot = TrainerConfig(spot=True)
    again = run_cost(spot, "NVIDIA H200", 8, 1800.0, 500, 0, fresh, preempted=False)
    assert again["usd_per_device_hour"] == spot.cost_table["NVIDIA H200"][1]
    assert (again["restarts"], again["preemptions"]) == (1, 1)
    assert again["total_usd"] == pytest.approx(fresh["usd"] + again["usd"])
    assert "1 restart(s), 1 after preemption" in describe(again)
    unknown = run_cost(t, "Some Accelerator", 1, 60.0, 10, 0, {}, False)
    assert unknown["usd"] is None and "set trainer.cost_per_device_hour" in describe(unknown)
    given = run_cost(TrainerConfig(cost_per_device_hour=2.0), "Some Accelerator", 2, 900.0, 100, 6400, {}, False)
    assert given["usd"] == pytest.approx(1.0) and given["tokens_per_usd"] == pytest.approx(6400.0)


@pytest.mark.slow
def test_cost_fields_follow_the_wall_time_and_add_up_on_resume(train_tiny, tmp_path):
    t0 = time.perf_counter()
    results, first = train_tiny("digits_mlp", "trainer.cost_per_device_hour=3.6", run_dir=tmp_path / "a")
    wall = time.perf_counter() - t0
    c = json.load(open(os.path.join(first, "env.json")))["cost"]
    assert c == results["cost"] and c["devices"] == 1  # 8 simulated CPU devices on one host bill as one
    assert 0 < c["wall_seconds"] <= wall and c["device_hours"] == pytest.approx(c["wall_seconds"] / 3600)
    assert c["usd"] == pytest.approx(c["device_hours"] * 3.6) and c["examples"] == 20 * 64
    assert c["examples_per_usd"] == pytest.approx(c["examples"] / c["usd"])
    row = [json.loads(line) for line in open(os.path.join(first, "metrics.jsonl"))][-1]
    assert row["split"] == "cost" and row["usd"] == pytest.approx(c["usd"])
    assert "cost   " in summary("x", 20, wall, results, first) and "$" in summary("x", 20, wall, results, first)
    _, second = train_tiny("digits_mlp", "trainer.cost_per_device_hour=3.6", "trainer.steps=30",
                           f"trainer.resume={first}", run_dir=tmp_path / "b")
    c2 = json.load(open(os.path.join(second, "env.json")))["cost"]
    assert (c2["restarts"], c2["preemptions"], c2["examples"]) == (1, 0, 10 * 64)
    assert c2["total_usd"] == pytest.approx(c["usd"] + c2["usd"])
    runs = find_runs(str(tmp_path))
    assert total_cost(runs).startswith(f"Total: ${c['usd'] + c2['usd']:.4g}")  # the first segment counted once
