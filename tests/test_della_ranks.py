"""DELLA's per-row magnitude ranks (ops/sparsify.py ``_row_ranks``, issue 14's DELLA speed-up):
equal to the definition, a stable argsort of a stable argsort, on real-looking bf16 task vectors
with many tied magnitudes, zeros of both signs, one-column rows and wide rows."""
import pytest
import torch

from tensorstore_llm.ops.sparsify import _row_ranks


def _reference(magnitude):
    return magnitude.argsort(dim=1, stable=True).argsort(dim=1, stable=True).to(torch.float32)


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 2), (64, 2048), (7, 5632), (2, 70000)])
def test_row_ranks_equal_double_stable_argsort(rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    base = (torch.randn(rows, cols, generator=g) * 0.02).bfloat16()
    tuned = (base.float() + torch.randn(rows, cols, generator=g) * 0.002).bfloat16()
    delta = tuned.float() - base.float()                    # few distinct magnitudes: many ties
    delta[:, ::7] = 0.0
    delta[:, 3::11] = -0.0
    magnitude = delta.abs()
    assert torch.equal(_row_ranks(magnitude), _reference(magnitude))


def test_row_ranks_of_lower_precision_and_fp64_inputs():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(16, 300, generator=g).abs()
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        magnitude = values.to(dtype)
        assert torch.equal(_row_ranks(magnitude), _reference(magnitude)), dtype
