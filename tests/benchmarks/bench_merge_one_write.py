"""``tsllm merge -o DIR``: one write (straight into the HF directory) against the store-then-export
path (``--keep-artifact``, what ``-o`` did before), on a generated family: wall time, peak RSS and
bytes on disk per merged byte.

    python tests/benchmarks/bench_merge_one_write.py [--preset 100m] [--methods task_arithmetic,ties]

Each case runs in a fresh subprocess (``tsllm``), in the same run, so the ratios are comparable on
a busy machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from tensorstore_llm.testing.synth import write_model_family

RECIPES = {
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                       "  - model: {ft1}\n    parameters: {{weight: 0.7}}\n  - model: {ft2}\n    parameters: {{weight: 0.5}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n"
            "  - model: {ft1}\n    parameters: {{weight: 1.0, density: 0.3}}\n"
            "  - model: {ft2}\n    parameters: {{weight: 0.6, density: 0.5}}\n",
}


def _bytes_under(path: str) -> int:
    """Bytes of the files under ``path``, each hard-linked file once (the store dedups by links)."""
    total, seen = 0, set()
    for folder, _, files in os.walk(path):
        for name in files:
            info = os.lstat(os.path.join(folder, name))
            if (info.st_dev, info.st_ino) not in seen and not os.path.islink(os.path.join(folder, name)):
                seen.add((info.st_dev, info.st_ino))
                total += info.st_size
    return total


def _run(args) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``tsllm ARGS`` in a subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tensorstore_llm_cli", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tsllm {' '.join(map(str, args))} failed: {proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="100m")
    parser.add_argument("--methods", default="task_arithmetic,ties")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench-one-write-")
    try:
        base, ft1, ft2 = write_model_family(os.path.join(root, "models"), args.preset, seed=0, finetunes=2)
        merged_bytes = _bytes_under(base)
        print(f"preset {args.preset}: {merged_bytes / 2**20:.0f} MiB per model")
        print(f"{'method':<16} {'mode':<16} {'wall s':>8} {'peak RSS MiB':>13} {'disk bytes / merged byte':>25}")
        for method in args.methods.split(","):
            recipe = os.path.join(root, f"{method}.yaml")
            with open(recipe, "w") as f:
                f.write(RECIPES[method].format(base=base, ft1=ft1, ft2=ft2))
            for mode, extra in (("-o (one write)", []), ("--keep-artifact", ["--keep-artifact"])):
                store, out = os.path.join(root, "store"), os.path.join(root, "out")
                wall, rss = _run(["--store", store, "-q", "merge", recipe, "-o", out, *extra])
                written = _bytes_under(store) + _bytes_under(out)
                print(f"{method:<16} {mode:<16} {wall:>8.2f} {rss:>13.0f} {written / merged_bytes:>25.2f}")
                shutil.rmtree(store)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
