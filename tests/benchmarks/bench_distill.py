"""Teacher-logit benchmarks on the real SmolLM2-135M teacher over data/corpus (not in the default run).

    python tests/benchmarks/bench_distill.py bytes  [--seq-len 512] [--threads 1]
    python tests/benchmarks/bench_distill.py overhead [--seq-len 512] [--sequences 8]
    python tests/benchmarks/bench_distill.py learn  [--steps 150] [--seeds 0]

bytes:    RS-KD (N = 50) datasets in the shipped codec, against alternative encodings of the same
          pairs (plain Parquet list<struct<id uint32, count uint8>>, ids without gaps, varint gaps)
          and against top-k 50 / 128 with bf16 values (DistillKit style), and full logits.
overhead: (forward + sampling + encoding + writing) / (forward + LM head alone) on the same batches.
learn:    a random 2-layer student with the teacher's tokenizer trained from the cache with RS-KD
          targets, top-k targets of about the same bytes, or hard labels; KL to the teacher's full
          distribution on held-out sequences.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
sys.path.insert(0, ROOT)

from tensorstore_llm.distill.encoding import decode_table, encode_ids, encode_rows  # noqa: E402
from tensorstore_llm.distill.precompute import SamplingConfig, precompute, teacher_targets  # noqa: E402
from tensorstore_llm.distill.shards import ZSTD_LEVEL, open_dataset  # noqa: E402
from tensorstore_llm.distill.stats import dataset_stats  # noqa: E402
from tensorstore_llm.hf.corpus import read_corpus  # noqa: E402
from tensorstore_llm.hf.models import final_hidden, head_logits, load_causal_lm  # noqa: E402
from tensorstore_llm.hf.packing import Packing, PackingRule  # noqa: E402
from tensorstore_llm.testing.real_models import smollm2_checkpoint  # noqa: E402

CORPUS = os.path.join(ROOT, "data", "corpus")


def parquet_bytes(table: pa.Table) -> int:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=ZSTD_LEVEL, use_dictionary=False)
    return len(buf.getvalue())


def alternatives(seqs) -> dict:
    """Bytes of the same RS-KD pairs in other encodings (same zstd level)."""
    structs = []
    for s in seqs:
        o = s.rows.offsets
        for p in range(len(o) - 1):
            structs.append([{"id": int(i), "count": int(c)} for i, c in
                            zip(s.rows.ids[o[p]:o[p + 1]], s.rows.counts[o[p]:o[p + 1]])])
    out = {"plain Parquet list<struct<id u32, count u8>>": parquet_bytes(pa.table({"t": pa.array(
        structs, type=pa.list_(pa.struct([("id", pa.uint32()), ("count", pa.uint8())])))}))}

    def blobs(fn):
        return parquet_bytes(pa.table({"b": [fn(s) for s in seqs]}))
    n_ids = blobs(lambda s: np.diff(s.rows.offsets).astype(np.uint8).tobytes())
    counts = blobs(lambda s: s.rows.counts.tobytes())
    out["ids u16 (no gaps) + counts + n_ids"] = blobs(lambda s: s.rows.ids.astype("<u2").tobytes()) + counts + n_ids

    def varint_gaps(s):
        g = s.rows.ids.astype(np.int64).copy()
        g[1:] -= s.rows.ids[:-1]
        g[s.rows.offsets[:-1]] = s.rows.ids[s.rows.offsets[:-1]]
        b = bytearray()
        for v in g.tolist():
            while v >= 128:
                b.append((v & 127) | 128)
                v >>= 7
            b.append(v)
        return bytes(b)
    out["varint gaps + counts + n_ids"] = blobs(varint_gaps) + counts + n_ids
    out["gap-planes ids + counts + n_ids (shipped)"] = blobs(lambda s: encode_ids(s.rows.ids, s.rows.offsets, 2)) + counts + n_ids
    pairs = np.concatenate([s.rows.ids.astype(np.int64) * 256 + s.rows.counts for s in seqs])
    _, freq = np.unique(pairs, return_counts=True)
    p = freq / freq.sum()
    out["order-0 entropy of (id, count) (bound for a static code)"] = float(-(p * np.log2(p)).sum() / 8 * len(pairs))
    return out


def topk_bf16_bytes(lm, packing, n_seq, k) -> int:
    """DistillKit-style top-k storage: k ids (u32) + k bf16 log-probs per position, Parquet zstd."""
    ids_col, val_col = [], []
    for i in range(n_seq):
        ids = torch.from_numpy(packing.sequences[i:i + 1].astype(np.int64))
        rows, _ = teacher_targets(lm, ids, [i], SamplingConfig(method="top-k", k=k))
        ids_col.append(rows[0].ids.astype(np.uint32))
        val_col.append(torch.from_numpy(rows[0].logprobs).bfloat16().view(torch.int16).numpy().tobytes())
    return parquet_bytes(pa.table({"ids": ids_col, "values": val_col}))


def cmd_bytes(args):
    lm = load_causal_lm(smollm2_checkpoint())
    corpus = read_corpus(CORPUS, tokenizer=lm.tokenizer)
    rule = PackingRule(seq_len=args.seq_len)
    packing = Packing(corpus.documents, lm.tokenizer, rule, corpus.fingerprint)
    n = min(len(packing), args.sequences)
    out = os.path.join(tempfile.mkdtemp(), "rs-kd")
    t0 = time.perf_counter()
    precompute(lm, corpus, out, rule=rule, max_sequences=n, batch_size=2, shard_sequences=8)
    seconds = time.perf_counter() - t0
    s = dataset_stats(out)
    tokens, pairs = s["tokens"], s["pairs"]
    print(f"RS-KD N=50 T=1 over {n} x {args.seq_len} = {tokens} tokens of data/corpus ({seconds:.0f} s, "
          f"{tokens / seconds:.0f} tokens/s on {torch.get_num_threads()} thread(s))")
    print(f"  unique ids/position {s['unique_per_position']:.2f}  coverage {s['coverage']:.3f}")
    print(f"  shipped dataset: {s['bytes_per_pair']:.3f} B/pair, {s['bytes_per_token']:.2f} B/token (whole shard files); "
          f"target columns {s['target_bytes_per_pair']:.3f} B/pair")
    ds = open_dataset(out)
    seqs = [q for name in ds.shard_names() for q in decode_table(ds.read_shard(name), 49152, 50)]
    t0 = time.perf_counter()
    for name in ds.shard_names():
        decode_table(ds.read_shard(name), 49152, 50)
    print(f"  read + verify + decode: {tokens / (time.perf_counter() - t0):.0f} tokens/s")
    for name, size in alternatives(seqs).items():
        print(f"  {name:58} {size / pairs:.3f} B/pair {size / tokens:7.2f} B/token")
    for k in (50, 128):
        size = topk_bf16_bytes(lm, packing, n, k)
        print(f"  top-{k} ids u32 + bf16 log-probs (DistillKit style)            {size / tokens:7.2f} B/token")
    print(f"  full logits bf16: {49152 * 2} B/token")


def cmd_overhead(args):
    lm = load_causal_lm(smollm2_checkpoint())
    corpus = read_corpus(CORPUS, tokenizer=lm.tokenizer)
    packing = Packing(corpus.documents, lm.tokenizer, PackingRule(seq_len=args.seq_len), corpus.fingerprint)
    config = SamplingConfig()
    fwd = full = 0.0
    for b in range(0, args.sequences, 2):
        idx = list(range(b, b + 2))
        ids = torch.from_numpy(packing.sequences[idx].astype(np.int64))
        t0 = time.perf_counter()
        with torch.inference_mode():
            h = final_hidden(lm.model, ids)
            for s in range(0, args.seq_len, 128):
                head_logits(lm.model, h[:, s:s + 128], lm.real_vocab)
        t1 = time.perf_counter()
        rows, _ = teacher_targets(lm, ids, idx, config)
        from tensorstore_llm.distill.encoding import SequenceTargets
        table = encode_rows("rs-kd", [SequenceTargets(i, packing.sequences[i], r) for i, r in zip(idx, rows)], 49152, 50)
        parquet_bytes(table)
        t2 = time.perf_counter()
        fwd += t1 - t0
        full += t2 - t1
    tokens = args.sequences * args.seq_len
    print(f"forward + LM head: {tokens / fwd:.0f} tokens/s; forward + sampling + encoding + zstd: {tokens / full:.0f} tokens/s; "
          f"overhead ratio {full / fwd:.3f} ({torch.get_num_threads()} thread(s))")


def cmd_learn(args):
    from tensorstore_llm.distill.learning import run_learning_experiment

    results = run_learning_experiment(steps=args.steps, seeds=[int(s) for s in args.seeds.split(",")],
                                      seq_len=args.seq_len, log=print)
    unique = results.pop("unique_per_position")[0]
    print(f"RS-KD cache: {unique:.1f} unique ids/position; top-k cache: k = {int(np.ceil(unique))}")
    for name, kls in results.items():
        print(f"{name:8} held-out KL to teacher at {args.steps // 3}, {2 * args.steps // 3}, {args.steps} steps: "
              + " ".join(f"{k:.3f}" for k in kls))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["bytes", "overhead", "learn"])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"bytes": cmd_bytes, "overhead": cmd_overhead, "learn": cmd_learn}[args.what](args)


if __name__ == "__main__":
    main()
