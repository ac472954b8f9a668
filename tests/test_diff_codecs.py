"""Delta codecs (issue 11): exact round trips bit for bit, lossy kernels against direct formulas,
DARE determinism across row blocks, reported errors against NumPy, delta_kl against a direct KL."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from tensorstore_llm.diff import exact
from tensorstore_llm.diff.codecs import codec_from_dict, get_codec, list_codecs, unpack_parts
from tensorstore_llm.diff.lossy import low_rank, randomized_svd
from tensorstore_llm.diff.quality import codec_report, delta_kl, reference_log_probs
from tensorstore_llm.errors import CodecError

DTYPES = [(torch.bfloat16, torch.int16, "bfloat16"), (torch.float16, torch.int16, "float16"),
          (torch.float32, torch.int32, "float32")]
PATHS = [True, False] if exact._numba is not None else [False]


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _roundtrip(base, target, fmt):
    """Encode with each kernel path: identical bytes, and every decoder gives the target's bits."""
    blobs = [exact.encode_delta(base, target, fmt, use_numba=p) for p in PATHS]
    assert all(b == blobs[0] for b in blobs)
    for p in PATHS:
        out = exact.decode_delta(base, blobs[0], use_numba=p)
        assert out.dtype == target.dtype and out.shape == target.shape
        assert torch.equal(_bits(out), _bits(target))
    return blobs[0]


def _fine_tune_like(shape, dtype, seed, step=1e-4):
    gen = torch.Generator().manual_seed(seed)
    base = (0.05 * torch.randn(shape, generator=gen)).to(dtype)
    target = (base.float() + step * torch.randn(shape, generator=gen)).to(dtype)
    return base, target


@pytest.mark.parametrize("dtype,_int,fmt", DTYPES)
def test_exact_roundtrip_fine_tune_like(dtype, _int, fmt):
    base, target = _fine_tune_like((300, 70), dtype, seed=1)
    data = _roundtrip(base, target, fmt)
    assert len(data) < base.numel() * base.element_size()


def _adversarial_words(bits, n, seed):
    """Every special class of bit pattern, in random mixtures, for base and target independently."""
    rng = np.random.default_rng(seed)
    word = np.uint16 if bits == 16 else np.uint32
    if bits == 16:   # values that are special for bf16 and fp16 alike
        specials = [0x0000, 0x8000, 0x0001, 0x8001, 0x007F, 0x03FF, 0x7F80, 0xFF80, 0x7C00, 0xFC00,
                    0x7FC0, 0xFFC1, 0x7E00, 0x7F81, 0x7FFF, 0xFFFF, 0x7F7F, 0xFF7F, 0x7BFF, 0x0400]
    else:
        specials = [0, 0x80000000, 1, 0x80000001, 0x007FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000,
                    0xFFC00001, 0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x00800000]
    specials = np.array(specials, dtype=word)
    random_words = rng.integers(0, 1 << bits, n, dtype=np.uint64).astype(word)
    pick = rng.integers(0, 3, n)
    out = np.where(pick == 0, specials[rng.integers(0, specials.size, n)], random_words)
    return out


@pytest.mark.parametrize("dtype,int_dtype,fmt", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_exact_adversarial_patterns(dtype, int_dtype, fmt, path):
    bits = 16 if dtype != torch.float32 else 32
    n = 5000
    b = _adversarial_words(bits, n, seed=2)
    t = _adversarial_words(bits, n, seed=3)
    t[: n // 2] = b[: n // 2]                          # half identical, half unrelated (huge deltas)
    t[n // 2: n // 2 + 50] = b[n // 2: n // 2 + 50] ^ (1 << (bits - 1))   # sign flips: 0 <-> -0, NaN <-> -NaN
    signed = np.int16 if bits == 16 else np.int32
    base = torch.from_numpy(b.view(signed)).view(dtype).reshape(50, 100)
    target = torch.from_numpy(t.view(signed)).view(dtype).reshape(50, 100)
    data = exact.encode_delta(base, target, fmt, use_numba=path)
    out = exact.decode_delta(base, data, use_numba=path)
    assert torch.equal(_bits(out), _bits(target))
    assert np.array_equal(exact.decode_delta(b, data, use_numba=path), t)   # NumPy words in, words out


def test_exact_every_bf16_pattern_against_every_distance():
    """All 65,536 bf16 patterns as base, targets at wrapped ULP distances up to +-2^15."""
    base = np.arange(1 << 16, dtype=np.uint16)
    for shift in (1, 2, 7, 255, 256, 4095, 32767, 32768):
        m = exact._mono(base, 16).astype(np.int64)
        target = exact._unmono(((m + shift) & 0xFFFF).astype(np.uint16), 16)
        for p in PATHS:
            data = exact.encode_delta(base, target, "bfloat16", use_numba=p)
            assert np.array_equal(exact.decode_delta(base, data, use_numba=p), target)


@pytest.mark.parametrize("dtype,_int,fmt", DTYPES)
def test_exact_identical_costs_header_only(dtype, _int, fmt):
    base, _ = _fine_tune_like((256, 64), dtype, seed=4)
    data = _roundtrip(base, base.clone(), fmt)
    assert len(data) == exact.header_size()


def test_exact_identical_rows_cost_almost_nothing():
    base, target = _fine_tune_like((512, 128), torch.bfloat16, seed=5)
    mixed = target.clone()
    mixed[256:] = base[256:]                           # half the rows unchanged
    full, half = _roundtrip(base, target, "bfloat16"), _roundtrip(base, mixed, "bfloat16")
    assert len(half) < 0.56 * len(full)


def test_exact_errors():
    base, target = _fine_tune_like((16, 16), torch.bfloat16, seed=6)
    data = exact.encode_delta(base, target)
    with pytest.raises(CodecError):
        exact.decode_delta(base[:8], data)              # wrong base size
    with pytest.raises(CodecError):
        exact.decode_delta(base, data[:-3])             # truncated
    with pytest.raises(CodecError):
        exact.decode_delta(base, b"XXXX" + data[4:])    # not an exact delta
    with pytest.raises(CodecError):
        exact.encode_delta(base, target[:8])            # shapes differ
    with pytest.raises(CodecError):
        exact.encode_delta(base, target, "float32")     # wrong format for the dtype
    corrupt = bytearray(data)
    corrupt[exact.header_size() + 6] ^= 0xFF           # the code table section
    with pytest.raises(CodecError):
        exact.decode_delta(base, bytes(corrupt))
    with pytest.raises(CodecError):
        exact.encode_delta(base, target, version=3)     # no such format


@pytest.mark.parametrize("path", PATHS)
def test_exact_v1_more_escapes_than_the_header_says_is_an_error(path):
    import zstandard

    from tensorstore_llm.diff import exact_v1

    base, target = _fine_tune_like((64, 64), torch.bfloat16, seed=6)
    fields = list(exact_v1.HEADER.unpack_from(exact.encode_delta(base, target, version=1)))
    b, t = exact._words(base, "bfloat16", "b"), exact._words(target, "bfloat16", "t")
    sym, _, esc = exact_v1._encode_np(b, t, 16, 7, 0xFF, 0)
    sym = sym.copy()
    sym[np.flatnonzero(sym != exact.ESCAPE)[:5]] = exact.ESCAPE   # five escapes more than the stream holds
    blobs = [zstandard.ZstdCompressor().compress(sym.tobytes()), b"",
             zstandard.ZstdCompressor().compress(esc.tobytes()) if esc.size else b""]
    fields[-3:] = [len(x) for x in blobs]
    with pytest.raises(CodecError):
        exact.decode_delta(base, exact_v1.HEADER.pack(*fields) + b"".join(blobs), use_numba=path)


def _tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is 10-20x faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_TINY = {}


def _tiny_fine_tune():
    """(model, base bf16 state, fine-tune bf16 state): 3 real AdamW steps on random token data."""
    from tensorstore_llm.testing.finetune import finetune

    if not _TINY:
        model = _tiny_model()
        base = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.named_parameters()}
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randint(0, 96, (4, 24), generator=gen) for _ in range(3)]
        finetune(model, batches, lr=1e-3)
        _TINY["ft"] = (model, base, {k: v.detach().to(torch.bfloat16).clone() for k, v in model.named_parameters()})
    model, base, ft = _TINY["ft"]
    return model, dict(base), dict(ft)


def test_exact_real_tiny_fine_tune_roundtrip():
    _, base, ft = _tiny_fine_tune()
    changed = sum(int((_bits(base[k]) != _bits(ft[k])).sum()) for k in ft) / sum(v.numel() for v in ft.values())
    assert changed > 0.3
    report = codec_report(get_codec("exact"), base, ft, keep_reconstruction=True)
    for k in ft:
        assert torch.equal(_bits(report["reconstruction"][k]), _bits(ft[k]))
    assert report["delta_rel"] == 0.0 and report["ratio"] > 1.5


def test_exact_real_smollm2_fine_tune_if_cached():
    """The real SmolLM2 fine-tune (benchmark pair), when this machine already built it."""
    from tensorstore_llm.testing.real_models import cache_root

    ft_dir = os.path.join(cache_root(), "smollm2-135m-instruct-ft30-lr0.0001-bfloat16")
    base_dir = os.path.join(cache_root(), "smollm2-135m-instruct-bfloat16")
    if not (os.path.isdir(ft_dir) and os.path.isdir(base_dir)):
        pytest.skip("SmolLM2 fine-tune not cached (tests/benchmarks/bench_diff_codecs.py builds it)")
    from safetensors import safe_open

    names = ["model.layers.3.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]
    with safe_open(os.path.join(base_dir, "model.safetensors"), "pt") as fb, \
            safe_open(os.path.join(ft_dir, "model.safetensors"), "pt") as ff:
        for name in names:
            b, t = fb.get_tensor(name), ff.get_tensor(name)
            data = _roundtrip(b, t, "bfloat16")
            if b.dim() == 2:
                assert len(data) * 4 < b.numel() * 2


def test_svd_error_matches_eckart_young():
    gen = torch.Generator().manual_seed(7)
    m, n, r = 120, 90, 10
    u = torch.linalg.qr(torch.randn(m, n, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=gen)).Q
    s = 0.7 ** torch.arange(n, dtype=torch.float32)              # known spectrum
    a = (u * s) @ v.T
    tail = float(torch.sqrt((s[r:].double() ** 2).sum()))
    uu, ss, vh = randomized_svd(a, r, power_iters=2, seed=0)
    err = float(torch.linalg.norm((a - (uu * ss) @ vh).double()))
    assert err == pytest.approx(tail, rel=1e-3)
    assert torch.allclose(ss, s[:r], rtol=1e-4)
    # bf16 factors: within bf16 rounding of the bound, never below it
    stored = low_rank(a, rank=r)
    err_stored = float(torch.linalg.norm((a - stored.approx).double()))
    assert tail * (1 - 1e-6) <= err_stored <= tail * 1.05
    # energy target: the smallest rank whose singular values hold the share
    share = 0.999
    want = int(np.searchsorted(np.cumsum(s.double().numpy() ** 2) / float((s.double() ** 2).sum()), share) + 1)
    assert low_rank(a, energy=share).info["rank"] == want


def test_bitdelta_scale_is_mean_abs_delta():
    base, target = _fine_tune_like((40, 30), torch.bfloat16, seed=8, step=3e-3)
    delta = (target.double() - base.double()).numpy()
    for per_row in (False, True):
        codec = get_codec("bitdelta", per_row=per_row)
        _, parts = unpack_parts(codec.encode(base, target, tensor="w"))
        scale = torch.from_numpy(parts["scale"].copy()).view(torch.bfloat16).double().numpy()
        want = np.abs(delta).mean(axis=1) if per_row else np.array([np.abs(delta).mean()])
        assert np.allclose(scale, want, rtol=2 ** -8)            # bf16-rounded mean |delta|
        signs = np.unpackbits(parts["signs"])[:delta.size].reshape(delta.shape)
        assert np.array_equal(signs.astype(bool), delta >= 0)
    # the mean |delta| scale is the L2 optimum: any other scale is worse
    flat = np.abs(delta).ravel()
    best = flat.mean()
    assert all(((flat - best) ** 2).sum() < ((flat - c) ** 2).sum() for c in (0.9 * best, 1.1 * best))


def test_dare_same_mask_under_any_row_blocking():
    base, target = _fine_tune_like((2000, 300), torch.bfloat16, seed=9, step=1e-2)  # > one RNG row group
    codec = get_codec("dare", keep=0.3, seed=11)
    whole = codec.decode(base, codec.encode(base, target, tensor="w"), tensor="w")
    for split in (1, 777, 1747):
        parts = []
        for start, stop in ((0, split), (split, 2000)):
            blob = codec.encode(base[start:stop], target[start:stop], tensor="w", start=start)
            parts.append(codec.decode(base[start:stop], blob, tensor="w", start=start))
        assert torch.equal(_bits(torch.cat(parts)), _bits(whole))
    # rescale: kept entries are delta / keep (in bf16), dropped ones are the base
    delta = target.float() - base.float()
    approx = codec.approximate(delta, "w", 0).approx
    kept = approx != 0
    assert 0.28 < float(kept.float().mean()) < 0.32
    assert torch.equal(approx[kept], (delta[kept] / 0.3).to(torch.bfloat16).float())
    other = get_codec("dare", keep=0.3, seed=12).approximate(delta, "w", 0).approx
    assert not torch.equal(other != 0, kept)


def test_top_k_keeps_largest():
    base, target = _fine_tune_like((64, 50), torch.bfloat16, seed=10, step=1e-2)
    delta = (target.float() - base.float())
    approx = get_codec("top-k", density=0.1).approximate(delta).approx
    kept = approx != 0
    assert int(kept.sum()) == 320
    assert float(delta.abs()[kept].min()) >= float(delta.abs()[~kept].max())


def _numpy_errors(codec, base, target):
    """Independent error computation: decode, then NumPy fp64 norms."""
    err2 = delta2 = weight2 = 0.0
    for name in base:
        r = codec.decode(base[name], codec.encode(base[name], target[name], tensor=name), tensor=name)
        r64, t64, b64 = (x.float().numpy().astype(np.float64) for x in (r, target[name], base[name]))
        err2 += np.sum((r64 - t64) ** 2)
        delta2 += np.sum((t64 - b64) ** 2)
        weight2 += np.sum(t64 ** 2)
    return math.sqrt(err2 / delta2), math.sqrt(err2 / weight2)


@pytest.mark.parametrize("spec", [("bf16", {}), ("low-rank", {"rank": 4}), ("low-rank", {"energy": 0.8}),
                                  ("top-k", {"density": 0.2}), ("dare", {"keep": 0.5, "seed": 3}),
                                  ("bitdelta", {}), ("bitdelta", {"per_row": True}),
                                  ("mixed-svd", {"groups": ((2, 8), (6, 3), (8, 2))})])
def test_reported_errors_equal_numpy(spec):
    name, params = spec
    codec = get_codec(name, **params)
    assert codec_from_dict(codec.to_dict()) == codec
    _, base, ft = _tiny_fine_tune()
    report = codec_report(codec, base, ft)
    delta_rel, weight_rel = _numpy_errors(codec, base, ft)
    assert report["delta_rel"] == pytest.approx(delta_rel, rel=1e-9)
    assert report["weight_rel"] == pytest.approx(weight_rel, rel=1e-9)
    assert report["bytes"] == sum(v["bytes"] for v in report["tensors"].values())
    for k, v in ft.items():   # 1-D tensors (norms) stay exact
        if v.dim() == 1:
            assert report["tensors"][k]["delta_rel"] == 0.0
    # the decoder's reconstruction is the kernel's approximation, rounded to the dtype
    w = "model.layers.0.mlp.up_proj.weight"
    a = codec.approximate(ft[w].float() - base[w].float(), w, 0).approx
    decoded = codec.decode(base[w], codec.encode(base[w], ft[w], tensor=w), tensor=w)
    assert torch.equal(_bits(decoded), _bits((base[w].float() + a).to(torch.bfloat16)))


def test_mixed_svd_more_bits_less_error():
    base, target = _fine_tune_like((64, 48), torch.bfloat16, seed=13, step=1e-2)
    delta = target.float() - base.float()
    errs = [float((get_codec("mixed-svd", groups=((16, b),)).approximate(delta).approx - delta).norm())
            for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]
    exact_rank16 = low_rank(delta, rank=16, power_iters=4).approx
    assert errs[2] == pytest.approx(float((exact_rank16 - delta).norm()), rel=0.02)


def test_codec_registry_errors():
    assert {"exact", "bf16", "low-rank", "top-k", "dare", "bitdelta", "mixed-svd"} <= set(list_codecs())
    with pytest.raises(CodecError):
        get_codec("nope")
    with pytest.raises(CodecError):
        get_codec("low-rank")                           # neither rank nor energy
    with pytest.raises(CodecError):
        get_codec("bitdelta", bogus=1)
    with pytest.raises(CodecError):
        get_codec("mixed-svd", groups=((4, 1),))


def test_delta_kl_matches_direct_computation():
    model, base, ft = _tiny_fine_tune()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 96, (3, 20), generator=gen) for _ in range(2)]
    candidate = get_codec("bitdelta")
    recon = codec_report(candidate, base, ft, keep_reconstruction=True)["reconstruction"]
    got = delta_kl(model, ft, recon, batches)
    # direct: two separate fp32 models, torch.nn.functional.kl_div over every position
    ref_model, cand_model = _tiny_model(), _tiny_model()
    ref_model.load_state_dict({k: v.float() for k, v in ft.items()}, strict=False)
    cand_model.load_state_dict({k: v.float() for k, v in recon.items()}, strict=False)
    total, count, nll_p, nll_q = 0.0, 0, 0.0, 0.0
    with torch.no_grad():
        for ids in batches:
            lp = torch.log_softmax(ref_model(input_ids=ids).logits[:, :-1].double(), -1)
            lq = torch.log_softmax(cand_model(input_ids=ids).logits[:, :-1].double(), -1)
            total += float(torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="sum"))
            count += lp.shape[0] * lp.shape[1]
            nll_p -= float(lp.gather(-1, ids[:, 1:, None]).sum())
            nll_q -= float(lq.gather(-1, ids[:, 1:, None]).sum())
    assert got["tokens"] == count
    assert got["kl"] == pytest.approx(total / count, rel=1e-4, abs=1e-9)
    assert got["kl"] > 0
    assert got["ppl_candidate"] == pytest.approx(math.exp(nll_q / count), rel=1e-5)
    assert got["ppl_reference"] == pytest.approx(math.exp(nll_p / count), rel=1e-5)
    assert delta_kl(model, ft, ft, batches)["kl"] == 0.0
    reused = delta_kl(model, ft, recon, batches, reference_lp=reference_log_probs(model, ft, batches))
    assert reused == got


# -- lossy codecs as streamed engine ops -------------------------------------------------------------

OP_SPECS = [("bf16", {}), ("low-rank", {"rank": 6}), ("low-rank", {"energy": 0.5}), ("top-k", {"density": 0.2}),
            ("dare", {"keep": 0.3}), ("bitdelta", {"per_row": True}), ("mixed-svd", {"groups": [[2, 8], [8, 3]]})]


@pytest.fixture(scope="module")
def op_pair(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("deltaops")
    gen = torch.Generator().manual_seed(3)
    shapes = {"model.embed_tokens.weight": (200, 40), "model.layers.0.mlp.up_proj.weight": (96, 40),
              "model.layers.0.input_layernorm.weight": (40,)}
    base = {k: torch.randn(s, generator=gen).bfloat16() for k, s in shapes.items()}
    ft = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).bfloat16() for k, v in base.items()}
    save_file(base, str(root / "base.safetensors"))
    save_file(ft, str(root / "ft.safetensors"))
    return str(root / "base.safetensors"), str(root / "ft.safetensors"), base, ft


def _run_op(op_pair, codec, params, tmp_path, max_memory, seed=7):
    from tensorstore_llm.diff.quality import plan_lossy
    from tensorstore_llm.engine.executor import Executor
    from tensorstore_llm.io.hf_dir import HFCheckpointSink, HFCheckpointSource

    base_src, ft_src = HFCheckpointSource(op_pair[0]), HFCheckpointSource(op_pair[1])
    out = str(tmp_path / f"{codec}-{max_memory}")
    sink = HFCheckpointSink(out, job_key=f"{codec}-{max_memory}")
    Executor(plan_lossy(base_src, ft_src, codec, params), sink, device="cpu", max_memory=max_memory, seed=seed).run()
    sink.commit()
    return out, HFCheckpointSource(out)


@pytest.mark.parametrize("codec,params", OP_SPECS, ids=[f"{c}-{p}" for c, p in OP_SPECS])
def test_lossy_ops_reconstruct_what_the_codec_decodes(op_pair, codec, params, tmp_path):
    """The streamed op writes exactly the codec's decode(encode(...)), under any blocking."""
    _, _, base, ft = op_pair
    extra = {"seed": 7} if codec == "dare" else {}
    coder = get_codec(codec, **params, **extra)
    _, big = _run_op(op_pair, codec, params, tmp_path, "64M")
    whole = codec in ("low-rank", "top-k", "mixed-svd")                 # declared whole-tensor ops
    _, small = _run_op(op_pair, codec, params, tmp_path, "1M" if whole else "48K")   # row-wise: several blocks
    for name in base:
        want = coder.decode(base[name], coder.encode(base[name], ft[name], tensor=name), tensor=name)
        for src in (big, small):
            got = src.read(name)
            assert got.dtype == torch.bfloat16
            assert torch.equal(_bits(got), _bits(want)), (codec, name)
        if base[name].dim() < 2:
            assert torch.equal(_bits(big.read(name)), _bits(ft[name]))              # norms stay exact


def test_bitdelta_op_streams_the_per_matrix_scale(op_pair, tmp_path):
    _, _, base, ft = op_pair
    _, big = _run_op(op_pair, "bitdelta", {}, tmp_path, "64M")
    _, small = _run_op(op_pair, "bitdelta", {}, tmp_path, "48K")
    for name in (n for n in base if base[n].dim() == 2):
        delta = ft[name].double() - base[name].double()
        scale = torch.tensor(float(delta.abs().mean())).float().bfloat16().float()   # mean |Δ|, stored in bf16
        want = (base[name].float() + torch.where(delta >= 0, scale, -scale)).bfloat16()
        assert torch.equal(_bits(big.read(name)), _bits(want))
        assert torch.equal(_bits(small.read(name)), _bits(want))


def test_reconstruction_error_equals_direct_formula(op_pair, tmp_path):
    from tensorstore_llm.diff.quality import reconstruction_error
    from tensorstore_llm.io.hf_dir import HFCheckpointSource

    _, _, base, ft = op_pair
    _, recon = _run_op(op_pair, "low-rank", {"rank": 4}, tmp_path, "64M")
    report = reconstruction_error(HFCheckpointSource(op_pair[0]), HFCheckpointSource(op_pair[1]), recon, max_memory="48K")
    err2 = delta2 = weight2 = 0.0
    for name in base:
        r, t, b = recon.read(name).double(), ft[name].double(), base[name].double()
        e, d, w = float((r - t).pow(2).sum()), float((t - b).pow(2).sum()), float(t.pow(2).sum())
        row = report["tensors"][name]
        assert row["err2"] == pytest.approx(e, rel=1e-12) and row["delta2"] == pytest.approx(d, rel=1e-12)
        assert row["weight_rel"] == pytest.approx(math.sqrt(e / w), rel=1e-12)
        err2, delta2, weight2 = err2 + e, delta2 + d, weight2 + w
    assert report["delta_rel"] == pytest.approx(math.sqrt(err2 / delta2), rel=1e-12)
    assert report["weight_rel"] == pytest.approx(math.sqrt(err2 / weight2), rel=1e-12)
    assert report["tensors"]["model.layers.0.input_layernorm.weight"]["err2"] == 0.0


def test_lossy_op_params_are_checked_when_the_plan_is_built(op_pair):
    from tensorstore_llm.diff.quality import plan_lossy
    from tensorstore_llm.errors import RecipeError
    from tensorstore_llm.io.hf_dir import HFCheckpointSource

    base_src, ft_src = HFCheckpointSource(op_pair[0]), HFCheckpointSource(op_pair[1])
    for codec, params in (("low-rank", {}), ("top-k", {"density": 1.5}), ("dare", {"keep": 0}),
                          ("mixed-svd", {"groups": [[2, 9]]}), ("low-rank", {"rank": 4, "bogus": 1})):
        with pytest.raises(RecipeError):
            plan_lossy(base_src, ft_src, codec, params)
    with pytest.raises(CodecError, match="lossy codecs"):
        plan_lossy(base_src, ft_src, "exact")
