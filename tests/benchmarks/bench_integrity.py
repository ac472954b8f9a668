"""What verified reads cost: the same commands, on the same store, interleaved run by run so that
machine load hits both sides alike.

``--before REV``: this tree against the tree of a revision from before reads were verified (the
whole difference between the two trees). Without it: this tree against this tree with the
checks switched off in the benchmark's own child process (``Store.open`` handing out sources
without checksums), which isolates the cost of checking.

Run:  python tests/benchmarks/bench_integrity.py --workdir /tmp/tsllm-bench --size 1gb
      python tests/benchmarks/bench_integrity.py --workdir /tmp/tsllm-bench --size 1gb --before 7d54e85
Prints a markdown table (medians, peak RSS, after/before ratio); results are in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import TSLLM, dir_bytes, fresh, model_family, timed, warm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIES = """merge_method: ties
base_model: base
models:
  - model: ft1
    parameters: {weight: 0.5, density: 0.3}
  - model: ft2
    parameters: {weight: 0.5, density: 0.3}
parameters: {normalize: true}
dtype: bfloat16
"""


# the CLI with every artifact opened without its checksums (the benchmark's baseline only)
UNCHECKED = """
import sys
from tensorstore_llm.io.zarr_tensors import ZarrTensorSource
from tensorstore_llm.store.store import Store
def open_unchecked(self, ref):
    artifact = self.get(ref)
    return ZarrTensorSource(artifact.path, artifact.manifest.metas(), "artifact:" + artifact.id)
Store.open = open_unchecked
from tensorstore_llm_cli import run
sys.argv = ["tsllm", *sys.argv[1:]]
run()
"""


def tree_of(revision: str, workdir: str) -> str:
    """The project's files at ``revision`` under workdir, importable with PYTHONPATH."""
    target = os.path.join(workdir, f"tree-{revision}")
    if not os.path.isdir(target):
        os.makedirs(target)
        archive = subprocess.run(["git", "-C", REPO, "archive", revision], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
        os.symlink("cli", os.path.join(target, "tensorstore_llm_cli"))
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--size", default="1gb")
    ap.add_argument("--before", help="git revision without verified reads (default: this tree, checks off)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default="", help="run only the jobs whose name contains this text (e.g. export)")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    base, ft1, ft2 = model_family(args.workdir, args.size)
    gb = dir_bytes(base) / 1e9
    warm([base, ft1, ft2])
    work = os.path.join(args.workdir, f"integrity-{args.size}")
    store = os.path.join(fresh(work), "store")
    for ref, path in (("base", base), ("ft1", ft1), ("ft2", ft2)):
        timed(TSLLM + ["-q", "--store", store, "import", path, "--name", ref])
    recipe = os.path.join(work, "ties.yaml")
    with open(recipe, "w") as f:
        f.write(TIES)
    envs = {"after": dict(os.environ, PYTHONPATH=REPO),
            "before": dict(os.environ, PYTHONPATH=tree_of(args.before, args.workdir) if args.before else REPO)}
    unchecked = [] if args.before else [sys.executable, "-c", UNCHECKED]

    def clear_staging():
        staging = os.path.join(store, "staging")
        for entry in os.listdir(staging) if os.path.isdir(staging) else []:
            shutil.rmtree(os.path.join(staging, entry), ignore_errors=True)

    jobs = {
        "export base (HF dir)": lambda: TSLLM + ["-q", "--store", store, "export", "base", fresh(os.path.join(work, "exported"))],
        "weighted sum of 3, --max-memory 1G": lambda: TSLLM + ["-q", "--store", store, "weighted-sum", "base", "ft1", "ft2",
                                                               "--weights", "0.2,0.3,0.5", "--max-memory", "1G"],
        "TIES of 2 on a base, --max-memory 1G": lambda: TSLLM + ["-q", "--store", store, "merge", recipe, "--max-memory", "1G"],
    }
    rows = []
    for what, cmd in jobs.items():
        if args.only not in what:
            continue
        results = {"before": [], "after": []}
        for _ in range(args.repeat):
            for side in ("before", "after"):
                clear_staging()
                command = cmd()
                if side == "before" and unchecked:
                    command = unchecked + command[len(TSLLM):]
                results[side].append(timed(command, env=envs[side]))
                subprocess.run(TSLLM + ["-q", "--store", store, "gc"], check=True, capture_output=True)
                _drop_unnamed(store)
        med = {s: statistics.median(r[0] for r in results[s]) for s in results}
        rss = {s: max(r[1] for r in results[s]) for s in results}
        rows.append(f"| [{args.size}, {gb:.2f} GB] {what} | {med['before']:.2f} | {med['after']:.2f} | "
                    f"{med['after'] / med['before']:.3f}x | {rss['before']:.0f} | {rss['after']:.0f} |")
        print(rows[-1], flush=True)
    print("\n| job | before s | after s | after/before | RSS before MiB | RSS after MiB |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nmachine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; medians of {args.repeat}, interleaved")


def _drop_unnamed(store: str) -> None:
    """Remove artifacts no tag names (the outputs of the timed jobs), so the next run writes again."""
    tags = {open(os.path.join(store, "tags", t)).read().strip() for t in os.listdir(os.path.join(store, "tags"))}
    for entry in os.listdir(os.path.join(store, "artifacts")):
        if entry not in tags:
            shutil.rmtree(os.path.join(store, "artifacts", entry), ignore_errors=True)


if __name__ == "__main__":
    main()
