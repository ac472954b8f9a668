"""Teacher-logit benchmarks on the real SmolLM2-135M teacher over data/corpus (not in the default run).

    python tests/benchmarks/bench_distill.py bytes  [--seq-len 512] [--threads 1]
    python tests/benchmarks/bench_distill.py overhead [--seq-len 512] [--sequences 8] [--device cuda --dtype bfloat16]
    python tests/benchmarks/bench_distill.py rss    [--seq-len 512] [--sequences 16] [--batch-size 2]
    python tests/benchmarks/bench_distill.py learn  [--seq-len 128] [--steps 150] [--seeds 0,1,2] [--methods rs-kd,top-k,hard,full]
                                                    [--corpus data|cpython] [--held-out 6] [--checkpoints 25,50,100,150]
                                                    [--workdir DIR] [--json FILE] [--margin NATS]
    python tests/benchmarks/bench_distill.py learn-report FILE.json ... [--margin NATS]

bytes:    RS-KD (N = 50) datasets in the shipped codec, against alternative encodings of the same
          pairs (plain Parquet list<struct<id uint32, count uint8>>, ids without gaps, varint gaps)
          and against top-k 50 / 128 with bf16 values (DistillKit style), and full logits.
overhead: (forward + sampling + encoding + writing) / (forward + LM head alone) on the same batches.
rss:      peak resident memory (VmHWM) of a precompute and of a reader, each in its own process.
learn:    a random 2-layer student with the teacher's tokenizer trained from the cache with RS-KD
          targets, top-k targets of about the same bytes, hard labels or full KD; KL to the
          teacher's full distribution on held-out sequences and the ECE of the student's top-1
          against the held-out next tokens. ``--corpus cpython``: ~41k training tokens of
          docstrings from this Python's standard library, held-out sequences from disjoint files
          (the Python version is printed and recorded: it fixes the corpus).
learn-report: the table of several ``learn --json`` records (e.g. seeds run as separate
          processes); ``--margin``: exit non-zero unless RS-KD is ahead of top-k for every seed at
          every checkpoint, and at the last by that many nats on average and by more than two
          standard deviations of the per-seed gap. (learn and learn-report: distill_learning.py.)
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
sys.path.insert(0, os.path.dirname(__file__))

from distill_learning import CORPUS, cmd_learn, cmd_learn_report  # noqa: E402

from tensorstore_llm.distill.encoding import decode_table, encode_ids, encode_rows  # noqa: E402
from tensorstore_llm.distill.precompute import SamplingConfig, precompute, teacher_targets  # noqa: E402
from tensorstore_llm.distill.shards import ZSTD_LEVEL, open_dataset  # noqa: E402
from tensorstore_llm.distill.stats import dataset_stats  # noqa: E402
from tensorstore_llm.hf.corpus import read_corpus  # noqa: E402
from tensorstore_llm.hf.models import final_hidden, head_logits, load_causal_lm  # noqa: E402
from tensorstore_llm.hf.packing import Packing, PackingRule  # noqa: E402
from tensorstore_llm.testing.real_models import smollm2_checkpoint  # noqa: E402


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


SHAPES = {   # SmolLM2 configurations, for random-weight teachers of the real sizes (no hub here)
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32),
}


def teacher_dir(args) -> str:
    """The real SmolLM2-135M checkpoint, or (``--random-shape``) a seeded random Llama of a SmolLM2
    size with its tokenizer (taken from ``--tokenizer-dir`` or the checkpoint), saved to a temp dir.
    Random weights give a near-uniform teacher (~50 unique ids of 50 draws), so sampling and
    copying cost more than with a trained teacher."""
    if not args.random_shape:
        return smollm2_checkpoint()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir or smollm2_checkpoint())
    config = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPES[args.random_shape])
    torch.manual_seed(0)
    out = tempfile.mkdtemp(prefix=f"random-{args.random_shape}-")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def forward_only(lm, ids, position_chunk=128):
    """The teacher's forward + LM head over position chunks, results dropped (the baseline)."""
    with torch.inference_mode():
        h = final_hidden(lm.model, ids.to(lm.model.device))
        for s in range(0, ids.shape[1], position_chunk):
            head_logits(lm.model, h[:, s:s + position_chunk], lm.real_vocab)
        if h.is_cuda:
            torch.cuda.synchronize()


def cmd_overhead(args):
    """Per batch, in the same run: forward + LM head alone, then forward + sampling + encoding +
    zstd (synchronous, no writer thread); then the whole ``precompute`` (writes behind) over the
    same sequences against the sum of the forward-alone times. Wall and CPU (process) seconds;
    the first batch warms up (imports, allocator) and is not counted."""
    from tensorstore_llm.distill.encoding import SequenceTargets

    lm = load_causal_lm(teacher_dir(args), device=args.device, dtype=args.dtype)
    corpus = read_corpus(CORPUS, tokenizer=lm.tokenizer)
    if args.repeat_corpus > 1:                     # more tokens for GPU throughput: the corpus k times over
        import dataclasses

        corpus = dataclasses.replace(corpus, documents=corpus.documents * args.repeat_corpus,
                                     fingerprint=f"{corpus.fingerprint}x{args.repeat_corpus}")
    rule = PackingRule(seq_len=args.seq_len)
    packing = Packing(corpus.documents, lm.tokenizer, rule, corpus.fingerprint)
    config = SamplingConfig()
    bs = args.batch_size
    n = min(args.sequences, len(packing) - bs)
    wall = {"fwd": 0.0, "full": 0.0}
    cpu = {"fwd": 0.0, "full": 0.0}
    for b in range(-bs, n, bs):                       # b < 0: the warm-up batch
        idx = list(range(max(b, 0), max(b, 0) + bs))
        ids = torch.from_numpy(packing.sequences[idx].astype(np.int64))
        w0, c0 = time.perf_counter(), time.process_time()
        forward_only(lm, ids, args.position_chunk)
        w1, c1 = time.perf_counter(), time.process_time()
        rows, _ = teacher_targets(lm, ids, idx, config, position_chunk=args.position_chunk)
        table = encode_rows("rs-kd", [SequenceTargets(i, packing.sequences[i], r) for i, r in zip(idx, rows)], lm.real_vocab, 50)
        parquet_bytes(table)
        w2, c2 = time.perf_counter(), time.process_time()
        if b >= 0:
            wall["fwd"] += w1 - w0
            wall["full"] += w2 - w1
            cpu["fwd"] += c1 - c0
            cpu["full"] += c2 - c1
    tokens = n * args.seq_len
    print(f"{n} x {args.seq_len} tokens, batch {bs}, {lm.model.device}, {torch.get_num_threads()} thread(s)")
    print(f"forward + LM head: {tokens / wall['fwd']:.0f} tokens/s; forward + sampling + encoding + zstd: "
          f"{tokens / wall['full']:.0f} tokens/s")
    print(f"overhead ratio, wall {wall['full'] / wall['fwd']:.3f}, CPU time {cpu['full'] / cpu['fwd']:.3f}")
    out = os.path.join(tempfile.mkdtemp(), "rs-kd")
    w0, c0 = time.perf_counter(), time.process_time()
    precompute(lm, corpus, out, rule=rule, max_sequences=n, batch_size=bs, shard_sequences=max(bs, 8),
               position_chunk=args.position_chunk)
    w1, c1 = time.perf_counter(), time.process_time()
    print(f"dataset: {dataset_stats(out)['unique_per_position']:.1f} unique ids/position")
    print(f"whole precompute (writes behind, {n} sequences): {tokens / (w1 - w0):.0f} tokens/s; "
          f"against forward alone: wall {(w1 - w0) / wall['fwd']:.3f}, CPU time {(c1 - c0) / cpu['fwd']:.3f}")


def _vm(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cmd_rss_precompute(args):
    lm = load_causal_lm(smollm2_checkpoint())
    loaded = _vm("VmRSS")
    precompute(lm, CORPUS, args.out, rule=PackingRule(seq_len=args.seq_len), max_sequences=args.sequences,
               batch_size=args.batch_size, shard_sequences=8, position_chunk=args.position_chunk)
    print(f"precompute: RSS after loading the teacher {loaded:.0f} MiB, peak {_vm('VmHWM'):.0f} MiB "
          f"(batch {args.batch_size} x {args.seq_len}, LM head over {args.position_chunk} positions at a time)")


def cmd_rss_read(args):
    from tensorstore_llm.distill.dataset import DistillDataset, collate_sparse

    ready = _vm("VmRSS")
    ds = DistillDataset(args.out)
    rates = []
    for epoch in range(3):                         # the first epoch pays one-time imports and Parquet set-up
        ds.set_epoch(epoch)
        tokens = 0
        t0 = time.perf_counter()
        for batch in torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate_sparse):
            tokens += batch["input_ids"].numel()
        rates.append(tokens / (time.perf_counter() - t0))
    print(f"reader: RSS after imports {ready:.0f} MiB, peak {_vm('VmHWM'):.0f} MiB over 3 epochs of {tokens} tokens in "
          f"batches of 8; into padded batches {rates[0]:.0f} tokens/s cold, {max(rates[1:]):.0f} tokens/s warm")


def cmd_rss(args):
    """Peak RSS of a precompute and of a reader, each in its own process (VmHWM)."""
    import subprocess

    out = os.path.join(tempfile.mkdtemp(), "rs-kd")
    common = ["--seq-len", str(args.seq_len), "--sequences", str(args.sequences), "--batch-size", str(args.batch_size),
              "--position-chunk", str(args.position_chunk), "--threads", str(args.threads), "--out", out]
    for what in ("rss-precompute", "rss-read"):
        done = subprocess.run([sys.executable, __file__, what, *common], capture_output=True, text=True, check=True)
        print(done.stdout.strip())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["bytes", "overhead", "learn", "learn-report", "rss", "rss-precompute", "rss-read"])
    parser.add_argument("records", nargs="*", help="learn-report: JSON files written by learn --json")
    parser.add_argument("--corpus", choices=["data", "cpython"], default="data",
                        help="learn: data/corpus, or docstrings of this Python's standard library")
    parser.add_argument("--train-tokens", type=int, default=41_000, help="learn --corpus cpython: training tokens")
    parser.add_argument("--held-out", type=int, default=6, help="learn: held-out sequences")
    parser.add_argument("--checkpoints", help="learn: steps to evaluate at, e.g. 25,50,100,150 (default: thirds)")
    parser.add_argument("--json", help="learn: also write the results here")
    parser.add_argument("--margin", type=float, help="learn / learn-report: fail unless RS-KD leads top-k by this")
    parser.add_argument("--out", help="rss-precompute / rss-read: the dataset directory")
    parser.add_argument("--workdir", help="learn: keep (and reuse) the caches here")
    parser.add_argument("--seq-len", type=int, help="tokens per packed sequence (learn: 128, the others: 512)")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--methods", default="rs-kd,top-k,hard,full")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--position-chunk", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--random-shape", choices=sorted(SHAPES), help="overhead: a random teacher of this SmolLM2 size")
    parser.add_argument("--tokenizer-dir", help="with --random-shape: where SmolLM2's tokenizer files are")
    parser.add_argument("--repeat-corpus", type=int, default=1, help="overhead: the corpus this many times over")
    args = parser.parse_args()
    if args.seq_len is None:
        args.seq_len = 128 if args.what == "learn" else 512
    torch.set_num_threads(args.threads)
    {"bytes": cmd_bytes, "overhead": cmd_overhead, "learn": cmd_learn, "learn-report": cmd_learn_report, "rss": cmd_rss, "rss-precompute": cmd_rss_precompute,
     "rss-read": cmd_rss_read}[args.what](args)


if __name__ == "__main__":
    main()
