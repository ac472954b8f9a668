import os
import subprocess
import sys

import pytest

from tensorstore_llm.store import Store
from tensorstore_llm.testing.synth import write_model_family

# under pytest-xdist, a test marked `serial` runs alone (hooks in xdist_support.py)
from xdist_support import pytest_configure, pytest_configure_node, pytest_runtest_protocol, pytest_unconfigure  # noqa: F401


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """base, ft1, ft2 of the 'tiny' preset as HF directories (read-only for tests)."""
    root = tmp_path_factory.mktemp("tiny-family")
    base, ft1, ft2 = write_model_family(str(root), "tiny", seed=0, finetunes=2)
    return {"base": base, "ft1": ft1, "ft2": ft2}


@pytest.fixture
def one_torch_thread():
    """torch at one intra-op thread during the test (restored after): several times faster for
    small tensors on a shared machine. Use: ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def store(tmp_path):
    return Store(str(tmp_path / "store"))


@pytest.fixture
def cli(capsys):
    """Run ``tsllm ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from tensorstore_llm_cli import main

    def run(*args):
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


def run_tsllm(*args, env=None, **kw):
    """``tsllm ARGS`` in a subprocess (for kills, timing and import checks)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tensorstore_llm_cli", *map(str, args)], env=full_env,
                          capture_output=True, text=True, **kw)


def kill_after_journal_lines(args, store_root, lines, journal="journal.jsonl", timeout=120):
    """Start ``tsllm ARGS``; SIGKILL it once a staged journal named ``journal`` under
    ``store_root/staging`` holds ``lines`` records (AssertionError if it ends first)."""
    import glob
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "tensorstore_llm_cli", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        for path in glob.glob(os.path.join(store_root, "staging", "*", journal)):
            with open(path, "rb") as f:
                if f.read().count(b"\n") >= lines:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    return
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("the job finished (or hung) before it could be killed; make it slower")


@pytest.fixture(scope="session")
def small_family(tmp_path_factory):
    """base, ft1, ft2 of the 'small' preset (~9.6 MB each, 39 tensors)."""
    root = tmp_path_factory.mktemp("small-family")
    base, ft1, ft2 = write_model_family(str(root), "small", seed=0, finetunes=2)
    return {"base": base, "ft1": ft1, "ft2": ft2}
