"""Peak memory of a child process, taken apart: anonymous, file-backed and shared pages.

``ru_maxrss`` (from ``wait4``) says how high the child's RSS went; sampling ``/proc/PID/status``
every few milliseconds says what it was made of at its highest point (``RssAnon``: heap, tensors,
buffers read with ``pread``; ``RssFile``: pages of mapped files, counted in RSS while they are
mapped; ``RssShmem``). Used by bench_budget.py and tests/test_memory_budget.py.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


@dataclass
class Peak:
    """What one child run held: its exit code, wall seconds, ru_maxrss and the sample at the top."""

    returncode: int
    wall: float
    maxrss_mib: float                           # the kernel's high-water mark (wait4)
    at_peak: dict = field(default_factory=dict)  # FIELDS -> MiB in the sample with the highest VmRSS
    stderr: str = ""


def _status(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read().decode()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[key] = int(value.split()[0]) / 1024
    return out


def run_measured(cmd: list[str], env=None, interval: float = 0.005) -> Peak:
    """Run ``cmd`` (stdout discarded) and return its Peak; raises nothing on failure (see returncode)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    best: dict = {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            status = _status(proc.pid)
            if status and status.get("VmRSS", 0) > best.get("VmRSS", -1):
                best.clear()
                best.update(status)
            time.sleep(interval)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    return Peak(os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 1024, dict(best), err[-3000:])
