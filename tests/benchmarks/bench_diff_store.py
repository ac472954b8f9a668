"""Delta-stored checkpoints (issue 11, store side): store-as-delta and read throughput against the
raw read+write ceiling, read cost against the fully stored fine-tune, peak RSS at --max-memory
512M, bytes on disk, and the read cost of each link of a chain.

    python tests/benchmarks/bench_diff_store.py [--workdir DIR] [--pairs real,1gb] [--chain N [--chain-preset 100m]] [--repeat 3]
    python tests/benchmarks/bench_diff_store.py --pairs real,1gb --reads-only --repeat 5
    python tests/benchmarks/bench_diff_store.py --pairs real,1gb --cold --repeat 3
    python tests/benchmarks/bench_diff_store.py --pairs real,1gb --reconstruct --repeat 3 [--cases cold,parent_warm]

Pairs: ``real`` = SmolLM2-135M-Instruct bf16 and its real 30-step AdamW fine-tune (cached by
tensorstore_llm.testing.finetune); ``1gb`` = the synthetic "1gb" Llama preset (1.0 GB bf16) and a
fine-tune of it moved by about one bf16 ULP per weight (delta_scale 2e-4 on weights of std 0.02).
Every command runs in a child process (wall time and peak RSS from wait4); each figure is the
median of ``--repeat`` runs with a warm page cache, and ratios compare runs of the same pass.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import TSLLM, dir_bytes, fresh, median_of, timed

READ_ALL = """
import sys, time
from tensorstore_llm.store import Store
store = Store(sys.argv[1])
if store.get(sys.argv[2]).manifest.info.get("delta"):   # the codec stack (numba, zstd) loads once per process
    import tensorstore_llm.diff.reader
    if len(sys.argv) > 4 and sys.argv[4] == "prefetch":
        tensorstore_llm.diff.reader.DeltaTensorSource.prefetch = True
def disk_read_bytes():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])
for _ in range(int(sys.argv[3])):
    total = 0
    began, cpu, disk = time.perf_counter(), time.process_time(), disk_read_bytes()
    with store.open(sys.argv[2]) as src:
        for name in src.keys():
            meta = src.meta(name)
            step = max(1, (64 << 20) // max(1, meta.row_numel * 2))
            align = getattr(src, "preferred_rows", lambda n: 1)(name)
            step = max(align, step - step % align)
            for start in range(0, meta.rows, step):
                total += src.read_rows(name, start, min(meta.rows, start + step)).numel()
    print(time.perf_counter() - began, time.process_time() - cpu, disk_read_bytes() - disk, flush=True)
"""


def read_all(store: str, ref: str, passes: int = 1) -> tuple[float, float, float]:
    """(seconds spent reading every tensor of ``ref`` in ~64 MiB blocks, without interpreter
    start-up; peak RSS MiB of the reading process; CPU seconds of the reading loop, all threads),
    of the last of ``passes`` reads in one process (passes > 1: compiled kernels already loaded)."""
    os.sync()
    proc = subprocess.Popen([sys.executable, "-c", READ_ALL, store, ref, str(passes)], stdout=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"reading {ref} failed")
    wall, cpu, _ = (float(x) for x in proc.stdout.read().decode().split()[-3:])
    return wall, usage.ru_maxrss / 1024, cpu


def read_all_io(store: str, ref: str, prefetch: bool = False) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of all threads, bytes the process read from disk per
    /proc/self/io read_bytes) of one read of every tensor of ``ref`` in a fresh process;
    ``prefetch=True`` turns the delta reader's POSIX_FADV_WILLNEED hints on."""
    out = subprocess.run([sys.executable, "-c", READ_ALL, store, ref, "1", "prefetch" if prefetch else ""],
                         check=True, stdout=subprocess.PIPE)
    wall, cpu, disk = out.stdout.decode().split()[-3:]
    return float(wall), float(cpu), int(disk)


def store_files(path: str) -> list[str]:
    """Every file under ``path``, one path per inode (the store hardlinks deduplicated chunks
    into objects/, so a walk meets them twice)."""
    seen, files = set(), []
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            inode = os.stat(full).st_ino
            if inode not in seen:
                seen.add(inode)
                files.append(full)
    return files


def evict(files: list[str]) -> None:
    """Write back and drop every page of ``files`` from the page cache (fsync, then
    POSIX_FADV_DONTNEED over the whole file)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: list[str]) -> tuple[int, int]:
    """(bytes of ``files`` in the page cache, their total size), by mincore(2) over a read-only
    mapping of each file (what `fincore` reports)."""
    import ctypes
    import mmap as mm
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mm.PAGESIZE
    resident = total = 0
    for path in files:
        size = os.path.getsize(path)
        total += size
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mm.PROT_READ, mm.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {path}")
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            try:
                if libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {path}")
            finally:
                libc.munmap(addr, size)
            resident += min(size, sum(b & 1 for b in vec) * page)
        finally:
            os.close(fd)
    return resident, total


def pair(kind: str, workdir: str) -> tuple[str, str]:
    """(base dir, fine-tune dir) of a benchmark pair, generated or built once."""
    if kind == "real":
        from tensorstore_llm.testing.finetune import smollm2_finetune
        from tensorstore_llm.testing.real_models import smollm2_checkpoint

        return smollm2_checkpoint("bfloat16"), smollm2_finetune(30)
    root = os.path.join(workdir, f"pair-{kind}")
    marker = os.path.join(root, ".complete")
    if not os.path.exists(marker):
        code = ("import sys; from tensorstore_llm.testing.synth import write_checkpoint as w; "
                "w(sys.argv[1] + '/base', sys.argv[2]); w(sys.argv[1] + '/ft', sys.argv[2], finetune=1, delta_scale=2e-4)")
        subprocess.run([sys.executable, "-c", code, root, kind], check=True)
        open(marker, "w").close()
    return os.path.join(root, "base"), os.path.join(root, "ft")


def tsllm(store: str, *args) -> list[str]:
    return [*TSLLM, "--store", store, "-q", *args]


def artifact_dir(store: str, tag: str) -> str:
    with open(os.path.join(store, "tags", tag)) as f:
        return os.path.join(store, "artifacts", f.read().strip())


def bench_pair(kind: str, workdir: str, repeat: int) -> dict:
    base, ft = pair(kind, workdir)
    ft_bytes = sum(os.path.getsize(os.path.join(ft, f)) for f in os.listdir(ft) if f.endswith(".safetensors"))
    subprocess.run(["sh", "-c", f"cat '{base}'/*.safetensors '{ft}'/*.safetensors > /dev/null"], check=True)
    out = {"pair": kind, "finetune_bytes": ft_bytes}
    copy = os.path.join(workdir, "raw-copy")
    out["raw_read_write_s"] = median_of(repeat, lambda: timed(
        ["sh", "-c", f"rm -rf '{copy}'; mkdir '{copy}'; cat '{ft}'/*.safetensors > '{copy}/x'; sync"]))[0]
    out["raw_read_s"] = median_of(repeat, lambda: timed(["sh", "-c", f"cat '{ft}'/*.safetensors > /dev/null"]))[0]
    store = os.path.join(workdir, f"store-{kind}")

    def setup():
        fresh(store)
        subprocess.run(tsllm(store, "import", base, "--name", "base"), check=True, stdout=subprocess.DEVNULL)

    def store_delta():
        setup()
        return timed(tsllm(store, "import", ft, "--delta-of", "base", "--name", "ft-delta", "--max-memory", "512M"))

    out["store_delta_s"], out["store_delta_rss_mib"] = median_of(repeat, store_delta)
    out["store_full_s"] = median_of(repeat, lambda: (subprocess.run(
        tsllm(store, "tag", "-d", "ft-full"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        timed(tsllm(store, "import", ft, "--name", "ft-full", "--max-memory", "512M")))[1])[0]
    zstd_store = fresh(os.path.join(workdir, f"store-{kind}-zstd"))
    subprocess.run(tsllm(zstd_store, "import", ft, "--name", "ft", "--compression", "zstd"), check=True,
                   stdout=subprocess.DEVNULL)
    out["bytes_finetune_zstd"] = dir_bytes(os.path.join(artifact_dir(zstd_store, "ft"), "tensors"))
    out["bytes_exact_delta"] = dir_bytes(os.path.join(artifact_dir(store, "ft-delta"), "deltas"))
    fresh(zstd_store)
    for ref in ("ft-full", "ft-delta"):
        runs = [read_all(store, ref) for _ in range(repeat)]
        out[f"read_{ref}_s"] = statistics.median(r[0] for r in runs)
        out[f"read_{ref}_rss_mib"] = max(r[1] for r in runs)
        out[f"read_{ref}_cpu_s"] = statistics.median(r[2] for r in runs)
        export = os.path.join(workdir, "export")
        out[f"export_{ref}_s"], out[f"export_{ref}_rss_mib"] = median_of(repeat, lambda ref=ref, export=export: (
            fresh(export), timed(tsllm(store, "export", ref, export, "--max-memory", "512M")))[1])
        fresh(export)
    gb = ft_bytes / 1e9
    out["store_delta_gb_s"] = gb / out["store_delta_s"]
    out["read_delta_gb_s"] = gb / out["read_ft-delta_s"]
    out["read_delta_vs_full"] = out["read_ft-delta_s"] / out["read_ft-full_s"]
    out["read_delta_vs_full_cpu"] = out["read_ft-delta_cpu_s"] / out["read_ft-full_cpu_s"]
    out["export_delta_vs_full"] = out["export_ft-delta_s"] / out["export_ft-full_s"]
    out["ratio_raw_over_zstd"] = ft_bytes / out["bytes_finetune_zstd"]
    out["ratio_raw_over_delta"] = ft_bytes / out["bytes_exact_delta"]
    fresh(store)
    return out


def bench_reads(kind: str, workdir: str, repeat: int) -> dict:
    """Only the read comparison: import the base, the fine-tune whole and as a delta (untimed),
    then read both ``repeat`` times, alternating, so both see the same load."""
    base, ft = pair(kind, workdir)
    ft_bytes = sum(os.path.getsize(os.path.join(ft, f)) for f in os.listdir(ft) if f.endswith(".safetensors"))
    store = fresh(os.path.join(workdir, f"store-{kind}-reads"))
    for args in (("import", base, "--name", "base"), ("import", ft, "--delta-of", "base", "--name", "ft-delta"),
                 ("import", ft, "--name", "ft-full")):
        subprocess.run(tsllm(store, *args), check=True, stdout=subprocess.DEVNULL)
    out = {"pair": kind, "finetune_bytes": ft_bytes, "load_average_before": os.getloadavg()[0],
           "bytes_exact_delta": dir_bytes(os.path.join(artifact_dir(store, "ft-delta"), "deltas"))}
    for passes, what in ((1, ""), (2, "steady_")):          # a fresh process; the second read in one process
        runs = {"ft-full": [], "ft-delta": []}
        for _ in range(repeat):
            for ref, rs in runs.items():
                rs.append(read_all(store, ref, passes))
        for ref, rs in runs.items():
            out[f"{what}read_{ref}_s"] = statistics.median(r[0] for r in rs)
            out[f"{what}read_{ref}_cpu_s"] = statistics.median(r[2] for r in rs)
            out[f"{what}read_{ref}_rss_mib"] = max(r[1] for r in rs)
        out[f"{what}read_delta_vs_full"] = out[f"{what}read_ft-delta_s"] / out[f"{what}read_ft-full_s"]
        out[f"{what}read_delta_vs_full_cpu"] = out[f"{what}read_ft-delta_cpu_s"] / out[f"{what}read_ft-full_cpu_s"]
    out["load_average_after"] = os.getloadavg()[0]
    out["ratio_raw_over_delta"] = ft_bytes / out["bytes_exact_delta"]
    fresh(store)
    return out


def artifact_files(store: str, tag: str) -> list[str]:
    return store_files(artifact_dir(store, tag))


def bench_cold(kind: str, workdir: str, repeat: int) -> dict:
    """Read cost as a user meets it, one case after another, alternating full and delta reads:
    ``cold`` (every file of the store evicted before each read), ``parent_warm`` (everything
    evicted, then the base read once, so only the fine-tune's own files come from disk) and
    ``warm`` (everything read once before). Per read: wall, CPU and /proc/self/io read_bytes of
    the reading process; per eviction: the bytes still resident (mincore) and the bandwidth of
    `dd` reading the full fine-tune's files just after an eviction."""
    base, ft = pair(kind, workdir)
    ft_bytes = sum(os.path.getsize(os.path.join(ft, f)) for f in os.listdir(ft) if f.endswith(".safetensors"))
    store = fresh(os.path.join(workdir, f"store-{kind}-cold"))
    for args in (("import", base, "--name", "base"), ("import", ft, "--delta-of", "base", "--name", "ft-delta"),
                 ("import", ft, "--name", "ft-full")):
        subprocess.run(tsllm(store, *args), check=True, stdout=subprocess.DEVNULL)
    os.sync()
    everything = store_files(store)
    out = {"pair": kind, "finetune_bytes": ft_bytes, "store_bytes": sum(map(os.path.getsize, everything)),
           "artifact_bytes": {ref: sum(map(os.path.getsize, artifact_files(store, ref)))
                              for ref in ("base", "ft-full", "ft-delta")},
           "load_average_before": os.getloadavg()[0]}
    full_files = artifact_files(store, "ft-full")
    evict(everything)
    out["resident_after_evict"] = resident_bytes(everything)[0]
    dd = f"for f in {' '.join(repr(p) for p in full_files)}; do dd if=\"$f\" of=/dev/null bs=16M status=none; done"
    out["dd_cold_s"] = timed(["sh", "-c", dd])[0]
    out["dd_cold_gb_s"] = out["artifact_bytes"]["ft-full"] / 1e9 / out["dd_cold_s"]
    out["dd_warm_s"] = timed(["sh", "-c", dd])[0]
    out["resident_after_dd"] = resident_bytes(full_files)
    cases = {}
    for case in ("cold", "parent_warm", "warm"):
        runs = {"ft-full": [], "ft-delta": []}
        residency = []
        for _ in range(repeat):
            for ref, rs in runs.items():
                if case != "warm":
                    evict(everything)
                if case == "parent_warm":
                    read_all_io(store, "base")
                if case == "warm":
                    read_all_io(store, ref)
                residency.append(resident_bytes(everything)[0])
                rs.append(read_all_io(store, ref))
        row = {"resident_before_read_max": max(residency), "resident_before_read_min": min(residency)}
        for ref, rs in runs.items():
            _read_medians(row, ref, rs)
        row["delta_vs_full_wall"] = row["ft-delta_wall_s"] / row["ft-full_wall_s"]
        row["delta_vs_full_cpu"] = row["ft-delta_cpu_s"] / row["ft-full_cpu_s"]
        row["load_average_after"] = os.getloadavg()[0]
        cases[case] = row
        print(case, json.dumps(row), flush=True)
    out["cases"] = cases
    fresh(store)
    return out


def bench_reconstruct(kind: str, workdir: str, repeat: int, which=("cold", "parent_warm", "warm")) -> dict:
    """Reconstruct (``tsllm export`` to an HF dir, fsynced) against the raw ceiling, as a user
    meets it, in one pass. Ceiling: ``cat`` of the fine-tune's safetensors (read) and
    ``cp -r`` of its HF dir + ``sync`` (read + write), each cold (files evicted) and warm.
    Then per case (cold: every store file evicted; parent warm: evicted, then the base read
    once; warm: the artifact read once) and per repeat, alternating full and delta: the export
    at --max-memory 512M (wall, peak RSS), the pure read of every tensor in 64 MiB blocks
    (wall, CPU, disk bytes) and, for the delta, the same read with the reader's
    POSIX_FADV_WILLNEED hints on (DeltaTensorSource.prefetch). ``tsllm ls`` gives the CLI's
    start-up cost, part of every
    export's wall time."""
    base, ft = pair(kind, workdir)
    ft_files = [os.path.join(ft, f) for f in os.listdir(ft)]
    ft_bytes = sum(os.path.getsize(f) for f in ft_files if f.endswith(".safetensors"))
    store = fresh(os.path.join(workdir, f"store-{kind}-reconstruct"))
    for args in (("import", base, "--name", "base"), ("import", ft, "--delta-of", "base", "--name", "ft-delta"),
                 ("import", ft, "--name", "ft-full")):
        subprocess.run(tsllm(store, *args), check=True, stdout=subprocess.DEVNULL)
    os.sync()
    everything = store_files(store)
    out = {"pair": kind, "finetune_bytes": ft_bytes, "load_average_before": os.getloadavg()[0],
           "artifact_bytes": {ref: sum(map(os.path.getsize, artifact_files(store, ref)))
                              for ref in ("base", "ft-full", "ft-delta")}}
    copy, export = os.path.join(workdir, "raw-copy"), os.path.join(workdir, "export")
    cat = ["sh", "-c", f"cat '{ft}'/*.safetensors > /dev/null"]
    cp = ["sh", "-c", f"rm -rf '{copy}'; cp -r '{ft}' '{copy}'; sync"]
    ceiling = {"cat_cold": [], "cat_warm": [], "cp_sync_cold": [], "cp_sync_warm": []}
    for _ in range(repeat):
        for what, cmd in (("cat", cat), ("cp_sync", cp)):
            fresh(copy)
            evict(ft_files)
            ceiling[f"{what}_cold"].append(timed(cmd)[0])
            fresh(copy)
            subprocess.run(cat, check=True)
            ceiling[f"{what}_warm"].append(timed(cmd)[0])
    fresh(copy)
    out["ceiling_s"] = {k: statistics.median(v) for k, v in ceiling.items()}
    out["cli_startup_s"] = median_of(repeat, lambda: timed(tsllm(store, "ls")))[0]
    print("ceiling", json.dumps(out["ceiling_s"]), "cli start-up", out["cli_startup_s"], flush=True)

    def prepare(case: str, ref: str) -> None:
        if case != "warm":
            evict(everything)
        if case == "parent_warm":
            read_all_io(store, "base")
        if case == "warm":
            read_all_io(store, ref)

    cases = {}
    for case in which:
        runs = {key: [] for key in ("export_ft-full", "export_ft-delta", "read_ft-full", "read_ft-delta",
                                    "read_ft-delta_prefetch")}
        for _ in range(repeat):
            for ref in ("ft-full", "ft-delta"):
                fresh(export)
                prepare(case, ref)
                runs[f"export_{ref}"].append(timed(tsllm(store, "export", ref, export, "--max-memory", "512M")))
                fresh(export)
                prepare(case, ref)
                runs[f"read_{ref}"].append(read_all_io(store, ref))
            prepare(case, "ft-delta")
            runs["read_ft-delta_prefetch"].append(read_all_io(store, "ft-delta", prefetch=True))
        row = {}
        for key, rs in runs.items():
            if key.startswith("export"):
                row[f"{key}_wall_s"] = statistics.median(r[0] for r in rs)
                row[f"{key}_rss_mib"] = max(r[1] for r in rs)
            else:
                _read_medians(row, key, rs)
        row["export_delta_vs_full"] = row["export_ft-delta_wall_s"] / row["export_ft-full_wall_s"]
        row["read_delta_vs_full_wall"] = row["read_ft-delta_wall_s"] / row["read_ft-full_wall_s"]
        row["read_delta_vs_full_cpu"] = row["read_ft-delta_cpu_s"] / row["read_ft-full_cpu_s"]
        row["load_average_after"] = os.getloadavg()[0]
        cases[case] = row
        print(case, json.dumps(row), flush=True)
    out["cases"] = cases
    out["load_average_after"] = os.getloadavg()[0]
    fresh(store)
    return out


def _read_medians(row: dict, key: str, reads: list) -> None:
    """Medians of (wall s, CPU s, bytes from disk) read records into ``row`` under ``key``."""
    row[f"{key}_wall_s"] = statistics.median(r[0] for r in reads)
    row[f"{key}_cpu_s"] = statistics.median(r[1] for r in reads)
    row[f"{key}_disk_bytes"] = statistics.median(r[2] for r in reads)


def bench_chain(workdir: str, repeat: int, links: int = 4, preset: str = "100m") -> dict:
    """Read time of each link of base -> ft1 -> ... -> ftN (each a delta of the last)."""
    root = os.path.join(workdir, f"chain-models-{preset}")
    marker = os.path.join(root, ".complete")
    if not os.path.exists(marker):
        code = ("import sys; from tensorstore_llm.testing.synth import write_checkpoint as w\n"
                "for k in range(int(sys.argv[2]) + 1): w(f'{sys.argv[1]}/c{k}', sys.argv[3], finetune=k, delta_scale=2e-4)")
        subprocess.run([sys.executable, "-c", code, root, str(links), preset], check=True)
        open(marker, "w").close()
    store = fresh(os.path.join(workdir, "store-chain"))
    subprocess.run(tsllm(store, "import", f"{root}/c0", "--name", "c0"), check=True, stdout=subprocess.DEVNULL)
    out = {"preset": preset, "read_s": {"0": median_of(repeat, lambda: read_all(store, "c0")[:2])[0]},
           "read_cpu_s": {"0": read_all(store, "c0")[2]}}
    for k in range(1, links + 1):
        subprocess.run(tsllm(store, "import", f"{root}/c{k}", "--delta-of", f"c{k - 1}", "--name", f"c{k}",
                             "--max-chain", str(links)), check=True, stdout=subprocess.DEVNULL)
        out["read_s"][str(k)] = median_of(repeat, lambda k=k: read_all(store, f"c{k}")[:2])[0]
        out["read_cpu_s"][str(k)] = read_all(store, f"c{k}")[2]
    fresh(store)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(os.getcwd(), "bench-diff-store"))
    parser.add_argument("--pairs", default="real,1gb")
    parser.add_argument("--chain", type=int, default=0, metavar="N", help="also measure reads through a chain of N deltas")
    parser.add_argument("--chain-preset", default="100m")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--reads-only", action="store_true",
                        help="per pair, only the delta read against the full read (imports untimed)")
    parser.add_argument("--cold", action="store_true",
                        help="per pair, full against delta read with the page cache cold, parent warm, and warm")
    parser.add_argument("--reconstruct", action="store_true",
                        help="per pair, tsllm export full vs delta, cold / parent warm / warm, against cat and cp + sync")
    parser.add_argument("--cases", default="cold,parent_warm,warm",
                        help="with --reconstruct: which cases to run (a long run can be split)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    results = {"load_average": os.getloadavg()[0]}
    for kind in filter(None, args.pairs.split(",")):
        bench = (bench_reconstruct if args.reconstruct else bench_cold if args.cold else
                 bench_reads if args.reads_only else bench_pair)
        extra = (args.cases.split(","),) if args.reconstruct else ()
        results[kind] = bench(kind, args.workdir, args.repeat, *extra)
        print(json.dumps(results[kind], indent=1), flush=True)
    if args.chain:
        results["chain"] = bench_chain(args.workdir, args.repeat, args.chain, args.chain_preset)
        print(json.dumps(results["chain"], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
