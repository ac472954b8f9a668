"""NuSLERP per row (``nuslerp_flatten: false``) streamed by row blocks (ops ``nuslerp_rows`` /
``nuslerp_rows_delta``): a float64 golden formula through the op conformance base, and the same
bytes as the whole-tensor replay it replaced (mergekit's operations on the whole tensor), at a
budget that splits every tensor into many row blocks, in fp32 and with ``--arithmetic mergekit``
in bf16.
"""

import pytest
import torch

from tensorstore_llm import api
from tensorstore_llm.ops.replay import NuSlerpWholeParams, _mergekit_nuslerp_pair
from tensorstore_llm.store import Store
from tensorstore_llm.testing.conformance import OpConformance

from helpers import dir_tensors


def _rows_slerp(a, b, t):
    """One SLERP per row, in float64, straight from the definition."""
    a, b = a.double(), b.double()
    cos = ((a / a.norm(dim=-1, keepdim=True)) * (b / b.norm(dim=-1, keepdim=True))).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.arccos(cos)
    return ((torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)).float()


class TestNuslerpRows(OpConformance):
    op = "nuslerp_rows"
    params = {"weights": [0.4, 0.6]}
    atol = 1e-5

    def make_inputs(self, gen):
        return {"models": [torch.randn((96, 160), generator=gen), torch.randn((96, 160), generator=gen)]}

    def golden(self, inputs, params):
        w0, w1 = params["weights"]
        return _rows_slerp(*inputs["models"], w1 / (w0 + w1))


class TestNuslerpRowsDelta(TestNuslerpRows):
    op = "nuslerp_rows_delta"

    def make_inputs(self, gen):
        base = torch.randn((96, 160), generator=gen)
        return {"base": base, "models": [base + 0.1 * torch.randn((96, 160), generator=gen),
                                         base + 0.1 * torch.randn((96, 160), generator=gen)]}

    def golden(self, inputs, params):
        w0, w1 = params["weights"]
        base, (m0, m1) = inputs["base"], inputs["models"]
        return base + _rows_slerp(m0 - base, m1 - base, w1 / (w0 + w1))


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("arithmetic,dtype", [("fp32", "float32"), ("mergekit", "bfloat16")])
def test_row_blocks_give_the_whole_tensor_replays_bytes(tmp_path, tiny_family, with_base, arithmetic, dtype):
    """At 32K every matrix is split into many row blocks; each output tensor still equals
    mergekit's unflattened NuSLERP computed on the whole tensors (in fp32, or in bf16 for the
    replay), bit for bit; 1-D tensors keep the whole-tensor op."""
    fam = tiny_family
    base = f"base_model: {fam['base']}\n" if with_base else ""
    text = (f"merge_method: nuslerp\n{base}models:\n  - model: {fam['ft1']}\n    parameters: {{weight: 1.0}}\n"
            f"  - model: {fam['ft2']}\n    parameters: {{weight: 3.0}}\nparameters: {{nuslerp_flatten: false}}\ndtype: {dtype}\n")
    out = tmp_path / "out"
    api.merge(Store(str(tmp_path / "s")), text, out_dir=str(out), progress=False, max_memory="32K", arithmetic=arithmetic)
    merged = dir_tensors(str(out))
    inputs = {k: dir_tensors(fam[k]) for k in ("base", "ft1", "ft2")}
    compute = torch.float32 if arithmetic == "fp32" else torch.bfloat16
    params = NuSlerpWholeParams((1.0, 3.0), flatten=False)
    split = 0
    for name, value in merged.items():
        a, b = (inputs[k][name].to(compute) for k in ("ft1", "ft2"))
        if with_base:
            anchor = inputs["base"][name].to(compute)
            expected = anchor + _mergekit_nuslerp_pair(params, a - anchor, b - anchor)
        else:
            expected = _mergekit_nuslerp_pair(params, a, b)
        assert torch.equal(value, expected.to(getattr(torch, dtype))), name
        split += value.dim() >= 2 and value.numel() * 4 > 32 * 1024
    assert split >= 4   # tensors that really ran in several row blocks
