"""Running the suite under pytest-xdist (``-n 2 --dist loadfile``): the cores are shared out, and a
test marked ``serial`` runs alone.

``--dist loadfile`` keeps each test module on one worker, so a module's fixtures (a local Ray, a
real model's losses) are built once. (``--dist loadgroup`` cannot group: pytest-xdist 3.8 renames
``item._nodeid``, which pytest 9 no longer reads.)

Each worker gets ``cores // workers`` torch threads (at least one), and so do the processes its
tests start (``OMP_NUM_THREADS``): two workers with two OpenMP threads each on two cores spin
against each other. The engine's tile threads are left as they are.

A serial test's other workers finish the test they are in and wait until the serial test is done (for
wall-time asserts and machine-wide measurements). It is a reader-writer lock on a file that the
controller creates and hands to its workers: every test holds it shared for its whole run protocol
(setup, call, teardown), a serial test holds it exclusive; a turnstile that both take first makes a
waiting serial test go before the tests that arrive after it. Without xdist nothing is locked.
tests/conftest.py imports these hooks.
"""
import contextlib
import os
import shutil
import tempfile

import pytest

SERIAL_LOCK_KEY = "tsllm_serial_lock"


def pytest_configure(config):
    """The controller (or a run without xdist) makes a private folder for the lock files; a worker
    takes its share of the cores."""
    if not hasattr(config, "workerinput"):
        config.tsllm_lock_dir = tempfile.mkdtemp(prefix="tsllm-xdist-")
        return
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, _cores() // workers)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)   # for child processes
    import torch

    torch.set_num_threads(threads)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist: hand each worker the path of the controller's lock file."""
    node.workerinput[SERIAL_LOCK_KEY] = os.path.join(node.config.tsllm_lock_dir, "serial.lock")


def pytest_unconfigure(config):
    """The controller removes the lock folder once the workers are gone."""
    lock_dir = getattr(config, "tsllm_lock_dir", None)
    if lock_dir:
        shutil.rmtree(lock_dir, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Each test runs holding the lock: shared, or exclusive when marked ``serial``."""
    path = getattr(item.config, "workerinput", {}).get(SERIAL_LOCK_KEY)
    with serial_lock(path, exclusive=item.get_closest_marker("serial") is not None):
        yield


@contextlib.contextmanager
def serial_lock(path, exclusive):
    """Hold the reader-writer lock at ``path`` (shared or exclusive); nothing when ``path`` is None."""
    try:
        import fcntl
    except ImportError:   # no flock (Windows): serial tests run beside others there
        path = None
    if path is None:
        yield
        return
    with open(path + ".turnstile", "a") as turnstile, open(path, "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if not exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)
