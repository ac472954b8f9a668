"""NF4 against bitsandbytes (where it installs) and a direct re-implementation of the codebook;
GPTQ / AWQ dequantisation against direct packing formulas."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tensorstore_llm.errors import FormatError, ShapeMismatch
from tensorstore_llm.lora.nf4 import (
    LUT_SIZE,
    NF4_CODE,
    dequantize_nf4,
    double_quantized_absmax,
    dynamic_map,
    from_bnb_state_dict,
    normal_map,
    quantization_error_ratio,
    quantize_blockwise_8bit,
    quantize_nf4,
    to_bnb_state_dict,
)
from tensorstore_llm.lora.packed import AWQ_ORDER, dequantize_awq, dequantize_gptq

try:
    import bitsandbytes.functional as bnbF
    BNB_REASON = None
except Exception as e:  # ImportError, or a broken native library
    bnbF, BNB_REASON = None, (f"bitsandbytes does not import here ({type(e).__name__}: {e}); NF4 checked against "
                              "the direct codebook only")

needs_bnb = pytest.mark.skipif(bnbF is None, reason=BNB_REASON or "")

SHAPES = [(128, 64), (37, 51), (300, 257)]          # whole blocks, odd element count, ragged last blocks


def sample(shape, dtype, seed=0):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)
    x.view(-1)[3] = 0
    x.view(-1)[-1] = x.abs().max() * 2                # a block whose absmax sits at its end
    return x


# ------------------------------------------------------------------ direct re-implementation

def test_codebook_is_the_normal_quantile_construction():
    torch.testing.assert_close(normal_map(), NF4_CODE, rtol=0, atol=1e-7)
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1


def direct_nf4(x, blocksize=64):
    """Nearest code (ties to the lower index) per element of x / absmax(block), elementwise loops."""
    flat = x.reshape(-1).float()
    idx, absmax = [], []
    for b0 in range(0, flat.numel(), blocksize):
        blk = flat[b0:b0 + blocksize]
        am = blk.abs().max()
        absmax.append(am)
        for v in torch.clamp(blk * (1.0 / am), -1, 1):
            d = (v - NF4_CODE).abs()
            idx.append(int(torch.nonzero(d == d.min())[0]))
    idx = torch.tensor(idx)
    scales = torch.repeat_interleave(torch.stack(absmax), blocksize)[:idx.numel()]
    deq = torch.stack([NF4_CODE[i] for i in idx]) * scales
    return idx, torch.stack(absmax), deq.reshape(x.shape)


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_quantize_matches_direct_nearest_code_formula(shape):
    x = sample(shape, torch.float32, seed=1)
    q = quantize_nf4(x, double_quant=False)
    idx, absmax, deq = direct_nf4(x)
    p = q.packed.reshape(-1)
    ours = torch.stack([p >> 4, p & 0xF], 1).reshape(-1)[:idx.numel()].long()
    assert torch.equal(ours, idx)
    assert torch.equal(q.absmax, absmax)
    assert torch.equal(dequantize_nf4(q), deq)


def test_double_quant_absmax_close_and_roundtrip_error_bounded():
    x = sample((300, 257), torch.float32, seed=2)
    single, double = quantize_nf4(x, double_quant=False), quantize_nf4(x)
    assert double.absmax.dtype == torch.uint8 and double.absmax2.numel() == -(-single.absmax.numel() // 256)
    # 8-bit code, worst case: half the widest gap, plus the CPU kernel's table step (2 / 65535)
    half_gap = float((dynamic_map()[1:] - dynamic_map()[:-1]).max()) / 2 + 2 / (LUT_SIZE - 1)
    err_absmax = (double.block_absmax() - single.absmax).abs()
    absmax2 = double.absmax2.repeat_interleave(256)[: err_absmax.numel()]
    assert bool((err_absmax <= half_gap * absmax2 * (1 + 1e-6)).all())
    err = (dequantize_nf4(double) - x).abs()
    # half the widest code gap
    bound = double.block_absmax().repeat_interleave(64)[: x.numel()].reshape(x.shape) * 0.17
    assert bool((err <= bound).all())


def test_quantization_error_ratio_reports_q_over_delta():
    w = sample((64, 64), torch.float32, seed=3)
    delta = torch.full((64, 64), 1e-4)
    q = w - dequantize_nf4(quantize_nf4(w))
    assert quantization_error_ratio(w, delta) == pytest.approx(float(q.norm() / delta.norm()), rel=1e-6)


# ------------------------------------------------------------------ bitsandbytes, bit for bit

@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_matches_bitsandbytes_bit_for_bit(shape, dtype):
    x = sample(shape, dtype, seed=4)
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    packed, state = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=False)
    q = quantize_nf4(x, double_quant=False)
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    ours = dequantize_nf4(q)
    assert ours.dtype == dtype and torch.equal(ours, bnbF.dequantize_4bit(packed, state))


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES + [(1024, 1000)])        # 16000 64-blocks: 63 blocks of 256 absmaxes
def test_double_quant_matches_bitsandbytes_bit_for_bit(shape, dtype):
    """Codes, offset, 8-bit absmax codes, second-level absmax and the dequantised weights all equal
    bitsandbytes' quantize_4bit(compress_statistics=True) / dequantize_4bit on CPU."""
    x = sample(shape, dtype, seed=5)
    packed, state = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4(x)
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map(signed=True))
    assert torch.equal(q.packed, packed) and torch.equal(q.offset, state.offset)
    assert torch.equal(q.absmax, state.absmax) and torch.equal(q.absmax2, state.state2.absmax)
    theirs = bnbF.dequantize_4bit(packed, state)
    assert torch.equal(dequantize_nf4(q), theirs.reshape(x.shape))
    assert torch.equal(double_quantized_absmax(quantize_nf4(x, double_quant=False).absmax), q.block_absmax())


def near_transitions():
    """fp32 values in [-1, 1] next to every place the 8-bit code changes: each midpoint between two
    dynamic-map codes and each lookup-table step of bitsandbytes' CPU kernel, a few ulps either side."""
    code = dynamic_map()
    mid = (code[:-1] + code[1:]) * 0.5
    k = torch.arange(1, LUT_SIZE, dtype=torch.float64)
    steps = ((k - 0.5) / (LUT_SIZE - 1) * 2 - 1).float()            # where (v + 1) / 2 * 65535 + 0.5 reaches k
    centres = torch.cat([mid, steps])
    out = [centres]
    for direction in (2.0, -2.0):
        v = centres
        for _ in range(3):
            v = torch.nextafter(v, torch.full_like(v, direction))
            out.append(v)
    return torch.cat(out).clamp(-1, 1)


@needs_bnb
def test_8bit_codes_match_bitsandbytes_next_to_every_code_change():
    v = near_transitions()
    per = 255                                                      # each block of 256: 255 values and 1.0
    v = torch.cat([v, torch.zeros((-v.numel()) % per)]).view(-1, per)
    x = torch.cat([v, torch.ones(v.shape[0], 1)], dim=1).reshape(-1)
    theirs, state = bnbF.quantize_blockwise(x, blocksize=256)
    ours, absmax = quantize_blockwise_8bit(x, 256)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(ours, theirs)
    nearest = torch.bucketize(x, (dynamic_map()[:-1] + dynamic_map()[1:]) / 2)
    assert (ours.long() != nearest).any()               # the table's rule is not nearest-code here


def direct_8bit(values, blocksize):
    """bitsandbytes' CPU 8-bit kernel, element by element in numpy float32 scalars: the table
    built by walking the midpoints, then u = (v * (1 / absmax) + 1) * 0.5 * 65535 + 0.5 truncated."""
    code = dynamic_map().numpy()
    mid = [np.float32(0.5) * (code[i] + code[i + 1]) for i in range(255)]
    lut, c = [], 0
    for i in range(LUT_SIZE):
        val = np.float32(-1.0) + np.float32(np.float32(2.0) * np.float32(i)) / np.float32(LUT_SIZE - 1)
        while c < 255 and mid[c] < val:
            c += 1
        lut.append(c)
    flat = values.numpy().astype(np.float32)
    out = []
    for b0 in range(0, flat.size, blocksize):
        blk = flat[b0:b0 + blocksize]
        am = np.float32(max(abs(float(v)) for v in blk))
        if am == 0:
            out += [0] * blk.size
            continue
        inv = np.float32(1.0) / am
        for v in blk:
            s = min(max(np.float32(v * inv), np.float32(-1.0)), np.float32(1.0))
            u = np.float32(np.float32(np.float32(s + np.float32(1.0)) * np.float32(0.5)) * np.float32(LUT_SIZE - 1))
            out.append(lut[int(np.float32(u + np.float32(0.5)))])
    return torch.tensor(out, dtype=torch.uint8)


def test_8bit_codes_match_a_direct_reimplementation_of_the_cpu_kernel():
    g = torch.Generator().manual_seed(9)
    v = near_transitions()
    pick = v[torch.randperm(v.numel(), generator=g)[:2000]]
    x = torch.cat([pick, torch.randn(997, generator=g) * 0.01, torch.zeros(256)])   # ragged end; an all-zero block
    x[1234] = 0.75
    ours, absmax = quantize_blockwise_8bit(x, 256)
    assert torch.equal(ours, direct_8bit(x, 256))
    assert absmax[-1] == 0 and bool((ours[-(x.numel() % 256 or 256):] == 0).all())


@needs_bnb
def test_reads_bitsandbytes_serialised_state():
    x = sample((96, 64), torch.bfloat16, seed=6)
    packed, state = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    tensors = {"layer.weight": packed, **{f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    t = from_bnb_state_dict(tensors, "layer.weight")
    assert t.shape == (96, 64) and t.dtype == torch.bfloat16
    assert torch.equal(dequantize_nf4(t), bnbF.dequantize_4bit(packed, state))
    del tensors["layer.weight.nested_absmax"]
    with pytest.raises(FormatError, match="nested_absmax"):
        from_bnb_state_dict(tensors, "layer.weight")


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bnb_state_dict_equals_bitsandbytes_serialisation(dtype):
    """Tensor for tensor, dtype, key order and JSON bytes: what Linear4bit's state dict saves."""
    x = sample((96, 192), dtype, seed=8)
    packed, state = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = {"w": packed, **{f"w.{k}": v for k, v in state.as_dict(packed=True).items()}}
    ours = to_bnb_state_dict(quantize_nf4(x), "w")
    assert list(ours) == list(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k
    assert torch.equal(dequantize_nf4(from_bnb_state_dict(ours, "w")), bnbF.dequantize_4bit(packed, state))


def test_reads_serialised_state_without_bitsandbytes():
    x = sample((64, 64), torch.float32, seed=7)
    q = quantize_nf4(x)
    meta = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 64], "nested_blocksize": 256,
            "nested_dtype": "float32", "nested_offset": q.offset.item()}
    tensors = {"w": q.packed, "w.absmax": q.absmax, "w.quant_map": NF4_CODE, "w.nested_absmax": q.absmax2,
               "w.nested_quant_map": q.code2,
               "w.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}
    assert torch.equal(dequantize_nf4(from_bnb_state_dict(tensors, "w")), dequantize_nf4(q))
    with pytest.raises(FormatError, match="not a bitsandbytes NF4"):
        from_bnb_state_dict({"v": q.packed}, "v")


# ------------------------------------------------------------------ GPTQ / AWQ

def pack_rows(vals, bits):
    """Direct GPTQ packing along rows: word r holds rows r*per .. r*per+per-1 at shifts 0, bits, ..."""
    per = 32 // bits
    out = torch.zeros(vals.shape[0] // per, vals.shape[1], dtype=torch.int64)
    for r in range(out.shape[0]):
        for k in range(per):
            out[r] |= vals[r * per + k].long() << (bits * k)
    return (out - ((out >> 31) << 32)).to(torch.int32)           # reinterpret as signed int32


def pack_cols(vals, bits, order=None):
    per = 32 // bits
    order = order or tuple(range(per))
    out = torch.zeros(vals.shape[0], vals.shape[1] // per, dtype=torch.int64)
    for j in range(out.shape[1]):
        for k in range(per):
            out[:, j] |= vals[:, j * per + order[k]].long() << (bits * k)
    return (out - ((out >> 31) << 32)).to(torch.int32)


@pytest.mark.parametrize("bits", [4, 8, 2])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_dequantize_matches_direct_formula(bits, act_order):
    gen = torch.Generator().manual_seed(bits)
    n_in, n_out, gs = 64, 48, 16
    q = torch.randint(0, 2 ** bits, (n_in, n_out), generator=gen)
    z = torch.randint(1, 2 ** bits, (n_in // gs, n_out), generator=gen)
    scales = (torch.rand(n_in // gs, n_out, generator=gen) * 0.01).half()
    g_idx = torch.randperm(n_in, generator=gen) // gs if act_order else torch.arange(n_in) // gs
    W = dequantize_gptq(pack_rows(q, bits), pack_cols(z - 1, bits), scales, bits=bits, group_size=gs,
                        g_idx=g_idx if act_order else None)
    want = torch.empty(n_out, n_in)
    for i in range(n_in):
        want[:, i] = scales[g_idx[i]].float() * (q[i] - z[g_idx[i]]).float()
    assert torch.equal(W, want)
    v2 = dequantize_gptq(pack_rows(q, bits), pack_cols(z, bits), scales, bits=bits, group_size=gs,
                         g_idx=g_idx if act_order else None, zero_offset=0)
    assert torch.equal(v2, want)


@pytest.mark.parametrize("bits", [4, 8])
def test_awq_dequantize_matches_direct_formula(bits):
    gen = torch.Generator().manual_seed(10 + bits)
    n_in, n_out, gs = 64, 32, 32
    q = torch.randint(0, 2 ** bits, (n_in, n_out), generator=gen)
    z = torch.randint(0, 2 ** bits, (n_in // gs, n_out), generator=gen)
    scales = (torch.rand(n_in // gs, n_out, generator=gen) * 0.01).half()
    order = AWQ_ORDER if bits == 4 else None
    W = dequantize_awq(pack_cols(q, bits, order), pack_cols(z, bits, order), scales, bits=bits, group_size=gs,
                       dtype=torch.float16)
    want = torch.empty(n_out, n_in, dtype=torch.float16)
    for i in range(n_in):
        want[:, i] = (q[i] - z[i // gs]).half() * scales[i // gs]          # AutoAWQ's fp16 arithmetic
    assert torch.equal(W, want)


def test_packed_shape_errors_name_the_layer():
    q = torch.zeros(8, 16, dtype=torch.int32)
    with pytest.raises(ShapeMismatch, match=r"layers\.0\.q_proj"):
        dequantize_awq(q, torch.zeros(1, 16, dtype=torch.int32), torch.zeros(3, 128), name="layers.0.q_proj")
    with pytest.raises(FormatError, match="3-bit"):
        dequantize_gptq(q, q, torch.zeros(1, 16), bits=3, name="x")
