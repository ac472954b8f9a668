"""LoRAM benchmarks: the memory planner against measured peaks, and a 70B-shaped prune / recover /
merge within --max-memory.

    python tests/benchmarks/bench_loram.py planner [--batch 2 --seq-len 128 --steps 2]
    python tests/benchmarks/bench_loram.py prune70b [--workdir DIR --max-memory 1G]

``planner``: each method runs in a fresh subprocess that imports torch / transformers / peft, reads
its RSS, loads SmolLM2-135M in fp32, resets the kernel's peak-RSS mark (so the loading transient,
bf16 file pages plus fp32 copies, is not counted), runs ``--steps`` AdamW training steps (full
fine-tuning, or PEFT LoRA r=16 on all linear layers) and reads the peak (VmHWM); measured = peak
- RSS before the model was loaded. ``prune70b``: a synthetic 70B-shaped checkpoint (real shapes, one
layer), imported, pruned 50% (MLP) / 50% (KV heads), a random adapter on the pruned shapes
recovered and merged with ``tsllm lora merge``; wall time and peak RSS of each command.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, torch
from transformers import AutoModelForCausalLM
method, batch, seq, steps, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
import peft
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = rss()
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
model.config.use_cache = False
if method == "lora":
    cfg = peft.LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, cfg)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, 49152, (batch, seq))
import gc; gc.collect()
loaded = rss()
with open("/proc/self/clear_refs", "w") as f:   # reset the peak (VmHWM): loading transients are not training
    f.write("5")
for _ in range(steps):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
print(json.dumps({"before": before, "loaded": loaded, "peak": peak}))
"""


def planner(args) -> None:
    from tensorstore_llm.arch import Architecture
    from tensorstore_llm.planner import PlanSettings, estimate
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    path = smollm2_checkpoint("bfloat16")
    arch = Architecture.from_dir(path)
    settings = PlanSettings(batch=args.batch, seq_len=args.seq_len, dtype="fp32", lora_rank=16)
    rows = []
    for method in ("full", "lora"):
        out = subprocess.run([sys.executable, "-c", CHILD, method, str(args.batch), str(args.seq_len), str(args.steps), path],
                             capture_output=True, text=True, check=True)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        measured = m["peak"] - m["before"]
        e = estimate(arch, method, settings)
        rows.append({"method": method, "estimate_mib": round(e.total / 2**20), "measured_mib": round(measured / 2**20),
                     "model_loaded_mib": round((m["loaded"] - m["before"]) / 2**20),
                     "error": round(e.total / measured - 1, 3), "weights": round(e.weights / 2**20),
                     "gradients": round(e.gradients / 2**20), "optimizer": round(e.optimizer / 2**20),
                     "activations": round(e.activations / 2**20)})
        print(json.dumps(rows[-1]), flush=True)


def _timed(cmd: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def prune70b(args) -> None:
    import torch

    from tensorstore_llm.lora.peft_format import build_adapter, write_adapter
    from tensorstore_llm.testing.synth import write_checkpoint

    work = args.workdir
    os.makedirs(work, exist_ok=True)
    base = write_checkpoint(os.path.join(work, "base"), "70b-1layer") if not os.path.exists(os.path.join(work, "base")) else os.path.join(work, "base")
    store = os.path.join(work, "store")
    tsllm = [sys.executable, "-m", "tensorstore_llm_cli", "--store", store, "-q"]
    mem = ["--max-memory", args.max_memory]
    report = {}
    report["import"] = _timed(tsllm + ["import", base, "--name", "base"] + mem)
    report["prune"] = _timed(tsllm + ["prune", "base", "--ratio", "0.5", "--head-ratio", "0.5", "--name", "small"] + mem)
    gen = torch.Generator().manual_seed(0)
    factors = {"model.layers.0.mlp.down_proj": (torch.randn(8, 14336, generator=gen) * 0.01, torch.randn(8192, 8, generator=gen) * 0.01),
               "model.layers.0.mlp.up_proj": (torch.randn(8, 8192, generator=gen) * 0.01, torch.randn(14336, 8, generator=gen) * 0.01),
               "model.layers.0.self_attn.q_proj": (torch.randn(8, 8192, generator=gen) * 0.01, torch.randn(4096, 8, generator=gen) * 0.01)}
    adapter = os.path.join(work, "pruned-lora")
    if not os.path.exists(adapter):
        write_adapter(build_adapter(factors, alpha=8, dtype=torch.bfloat16), adapter)
    report["recover"] = _timed(tsllm + ["loram", "recover", adapter, "--plan", "small-plan", "--name", "full-lora"])
    report["merge"] = _timed(tsllm + ["lora", "merge", "base", "full-lora", "--name", "merged"] + mem)
    for step, (wall, rss) in report.items():
        print(f"{step:8} {wall:7.1f} s  peak RSS so far {rss / 2**30:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["planner", "prune70b"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workdir", default="bench-loram")
    parser.add_argument("--max-memory", default="1G")
    args = parser.parse_args()
    {"planner": planner, "prune70b": prune70b}[args.what](args)


if __name__ == "__main__":
    main()
