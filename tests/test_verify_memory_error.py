"""Running out of memory while reading is the machine's limit, not damage: a healthy artifact read
or verified under a too-small address space raises MemoryError, never IntegrityError (which would
tell the user the artifact is corrupt)."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from tensorstore_llm.store import Store
    from tensorstore_llm.testing.conformance import SinkConformance

    store = Store(sys.argv[1])
    writer = store.create("job-m", "zstd")
    SinkConformance.write_all(None, writer, {"w": torch.zeros(2, 2**23)}, rows_per_block=1 << 20)
    art = writer.commit(kind="checkpoint")
    src = store.open(art.id)
    src.read_rows("w", 0, 1)              # zarr's loop thread starts before the limit
    with open("/proc/self/status") as f:
        vm = int(next(line for line in f if line.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (16 << 20), resource.RLIM_INFINITY))   # 64 MiB of rows cannot fit
    for what, call in (("read", lambda: src.read_rows("w", 0, 2)), ("verify", lambda: store.verify(art.id))):
        try:
            call()
            print(what, "ok")
        except BaseException as e:
            print(what, type(e).__name__)
""")


def test_out_of_memory_is_not_reported_as_corruption(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "store")], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["read MemoryError", "verify MemoryError"], done.stdout
