"""Opt-in pytest plugin: CPU seconds per test (this process and its waited-for children, user + sys).

Wall time hides what a test costs on a shared, loaded machine; CPU time does not. Enable it with
`MLSYS_CPUTIME=path.tsv make test` (tests/conftest.py loads it) or `-p tests.cputime`; every test phase
(setup, call, teardown) adds to its test's row, and the session prints the ten dearest tests.
Each finished test is also appended to out.tsv.partial at once (an interrupted run keeps its numbers). Children
count once they are waited for (subprocess.run does); a server killed without wait() is missed.
"""

import glob
import os
import resource
import time

import pytest

_rows: dict[str, list[float]] = {}


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _add(item, cpu: float, wall: float) -> None:
    row = _rows.setdefault(item.nodeid, [0.0, 0.0])
    row[0] += cpu
    row[1] += wall


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    c, w = _cpu(), time.perf_counter()
    yield
    _add(item, _cpu() - c, time.perf_counter() - w)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    c, w = _cpu(), time.perf_counter()
    yield
    _add(item, _cpu() - c, time.perf_counter() - w)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    c, w = _cpu(), time.perf_counter()
    yield
    _add(item, _cpu() - c, time.perf_counter() - w)
    path = os.environ.get("MLSYS_CPUTIME", "")
    if path and path != "1":  # a row per finished test as it goes: an interrupted run still leaves its numbers
        cpu, wall = _rows[item.nodeid]
        with open(f"{path}.partial", "a") as f:
            f.write(f"{cpu:.2f}\t{wall:.2f}\t{item.nodeid}\n")


def pytest_sessionfinish(session):
    if not _rows:
        return
    path = os.environ.get("MLSYS_CPUTIME", "")
    if path and path != "1":
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")
        out = f"{path}.{worker}" if worker else path
        with open(out, "w") as f:
            f.writelines(f"{cpu:.2f}\t{wall:.2f}\t{node}\n" for node, (cpu, wall) in _rows.items())


def pytest_terminal_summary(terminalreporter):
    rows = dict(_rows)
    path = os.environ.get("MLSYS_CPUTIME", "")
    if not rows and path and path != "1":  # the xdist controller: read what each worker wrote
        for out in glob.glob(f"{glob.escape(path)}.gw*"):
            for line in open(out):
                cpu, wall, node = line.rstrip("\n").split("\t", 2)
                rows[node] = [float(cpu), float(wall)]
    if not rows:
        return
    top = sorted(rows.items(), key=lambda kv: -kv[1][0])[:10]
    terminalreporter.write_sep("=", f"ten dearest tests by CPU seconds (total {sum(r[0] for r in rows.values()):.0f} s)")
    for node, (cpu, wall) in top:
        terminalreporter.write_line(f"{cpu:8.1f} cpu-s {wall:8.1f} wall-s  {node}")
