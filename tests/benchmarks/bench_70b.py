"""A 70B-shaped TIES merge on a modest budget: real Llama-70B tensor shapes (hidden 8192,
intermediate 28672, vocab 128256; 1 layer by default), base + 2 fine-tunes, streamed from the
Hugging Face directories at --max-memory 1G. Peak RSS must stay under ~1.5 GiB.

Run:  python tests/benchmarks/bench_70b.py --workdir /tmp/tsllm-bench [--layers 1] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import TSLLM, dir_bytes, fresh, timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--max-memory", default="1G")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--method", default="ties")
    args = ap.parse_args()
    root = os.path.join(args.workdir, f"models-70b-{args.layers}layer")
    if not os.path.exists(os.path.join(root, ".complete")):
        fresh(root)
        code = ("import sys; from tensorstore_llm.testing.synth import write_model_family; "
                "write_model_family(sys.argv[1], '70b-1layer', seed=0, finetunes=2, layers=int(sys.argv[2]))")
        subprocess.run([sys.executable, "-c", code, root, str(args.layers)], check=True)
        open(os.path.join(root, ".complete"), "w").close()
    recipe = os.path.join(args.workdir, f"70b-{args.method}.yaml")
    with open(recipe, "w") as f:
        f.write(f"merge_method: {args.method}\nbase_model: {root}/base\nmodels:\n"
                f"  - model: {root}/ft1\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                f"  - model: {root}/ft2\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: bfloat16\n")
    store = fresh(os.path.join(args.workdir, "store-70b"))
    wall, rss = timed(TSLLM + ["-q", "--store", store, "merge", recipe, "--max-memory", args.max_memory, "--device", args.device])
    gb = dir_bytes(os.path.join(root, "base")) / 1e9
    print(f"| 70B-shaped {args.method}, {args.layers} layer(s), 3 x {gb:.1f} GB, --max-memory {args.max_memory}, "
          f"--device {args.device} | {wall:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
