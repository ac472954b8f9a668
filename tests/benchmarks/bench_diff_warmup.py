"""A/B of the delta reader's decoder warm-up on open (``exact.warm_decoder`` on a worker thread).

The warm-up starts numba's ~0.5 CPU-s start-up as soon as a delta-stored source opens, so that it
runs beside planning and the first reads instead of before the first decode. This measures, on
one pair, ``--pairs`` alternating fresh-process runs with and without it (the other patched to a
no-op, as the reader was before), page cache warm:

- ``export``: ``runs.export`` of the delta-stored fine-tune at --max-memory 512M, in process
  (interpreter and imports excluded), wall and CPU of all threads, and the seconds from the
  source's opening to its first decode and of that first decode (what the warm-up could hide);
- ``read``: every tensor read in 64 MiB blocks (bench_diff_store's pure read), wall and CPU.

It prints per-kind medians, and in how many pairs the warm-up was faster.

    python tests/benchmarks/bench_diff_warmup.py --pair real --pairs 8 [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from bench_diff_store import READ_ALL, pair, tsllm

from common import fresh

EXPORT = """
import sys, time
import tensorstore_llm.diff.reader as reader
from tensorstore_llm.runs import export
from tensorstore_llm.store import Store
if sys.argv[4] == "no-warm-up":
    reader.warm_decoder = lambda formats: None
marks = {}
opened, decode = reader.DeltaTensorSource.__init__, reader.decode_block
def opening(self, *args):
    marks.setdefault("open", time.perf_counter())
    opened(self, *args)
def decoding(*args):
    marks.setdefault("decode", time.perf_counter())
    values = decode(*args)
    marks.setdefault("decoded", time.perf_counter())
    return values
reader.DeltaTensorSource.__init__, reader.decode_block = opening, decoding
store = Store(sys.argv[1])
began, cpu = time.perf_counter(), time.process_time()
export(store, sys.argv[2], sys.argv[3], max_memory="512M")
print(time.perf_counter() - began, time.process_time() - cpu, marks["decode"] - marks["open"],
      marks["decoded"] - marks["decode"])
"""


def one(kind: str, store: str, variant: str, out_dir: str) -> tuple[float, ...]:
    """(wall, CPU) seconds of one fresh-process export or read of ``ft-delta``; an export adds
    (seconds from the source's opening to its first decode, seconds that first decode took)."""
    if kind == "export":
        shutil.rmtree(out_dir, ignore_errors=True)
        args = [sys.executable, "-c", EXPORT, store, "ft-delta", out_dir, variant]
    else:
        args = [sys.executable, "-c", READ_ALL, store, "ft-delta", "1", variant]
    done = subprocess.run(args, check=True, stdout=subprocess.PIPE, text=True)
    return tuple(float(x) for x in done.stdout.split()[:4 if kind == "export" else 2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(os.getcwd(), "bench-diff-warmup"))
    parser.add_argument("--pair", default="real")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()
    base, ft = pair(args.pair, args.workdir)
    store = fresh(os.path.join(args.workdir, "store"))
    for cmd in (("import", base, "--name", "base"), ("import", ft, "--delta-of", "base", "--name", "ft-delta")):
        subprocess.run(tsllm(store, *cmd), check=True, stdout=subprocess.DEVNULL)
    out_dir = os.path.join(args.workdir, "export")
    one("read", store, "", out_dir)                                   # page cache warm, both sides
    results = {"load_average_before": os.getloadavg()[0]}
    for kind in ("export", "read"):
        runs = {"warm-up": [], "no-warm-up": []}
        for i in range(args.pairs):
            order = ("warm-up", "no-warm-up") if i % 2 == 0 else ("no-warm-up", "warm-up")
            for variant in order:
                runs[variant].append(one(kind, store, "" if variant == "warm-up" else variant, out_dir))
        wins = sum(a[0] < b[0] for a, b in zip(runs["warm-up"], runs["no-warm-up"]))
        results[kind] = {v: {"wall_s": statistics.median(r[0] for r in rs), "cpu_s": statistics.median(r[1] for r in rs),
                             "runs": rs} for v, rs in runs.items()}
        if kind == "export":
            for v, rs in runs.items():
                results[kind][v]["open_to_first_decode_s"] = statistics.median(r[2] for r in rs)
                results[kind][v]["first_decode_s"] = statistics.median(r[3] for r in rs)
        results[kind]["warm_up_faster_in"] = f"{wins} of {args.pairs}"
        results[kind]["load_average_after"] = os.getloadavg()[0]
        print(kind, json.dumps({v: {k: x for k, x in r.items() if k != "runs"} if isinstance(r, dict) else r
                                for v, r in results[kind].items()}), flush=True)
    fresh(store)
    shutil.rmtree(out_dir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
