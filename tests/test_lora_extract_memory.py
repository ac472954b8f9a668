"""The memory-lean lora_extract op gives bit-for-bit the factors of the plain formula.

The op gets its inputs in their stored dtype, forms the fp32 delta itself (by slabs for the
default Gram route, see test_lora_extract_gram.py; whole for ``method="randomized"``) and sums
||delta||^2 in fp64 slices; the reference here is ``extract_lora`` on ``ft.float() - base.float()``
with the same method and seeded projection.
"""
from types import SimpleNamespace

import pytest
import torch

from tensorstore_llm.lora.streamed import held_dtype
from tensorstore_llm.ops.lora import extract_lora
from tensorstore_llm.ops.lora_extract import delta_slab, fp64_squared_norm
from tensorstore_llm.ops.lora_streamed import (
    LoraExtractParams,
    factor_names,
    lora_extract_op,
)
from tensorstore_llm.seeding import seed_for


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_randomized_extract_op_matches_plain_formula_bitwise(dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(96, 80, generator=g).to(dtype)
    ft = (base.float() + 0.05 * torch.randn(96, 80, generator=g)).to(dtype)
    base_before, ft_before = base.clone(), ft.clone()
    params = LoraExtractParams(rank=8, module="layers.0.q_proj", method="randomized")
    out = lora_extract_op(SimpleNamespace(seed=11), params, base, ft)
    ref = extract_lora(ft.float() - base.float(), rank=8, method="randomized", power_iters=3, oversample=10,
                       generator=seed_for(11, "lora_extract", params.module))
    a, b, rec = factor_names(params.module)
    assert torch.equal(out[a], ref.A) and torch.equal(out[b], ref.B)
    energy = float(torch.tensor(ref.delta_energy, dtype=torch.float32))
    assert out[rec].dtype == torch.float32 and float(out[rec][0]) == energy
    assert torch.equal(base, base_before) and torch.equal(ft, ft_before)    # inputs never written to


def test_delta_slab_is_a_fresh_fp32_slice_of_the_formula():
    base, ft = torch.randn(7, 5), torch.randn(7, 5)
    whole = delta_slab(ft, base, 0, 5, True)
    assert torch.equal(whole, ft - base) and whole.data_ptr() != ft.data_ptr()
    assert torch.equal(delta_slab(ft, base, 1, 4, True), (ft - base)[:, 1:4])
    assert torch.equal(delta_slab(ft, base, 2, 6, False), (ft - base)[2:6])
    own = delta_slab(ft, None, 0, 3, False)
    assert torch.equal(own, ft[:3]) and own.data_ptr() != ft.data_ptr()
    half = delta_slab(ft.bfloat16(), base.bfloat16(), 1, 3, True)
    assert half.dtype == torch.float32 and half.is_contiguous()
    assert torch.equal(half, (ft.bfloat16().float() - base.bfloat16().float())[:, 1:3])


def test_squared_norm_in_pieces_matches_fp64_sum():
    x = torch.randn(301, 257)
    assert fp64_squared_norm(x, chunk=1000) == pytest.approx(float(x.double().square().sum()), rel=1e-13)
    assert fp64_squared_norm(x[:, 3:50]) == pytest.approx(float(x[:, 3:50].double().square().sum()), rel=1e-13)
    assert fp64_squared_norm(torch.zeros(3, 4)) == 0.0


def test_held_dtype_keeps_only_exact_shared_dtypes():
    assert held_dtype("bfloat16", "bfloat16") == "bfloat16"
    assert held_dtype("float32", "float32") == "float32"
    assert held_dtype("bfloat16", "float32") == "float32"          # mixed: the engine casts both
    assert held_dtype("int8", "int8") == "float32"
    assert held_dtype("bfloat16", "bfloat16", compute_dtype="float64") == "float32"


def test_combine_factors_op_matches_plain_formula_bitwise():
    from tensorstore_llm.ops.lora_streamed import (
        LoraCombineParams,
        combine_deltas,
        lora_combine_factors_op,
    )

    g = torch.Generator().manual_seed(5)
    factors = [torch.randn(6, 40, generator=g), torch.randn(56, 6, generator=g),
               torch.randn(4, 40, generator=g), torch.randn(56, 4, generator=g)]
    params = LoraCombineParams(weights=(0.7, 0.3), scalings=(2.0, 1.0), rank=5, module="layers.1.v_proj")
    ctx = SimpleNamespace(seed=4)
    out = lora_combine_factors_op(ctx, params, factors)
    ref = extract_lora(combine_deltas(ctx, params, factors), rank=5, method="randomized",
                       generator=seed_for(4, "lora_combine", params.module))
    a, b, rec = factor_names(params.module)
    assert torch.equal(out[a], ref.A) and torch.equal(out[b], ref.B)
    assert float(out[rec][0]) == float(torch.tensor(ref.delta_energy, dtype=torch.float32))
