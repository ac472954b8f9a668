"""The QLoRA merge ops (ops/nf4_merge.py) through the op conformance base: rows of
dequant(NF4(W)) + s·B·A (optionally requantised), DoRA per stored row and on a transposed layout,
and the report reductions (‖q‖², ‖Δ‖², the requantisation error). The golden formulas quantise the
whole tensor with ``lora.nf4`` (checked against bitsandbytes in test_lora_nf4.py). The factors are
multiples of 1/64 with few bits, so B·A is exact in fp32 whatever order BLAS sums in, and the
tensor (97 x 150) ends in a partial 64-block and its rows cut 64-blocks."""
import torch
from test_op_conformance_stats import ReductionConformance

from tensorstore_llm.lora.nf4 import nf4_roundtrip
from tensorstore_llm.testing.conformance import OpConformance

SHAPE = (97, 150)
RANK = 4
PARAMS = {"scaling": 2.0, "base_dtype": "float32", "out_dtype": "float32"}


def _dyadic(gen, shape):
    return torch.round(torch.randn(shape, generator=gen) * 8) / 64


def _delta(inputs, params, transpose=False):
    d = (inputs["b"] @ inputs["a"]) * params["scaling"]
    return d.T if transpose else d


def _inputs(gen, dora=False, transpose=False):
    rows, cols = SHAPE
    out, inp = (cols, rows) if transpose else (rows, cols)
    x = {"w": torch.randn(SHAPE, generator=gen), "a": _dyadic(gen, (RANK, inp)), "b": _dyadic(gen, (out, RANK))}
    if dora:
        x["magnitude"] = 1 + 0.1 * torch.rand(out, generator=gen)
    return x


class TestNf4LoraMerge(OpConformance):
    op = "nf4_lora_merge"
    params = PARAMS
    whole = ("a", "b")
    small_budget = "64K"

    def make_inputs(self, gen):
        return _inputs(gen)

    def golden(self, inputs, params):
        merged = nf4_roundtrip(inputs["w"]) + _delta(inputs, params)
        return nf4_roundtrip(merged) if params.get("requantize") else merged


class TestNf4LoraMergeRequantize(TestNf4LoraMerge):
    params = {**PARAMS, "requantize": True}


class TestNf4DoraMerge(OpConformance):
    op = "nf4_dora_merge"
    params = {**PARAMS, "dora": True}
    whole = ("a", "b", "magnitude")
    small_budget = "64K"

    def make_inputs(self, gen):
        return _inputs(gen, dora=True)

    def golden(self, inputs, params):
        merged = nf4_roundtrip(inputs["w"]) + _delta(inputs, params)
        return inputs["magnitude"].view(-1, 1) / torch.linalg.norm(merged, dim=1).view(-1, 1) * merged


class TestNf4DoraMergeTransposed(OpConformance):
    op = "nf4_dora_merge_transposed"
    params = {**PARAMS, "dora": True, "transpose": True}
    whole = ("a", "b", "magnitude")
    small_budget = "4M"

    def make_inputs(self, gen):
        return _inputs(gen, dora=True, transpose=True)

    def golden(self, inputs, params):
        merged = nf4_roundtrip(inputs["w"]) + _delta(inputs, params, transpose=True)     # stored in x out
        return inputs["magnitude"].view(1, -1) / torch.linalg.norm(merged.T, dim=1).view(1, -1) * merged


def _error_golden(inputs, params, dora=False, transpose=False):
    w = inputs["w"].double()
    delta = _delta(inputs, params, transpose)
    out = {"q_sq": float((w - nf4_roundtrip(inputs["w"]).double()).square().sum()),
           "delta_sq": float(delta.double().square().sum())}
    if params.get("requantize"):
        merged = nf4_roundtrip(inputs["w"]) + delta
        if dora:
            axis = 0 if transpose else 1
            norm = torch.linalg.norm(merged, dim=axis, keepdim=True)
            mag = inputs["magnitude"].view(1, -1) if transpose else inputs["magnitude"].view(-1, 1)
            merged = mag / norm * merged
        out["requant_sq"] = float((merged.double() - nf4_roundtrip(merged).double()).square().sum())
    return out


class TestNf4MergeError(ReductionConformance):
    op = "nf4_merge_error"
    params = {**PARAMS, "requantize": True}
    whole = ("a", "b")
    small_budget = "64K"
    blocking_exact = False    # fp64 sums per tile piece (see test_op_conformance_stats)
    rel = 1e-6

    def make_inputs(self, gen):
        return _inputs(gen)

    def golden(self, inputs, params):
        return _error_golden(inputs, params)


class TestNf4DoraMergeError(TestNf4MergeError):
    op = "nf4_dora_merge_error"
    params = {**PARAMS, "dora": True, "requantize": True}
    whole = ("a", "b", "magnitude")

    def make_inputs(self, gen):
        return _inputs(gen, dora=True)

    def golden(self, inputs, params):
        return _error_golden(inputs, params, dora=True)


class TestNf4DoraTransposedError(TestNf4DoraMergeError):
    op = "nf4_dora_transposed_error"
    params = {**PARAMS, "dora": True, "transpose": True, "requantize": True}
    small_budget = "4M"

    def make_inputs(self, gen):
        return _inputs(gen, dora=True, transpose=True)

    def golden(self, inputs, params):
        return _error_golden(inputs, params, dora=True, transpose=True)

    def test_block_size_and_job_order_do_not_change_bits(self, tmp_path):
        """A whole-tensor reduction: one block at any budget; the job order still must not matter."""
        store, per_name, sources = self._store(tmp_path)
        whole, _ = self._run(tmp_path, store, per_name, sources, budget="256M", key="job-a")
        other, _ = self._run(tmp_path, store, per_name, sources, budget=self.small_budget,
                             order=list(reversed(self.names)), key="job-b")
        self._same_records(whole, other)
