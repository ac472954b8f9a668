"""Peak RSS of ``lora export`` of one large adapter artifact: the streamed export
(``lora.artifacts.export_adapter``, one tensor in memory at a time) against the in-memory path it
replaced (the whole adapter read back, then ``peft_format.write_adapter``), each in a process of
its own, and whether the two directories hold the same bytes.

    python tests/benchmarks/bench_lora_export.py --workdir DIR [--repeat 2]

The adapter: 24 layers x 7 modules at rank 64 over 2048 / 5632 widths (a 1.7B-shaped model), fp32
(210 MiB of factors), committed as a ``lora`` artifact.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import resource
import shutil
import subprocess
import sys
import time

SHAPES = {"q": (2048, 2048), "k": (256, 2048), "v": (256, 2048), "o": (2048, 2048), "gate": (5632, 2048),
          "up": (5632, 2048), "down": (2048, 5632)}


def make(root: str) -> None:
    """Commit the adapter as artifact ``big`` of the store under ``root``."""
    import torch

    from tensorstore_llm.lora.artifacts import adapter_info, commit_adapter
    from tensorstore_llm.lora.peft_format import build_adapter
    from tensorstore_llm.store import Store

    g = torch.Generator().manual_seed(0)
    factors = {f"model.layers.{layer}.{name}_proj": (torch.randn(64, i, generator=g), torch.randn(o, 64, generator=g))
               for layer in range(24) for name, (o, i) in SHAPES.items()}
    adapter = build_adapter(factors)
    commit_adapter(Store(os.path.join(root, "store")), adapter, name="big",
                   info=adapter_info(adapter, {"id": None, "external": None, "checksums": {}}))


def export(root: str, mode: str) -> None:
    """One export (``streamed`` or ``memory``) into ``root/out-MODE``; prints peak RSS and time."""
    from tensorstore_llm.lora.artifacts import export_adapter, read_adapter_artifact
    from tensorstore_llm.lora.peft_format import write_adapter
    from tensorstore_llm.store import Store

    store, out = Store(os.path.join(root, "store")), os.path.join(root, f"out-{mode}")
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if mode == "memory":
        write_adapter(read_adapter_artifact(store, "big")[0], out)
    else:
        export_adapter(store, "big", out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {mode} | {peak:.0f} | +{peak - before:.0f} | {time.perf_counter() - start:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return make(args.workdir) if args.child[1] == "make" else export(args.workdir, args.child[1])
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    me = [sys.executable, os.path.abspath(__file__), "--workdir", args.workdir, "--child"]
    subprocess.run([*me, "x", "make"], check=True)
    print("| export | peak RSS MiB | above the process after imports, MiB | wall s |\n|---|---|---|---|", flush=True)
    for _ in range(args.repeat):
        for mode in ("memory", "streamed"):
            subprocess.run([*me, "x", mode], check=True)
    same = all(filecmp.cmp(os.path.join(args.workdir, "out-memory", f), os.path.join(args.workdir, "out-streamed", f),
                           shallow=False) for f in ("adapter_config.json", "adapter_model.safetensors"))
    print(f"\nsame bytes: {same}; load average {os.getloadavg()[0]:.1f}")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
