"""The packed-NF4 ops (ops/nf4_pack.py, ``lora merge --requantize nf4-packed``) through the op
conformance base: the 4-bit codes (rows, in / 2) and the double-quantised absmax codes
(rows, in / 64) of W' = dequant(NF4(W)) + s·B·A (DoRA: its row-normalised form) or of an untouched
W, and the reductions that give the state's ``offset`` / ``nested_absmax`` (and the report's
squared norms).

The golden values quantise the whole dense tensor at once: with ``lora.nf4.quantize_nf4`` (checked
against bitsandbytes in test_lora_nf4.py) and, where bitsandbytes is installed, with its own
``quantize_4bit`` too, bit for bit. The weight (97 x 192, three 64-blocks a row) has 291 absmaxes,
so the double quantisation's 256-blocks end in a partial one and row blocks cut them; one all-zero
row gives 64-blocks whose absmax is 0, and in fp32 one 64-block of absmax 1 holds the midpoints
between NF4 codes exactly (a tie goes to the upper code, as bitsandbytes rounds). The LoRA factors
are multiples of 1/64 with few bits, so B·A is exact in fp32 whatever order BLAS sums in. The bf16
classes store W in bf16 and round W' to bf16 before packing, as a bf16 model's merge does.
"""
import dataclasses

import pytest
import torch
from test_op_conformance_stats import ReductionConformance

from tensorstore_llm.io.base import TensorMeta
from tensorstore_llm.lora.nf4 import NF4_CODE, nf4_roundtrip, quantize_nf4
from tensorstore_llm.testing.conformance import OpConformance, same_bits

SHAPE = (97, 192)
RANK = 4
ZERO_ROW = 40
TIE_ROW = 60
BF16 = {"scaling": 2.0, "base_dtype": "bfloat16", "out_dtype": "bfloat16", "requantize": True}
FP32 = {**BF16, "base_dtype": "float32", "out_dtype": "float32"}


def _torch_dtype(name):
    return getattr(torch, name)


def _dyadic(gen, shape):
    return torch.round(torch.randn(shape, generator=gen) * 8) / 64


def _weight(gen, dtype):
    w = torch.randn(SHAPE, generator=gen) * torch.linspace(0.5, 2, SHAPE[1])   # absmaxes that vary per block
    w[ZERO_ROW] = 0
    mids = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2          # absmax 1: values exactly between two codes (fp32)
    w[TIE_ROW, :64] = torch.cat([torch.ones(1), mids, -mids, torch.zeros(64 - 31)])
    return w.to(_torch_dtype(dtype))


def _inputs(gen, params, dora=False):
    rows, cols = SHAPE
    x = {"w": _weight(gen, params["base_dtype"]), "a": _dyadic(gen, (RANK, cols)), "b": _dyadic(gen, (rows, RANK))}
    if dora:
        x["magnitude"] = 1 + 0.1 * torch.rand(rows, generator=gen)
    return x


def _merged(inputs, params, dora=False):
    """W' in the output dtype: dequant(NF4(W)) in W's dtype + s·B·A in fp32 (DoRA: m / ‖row‖ times
    that), rounded once."""
    merged = nf4_roundtrip(inputs["w"]).float() + (inputs["b"] @ inputs["a"]) * params["scaling"]
    if dora:
        merged = inputs["magnitude"].view(-1, 1) / torch.linalg.norm(merged, dim=1).view(-1, 1) * merged
    return merged.to(_torch_dtype(params["out_dtype"]))


def _bnb_quantize(x):
    """bitsandbytes' own NF4 of ``x`` (double-quantised), or None where it is not installed."""
    try:
        import bitsandbytes.functional as F
    except ImportError:
        return None
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    return {"packed": packed, "absmax": state.absmax, "offset": state.offset, "nested_absmax": state.state2.absmax}


class PackedOutputs:
    """The packed ops' outputs as ``lora/nf4_packed.py`` plans them: ``<name>`` (rows, in / 2)
    uint8 and ``<name>.absmax`` (rows, in / 64) uint8."""

    dtype = "uint8"

    def extra_outputs(self, name, inputs):
        rows, n_in = inputs["w"].shape
        return [TensorMeta(name + ".absmax", (rows, n_in // 64), "uint8")]

    def _plan(self, per_name, sources, order):
        plan, params = super()._plan(per_name, sources, order)
        packed = [TensorMeta(j.output.name, (j.output.shape[0], j.output.shape[1] // 2), "uint8") for j in plan.jobs]
        plan.jobs = [dataclasses.replace(job, output=out) for job, out in zip(plan.jobs, packed)]
        return plan, params


class PackConformance(PackedOutputs, OpConformance):
    """A packing op: ``golden`` gives the dense W' (in the output dtype) it packs; the expected
    outputs are its whole-tensor NF4 codes (``quantize_nf4``, and bitsandbytes' where installed)."""

    small_budget = "64K"

    def _expected(self, per_name):
        out = {}
        for name, inputs in per_name.items():
            q = quantize_nf4(self.golden(inputs, self.params))
            out[name] = q.packed.view(SHAPE[0], SHAPE[1] // 2)
            out[name + ".absmax"] = q.absmax.view(SHAPE[0], SHAPE[1] // 64)
        return out

    def test_golden_formula(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        got, _ = self._run(tmp_path, store, per_name, sources, budget="256M")
        expected = self._expected(per_name)
        assert set(got) == set(expected)
        for name, value in expected.items():
            assert same_bits(got[name], value), name
        assert (got["t0.absmax"][ZERO_ROW] != got["t0.absmax"][ZERO_ROW + 1]).any()   # the codes are not all alike
        for name, inputs in per_name.items():
            theirs = _bnb_quantize(self.golden(inputs, self.params))
            if theirs is None:
                pytest.skip("bitsandbytes is not installed: checked against lora.nf4 only")
            assert torch.equal(got[name].reshape(-1, 1), theirs["packed"]), name
            assert torch.equal(got[name + ".absmax"].reshape(-1), theirs["absmax"]), name


class TestNf4PackMerge(PackConformance):
    op = "nf4_pack_merge"
    params = BF16
    whole = ("a", "b")

    def make_inputs(self, gen):
        return _inputs(gen, self.params)

    def golden(self, inputs, params):
        return _merged(inputs, params)


class TestNf4PackMergeFp32(TestNf4PackMerge):
    params = FP32


class TestNf4PackDoraMerge(PackConformance):
    op = "nf4_pack_dora_merge"
    params = {**BF16, "dora": True}
    whole = ("a", "b", "magnitude")

    def make_inputs(self, gen):
        return _inputs(gen, self.params, dora=True)

    def golden(self, inputs, params):
        return _merged(inputs, params, dora=True)


class TestNf4Pack(PackConformance):
    """A Linear weight the adapter leaves alone: NF4 of W as stored (bf16)."""

    op = "nf4_pack"
    params = {"out_dtype": "bfloat16"}

    def make_inputs(self, gen):
        return {"w": _weight(gen, self.params["out_dtype"])}

    def golden(self, inputs, params):
        return inputs["w"].to(_torch_dtype(params["out_dtype"]))


class TestNf4PackFp32(TestNf4Pack):
    """fp32: the row ``TIE_ROW`` keeps its values exactly on the midpoints between codes (ties go up)."""

    params = {"out_dtype": "float32"}


# -- the reductions: the state's offset / nested absmax, exact; the report's norms ------------

class PackReductionConformance(PackedOutputs, ReductionConformance):
    """A reduction over a packed weight: ``golden`` returns the record's squared norms (compared
    within ``rel``); ``dense(inputs, params)`` the W' whose state ``offset`` and ``nested_absmax``
    must equal the whole-tensor quantisation's (and bitsandbytes') exactly."""

    small_budget = "64K"
    blocking_exact = False     # fp64 sums per tile piece (see test_op_conformance_stats); the state is exact
    rel = 1e-6

    def dense(self, inputs, params):
        raise NotImplementedError

    def test_state_is_exact(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        whole, _ = self._run(tmp_path, store, per_name, sources, budget="256M", key="job-a")
        split, executor = self._run(tmp_path, store, per_name, sources, budget=self.small_budget, key="job-b")
        assert max(j.blocks for j in executor.estimate().jobs) > 1
        for name, inputs in per_name.items():
            dense = self.dense(inputs, self.params)
            q = quantize_nf4(dense)
            assert len(q.absmax2) == 2                   # 291 absmaxes: a whole and a partial 256-block
            for got in (whole[name], split[name]):
                assert got["offset"] == float(q.offset), name
                assert got["nested_absmax"] == q.absmax2.tolist(), name
            theirs = _bnb_quantize(dense)
            if theirs is not None:
                assert whole[name]["offset"] == float(theirs["offset"]), name
                assert whole[name]["nested_absmax"] == theirs["nested_absmax"].tolist(), name


class TestNf4PackState(PackReductionConformance):
    op = "nf4_pack_state"
    params = {"out_dtype": "bfloat16"}

    def make_inputs(self, gen):
        return {"w": _weight(gen, "bfloat16")}

    def dense(self, inputs, params):
        return inputs["w"].to(_torch_dtype(params["out_dtype"]))

    def golden(self, inputs, params):
        q = quantize_nf4(self.dense(inputs, params))
        return {"offset": float(q.offset), "nested_absmax": q.absmax2.tolist()}


def _error_golden(inputs, params, dora=False):
    """‖W − dequant(NF4(W))‖², ‖s·B·A‖², ‖W' − dequant(NF4(W'))‖² (W, W' as stored), in fp64."""
    w = inputs["w"]
    merged = _merged(inputs, params, dora)
    q = quantize_nf4(merged)
    return {"q_sq": float((w.double() - nf4_roundtrip(w).double()).square().sum()),
            "delta_sq": float(((inputs["b"] @ inputs["a"]) * params["scaling"]).double().square().sum()),
            "requant_sq": float((merged.double() - nf4_roundtrip(merged).double()).square().sum()),
            "offset": float(q.offset)}


class TestNf4PackMergeError(PackReductionConformance):
    op = "nf4_pack_merge_error"
    params = BF16
    whole = ("a", "b")

    def make_inputs(self, gen):
        return _inputs(gen, self.params)

    def dense(self, inputs, params):
        return _merged(inputs, params)

    def golden(self, inputs, params):
        return _error_golden(inputs, params)


class TestNf4PackMergeErrorFp32(TestNf4PackMergeError):
    params = FP32


class TestNf4PackDoraMergeError(PackReductionConformance):
    op = "nf4_pack_dora_merge_error"
    params = {**BF16, "dora": True}
    whole = ("a", "b", "magnitude")

    def make_inputs(self, gen):
        return _inputs(gen, self.params, dora=True)

    def dense(self, inputs, params):
        return _merged(inputs, params, dora=True)

    def golden(self, inputs, params):
        return _error_golden(inputs, params, dora=True)
