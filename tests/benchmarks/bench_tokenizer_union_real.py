"""A tokenizer-union merge on a real SmolLM2-135M pair against a whole mergekit run, on equal
output (both write a Hugging Face directory).

The pair and the recipe are ``tests/test_tokenizer_union_real.py``'s: SmolLM2 with tokens added,
its embedding resized and fine-tuned on text using them, and a plain SmolLM2 fine-tune; ``linear``
0.5 / 0.5 with ``tokenizer_source: union`` and the plain model as base, in fp32. The suite test
checks tsllm's output against a direct computation; this script runs ``tsllm merge -o`` and
``mergekit-yaml`` (wall and peak RSS of each child, wait4) and then compares the two outputs:
the same vocabulary (token -> id), every tensor, and the logits of both models in transformers on
a text that uses the added tokens.

Run:  pip install mergekit
      python tests/benchmarks/bench_tokenizer_union_real.py --workdir /tmp/tsllm-union-real
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
from common import TSLLM, fresh, timed  # noqa: E402

TEXT = "<tool_call>tensorstore zarrification of a JSON file</tool_call> and the rest of the sentence."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--max-memory", default="1G")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    from test_seed_methods import _task_finetune
    from test_tokenizer_union_real import added_tokens_finetune, union_recipe

    pair = {"plain": _task_finetune("b"), "added": added_tokens_finetune()}
    recipe = os.path.join(args.workdir, "union.yaml")
    with open(recipe, "w", encoding="utf-8") as f:
        f.write(union_recipe(pair))
    ours, theirs = fresh(os.path.join(args.workdir, "ours")), fresh(os.path.join(args.workdir, "mergekit"))
    store = fresh(os.path.join(args.workdir, "store"))
    load = _load_average()
    wall_ours, rss_ours = timed(TSLLM + ["--store", store, "merge", recipe, "-o", ours, "--max-memory", args.max_memory])
    mergekit_yaml = shutil.which("mergekit-yaml") or os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    wall_theirs, rss_theirs = timed([mergekit_yaml, recipe, theirs])
    print(f"load average at start {load}, at end {_load_average()}")
    print("| tool | wall s | peak RSS MiB |\n|---|---:|---:|")
    print(f"| tsllm merge -o (--max-memory {args.max_memory}) | {wall_ours:.1f} | {rss_ours:.0f} |")
    print(f"| mergekit-yaml | {wall_theirs:.1f} | {rss_theirs:.0f} |")
    compare(ours, theirs)


def _load_average() -> str:
    with open("/proc/loadavg", encoding="ascii") as f:
        return " ".join(f.read().split()[:3])


def compare(ours: str, theirs: str) -> None:
    """Vocabulary, tensors and logits of the two outputs (prints; raises on a vocabulary mismatch)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_ours, tok_theirs = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(theirs)
    if tok_ours.get_vocab() != tok_theirs.get_vocab():
        raise SystemExit(f"vocabularies differ: {len(tok_ours)} vs {len(tok_theirs)} tokens")
    print(f"same vocabulary: {len(tok_ours)} tokens, ids equal")
    a = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(theirs, dtype=torch.float32).eval()
    sa, sb = a.state_dict(), b.state_dict()
    worst = max((float((sa[n] - sb[n]).abs().max()), n) for n in sa)
    print(f"tensors: max |ours - mergekit| = {worst[0]:.3g} ({worst[1]})")
    ids = tok_ours(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = float((a(ids).logits - b(ids).logits).abs().max())
    print(f"logits on {ids.shape[1]} tokens (added ones included): max |ours - mergekit| = {diff:.3g}")


if __name__ == "__main__":
    main()
