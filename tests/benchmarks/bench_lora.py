"""LoRA benchmarks, same run and same inputs for both sides:

- ``tsllm lora merge -o DIR`` (equal output: one write into a HF directory; at the default budget
  and at ``--merge-memory``; the two-write ``--keep-artifact`` and a store-only merge for
  reference) against PEFT's load -> ``merge_and_unload`` -> ``save_pretrained``, rank-64 adapter on
  every linear layer of a ~1 GB bf16 Llama-shaped base; wall, user + sys and peak RSS by wait4;
- ``tsllm lora extract --rank 64`` against ``mergekit-extract-lora --max-rank 64`` on the same
  (base, fine-tune) pair (a test-only comparison: mergekit is BUSL-1.1, never a dependency),
  with the captured energy 1 - ||D - s B A||^2 / ||D||^2 of both adapters over the same modules
  (ours: the exact truncated SVD by the Gram route, ``ops.lora_extract``; mergekit: a full fp32
  SVD per module with bf16 factors);
- ``tsllm lora resize`` of a rank-256 adapter to rank 32 and to ``--rank-pattern auto``.

The fine-tune is base + a rank-48 update with a decaying spectrum + small full-rank noise (a
fine-tune's delta is mostly low-rank; pure noise would make every rank-64 extraction equal).

Run:  python tests/benchmarks/bench_lora.py --workdir /tmp/tsllm-bench-lora [--size 1gb|small]
      [--only merge|extract] [--rounds 2] [--mergekit-json timed-run.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import TSLLM, child_usage, fresh

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


def timed_cpu(cmd: list[str]) -> tuple[float, float, float]:
    """(wall s, user + sys s, peak RSS MiB) of the child ``cmd`` alone (``common.child_usage``)."""
    wall, usage = child_usage(cmd)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def _row(name, ours, theirs=None, note=""):
    w, c, r = ours
    if theirs is None:
        return f"| {name} | {w:.1f} | {c:.1f} | {r:.0f} | - | - | - | - | {note} |"
    pw, pc, pr = theirs
    return (f"| {name} | {w:.1f} | {c:.1f} | {r:.0f} | {pw:.1f} | {pc:.1f} | {pr:.0f} | "
            f"{w / pw:.2f}x / {c / pc:.2f}x / {r / pr:.2f}x | {note} |")


class _Rows(list):
    """Table rows, each also printed to stderr as soon as it is measured (a long run that is cut
    short still leaves what it measured)."""

    HEADER = ("| job | ours wall s | ours user+sys s | ours peak MiB | other wall s | other user+sys s | "
              "other peak MiB | ratio wall / CPU / RSS | note |")

    def append(self, row: str) -> None:
        print(row, file=sys.stderr, flush=True)
        super().append(row)

    def print(self) -> None:
        print(self.HEADER)
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(self))


def _load() -> str:
    return f"load average {os.getloadavg()[0]:.1f}"


def merge_rows(rows: _Rows, root: str, tsllm: list[str], store: str, args) -> None:
    """Equal output: PEFT's load -> merge_and_unload -> save_pretrained against ``tsllm lora
    merge -o DIR`` (one write into the HF directory) at the default budget and at
    ``--merge-memory``, and the two-write path (``--keep-artifact``) and a store-only merge for
    reference; ``--rounds`` interleaved rounds, one row per run."""
    base, adapter = f"{root}/base", f"{root}/adapter-r{args.rank}"
    merge = [*tsllm, "lora", "merge", base, adapter]
    for k in range(args.rounds):
        peft_merge = timed_cpu([sys.executable, "-c", PEFT_MERGE, base, adapter, fresh(f"{root}/out-peft")])
        rows.append(_row(f"PEFT load -> merge_and_unload -> save_pretrained (round {k + 1})", peft_merge, None,
                         _load()))
        cases = [("-o DIR (default --max-memory)", ["-o", f"{root}/out-ours"]),
                 (f"-o DIR --max-memory {args.merge_memory}", ["-o", f"{root}/out-ours", "--max-memory",
                                                               args.merge_memory]),
                 ("-o DIR --keep-artifact (store + export, two writes)", ["-o", f"{root}/out-ours", "--keep-artifact"]),
                 ("store artifact only (no directory)", ["--name", "merged"])]
        for label, extra in cases:
            fresh(f"{root}/out-ours")
            fresh(store)
            ours = timed_cpu([*merge, *extra])
            rows.append(_row(f"lora merge r{args.rank} {label} (round {k + 1})", ours, peft_merge, _load()))
        fresh(store)


def extract_rows(rows: _Rows, root: str, tsllm: list[str], args) -> None:
    """``tsllm lora extract --rank R`` against ``mergekit-extract-lora --max-rank R`` on the same
    pair, with each adapter's captured energy over the same modules. ``--mergekit-json`` reuses a
    mergekit run timed earlier by :func:`timed_cpu` (it takes tens of minutes on 2 cores)."""
    base, ft = f"{root}/base", f"{root}/ft"
    if args.mergekit_json:
        with open(args.mergekit_json) as f:
            done = json.load(f)
        mergekit, mk_out = (done["wall_s"], done["cpu_s"], done["peak_rss_mib"]), done["out_path"]
        mk_note = f"mergekit timed earlier ({args.mergekit_json})"
    else:
        mk_out = fresh(f"{root}/extract-mergekit")
        mergekit = timed_cpu(["mergekit-extract-lora", "--model", ft, "--base-model", base, "--out-path", mk_out,
                              "--max-rank", str(args.rank), "-e", "embed_tokens|lm_head", "--quiet"])
        mk_note = _load()
    ours_out = fresh(f"{root}/extract-ours")
    ours = timed_cpu([*tsllm, "lora", "extract", ft, "--base", base, "--rank", str(args.rank), "-o", ours_out,
                      "--name", "extracted", *args.extract_options])
    energy = json.loads(subprocess.run([sys.executable, "-c", ENERGY, base, ft, ours_out, mk_out], check=True,
                                       capture_output=True, text=True).stdout)
    ours_e, mk_e = energy[ours_out]["captured"], energy[mk_out]["captured"]
    note = (f"captured energy ours {ours_e:.7f} ({energy[ours_out]['modules']} modules), "
            f"mergekit {mk_e:.7f} ({energy[mk_out]['modules']} modules), ours - mergekit {ours_e - mk_e:+.1e}; "
            f"ours {_load()}; {mk_note}")
    rows.append(_row(f"lora extract r{args.rank} {' '.join(args.extract_options)} vs mergekit-extract-lora",
                     ours, mergekit, note))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="1gb")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--merge-memory", default="32M",
                    help="a second -o row at this --max-memory: above the interpreter and torch (~220 MiB), "
                         "a merge holds about its budget plus ~55 MiB of runtime, so the RSS goal needs a small one")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the merge rows")
    ap.add_argument("--only", choices=["merge", "extract", "all"], default="all",
                    help="merge: the merge rows only; extract: the extraction row only")
    ap.add_argument("--mergekit-json", help="reuse a timed mergekit-extract-lora run: JSON with wall_s, cpu_s, "
                                            "peak_rss_mib and out_path (the adapter it wrote)")
    ap.add_argument("--extract-options", nargs="*", default=[], help="extra tsllm lora extract options")
    args = ap.parse_args()

    root = os.path.join(args.workdir, f"lora-{args.size}")
    if not os.path.exists(os.path.join(root, ".complete-v2")):
        fresh(root)
        os.makedirs(root)
        subprocess.run([sys.executable, "-c", MAKE, root, json.dumps(SIZES[args.size]), str(args.rank)], check=True)
        open(os.path.join(root, ".complete-v2"), "w").close()
    store = fresh(f"{root}/store")
    tsllm = [*TSLLM, "-q", "--store", store]
    rows = _Rows()
    if args.only in ("merge", "all"):
        merge_rows(rows, root, tsllm, store, args)
    if args.only in ("extract", "all"):
        extract_rows(rows, root, tsllm, args)
    if args.only == "all":
        base = f"{root}/base"
        subprocess.run([*tsllm, "lora", "import", f"{root}/adapter-r256", "--base", base, "--name", "rank256"],
                       check=True, stdout=subprocess.DEVNULL)
        rows.append(_row("lora resize r256 -> r32", timed_cpu([*tsllm, "lora", "resize", "rank256", "--rank", "32"])))
        rows.append(_row("lora resize r256 -> --rank-pattern auto (budget of r32)",
                         timed_cpu([*tsllm, "lora", "resize", "rank256", "--rank-pattern", "auto", "--rank", "32"])))
    rows.print()


if __name__ == "__main__":
    main()
