"""The per-machine cache of real test models (``testing.real_models.cached_build``): processes that
ask for the same missing checkpoint at once (pytest-xdist workers) build it once, and no reader ever
sees a half-built directory."""
import os
import subprocess
import sys
import textwrap

import pytest

from tensorstore_llm.testing.real_models import cached_build, is_cached

# A child process: waits until the start file exists, then asks for the checkpoint; its build logs
# one line per call to builds.log, sleeps (so that the other child arrives while it builds) and
# renames a complete directory into place.
CHILD = textwrap.dedent("""
    import os, sys, tempfile, time
    from tensorstore_llm.testing.real_models import cached_build, is_cached
    root, start = sys.argv[1], sys.argv[2]
    target = os.path.join(root, "model-x")

    def build(path):
        with open(os.path.join(root, "builds.log"), "a") as log:
            log.write(f"{os.getpid()}\\n")
        staging = tempfile.mkdtemp(dir=root)
        time.sleep(1.0)
        with open(os.path.join(staging, "model.safetensors"), "wb") as f:
            f.write(b"weights")
        os.rename(staging, path)

    while not os.path.exists(start):
        time.sleep(0.005)
    got = cached_build(target, build)
    print(got == target and is_cached(got))
""")


def test_two_processes_build_a_missing_checkpoint_once(tmp_path):
    start = tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    start.touch()
    results = [child.communicate(timeout=120) for child in children]
    assert [child.returncode for child in children] == [0, 0], [err for _, err in results]
    assert [out.strip() for out, _ in results] == ["True", "True"]
    assert len((tmp_path / "builds.log").read_text().splitlines()) == 1   # the second waited, then read it


def test_a_cached_checkpoint_is_returned_without_building(tmp_path):
    target = tmp_path / "ready"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"weights")

    def build(path):
        raise AssertionError("built again")

    assert cached_build(str(target), build) == str(target)


def test_a_failed_build_leaves_nothing_and_the_next_call_builds(tmp_path):
    target = str(tmp_path / "flaky")

    def failing(path):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cached_build(target, failing)
    assert not is_cached(target)

    def build(path):
        os.makedirs(path)
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(b"weights")

    assert cached_build(target, build) == target and is_cached(target)
