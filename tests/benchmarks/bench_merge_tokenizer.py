"""A tokenizer-union linear merge at ~1 GB: ``tsllm merge -o`` vs ``mergekit-yaml`` on equal
output (both write a Hugging Face directory, bf16).

Two generated Llama models (the generator's 1gb preset shape, 7 layers, bf16, ~1.03 GB each) with
real tokenizers: model A has SmolLM2's tokenizer (49,152 tokens); model B has the same tokens
with their ids shuffled (every embedding row moves) plus 64 added tokens. The recipe is
``linear`` (0.5 / 0.5) with ``tokenizer_source: union`` and ``dtype: bfloat16``, so every
embedding and LM-head row of B is gathered through a permutation and 64 rows are filled from B
alone. Runs are interleaved (ours, theirs, ...); the table gives medians of wall time and the
largest peak RSS. ``--check`` then compares the two outputs: the same vocabulary, and per token
the rows of both (max |diff|, bf16 arithmetic on their side, fp32 rounded once on ours).

Needs the SmolLM2 tokenizer from ``tensorstore_llm.testing.real_models`` (cached once).

Run:  pip install mergekit
      python tests/benchmarks/bench_merge_tokenizer.py --workdir /tmp/tsllm-bench --repeat 2 --check
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import TSLLM, fresh, timed, warm

ADDED = 64
LAYERS = 7
RECIPE = ("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
          "  - model: {b}\n    parameters: {{weight: 0.5}}\ntokenizer_source: union\ndtype: bfloat16\n")

# Child-process code (this process never imports torch, so the children's peak RSS is their own).
MAKE_MODELS = r"""
import json, os, sys, numpy as np
from dataclasses import replace
from transformers import AutoTokenizer
from tensorstore_llm.io.hf_dir import HFCheckpointSink
from tensorstore_llm.testing.real_models import smollm2_checkpoint
from tensorstore_llm.testing.synth import BLOCK_ELEMENTS, llama_config, shape_of, tensor_metas, tensor_rows

root, layers, added = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
smol = smollm2_checkpoint()
tok_dir = os.path.join(root, "tok-b")
os.makedirs(tok_dir, exist_ok=True)
spec = json.load(open(os.path.join(smol, "tokenizer.json")))
special = {t["id"] for t in spec["added_tokens"]}
vocab = spec["model"]["vocab"]
ordinary = sorted((i, t) for t, i in vocab.items() if i not in special)
ids = np.array([i for i, _ in ordinary])
shuffled = np.random.default_rng(0).permutation(ids)
for (_, token), new in zip(ordinary, shuffled.tolist()):
    vocab[token] = new
json.dump(spec, open(os.path.join(tok_dir, "tokenizer.json"), "w"))
for name in ("tokenizer_config.json", "special_tokens_map.json"):
    if os.path.exists(os.path.join(smol, name)):
        open(os.path.join(tok_dir, name), "wb").write(open(os.path.join(smol, name), "rb").read())
tok_b = AutoTokenizer.from_pretrained(tok_dir)
tok_b.add_tokens([f"<extra_{k}>" for k in range(added)])
tok_a = AutoTokenizer.from_pretrained(smol)
for key, tok, finetune in (("a", tok_a, 0), ("b", tok_b, 1)):
    shape = replace(shape_of("1gb", layers), vocab_size=len(tok))
    out = os.path.join(root, key)
    files = {"config.json": json.dumps(llama_config(shape, "bfloat16"), indent=2).encode()}
    sink = HFCheckpointSink(out, max_shard_bytes=2 * 1024**3, job_key=f"tok-bench-{key}", files=files)
    metas = tensor_metas(shape, "bfloat16")
    sink.prepare(metas)
    for meta in metas:
        rows = max(1, BLOCK_ELEMENTS // max(1, meta.row_numel))
        for start in range(0, meta.rows, rows):
            stop = min(meta.rows, start + rows)
            sink.write_rows(meta.name, start, tensor_rows(meta, start, stop, 0, finetune))
        sink.finish(meta.name)
    sink.commit()
    tok.save_pretrained(out)
"""

CHECK = r"""
import os, sys, torch
from safetensors import safe_open
from transformers import AutoTokenizer
ours, theirs = sys.argv[1], sys.argv[2]
vo, vt = AutoTokenizer.from_pretrained(ours).get_vocab(), AutoTokenizer.from_pretrained(theirs).get_vocab()
print(f"vocabulary: {len(vo)} tokens, same set: {set(vo) == set(vt)}, same ids: {vo == vt}")
order = sorted(vo, key=vo.get)
perm = torch.tensor([vt[t] for t in order])
def tensor(d, name):
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "pt") as s:
                if name in s.keys():
                    return s.get_tensor(name)
for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.3.mlp.up_proj.weight"):
    a, b = tensor(ours, name).float(), tensor(theirs, name).float()
    if name != "model.layers.3.mlp.up_proj.weight":
        b = b[perm]
    diff = (a - b).abs().max().item()
    print(f"{name}: max |ours - mergekit| (rows matched by token) = {diff:.3g}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--max-memory", default=None, help="tsllm's --max-memory (default: not given, i.e. auto)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--check", action="store_true", help="compare the two outputs (vocabulary, rows by token)")
    args = ap.parse_args()
    root = os.path.join(args.workdir, "models-tokenizer-union")
    if not os.path.exists(os.path.join(root, ".complete")):
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        subprocess.run([sys.executable, "-c", MAKE_MODELS, root, str(LAYERS), str(ADDED)], check=True)
        open(os.path.join(root, ".complete"), "w").close()
    a, b = os.path.join(root, "a"), os.path.join(root, "b")
    work = os.path.join(args.workdir, "merge-tokenizer-bench")
    os.makedirs(work, exist_ok=True)
    recipe = os.path.join(work, "union.yaml")
    with open(recipe, "w") as f:
        f.write(RECIPE.format(a=a, b=b))
    store, ours_out, theirs_out = (os.path.join(work, n) for n in ("store", "ours", "mk-out"))
    mergekit_yaml = shutil.which("mergekit-yaml") or os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    warm([a, b])
    print(f"load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    ours, theirs = [], []
    for _ in range(args.repeat):   # interleaved
        fresh(store), fresh(ours_out)
        ours.append(timed(TSLLM + ["-q", "--store", store, "merge", recipe, "-o", ours_out,
                            *(["--max-memory", args.max_memory] if args.max_memory else [])]))
        if not args.skip_mergekit:
            fresh(theirs_out)
            theirs.append(timed([mergekit_yaml, recipe, theirs_out]))
    t_wall, t_rss = statistics.median(r[0] for r in ours), max(r[1] for r in ours)
    print("| merge | mergekit wall s | mergekit RSS MiB | tsllm wall s | tsllm RSS MiB | wall ratio | RSS ratio | runs |")
    print("|---|---|---|---|---|---|---|---|")
    if theirs:
        m_wall, m_rss = statistics.median(r[0] for r in theirs), max(r[1] for r in theirs)
        runs = ", ".join(f"{o[0]:.1f} vs {t[0]:.1f}" for o, t in zip(ours, theirs))
        print(f"| linear, tokenizer union | {m_wall:.1f} | {m_rss:.0f} | {t_wall:.1f} | {t_rss:.0f} | "
              f"{t_wall / m_wall:.2f}x | {t_rss / m_rss:.2f}x | {runs} |")
    else:
        print(f"| linear, tokenizer union | - | - | {t_wall:.1f} | {t_rss:.0f} | - | - | - |")
    print(f"load average at the end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    if args.check and theirs:
        done = subprocess.run([sys.executable, "-c", CHECK, ours_out, theirs_out], capture_output=True, text=True, check=False)
        print(done.stdout.strip() if done.returncode == 0 else f"check failed: {done.stderr.strip()[-1500:]}")


if __name__ == "__main__":
    main()
