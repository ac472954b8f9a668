"""tsllm merge vs mergekit on equal output: both read the same generated models (base + 2
fine-tunes, bf16, the synthetic Llama generator) and write a Hugging Face directory
(``tsllm merge -o DIR`` / ``mergekit-yaml RECIPE DIR``). Runs are interleaved (ours, theirs, ours,
theirs, ...) so that a shared machine's load hits both alike; the table gives medians of wall time,
the largest peak RSS, and the bytes each side wrote to disk (the child's ``ru_oublock``: every byte
it sent to storage, temporary files and journals included) per byte of merged model. The
``frankenmerge`` row is a 2-model passthrough of slices (A's layers [0, 2L/3) then B's [L/3, L):
a deeper output); ``--check`` then compares the two frankenmerge outputs tensor by tensor and
their logits in transformers.

Sizes: ``1gb`` (the generator's 1gb preset, 1.07 GB per model), ``250m`` (the 100m preset with
13 layers, 262 MB), or any generator preset.

Run:  pip install mergekit
      python tests/benchmarks/bench_merge.py --workdir /tmp/tsllm-bench --sizes 250m,1gb --repeat 2 --check
      python tests/benchmarks/bench_merge.py --workdir /tmp/tsllm-bench --store-only   # issue 3's table: into the store
      python tests/benchmarks/bench_merge.py --workdir /tmp/tsllm-bench --sizes 250m --also-max-memory 2G   # + another budget
(tsllm runs at its default --max-memory, auto, unless --max-memory is given)
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import TSLLM, child_usage, fresh, warm

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
    "della": "merge_method: della\nbase_model: {base}\nmodels:\n"
             "  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}\n"
             "  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}\n",
    "frankenmerge": "merge_method: passthrough\nslices:\n"
                    "  - sources: [{{model: {ft1}, layer_range: [0, {two_thirds}]}}]\n"
                    "  - sources: [{{model: {ft2}, layer_range: [{one_third}, {layers}]}}]\n",
}
SIZES = {"250m": ("100m", 13), "1gb": ("1gb", None)}   # size name -> (generator preset, layers)
GOALS = {"linear": 0.4, "task_arithmetic": 0.4, "ties": 0.1, "dare_ties": 0.2, "slerp": 0.5, "della": 0.3,
         "frankenmerge": 0.4}
RSS_GOAL = 0.35


def family(workdir: str, size: str) -> tuple[list[str], int]:
    """base, ft1, ft2 of ``size`` under workdir (generated once, in a child process so this
    process never imports torch), and their layer count."""
    preset, layers = SIZES.get(size, (size, None))
    root = os.path.join(workdir, f"models-{size}")
    if not os.path.exists(os.path.join(root, ".complete")):
        shutil.rmtree(root, ignore_errors=True)
        code = ("import sys; from tensorstore_llm.testing.synth import write_model_family; "
                "write_model_family(sys.argv[1], sys.argv[2], seed=0, finetunes=2, layers=int(sys.argv[3]) or None)")
        subprocess.run([sys.executable, "-c", code, root, preset, str(layers or 0)], check=True)
        open(os.path.join(root, ".complete"), "w").close()
    code = "import sys; from tensorstore_llm.testing.synth import shape_of; print(shape_of(sys.argv[1], int(sys.argv[2]) or None).num_hidden_layers)"
    depth = int(subprocess.run([sys.executable, "-c", code, preset, str(layers or 0)], check=True,
                               capture_output=True, text=True).stdout)
    return [os.path.join(root, name) for name in ("base", "ft1", "ft2")], depth


def run(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, bytes written to storage) of ``cmd`` alone (``common.child_usage``:
    dirty pages of earlier runs flushed first, untimed; mergekit does not sync its output)."""
    wall, usage = child_usage(cmd)
    return wall, usage.ru_maxrss / 1024, usage.ru_oublock * 512


def model_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def check_frankenmerge(ours: str, theirs: str) -> str:
    """Tensor-by-tensor equality and the logits of both outputs in transformers (child process)."""
    code = r"""
import sys, torch, transformers
from safetensors import safe_open
import os
def tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "pt") as s:
                out.update({k: s.get_tensor(k) for k in s.keys()})
    return out
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
del a, b
logits = []
for d in sys.argv[1:]:
    model = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.bfloat16)
    ids = (torch.arange(1, 17) * 7919 % model.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        logits.append(model(ids).logits.float())
    layers = len(model.model.layers)
    del model
print(f"tensors bit-identical: {same}; layers {layers}; logits equal: {torch.equal(*logits)} "
      f"(max |diff| {(logits[0] - logits[1]).abs().max().item():.3g})")
"""
    done = subprocess.run([sys.executable, "-c", code, ours, theirs], capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else f"check failed: {done.stderr.strip()[-1500:]}"


def bench_size(args, size: str, mergekit_yaml: str) -> None:
    (base, ft1, ft2), layers = family(args.workdir, size)
    work = os.path.join(args.workdir, f"merge-bench-{size}")
    os.makedirs(work, exist_ok=True)
    warm([base, ft1, ft2])
    store, ours_out, theirs_out = (os.path.join(work, n) for n in ("store", "ours", "mk-out"))
    results = {}
    for method in args.methods.split(","):
        recipe = os.path.join(work, f"{method}.yaml")
        with open(recipe, "w") as f:
            f.write(RECIPES[method].format(base=base, ft1=ft1, ft2=ft2, layers=layers, one_third=layers // 3,
                                           two_thirds=2 * layers // 3) + "dtype: bfloat16\n")
        ours_cmd = TSLLM + ["-q", "--store", store, "merge", recipe, "--device", args.device]
        ours_cmd += [] if args.store_only else ["-o", ours_out]
        other_budget_cmd = ours_cmd + ["--max-memory", args.also_max_memory] if args.also_max_memory else None
        ours_cmd += ["--max-memory", args.max_memory] if args.max_memory else []   # none: tsllm's default (auto)
        theirs_cmd = [mergekit_yaml, recipe, theirs_out] + (["--cuda"] if args.device == "cuda" else [])
        ours, theirs, merged, lean = [], [], 0, []
        for _ in range(args.repeat):          # interleaved: ours, theirs, ours, theirs, ...
            fresh(store), fresh(ours_out)
            ours.append(run(ours_cmd))
            if other_budget_cmd:              # the same merge at another budget
                fresh(store), fresh(ours_out)
                lean.append(run(other_budget_cmd))
            if not args.store_only:
                merged = model_bytes(ours_out)
            if not args.skip_mergekit:
                fresh(theirs_out)
                theirs.append(run(theirs_cmd))
                merged = merged or model_bytes(theirs_out)
        if method == "frankenmerge" and args.check and not args.skip_mergekit and not args.store_only:
            print(f"  frankenmerge {size}: {check_frankenmerge(ours_out, theirs_out)}", flush=True)
        results[method] = (ours, theirs, merged)
        _row(method, ours, theirs, merged)
        if lean:
            _row(f"{method} (--max-memory {args.also_max_memory})", lean, theirs, merged)
    fresh(store), fresh(ours_out), fresh(theirs_out)


def _row(method: str, ours, theirs, merged: int) -> None:
    t_wall, t_rss = statistics.median(r[0] for r in ours), max(r[1] for r in ours)
    t_disk = statistics.median(r[2] for r in ours) / merged if merged else float("nan")
    if theirs:
        m_wall, m_rss = statistics.median(r[0] for r in theirs), max(r[1] for r in theirs)
        m_disk = statistics.median(r[2] for r in theirs) / merged
    else:
        m_wall = m_rss = m_disk = float("nan")
    goal = GOALS.get(method.split(" (")[0], float("nan"))
    verdict = "met" if t_wall / m_wall <= goal and t_rss / m_rss <= RSS_GOAL else "missed"
    walls = " / ".join(f"{a[0]:.1f}" + (f" vs {b[0]:.1f}" if b else "") for a, b in zip(ours, theirs or [None] * len(ours)))
    print(f"| {method} | {m_wall:.2f} | {m_rss:.0f} | {t_wall:.2f} | {t_rss:.0f} | {t_wall / m_wall:.2f}x (<= {goal}x) | "
          f"{t_rss / m_rss:.2f}x | {t_disk:.2f} | {m_disk:.2f} | {verdict} | {walls} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--sizes", default="250m,1gb", help="comma-separated: 250m, 1gb or generator presets")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--methods", default=",".join(RECIPES))
    ap.add_argument("--max-memory", default=None, help="tsllm's --max-memory (default: not given, i.e. tsllm's default, auto)")
    ap.add_argument("--also-max-memory", default=None,
                    help="also run tsllm at this budget (e.g. 2G) in each round; printed as a row of its own")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--store-only", action="store_true", help="tsllm writes into its store, not an HF directory (issue 3's table)")
    ap.add_argument("--check", action="store_true", help="compare the frankenmerge outputs (tensors, transformers logits)")
    args = ap.parse_args()
    mergekit_yaml = shutil.which("mergekit-yaml") or os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    print(f"load average at start: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}")
    for size in args.sizes.split(","):
        print(f"\n{size}: {'tsllm into its store' if args.store_only else 'both write a Hugging Face directory'}; "
              f"median of {args.repeat}, interleaved\n")
        print("| method | mergekit wall s | mergekit RSS MiB | tsllm wall s | tsllm RSS MiB | wall ratio (goal) | RSS ratio | "
              "tsllm bytes written / merged byte | mergekit bytes written / merged byte | goals | runs: tsllm vs mergekit s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        bench_size(args, size, mergekit_yaml)
        print(f"load average after {size}: {' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
