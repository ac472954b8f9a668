"""Helpers shared by the benchmarks: timed subprocesses with peak RSS, medians, model families."""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time

TSLLM = [sys.executable, "-m", "tensorstore_llm_cli"]


def child_usage(cmd: list[str], env=None) -> tuple[float, object]:
    """Run ``cmd`` alone; return (wall seconds, its ``os.wait4`` rusage).

    Dirty pages of earlier runs are flushed first (untimed), so no contender pays for another's
    writes: mergekit does not sync its output, and the next run's fsync would wait behind it.
    Raises RuntimeError with the end of its stderr when it fails.
    """
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage


def timed(cmd: list[str], env=None) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS MiB) of that child alone (:func:`child_usage`)."""
    wall, usage = child_usage(cmd, env)
    return wall, usage.ru_maxrss / 1024


def median_of(repeat: int, fn) -> tuple[float, float]:
    """Median wall and max peak RSS over ``repeat`` calls of ``fn() -> (wall, rss)``."""
    results = [fn() for _ in range(repeat)]
    return statistics.median(r[0] for r in results), max(r[1] for r in results)


def model_family(workdir: str, preset: str, finetunes: int = 2) -> list[str]:
    """base + fine-tunes of ``preset`` under workdir (generated once, reused across runs).

    Generated in a child process so that this process never imports torch: a child's peak RSS
    (wait4) starts from the parent's image, and a small parent keeps baseline readings honest.
    """
    root = os.path.join(workdir, f"models-{preset}")
    marker = os.path.join(root, ".complete")
    if not os.path.exists(marker):
        shutil.rmtree(root, ignore_errors=True)
        code = ("import sys; from tensorstore_llm.testing.synth import write_model_family; "
                "write_model_family(sys.argv[1], sys.argv[2], seed=0, finetunes=int(sys.argv[3]))")
        subprocess.run([sys.executable, "-c", code, root, preset, str(finetunes)], check=True)
        open(marker, "w").close()
    return [os.path.join(root, "base")] + [os.path.join(root, f"ft{k}") for k in range(1, finetunes + 1)]


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def fresh(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    return path


def warm(paths: list[str]) -> None:
    """Read files once so every contender starts from a warm page cache."""
    for p in paths:
        subprocess.run(["sh", "-c", f"cat '{p}'/*.safetensors > /dev/null"], check=True)
