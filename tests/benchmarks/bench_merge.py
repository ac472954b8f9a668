"""tsllm merge vs mergekit on the same inputs: base + 2 fine-tunes of ~1 GB bf16 (the synthetic
Llama generator), warm page cache, median of --repeat runs, wall and peak RSS of each CLI run,
plus the physical ceiling (cat of the inputs + cp/sync of one model).

Run:  pip install mergekit; python tests/benchmarks/bench_merge.py --workdir /tmp/tsllm-bench
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import TSLLM, fresh, median_of, model_family, timed, warm  # noqa: E402

RECIPES = {
    "linear": "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.2}}\n"
              "  - model: {ft1}\n    parameters: {{weight: 0.3}}\n  - model: {ft2}\n    parameters: {{weight: 0.5}}\n",
    "task_arithmetic": "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n"
                       "  - model: {ft2}\n    parameters: {{weight: 0.5}}\n",
    "ties": "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            "  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
    "dare_ties": "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                 "  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
    "slerp": "merge_method: slerp\nbase_model: {ft1}\nmodels:\n  - model: {ft2}\nparameters: {{t: 0.5}}\n",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--preset", default="1gb")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--methods", default=",".join(RECIPES))
    ap.add_argument("--max-memory", default="2G")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-mergekit", action="store_true")
    args = ap.parse_args()
    base, ft1, ft2 = model_family(args.workdir, args.preset)
    work = os.path.join(args.workdir, "merge-bench")
    os.makedirs(work, exist_ok=True)
    warm([base, ft1, ft2])
    mergekit_yaml = shutil.which("mergekit-yaml") or os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    ceiling = median_of(args.repeat, lambda: timed(["sh", "-c", f"cat {base}/*.safetensors {ft1}/*.safetensors {ft2}/*.safetensors > /dev/null && "
                                                                f"rm -rf {work}/cp && cp -r {base} {work}/cp && sync {work}/cp/*"]))
    print(f"physical ceiling (cat 3 inputs + cp one model + sync): {ceiling[0]:.2f} s\n")
    print("| method | mergekit wall s | mergekit RSS MiB | tsllm wall s | tsllm RSS MiB | wall ratio | RSS ratio | tsllm / ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        recipe = os.path.join(work, f"{method}.yaml")
        with open(recipe, "w") as f:
            f.write(RECIPES[method].format(base=base, ft1=ft1, ft2=ft2) + "dtype: bfloat16\n")
        store = os.path.join(work, "store")

        def ours():
            fresh(store)
            return timed(TSLLM + ["-q", "--store", store, "merge", recipe, "--max-memory", args.max_memory, "--device", args.device])
        t_wall, t_rss = median_of(args.repeat, ours)
        if args.skip_mergekit:
            m_wall = m_rss = float("nan")
        else:
            def theirs():
                return timed([mergekit_yaml, recipe, fresh(os.path.join(work, "mk-out"))] + (["--cuda"] if args.device == "cuda" else []))
            m_wall, m_rss = median_of(args.repeat, theirs)
        print(f"| {method} | {m_wall:.2f} | {m_rss:.0f} | {t_wall:.2f} | {t_rss:.0f} | {t_wall / m_wall:.2f}x | "
              f"{t_rss / m_rss:.2f}x | {t_wall / ceiling[0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
