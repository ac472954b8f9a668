"""Exports lock their staging, and gc removes the partials that killed exports leave behind.

Real processes throughout: concurrent exports are real ``tsllm export`` processes (one of them
paused with SIGSTOP where the interleaving matters), killed exports are killed with SIGKILL.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tensorstore_llm.errors import StorageError
from tensorstore_llm.io.export_partials import (
    LOCK_NAME,
    REGISTRY_DIR,
    ExportLock,
    partial_dir,
    registration_path,
    remove_export_partials,
    stale_export_partials,
)
from tensorstore_llm.io.hf_dir import HFCheckpointSource
from tensorstore_llm.store import Store

from conftest import run_tsllm


@pytest.fixture(scope="module")
def exported_store(tmp_path_factory, small_family):
    """A store holding the 'small' base model (39 tensors) as ``base``."""
    root = str(tmp_path_factory.mktemp("export-store") / "store")
    done = run_tsllm("--store", root, "import", small_family["base"], "--name", "base")
    assert done.returncode == 0, done.stderr
    return root


def _export(root, out, *extra):
    return ["--store", root, "export", "base", str(out), "--max-memory", "256K", *extra]


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "tensorstore_llm_cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _partials(out):
    parent, base = os.path.split(str(out))
    return sorted(glob.glob(os.path.join(parent, f".{base}.tsllm-partial-*")))


def _wait_for_journal(proc, out, lines, timeout=120):
    """Wait until the export ``proc`` has journaled ``lines`` finished tensors in its partial."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for partial in _partials(out):
            try:
                with open(os.path.join(partial, "journal.jsonl"), "rb") as f:
                    if f.read().count(b"\n") >= lines:
                        return partial
            except FileNotFoundError:
                pass
        if proc.poll() is not None:
            raise AssertionError(f"export ended (rc={proc.returncode}) before it wrote {lines} tensors: {proc.stderr.read()}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("export did not progress")


def _registrations(root):
    folder = os.path.join(root, REGISTRY_DIR)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _assert_complete_export(out, root):
    """``out`` holds exactly the artifact's tensors, bit for bit, and nothing of the staging."""
    store = Store(root)
    names = set(os.listdir(out))
    assert LOCK_NAME not in names and "journal.jsonl" not in names and "layout.json" not in names, names
    with store.open("base") as want, HFCheckpointSource(str(out)) as got:
        assert sorted(got.keys()) == sorted(want.keys())
        for name in want.keys():
            assert torch.equal(got.read(name), want.read(name)), name
    from safetensors import safe_open

    for shard in glob.glob(os.path.join(out, "*.safetensors")):
        with safe_open(shard, "pt") as f:
            assert list(f.keys())
    assert _partials(out) == []


def test_second_export_of_the_same_job_fails_cleanly_while_the_first_completes(tmp_path, exported_store):
    out = tmp_path / "out"
    first = _start(_export(exported_store, out))
    try:
        _wait_for_journal(first, out, lines=3)
        first.send_signal(signal.SIGSTOP)   # the first export holds its staging, mid-way
        second = run_tsllm(*_export(exported_store, out), timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 8, second.stderr
    assert second.stderr.count("\n") == 1 and second.stderr.startswith("error: ") and "Traceback" not in second.stderr
    assert "another process is exporting the same job" in second.stderr and str(out) in second.stderr
    assert first.wait(timeout=180) == 0, first.stderr.read()
    _assert_complete_export(out, exported_store)
    assert _registrations(exported_store) == []


def test_two_exports_started_together_give_one_complete_export_and_one_clean_error(tmp_path, exported_store):
    out = tmp_path / "out"
    procs = [_start(_export(exported_store, out)) for _ in range(2)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 8], results
    loser = next(err for code, err in results if code == 8)
    assert loser.count("\n") == 1 and loser.startswith("error: ") and str(out) in loser, loser
    _assert_complete_export(out, exported_store)
    assert _registrations(exported_store) == []


def test_export_with_other_settings_that_loses_the_race_is_discarded(tmp_path, exported_store):
    out = tmp_path / "out"
    sharded = _start(_export(exported_store, out, "--max-shard-size", "1M"))
    try:
        _wait_for_journal(sharded, out, lines=3)
        sharded.send_signal(signal.SIGSTOP)
        single = run_tsllm(*_export(exported_store, out), timeout=120)   # another job key: another staging
    finally:
        sharded.send_signal(signal.SIGCONT)
    assert single.returncode == 0, single.stderr
    assert sharded.wait(timeout=180) == 8
    err = sharded.stderr.read()
    assert err.count("\n") == 1 and "published it first" in err, err
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    _assert_complete_export(out, exported_store)
    assert _registrations(exported_store) == []


def test_gc_function_removes_the_partial_of_a_killed_export_but_not_a_live_one(tmp_path, exported_store):
    dead_out, live_out = tmp_path / "dead", tmp_path / "live"
    dead = _start(_export(exported_store, dead_out))
    _wait_for_journal(dead, dead_out, lines=4)
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    [dead_partial] = _partials(dead_out)
    assert not dead_out.exists() and os.path.exists(registration_path(exported_store, dead_partial))
    live = _start(_export(exported_store, live_out))
    try:
        [live_partial] = [_wait_for_journal(live, live_out, lines=2)]
        live.send_signal(signal.SIGSTOP)
        assert stale_export_partials(exported_store) == [dead_partial]
        assert remove_export_partials(exported_store, dry_run=True) == [dead_partial]
        assert os.path.isdir(dead_partial)
        assert remove_export_partials(exported_store) == [dead_partial]
        assert not os.path.lexists(dead_partial) and os.path.isdir(live_partial)
        assert _registrations(exported_store) == [os.path.basename(registration_path(exported_store, live_partial))]
        assert remove_export_partials(exported_store) == []
    finally:
        live.send_signal(signal.SIGCONT)
    assert live.wait(timeout=180) == 0, live.stderr.read()
    _assert_complete_export(live_out, exported_store)
    assert _registrations(exported_store) == [] and stale_export_partials(exported_store) == []
    assert not dead_out.exists()


def test_killed_export_resumes_from_its_locked_partial(tmp_path, exported_store):
    out = tmp_path / "out"
    proc = _start(_export(exported_store, out))
    _wait_for_journal(proc, out, lines=5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = run_tsllm(*_export(exported_store, out), timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    assert int(rerun.stdout.split("resumed: ")[1].split()[0]) >= 5
    _assert_complete_export(out, exported_store)
    assert _registrations(exported_store) == []


def _interrupted_partial(root, out, key="job-0123456789ab"):
    """A registered partial that no process holds, as an interrupted export leaves it."""
    lock = ExportLock(partial_dir(str(out), key), str(out), root)
    lock.acquire()
    with open(os.path.join(lock.partial, "model.safetensors"), "wb") as f:
        f.write(b"\0" * 64)
    lock.release()
    return lock.partial


def test_gc_never_follows_symlinks_nor_removes_what_an_export_did_not_create(tmp_path):
    root = str(tmp_path / "store")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / LOCK_NAME).write_bytes(b"")
    (victim / "precious.txt").write_text("keep me")
    # a registered partial replaced by a symlink to another directory
    swapped = _interrupted_partial(root, tmp_path / "a")
    for name in os.listdir(swapped):
        os.remove(os.path.join(swapped, name))
    os.rmdir(swapped)
    os.symlink(victim, swapped)
    # a registered partial whose lock file is gone: not recognisably an export's
    foreign = _interrupted_partial(root, tmp_path / "b")
    os.remove(os.path.join(foreign, LOCK_NAME))
    # a hand-written registration naming a directory that is not a partial
    forged = registration_path(root, str(victim))
    with open(forged, "w") as f:
        json.dump({"partial": str(victim), "out": str(tmp_path / "x")}, f)
    # a partial-looking directory nobody registered
    stray = tmp_path / ".c.tsllm-partial-job-feedfacecafe"
    stray.mkdir()
    (stray / LOCK_NAME).write_bytes(b"")
    # a real leftover, and a registration whose partial is already gone
    leftover = _interrupted_partial(root, tmp_path / "d")
    gone = _interrupted_partial(root, tmp_path / "e")
    for name in os.listdir(gone):
        os.remove(os.path.join(gone, name))
    os.rmdir(gone)

    assert stale_export_partials(root) == [leftover]
    assert remove_export_partials(root) == [leftover]
    assert not os.path.lexists(leftover) and not os.path.exists(registration_path(root, gone))
    assert os.path.islink(swapped) and sorted(os.listdir(victim)) == sorted([LOCK_NAME, "precious.txt"])
    assert os.path.isdir(foreign) and os.listdir(foreign) == ["model.safetensors"]
    assert os.path.isdir(stray) and os.listdir(stray) == [LOCK_NAME]
    assert not os.path.exists(forged)   # the forged registration is dropped; what it names is untouched
    assert remove_export_partials(root) == []


def test_empty_partial_of_an_export_killed_before_locking_is_removed(tmp_path):
    root = str(tmp_path / "store")
    partial = _interrupted_partial(root, tmp_path / "out")
    for name in os.listdir(partial):
        os.remove(os.path.join(partial, name))
    assert stale_export_partials(root) == [partial]
    assert remove_export_partials(root) == [partial] and not os.path.exists(partial)
    assert _registrations(root) == []


def test_lock_is_exclusive_and_released_by_publishing(tmp_path):
    root, out = str(tmp_path / "store"), tmp_path / "out"
    first = ExportLock(partial_dir(str(out), "job-1"), str(out), root)
    first.acquire()
    second = ExportLock(partial_dir(str(out), "job-1"), str(out), root)
    with pytest.raises(StorageError, match="another process is exporting the same job"):
        second.acquire()
    assert os.path.isdir(first.partial)   # the loser touched nothing
    os.rename(first.partial, out)
    first.published()
    assert os.listdir(out) == [] and _registrations(root) == []
    again = ExportLock(partial_dir(str(out), "job-1"), str(out), root)
    again.acquire()
    again.abandon()   # it created the partial: gone again
    assert not os.path.exists(again.partial) and _registrations(root) == []


def test_abort_after_close_or_publish_only_removes_what_the_sink_still_owns(tmp_path):
    from tensorstore_llm.io.base import TensorMeta
    from tensorstore_llm.io.hf_dir import HFCheckpointSink

    root, out = str(tmp_path / "store"), tmp_path / "out"

    def staged_sink():
        sink = HFCheckpointSink(str(out), job_key="job-a", store_root=root)
        sink.prepare([TensorMeta("w", (2,), "float32")])
        sink.write_rows("w", 0, torch.ones(2))
        sink.finish("w")
        return sink

    sink = staged_sink()
    sink.close()   # interrupted: the partial stays for a resume, registered and unheld
    assert stale_export_partials(root) == [sink.staging_dir]
    sink.abort()
    assert not os.path.exists(sink.staging_dir) and _registrations(root) == []
    sink = staged_sink()
    assert sink.commit() == str(out) and sorted(os.listdir(out)) == ["model.safetensors"]
    holder = ExportLock(sink.staging_dir, str(out), root)   # someone else's partial at the same path now
    holder.acquire()
    sink.abort()
    assert os.path.isdir(holder.partial) and os.path.isdir(out) and len(_registrations(root)) == 1
    holder.remove()
    assert not os.path.exists(holder.partial) and _registrations(root) == []
