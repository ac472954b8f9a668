"""An honest budget: peak RSS of whole CLI runs against --max-memory + 300 MiB and against the
peak the dry run predicts, at several budgets, on 70B-shaped tensors and on ~1 GB models.

For each case: the dry run's predicted peak RSS, then the run itself in a child process whose
peak is the kernel's high-water mark (``ru_maxrss``), with /proc/PID/status sampled to split the
top into anonymous memory and mapped file pages. Prints a markdown table for docs/benchmarks.md.

Run:  python tests/benchmarks/bench_budget.py --workdir /tmp/tsllm-bench [--sizes 1gb,70b]
      [--budgets 512M,1G,4G] [--jobs ties,ws,export]
(70B shapes: 1 layer of real Llama-70B shapes, base + 2 fine-tunes, 3 x 5.9 GB on disk; check
``df -h`` first. The models are kept in --workdir for later runs; stores are removed after each.)
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import TSLLM, fresh
from rss_probe import run_measured

ALLOWANCE_MIB = 300
PRESETS = {"1gb": ("1gb", None), "70b": ("70b-1layer", 1)}


def family(workdir: str, size: str) -> list[str]:
    """base, ft1, ft2 of ``size`` under workdir (generated once, in a child process)."""
    preset, layers = PRESETS[size]
    root = os.path.join(workdir, f"models-{preset}")
    if not os.path.exists(os.path.join(root, ".complete")):
        fresh(root)
        code = ("import sys; from tensorstore_llm.testing.synth import write_model_family; "
                "write_model_family(sys.argv[1], sys.argv[2], seed=0, finetunes=2"
                + (f", layers={layers})" if layers else ")"))
        subprocess.run([sys.executable, "-c", code, root, preset], check=True)
        open(os.path.join(root, ".complete"), "w").close()
    return [os.path.join(root, name) for name in ("base", "ft1", "ft2")]


def command(job: str, models: list[str], store: str, workdir: str, budget: str) -> list[str]:
    """The CLI command of one case (``export`` exports the base after importing it, untimed)."""
    base, ft1, ft2 = models
    common = ["--max-memory", budget]
    if job == "ties":
        recipe = os.path.join(workdir, "budget-ties.yaml")
        with open(recipe, "w") as f:
            f.write(f"merge_method: ties\nbase_model: {base}\nmodels:\n"
                    f"  - model: {ft1}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                    f"  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\ndtype: bfloat16\n")
        return TSLLM + ["-q", "--store", store, "merge", recipe, "--device", "cpu", *common]
    if job == "ws":
        return TSLLM + ["-q", "--store", store, "weighted-sum", base, ft1, ft2, "--weights", "0.2,0.3,0.5",
                        "--device", "cpu", *common]
    if job == "export":
        subprocess.run(TSLLM + ["-q", "--store", store, "import", base, "--name", "base"], check=True,
                       stdout=subprocess.DEVNULL)
        out = os.path.join(workdir, "budget-export")
        shutil.rmtree(out, ignore_errors=True)
        return TSLLM + ["-q", "--store", store, "export", "base", out, *common]
    raise ValueError(job)


def predicted_mib(cmd: list[str]) -> float:
    """The dry run's predicted peak RSS in MiB."""
    out = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"predicted peak RSS: ([0-9.]+) (MiB|GiB)", out)
    if not match:
        raise RuntimeError(f"no prediction in the dry run of {' '.join(cmd)}:\n{out}")
    return float(match.group(1)) * (1024 if match.group(2) == "GiB" else 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--sizes", default="1gb,70b")
    ap.add_argument("--budgets", default="512M,1G,4G")
    ap.add_argument("--jobs", default="ties,ws,export")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    print("| model | job | --max-memory | predicted MiB | peak RSS MiB | anon / file MiB at peak | wall s "
          "| peak - budget MiB | <= budget + 300 | peak / predicted |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failures = 0
    for size in args.sizes.split(","):
        models = family(args.workdir, size)
        for job in args.jobs.split(","):
            for budget in args.budgets.split(","):
                store = fresh(os.path.join(args.workdir, "budget-store"))
                cmd = command(job, models, store, args.workdir, budget)
                predicted = predicted_mib(cmd)
                os.sync()
                peak = run_measured(cmd)
                if peak.returncode:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{peak.stderr}")
                budget_mib = int(budget[:-1]) * (1024 if budget[-1] == "G" else 1)
                over = peak.maxrss_mib - budget_mib
                ok = over <= ALLOWANCE_MIB and abs(peak.maxrss_mib / predicted - 1) <= 0.10
                failures += not ok
                print(f"| {size} | {job} | {budget} | {predicted:.0f} | {peak.maxrss_mib:.0f} | "
                      f"{peak.at_peak.get('RssAnon', 0):.0f} / {peak.at_peak.get('RssFile', 0):.0f} | {peak.wall:.1f} | "
                      f"{over:+.0f} | {'yes' if over <= ALLOWANCE_MIB else 'NO'} | {peak.maxrss_mib / predicted:.3f} |",
                      flush=True)
                shutil.rmtree(store, ignore_errors=True)
                shutil.rmtree(os.path.join(args.workdir, "budget-export"), ignore_errors=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
