"""LoRA benchmarks, same run and same inputs for both sides:

- ``tsllm lora merge`` (streamed into the store; and with ``-o``, exported to a HF directory too)
  against PEFT's load -> ``merge_and_unload`` -> ``save_pretrained``, rank-64 adapter on every
  linear layer of a ~1 GB bf16 Llama-shaped base;
- ``tsllm lora extract --rank 64`` against ``mergekit-extract-lora --max-rank 64`` on the same
  (base, fine-tune) pair (a test-only comparison: mergekit is BUSL-1.1, never a dependency),
  with the captured energy 1 - ||D - s B A||^2 / ||D||^2 of both adapters over the same modules;
- ``tsllm lora resize`` of a rank-256 adapter to rank 32 and to ``--rank-pattern auto``.

The fine-tune is base + a rank-48 update with a decaying spectrum + small full-rank noise (a
fine-tune's delta is mostly low-rank; pure noise would make every rank-64 extraction equal).

Run:  python tests/benchmarks/bench_lora.py --workdir /tmp/tsllm-bench-lora [--size 1gb|small]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import TSLLM, fresh, timed  # noqa: E402

SIZES = {   # Llama-shaped, bf16
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8000),
    "1gb": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=10, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000),
}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

MAKE = """
import sys, json, torch, transformers, peft
root, size, rank = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
cfg = transformers.LlamaConfig(tie_word_embeddings=False, **size)
model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(root + "/base", max_shard_size="500MB")
g = torch.Generator().manual_seed(1)
ft = {}
for k, v in model.state_dict().items():
    if v.ndim == 2 and "embed" not in k and "lm_head" not in k:
        out, inp = v.shape
        spectrum = 0.3 * 0.93 ** torch.arange(48.0)                 # a decaying rank-48 update
        U = torch.linalg.qr(torch.randn(out, 48, generator=g))[0]
        V = torch.linalg.qr(torch.randn(inp, 48, generator=g))[0]
        delta = (U * spectrum) @ V.T + 2e-4 * torch.randn(out, inp, generator=g)
        ft[k] = (v.float() + delta).to(v.dtype)
    else:
        ft[k] = v
model.load_state_dict(ft)
model.save_pretrained(root + "/ft", max_shard_size="500MB")
for r in (rank, 256):
    m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=%r, init_lora_weights=False))
    pm.save_pretrained(f"{root}/adapter-r{r}")
""" % (LINEAR,)

PEFT_MERGE = """
import sys, torch, transformers, peft
base, adapter, out = sys.argv[1:4]
m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
m = peft.PeftModel.from_pretrained(m, adapter).merge_and_unload()
m.save_pretrained(out, max_shard_size="500MB")
"""

ENERGY = """
import sys, os, json, torch
from safetensors.torch import load_file
from tensorstore_llm.lora.peft_format import read_adapter
def load(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith('.safetensors'):
            out.update(load_file(os.path.join(d, f)))
    return out
base, ft = load(sys.argv[1]), load(sys.argv[2])
result = {}
for path in sys.argv[3:]:
    ad = read_adapter(path)
    err = tot = 0.0
    for name, m in ad.modules.items():
        D = ft[m.weight_name].double() - base[m.weight_name].double()
        X = m.scaling * (m.B.double() @ m.A.double())
        err += float((D - X).square().sum()); tot += float(D.square().sum())
    result[path] = {"captured": 1 - err / tot, "modules": len(ad.modules), "ranks": sorted(set(ad.ranks().values()))}
print(json.dumps(result))
"""


def _row(name, ours, theirs=None, note=""):
    w, r = ours
    if theirs is None:
        return f"| {name} | {w:.1f} | {r:.0f} | - | - | - | {note} |"
    pw, pr = theirs
    return f"| {name} | {w:.1f} | {r:.0f} | {pw:.1f} | {pr:.0f} | {w / pw:.2f}x / {r / pr:.2f}x | {note} |"


class _Rows(list):
    """Table rows, each also printed to stderr as soon as it is measured (a long run that is cut
    short still leaves what it measured)."""

    def __init__(self, header: str):
        super().__init__()
        self.header = header

    def append(self, row: str) -> None:
        print(row, file=sys.stderr, flush=True)
        super().append(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="1gb")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--max-memory", default="1G", help="tsllm --max-memory")
    ap.add_argument("--merge-memory", default="32M",
                    help="a second merge row at this --max-memory: above the interpreter and torch (~220 MiB), "
                         "a merge holds about its budget plus ~55 MiB of runtime, so the RSS goal needs a small one")
    ap.add_argument("--only", choices=["merge", "all"], default="all", help="merge: skip extract and resize")
    args = ap.parse_args()

    root = os.path.join(args.workdir, f"lora-{args.size}")
    if not os.path.exists(os.path.join(root, ".complete-v2")):
        fresh(root)
        os.makedirs(root)
        subprocess.run([sys.executable, "-c", MAKE, root, json.dumps(SIZES[args.size]), str(args.rank)], check=True)
        open(os.path.join(root, ".complete-v2"), "w").close()
    base, ft, adapter = f"{root}/base", f"{root}/ft", f"{root}/adapter-r{args.rank}"
    store = fresh(f"{root}/store")
    tsllm = [*TSLLM, "-q", "--store", store]
    mm = ["--max-memory", args.max_memory]
    rows = _Rows(f"| job ({args.size}, --max-memory {args.max_memory}) | ours wall s | ours peak MiB | other wall s | "
                 "other peak MiB | ratio wall / RSS | note |")

    peft_merge = timed([sys.executable, "-c", PEFT_MERGE, base, adapter, fresh(f"{root}/out-peft")])
    ours_store = timed([*tsllm, "lora", "merge", base, adapter, "--name", "merged", *mm])
    shutil.rmtree(store)
    ours_export = timed([*tsllm, "lora", "merge", base, adapter, "-o", fresh(f"{root}/out-ours"), *mm])
    shutil.rmtree(store)
    ours_small = timed([*tsllm, "lora", "merge", base, adapter, "--name", "merged", "--max-memory", args.merge_memory])
    rows.append(_row(f"lora merge r{args.rank} -> store artifact", ours_store, peft_merge))
    rows.append(_row(f"lora merge r{args.rank} -> store + HF dir (-o)", ours_export, peft_merge))
    rows.append(_row(f"lora merge r{args.rank} -> store artifact, --max-memory {args.merge_memory}", ours_small,
                     peft_merge, f"load average {os.getloadavg()[0]:.1f}"))
    if args.only == "merge":
        print(rows.header)
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        return

    mk_out = fresh(f"{root}/extract-mergekit")
    mergekit = timed(["mergekit-extract-lora", "--model", ft, "--base-model", base, "--out-path", mk_out,
                      "--max-rank", str(args.rank), "-e", "embed_tokens|lm_head", "--quiet"])
    ours_out = fresh(f"{root}/extract-ours")
    ours_extract = timed([*tsllm, "lora", "extract", ft, "--base", base, "--rank", str(args.rank), "-o", ours_out,
                          "--name", "extracted", *mm])
    energy = json.loads(subprocess.run([sys.executable, "-c", ENERGY, base, ft, ours_out, mk_out], check=True,
                                       capture_output=True, text=True).stdout)
    note = (f"captured energy ours {energy[ours_out]['captured']:.6f} ({energy[ours_out]['modules']} modules), "
            f"mergekit {energy[mk_out]['captured']:.6f} ({energy[mk_out]['modules']} modules)")
    rows.append(_row(f"lora extract r{args.rank} vs mergekit-extract-lora", ours_extract, mergekit, note))

    subprocess.run([*tsllm, "lora", "import", f"{root}/adapter-r256", "--base", base, "--name", "rank256"], check=True,
                   stdout=subprocess.DEVNULL)
    rows.append(_row("lora resize r256 -> r32", timed([*tsllm, "lora", "resize", "rank256", "--rank", "32"])))
    rows.append(_row("lora resize r256 -> --rank-pattern auto (budget of r32)",
                     timed([*tsllm, "lora", "resize", "rank256", "--rank-pattern", "auto", "--rank", "32"])))
    print(rows.header)
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
