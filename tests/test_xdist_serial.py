"""Under pytest-xdist a test marked ``serial`` runs alone (tests/xdist_support.py): a small suite of
sleeping tests, run with two workers, logs when each test starts and ends; no serial test's run
overlaps any other test's, while the ordinary tests do run side by side; each worker, and the
processes it starts, use their share of the cores as torch threads."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("xdist", reason="pytest-xdist is not installed (it is in the test extra)")

CONFTEST = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from xdist_support import pytest_configure, pytest_configure_node, pytest_runtest_protocol, pytest_unconfigure
""")

SUITE = textwrap.dedent("""
    import os, subprocess, sys, time
    import pytest
    import torch

    def _log(kind):
        start = time.time()
        time.sleep(0.15)
        with open({log!r}, "a") as f:
            f.write(f"{{kind}} {{os.environ['PYTEST_XDIST_WORKER']}} {{start}} {{time.time()}}\\n")

    def test_threads_are_shared_out():
        child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                               capture_output=True, text=True, check=True)
        with open({threads!r}, "a") as f:
            f.write(f"{{torch.get_num_threads()}} {{child.stdout.strip()}}\\n")

    @pytest.mark.parametrize("i", range(12))
    def test_ordinary(i):
        # meet the other worker (it may still be starting): both in an ordinary test at once
        me = os.environ["PYTEST_XDIST_WORKER"]
        open(os.path.join({log_dir!r}, "started-" + me), "w").close()
        other = os.path.join({log_dir!r}, "started-" + ("gw1" if me == "gw0" else "gw0"))
        deadline = time.time() + 30
        while not os.path.exists(other) and time.time() < deadline:
            time.sleep(0.01)
        _log("ordinary")

    @pytest.mark.serial
    @pytest.mark.parametrize("i", range(4))
    def test_serial(i):
        _log("serial")
""")


def test_serial_tests_never_overlap_others_under_two_workers(tmp_path):
    log = tmp_path / "runs.log"
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(CONFTEST.format(tests=os.path.dirname(__file__)))
    threads = tmp_path / "threads.log"
    (suite / "test_sleepers.py").write_text(SUITE.format(log=str(log), log_dir=str(tmp_path), threads=str(threads)))
    (suite / "pytest.ini").write_text("[pytest]\nmarkers =\n    serial: runs alone\n")
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}   # only xdist: the installed plugins start slowly
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "xdist.plugin", "-n", "2", "-p", "no:cacheprovider",
                             str(suite)], cwd=suite, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = [(kind, worker, float(start), float(end))
            for kind, worker, start, end in (line.split() for line in log.read_text().splitlines())]
    assert len(runs) == 16 and {worker for _, worker, _, _ in runs} == {"gw0", "gw1"}
    for kind, worker, start, end in runs:
        if kind == "serial":
            others = [r for r in runs if r[1] != worker]
            assert all(o_end <= start or o_start >= end for _, _, o_start, o_end in others), (start, end, others)
    ordinary = [r for r in runs if r[0] == "ordinary"]
    side_by_side = any(a[1] != b[1] and a[2] < b[3] and b[2] < a[3] for a in ordinary for b in ordinary)
    assert side_by_side, "the two workers never ran ordinary tests at the same time"
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert threads.read_text().split() == [str(share), str(share)]   # the worker's torch, and its child's
