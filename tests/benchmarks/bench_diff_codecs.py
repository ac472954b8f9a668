"""Delta codecs on a real SmolLM2-135M full fine-tune (issue 11): exact representations, exact-codec
throughput per core, and lossy codecs with weight error and model KL.

    python tests/benchmarks/bench_diff_codecs.py [--repeat 5] [--skip-lossy | --skip-exact] [--dtypes bfloat16,float16,float32] [--json out.json]
    python tests/benchmarks/bench_diff_codecs.py --skip-lossy --generated 100m [--generated-scale 0.005]

bf16: the 30-step fine-tune (seq 128, batch 8). fp16 / fp32: a shorter real fine-tune (``--fp-steps``
steps, seq 64, batch 4) trained in fp32 and cast, against the base cast to the same dtype.

Builds (and caches) the fine-tune with tensorstore_llm.testing.finetune.smollm2_finetune. Every
throughput figure is single-threaded (one core) and the median of ``--repeat`` runs; on a shared
machine the spread is printed too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

from tensorstore_llm.diff import exact, exact_huff, exact_lanes, exact_v1
from tensorstore_llm.diff.codecs import get_codec
from tensorstore_llm.diff.quality import codec_report, delta_kl, reference_log_probs

GB = 1e9


def load_state(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def words(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).numpy().reshape(-1).view(
        np.uint16 if t.element_size() == 2 else np.uint32)


# --- statistics ---------------------------------------------------------------------------------

def entropy(values: np.ndarray) -> float:
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def ulp_stats(base: dict, ft: dict, bits: int, eshift: int, emask: int) -> dict:
    b = np.concatenate([words(base[k]) for k in sorted(base)])
    f = np.concatenate([words(ft[k]) for k in sorted(base)])
    z = exact._zigzag_np(b, f, bits)
    d = np.where(z & 1, -((z >> 1).astype(np.int64)) - 1, (z >> 1).astype(np.int64))
    e = (b >> eshift) & emask
    h0 = entropy(d)
    hc = 0.0
    for ev in np.unique(e):
        m = e == ev
        hc += m.mean() * entropy(d[m])
    a = np.abs(d)
    return {"elements": int(b.size), "changed": float(np.mean(b != f)), "H_ulp": h0, "H_ulp_given_exp": hc,
            "bound_ratio": bits / hc, "zero": float(np.mean(a == 0)), "pm1": float(np.mean(a == 1)),
            "pm2": float(np.mean(a == 2)), "escape_share": float(np.mean(z >= 255))}


# --- exact representations ----------------------------------------------------------------------

def zstd(data: bytes, level: int) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=level).compress(data))


def blosc(arr: np.ndarray, shuffle: int, clevel: int = 5) -> int:
    from numcodecs import Blosc

    return len(Blosc(cname="zstd", clevel=clevel, shuffle=shuffle, blocksize=0).encode(arr))


def byte_planes(arr: np.ndarray) -> list[bytes]:
    raw = arr.view(np.uint8).reshape(-1, arr.itemsize)
    return [raw[:, j].tobytes() for j in range(arr.itemsize)]


def representations(base: dict, ft: dict, bits: int, eshift: int, emask: int, fmt: str) -> list[tuple]:
    """(name, bytes) for each exact representation, every tensor coded on its own."""
    from numcodecs import Blosc

    rows = {}

    def add(name, n):
        rows[name] = rows.get(name, 0) + n

    for k in sorted(base):
        b, f = words(base[k]), words(ft[k])
        xor = b ^ f
        ulp = exact._zigzag_np(b, f, bits).astype(b.dtype)
        add("fine-tune alone: zstd-3", zstd(f.tobytes(), 3))
        add("fine-tune alone: byte-grouped zstd-3 (ZipNN-style)", sum(zstd(p, 3) for p in byte_planes(f)))
        add("fine-tune alone: blosc-zstd-5 byte shuffle", blosc(f, Blosc.SHUFFLE))
        add("XOR: zstd-3", zstd(xor.tobytes(), 3))
        add("XOR: byte-grouped zstd-3 (BitX-style)", sum(zstd(p, 3) for p in byte_planes(xor)))
        add("XOR: blosc-zstd-5 byte shuffle", blosc(xor, Blosc.SHUFFLE))
        add("XOR: blosc-zstd-5 bit shuffle", blosc(xor, Blosc.BITSHUFFLE))
        add("ULP diff (zigzag): zstd-3", zstd(ulp.tobytes(), 3))
        add("ULP diff (zigzag): byte-grouped zstd-3", sum(zstd(p, 3) for p in byte_planes(ulp)))
        add("ULP diff (zigzag): blosc-zstd-5 bit shuffle", blosc(ulp, Blosc.BITSHUFFLE))
        for level in (None, 1, 3, 9):
            what = "zstd literals only, no match search (codec `exact` format 1)" if level is None else \
                f"zstd-{level} (codec `exact` format 1, level={level})"
            add(f"ULP diff, sorted by base exponent, {what}", len(exact.encode_delta(b, f, fmt, level=level, version=1)))
        add("ULP diff, element order, Huffman table per base exponent (codec `exact` format 2, default)",
            len(exact.encode_delta(b, f, fmt)))
        esc = exact_v1._encode_np(b, f, bits, eshift, emask, 0)[2]
        unsorted = np.minimum(exact._zigzag_np(b, f, bits), 255).astype(np.uint8)
        add("ULP diff, byte symbols + escapes, element order, zstd-1 (no sort)",
            zstd(unsorted.tobytes(), 1) + zstd(esc.tobytes(), 1) + exact.header_size(1))
    return list(rows.items())


# --- throughput ---------------------------------------------------------------------------------

def raw_read(ft_path: str, repeat: int) -> dict:
    """Single-thread read of the whole fine-tune from its safetensors file (page cache warm), GB/s:
    the cost of reading the full checkpoint that a delta-stored one is compared with."""
    from safetensors import safe_open

    def once():
        with safe_open(ft_path, "pt") as f:
            total = 0
            for k in f.keys():
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
            return total
    raw = once()
    wall, cpu = [], []
    for _ in range(repeat):
        c0, t0 = time.thread_time(), time.perf_counter()
        once()
        wall.append(raw / (time.perf_counter() - t0) / GB)
        cpu.append(raw / (time.thread_time() - c0) / GB)
    return {"read_gbps": statistics.median(wall), "read_cpu_gbps": statistics.median(cpu)}


def decode_stages(base: dict, ft: dict, repeat: int = 7, block_bytes: int = 8 << 20) -> dict:
    """bf16 format-2 decode split into its stages (numba path), ns per weight per CPU-second, best of
    ``repeat``, over every tensor in the store's row blocks."""
    import numba

    base, ft = row_blocks(base, ft, block_bytes)
    names = sorted(k for k in base if not torch.equal(base[k].view(torch.int16), ft[k].view(torch.int16)))
    words_of = {k: exact._words(base[k], "bfloat16", "base") for k in names}
    parsed = {k: exact_huff.parse_v2(exact.encode_delta(base[k], ft[k])) for k in names}
    tables = {k: exact_lanes.parse_tables_nb(np.frombuffer(parsed[k][5], np.uint8), 0xFF, exact_huff.MAX_TABLES,
                                             exact_huff._REVERSED)[:2] for k in names}
    weights = sum(words_of[k].size for k in names)
    chunk = exact_lanes.CHUNK
    lanes_chunk = exact_lanes._lanes_chunk

    @numba.njit(nogil=True)
    def lanes_only(words, starts, bit_counts, dec, ctx_off, b):
        pos = starts * 64
        ends = pos + bit_counts
        sym = np.empty(chunk, np.uint8)
        ctx = np.empty(512, np.uint32)                   # bf16: offset by base >> 7, as undelta_nb builds it
        for v in range(512):
            ctx[v] = np.uint32(ctx_off[v & 0xFF])
        for i0 in range(0, b.size, chunk):
            lanes_chunk(words, ends, dec, ctx, b, 7, sym, pos, i0, min(b.size, i0 + chunk))

    def whole(k):
        p = parsed[k]
        exact_lanes.undelta_nb(p[6], p[7], p[8], tables[k][1], tables[k][0], words_of[k], 7, 0xFF,
                               np.empty(0, np.uint8), 0, np.zeros(p[4], np.uint16), 16, np.empty(words_of[k].size, np.uint16))

    stages = {
        "header + tables": lambda k: exact_lanes.parse_tables_nb(np.frombuffer(parsed[k][5], np.uint8), 0xFF,
                                                                 exact_huff.MAX_TABLES, exact_huff._REVERSED),
        "lanes (symbols)": lambda k: lanes_only(parsed[k][6], parsed[k][7], parsed[k][8], tables[k][1], tables[k][0], words_of[k]),
        "lanes + escapes + apply": whole,
    }
    out = {}
    for stage, fn in stages.items():
        best = math.inf
        for _ in range(repeat):
            c0 = time.thread_time()
            for k in names:
                fn(k)
            best = min(best, time.thread_time() - c0)
        out[stage] = best / weights * 1e9
    return out


def row_blocks(base: dict, ft: dict, block_bytes: int) -> tuple[dict, dict]:
    """Every tensor cut into row blocks of at most ``block_bytes`` (as the store codes them; 0: whole)."""
    if not block_bytes:
        return base, ft
    b_out, f_out = {}, {}
    for k in sorted(base):
        t = base[k]
        rows = max(1, block_bytes // max(1, t[0].numel() * t.element_size())) if t.dim() else 1
        if t.dim() == 0 or rows >= t.shape[0]:
            b_out[k], f_out[k] = t, ft[k]
            continue
        for i, start in enumerate(range(0, t.shape[0], rows)):
            b_out[f"{k}#{i}"], f_out[f"{k}#{i}"] = t[start:start + rows], ft[k][start:start + rows]
    return b_out, f_out


def throughput(base: dict, ft: dict, fmt: str, repeat: int, use_numba: bool, block_bytes: int = 0,
               version: int = exact.VERSION) -> dict:
    """Single-thread encode / decode of the whole model, GB/s of the target's raw bytes (median);
    tensors coded in row blocks of ``block_bytes`` (0: whole tensors), in exact format ``version``."""
    base, ft = row_blocks(base, ft, block_bytes)
    names = sorted(base)
    raw = sum(ft[k].numel() * ft[k].element_size() for k in names)
    blobs = {k: exact.encode_delta(base[k], ft[k], fmt, use_numba=use_numba, version=version) for k in names}
    exact.decode_delta(base[names[0]], blobs[names[0]], use_numba=use_numba)
    enc, dec, enc_cpu, dec_cpu = [], [], [], []
    for _ in range(repeat):
        c0, t0 = time.thread_time(), time.perf_counter()
        for k in names:
            exact.encode_delta(base[k], ft[k], fmt, use_numba=use_numba, version=version)
        c1, t1 = time.thread_time(), time.perf_counter()
        for k in names:
            exact.decode_delta(base[k], blobs[k], use_numba=use_numba)
        c2, t2 = time.thread_time(), time.perf_counter()
        enc.append(raw / (t1 - t0) / GB)
        dec.append(raw / (t2 - t1) / GB)
        enc_cpu.append(raw / (c1 - c0) / GB)
        dec_cpu.append(raw / (c2 - c1) / GB)
    for k in names:   # and it is exact
        out = exact.decode_delta(base[k], blobs[k], use_numba=use_numba)
        assert torch.equal(out.view(torch.int16 if out.element_size() == 2 else torch.int32),
                           ft[k].view(torch.int16 if out.element_size() == 2 else torch.int32)), k
    return {"encode_gbps": statistics.median(enc), "decode_gbps": statistics.median(dec),
            "encode_cpu_gbps": statistics.median(enc_cpu), "decode_cpu_gbps": statistics.median(dec_cpu),
            "encode_range": [min(enc), max(enc)], "decode_range": [min(dec), max(dec)],
            "bytes": sum(len(v) for v in blobs.values()), "raw": raw}


# --- lossy --------------------------------------------------------------------------------------

LOSSY = [
    ("bf16", {}),
    ("bitdelta", {}),
    ("bitdelta", {"per_row": True}),
    ("low-rank", {"rank": 64}),
    ("low-rank", {"energy": 0.5}),
    ("top-k", {"density": 0.2}),
    ("dare", {"keep": 0.3, "seed": 0}),
    ("mixed-svd", {"groups": [[2, 8], [32, 3], [64, 2]]}),
    ("mixed-svd", {"groups": [[8, 8], [64, 4], [128, 3], [192, 2]]}),
]


def lossy_table(base: dict, ft: dict, model, batches, specs, ref_lp) -> list[dict]:
    rows = []
    for name, params in specs:
        codec = get_codec(name, **params)
        t0 = time.perf_counter()
        rep = codec_report(codec, base, ft, keep_reconstruction=True)
        secs = time.perf_counter() - t0
        q = delta_kl(model, ft, rep.pop("reconstruction"), batches, reference_lp=ref_lp)
        rows.append({"codec": codec.to_dict(), "bytes": rep["bytes"], "ratio": rep["ratio"],
                     "delta_rel": rep["delta_rel"], "weight_rel": rep["weight_rel"], "kl": q["kl"],
                     "kl_max": q["kl_max"], "ppl_change": q["ppl_change"], "encode_decode_s": secs})
        print(f"  {json.dumps(rows[-1]['codec']):60s} ratio {rep['ratio']:7.2f}  Δrel {rep['delta_rel']:.3f}  "
              f"Wrel {rep['weight_rel']:.2e}  KL {q['kl']:.2e}  ppl {100 * q['ppl_change']:+.3f}%", flush=True)
    return rows


def generated_pair(preset: str, scale: float, fmt: str) -> tuple[str, str]:
    """(base dir, fine-tune dir) of a generated pair, cached under the test-model cache."""
    from tensorstore_llm.testing.real_models import cache_root
    from tensorstore_llm.testing.synth import write_checkpoint

    root = os.path.join(cache_root(), f"bench-synth-{preset}-{scale:g}-{fmt}")
    dirs = []
    for k, name in ((0, "base"), (1, "ft1")):
        out = os.path.join(root, name)
        if not os.path.isfile(os.path.join(out, "config.json")):
            write_checkpoint(out, preset, finetune=k, delta_scale=scale * 0.02, dtype=fmt, max_shard_size=1 << 40)
        dirs.append(out)
    return dirs[0], dirs[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-lossy", action="store_true")
    ap.add_argument("--skip-exact", action="store_true", help="only the lossy codecs")
    ap.add_argument("--throughput-only", action="store_true", help="exact codec: skip the representation table")
    ap.add_argument("--dtypes", default="bfloat16,float16,float32",
                    help="exact-delta formats to measure (the fp32 fine-tune trains once, then is cached)")
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--fp-steps", type=int, default=5,
                    help="AdamW steps of the fp16 / fp32 fine-tune (a shorter run: seq 64, batch 4)")
    ap.add_argument("--generated", default=None, metavar="PRESET",
                    help="instead of SmolLM2: a generated pair (tensorstore_llm.testing.synth preset, e.g. 100m), "
                         "fine-tune = base + N(0, (scale x 0.02)^2) per weight")
    ap.add_argument("--generated-scale", type=float, default=0.005,
                    help="the generated fine-tune's delta, relative to the weights' 0.02 std (the real one moves "
                         "weights by ~0.56%% of their norm)")
    ap.add_argument("--block-bytes", type=int, default=8 << 20,
                    help="throughput: code tensors in row blocks of this many bytes, as the store does (0: whole tensors)")
    ap.add_argument("--stages", action="store_true", help="bf16: also time the decode stages (tables, lanes, escapes + apply)")
    ap.add_argument("--numpy-weights", type=int, default=3_000_000,
                    help="throughput of the NumPy fallback on the first tensors up to this many weights")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from tensorstore_llm.testing.finetune import heldout_text, smollm2_finetune, token_batches
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    out = {"machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}, "numba": exact._numba is not None}
    formats = {"bfloat16": (16, 7, 0xFF), "float16": (16, 10, 0x1F), "float32": (32, 23, 0xFF)}
    dtypes = [] if args.skip_exact else [(f, *formats[f]) for f in args.dtypes.split(",")]
    for fmt, bits, eshift, emask in dtypes:
        if args.generated:
            base_dir, ft_dir = generated_pair(args.generated, args.generated_scale, fmt)
        else:
            base_dir = smollm2_checkpoint(fmt)
            ft_dir = smollm2_finetune(dtype=fmt) if fmt == "bfloat16" else \
                smollm2_finetune(steps=args.fp_steps, seq_len=64, batch=4, dtype=fmt)
        base, ft = load_state(base_dir), load_state(ft_dir)
        raw = sum(v.numel() * v.element_size() for v in ft.values())
        stats = ulp_stats(base, ft, bits, eshift, emask)
        print(f"[{fmt}] {stats}", flush=True)
        reps = [] if args.throughput_only else representations(base, ft, bits, eshift, emask, fmt)
        alone = min((n for name, n in reps if name.startswith("fine-tune alone")), default=0)
        for name, n in reps:
            print(f"  {name:80s} {n / 1e6:8.2f} MB  {raw / n:5.2f}x raw  {alone / n:5.2f}x vs best alone", flush=True)
        torch.set_num_threads(1)   # per-core figures
        block = args.block_bytes
        tp = {}
        if exact._numba is not None:
            tp["numba"] = throughput(base, ft, fmt, args.repeat, True, block)
            tp["numba, format 1"] = throughput(base, ft, fmt, args.repeat, True, block, version=1)
        few = {}                       # the NumPy path decodes format 2 with a Python loop: a few tensors
        for k in sorted(base):
            if sum(v.numel() for v in few.values()) + base[k].numel() <= args.numpy_weights:
                few[k] = base[k]
        tp["numpy"] = throughput(few, {k: ft[k] for k in few}, fmt, 1, False, block)
        if args.stages and fmt == "bfloat16" and exact._numba is not None:
            tp["stages_ns_per_weight"] = decode_stages(base, ft, block_bytes=block or (1 << 62))
            print("  decode stages, ns / weight per CPU-s: " + ", ".join(
                f"{k} {v:.2f}" for k, v in tp["stages_ns_per_weight"].items()), flush=True)
        ft_files = [os.path.join(ft_dir, n) for n in sorted(os.listdir(ft_dir)) if n.endswith(".safetensors")]
        tp["raw_read"] = raw_read(ft_files[0], args.repeat) if len(ft_files) == 1 else {}
        torch.set_num_threads(os.cpu_count() or 1)
        if tp["raw_read"]:
            r = tp["raw_read"]
            print(f"  raw read of the full fine-tune (1 thread, page cache): {r['read_gbps']:.3f} GB/s wall, "
                  f"{r['read_cpu_gbps']:.3f} per CPU-s", flush=True)
        for path, t in ((k, v) for k, v in tp.items() if k not in ("raw_read", "stages_ns_per_weight")):
            print(f"  throughput ({path}, 1 thread): wall-clock encode {t['encode_gbps']:.3f} GB/s "
                  f"(range {t['encode_range'][0]:.3f}-{t['encode_range'][1]:.3f}), decode {t['decode_gbps']:.3f} GB/s "
                  f"(range {t['decode_range'][0]:.3f}-{t['decode_range'][1]:.3f}); per CPU-second of the thread: "
                  f"encode {t['encode_cpu_gbps']:.3f}, decode {t['decode_cpu_gbps']:.3f} GB/s", flush=True)
        out[fmt] = {"raw": raw, "stats": stats, "representations": reps, "throughput": tp}
    if not args.skip_lossy:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base_dir, ft_dir = smollm2_checkpoint("bfloat16"), smollm2_finetune()
        base, ft = load_state(base_dir), load_state(ft_dir)
        tok = AutoTokenizer.from_pretrained(ft_dir)
        model = AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32).eval()
        batches = token_batches(tok, heldout_text(), 256, 4, args.eval_batches, seed=1)
        ref_lp = reference_log_probs(model, ft, batches)
        base_kl = delta_kl(model, ft, base, batches, reference_lp=ref_lp)
        print(f"[lossy] base itself vs fine-tune: KL {base_kl['kl']:.3e} ppl {100 * base_kl['ppl_change']:+.2f}% "
              f"(fine-tune ppl {base_kl['ppl_reference']:.3f})", flush=True)
        out["lossy"] = {"base_vs_ft": base_kl, "tokens": base_kl["tokens"],
                        "rows": lossy_table(base, ft, model, batches, LOSSY, ref_lp)}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
