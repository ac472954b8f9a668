"""Foundation benchmarks: import / export throughput against raw `cat` / `cp`, a streamed weighted
sum of three checkpoints at two memory budgets and two model sizes, and `tsllm --help` latency.

Run:  python tests/benchmarks/bench_foundation.py --workdir /tmp/tsllm-bench --sizes 1gb,2gb
Prints a markdown table; results we saw are in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import TSLLM, dir_bytes, fresh, median_of, model_family, timed, warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--sizes", default="1gb,2gb")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    rows = []

    def row(what, wall, rss, baseline=None, note=""):
        ratio = f"{wall / baseline:.2f}x" if baseline else ""
        rows.append(f"| {what} | {wall:.2f} | {rss:.0f} | {ratio} | {note} |")
        print(rows[-1], flush=True)

    print("| job | wall s (median) | peak RSS MiB | vs baseline | note |\n|---|---|---|---|---|")
    helps = [timed(TSLLM + ["--help"])[0] for _ in range(5)]
    row("`tsllm --help`", statistics.median(helps), 0, note="interpreter start included")
    startup = median_of(3, lambda: timed([sys.executable, "-c", "import torch, zarr"]))
    row("python -c 'import torch, zarr' (startup floor of every streamed command)", *startup)

    for size in args.sizes.split(","):
        base, ft1, ft2 = model_family(args.workdir, size)
        gb = dir_bytes(base) / 1e9
        warm([base, ft1, ft2])
        work = os.path.join(args.workdir, f"run-{size}")
        os.makedirs(work, exist_ok=True)
        cat = median_of(args.repeat, lambda: timed(["sh", "-c", f"cat '{base}'/*.safetensors > /dev/null"]))
        row(f"[{size}, {gb:.2f} GB] cat base > /dev/null (read ceiling)", *cat)
        cp = median_of(args.repeat, lambda: timed(["sh", "-c", f"rm -rf '{work}/cp' && cp -r '{base}' '{work}/cp' && sync '{work}'/cp/*"]))
        row(f"[{size}] cp -r base + sync of the copies (read+write ceiling)", *cp)
        store = os.path.join(work, "store")

        def do_import():
            fresh(store)
            return timed(TSLLM + ["-q", "--store", store, "import", base, "--name", "base"])
        imp = median_of(args.repeat, do_import)
        row(f"[{size}] tsllm import base", *imp, baseline=cp[0], note=f"{gb / imp[0]:.2f} GB/s; vs cp+sync")

        def do_export():
            return timed(TSLLM + ["-q", "--store", store, "export", "base", fresh(os.path.join(work, "export"))])
        exp = median_of(args.repeat, do_export)
        row(f"[{size}] tsllm export base", *exp, baseline=cp[0], note=f"{gb / exp[0]:.2f} GB/s; vs cp+sync")
        for ref, path in (("ft1", ft1), ("ft2", ft2)):
            timed(TSLLM + ["-q", "--store", store, "import", path, "--name", ref])
        cat3 = median_of(args.repeat, lambda: timed(["sh", "-c", f"cat '{base}'/*.safetensors '{ft1}'/*.safetensors '{ft2}'/*.safetensors > /dev/null"]))
        row(f"[{size}] cat of the three inputs > /dev/null", *cat3)
        for budget in ("512M", "4G"):
            def do_sum():
                for entry in os.listdir(os.path.join(store, "staging")):
                    fresh(os.path.join(store, "staging", entry))
                return timed(TSLLM + ["-q", "--store", store, "weighted-sum", "base", "ft1", "ft2",
                                      "--weights", "0.2,0.3,0.5", "--max-memory", budget])
            ws = median_of(args.repeat, do_sum)
            row(f"[{size}] weighted sum of 3, --max-memory {budget}", *ws, baseline=cp[0],
                note=f"reads {3 * gb:.1f} GB, writes {gb:.1f} GB; vs cp+sync of one model")
    print("\n".join(["", "| job | wall s (median) | peak RSS MiB | vs baseline | note |", "|---|---|---|---|---|", *rows]))
    print(f"\nmachine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
