"""LoRA benchmarks: merge against PEFT (load -> merge_and_unload -> save_pretrained), resize of a
rank-256 adapter, extraction of a rank-64 adapter from a fine-tune.

The merge measured here is the in-memory path (``tensorstore_llm.lora.api.merge_adapter``, one
shard at a time), not yet the streamed engine job the issue's targets are for.

Run:  python tests/benchmarks/bench_lora.py --workdir /tmp/tsllm-bench-lora [--size 1gb|small]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import fresh, timed  # noqa: E402

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
ft = {k: v + 0.01 * torch.randn_like(v) if v.ndim == 2 else v for k, v in model.state_dict().items()}
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
OUR_MERGE = "import sys; from tensorstore_llm.lora.api import merge_adapter; merge_adapter(*sys.argv[1:4])"
RESIZE = """
import sys, time
from tensorstore_llm.lora.peft_format import read_adapter, write_adapter
from tensorstore_llm.lora.adapters import resize_adapter
ad = read_adapter(sys.argv[1])
new, report = resize_adapter(ad, rank=int(sys.argv[3]), auto_budget=True)
write_adapter(new, sys.argv[2])
"""
EXTRACT = """
import sys, os
from safetensors.torch import load_file
from tensorstore_llm.lora.adapters import extract_adapter
from tensorstore_llm.lora.peft_format import write_adapter
def load(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith('.safetensors'):
            out.update(load_file(os.path.join(d, f)))
    return out
ad, rep = extract_adapter(load(sys.argv[1]), load(sys.argv[2]), rank=int(sys.argv[4]), targets=%r)
write_adapter(ad, sys.argv[3])
print('captured', rep.totals['captured'], file=sys.stderr)
""" % (LINEAR,)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="1gb")
    ap.add_argument("--rank", type=int, default=64)
    args = ap.parse_args()
    import json

    root = os.path.join(args.workdir, f"lora-{args.size}")
    if not os.path.exists(os.path.join(root, ".complete")):
        fresh(root)
        os.makedirs(root)
        subprocess.run([sys.executable, "-c", MAKE, root, json.dumps(SIZES[args.size]), str(args.rank)], check=True)
        open(os.path.join(root, ".complete"), "w").close()
    base, ft, adapter = f"{root}/base", f"{root}/ft", f"{root}/adapter-r{args.rank}"
    rows = []
    wall_p, rss_p = timed([sys.executable, "-c", PEFT_MERGE, base, adapter, fresh(f"{root}/out-peft")])
    wall_o, rss_o = timed([sys.executable, "-c", OUR_MERGE, base, adapter, fresh(f"{root}/out-ours")])
    rows.append(("lora merge r%d" % args.rank, wall_o, rss_o, wall_p, rss_p))
    wall_r, rss_r = timed([sys.executable, "-c", RESIZE, f"{root}/adapter-r256", fresh(f"{root}/resized"), "32"])
    rows.append(("lora resize r256 -> auto(32)", wall_r, rss_r, None, None))
    wall_e, rss_e = timed([sys.executable, "-c", EXTRACT, base, ft, fresh(f"{root}/extracted"), str(args.rank)])
    rows.append((f"lora extract r{args.rank} (in-memory)", wall_e, rss_e, None, None))
    print(f"| job ({args.size}) | ours wall s | ours peak MiB | PEFT wall s | PEFT peak MiB | ratio wall / RSS |")
    print("|---|---|---|---|---|---|")
    for name, w, r, pw, pr in rows:
        ratio = f"{w / pw:.2f}x / {r / pr:.2f}x" if pw else "-"
        print(f"| {name} | {w:.1f} | {r:.0f} | {pw if pw is None else f'{pw:.1f}'} | "
              f"{pr if pr is None else f'{pr:.0f}'} | {ratio} |")


if __name__ == "__main__":
    main()
