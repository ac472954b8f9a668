"""The whole-tensor LoRA ops (ops/lora_streamed.py) through the op conformance base: extraction
(A, B and the delta's energy: three outputs), SVD initialisation (PiSSA, GOAT experts), and the
combination of adapters merged into W (linear, and TIES against PEFT's own ``ties``) or
re-factored. Factors are not unique (signs, rotations), so factor ops are checked on what they
promise: B @ A against a direct SVD of the delta they factor; the base's determinism checks
compare every output bit for bit."""
import pytest
import torch

from tensorstore_llm.io.base import TensorMeta
from tensorstore_llm.testing.conformance import OpConformance

SHAPE = (96, 160)     # out x in
RANK = 4


def _randn(gen, shape=SHAPE):
    return torch.randn(shape, generator=gen)


def _low_rank(gen, rank=RANK, scale=0.05):
    """An out x in matrix of exact rank ``rank`` with well separated singular values."""
    spread = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.06, 0.03])[:rank, None]
    return scale * _randn(gen, (SHAPE[0], rank)) @ (spread * _randn(gen, (rank, SHAPE[1])))


class _FactorOp(OpConformance):
    """A whole-tensor op whose outputs are named after its module (params ``module`` = the
    tensor's name): ``outputs(name, inputs)`` lists them, the first drives the job."""

    small_budget = "4M"      # whole-tensor ops: the determinism checks vary the order and resume

    def outputs(self, name, inputs) -> list[TensorMeta]:
        raise NotImplementedError

    def _plan(self, per_name, sources, order):
        from tensorstore_llm.engine.plan import Plan, TensorJob
        from tensorstore_llm.ops.registry import get_op

        spec = get_op(self.op)
        jobs = []
        for name in order:
            inputs = per_name[name]
            params = spec.make_params({**self.params, "module": name}, type(self).__name__)
            first, *extra = self.outputs(name, inputs)
            jobs.append(TensorJob(first, self.op, self.input_roles(spec, name, inputs), params,
                                  extra_outputs=tuple(extra)))
        return Plan(jobs, sources), None

    def golden(self, inputs, params):
        return None   # factors are checked through their products in test_golden_formula

    def finished_output(self, name, inputs):
        return self.outputs(name, inputs)[0].name


class TestLoraExtract(_FactorOp):
    """A (r x in), B (out x r) with B @ A the rank-r SVD of ft - base, and [||ft - base||^2]."""

    op = "lora_extract"
    params = {"rank": RANK}
    whole = ("base", "ft")

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "ft": base + _low_rank(gen)}

    def outputs(self, name, inputs):
        return [TensorMeta(f"{name}.lora_A.weight", (RANK, SHAPE[1]), "float32"),
                TensorMeta(f"{name}.lora_B.weight", (SHAPE[0], RANK), "float32"),
                TensorMeta(f"{name}.lora_record", (1,), "float32")]

    def test_golden_formula(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        got, _ = self._run(tmp_path, store, per_name, sources, budget="256M")
        for name, inputs in per_name.items():
            delta = (inputs["ft"] - inputs["base"]).double()
            product = got[f"{name}.lora_B.weight"].double() @ got[f"{name}.lora_A.weight"].double()
            assert torch.allclose(product, delta, atol=1e-5, rtol=0), name        # an exact-rank delta
            energy = float(got[f"{name}.lora_record"][0])
            assert energy == pytest.approx(float(delta.pow(2).sum()), rel=1e-6), name
            # A = sqrt(S) V^T: its rows are orthogonal with squared norms the singular values
            s = torch.linalg.svdvals(delta)[:RANK]
            gram = got[f"{name}.lora_A.weight"].double() @ got[f"{name}.lora_A.weight"].double().T
            assert torch.allclose(gram, torch.diag(s), atol=1e-5 * float(s[0])), name


class TestSvdInitPissa(_FactorOp):
    """PiSSA: s * B @ A = U_r S_r V_r^T of W (exact SVD)."""

    op = "svd_init_factors"
    params = {"rank": RANK, "scaling": 2.0}
    whole = ("w",)
    experts = 1

    def make_inputs(self, gen):
        return {"w": _randn(gen)}

    def outputs(self, name, inputs):
        out = []
        for e in range(self.experts):
            out += [TensorMeta(f"{name}.expert{e}.lora_A.weight", (RANK, SHAPE[1]), "float32"),
                    TensorMeta(f"{name}.expert{e}.lora_B.weight", (SHAPE[0], RANK), "float32")]
        return out

    def segments(self):
        return [(0, RANK)]

    def test_golden_formula(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        got, _ = self._run(tmp_path, store, per_name, sources, budget="256M")
        for name, inputs in per_name.items():
            u, s, vh = torch.linalg.svd(inputs["w"].double(), full_matrices=False)
            for e, (lo, hi) in enumerate(self.segments()):
                expected = u[:, lo:hi] @ torch.diag(s[lo:hi]) @ vh[lo:hi]
                product = self.params["scaling"] * (got[f"{name}.expert{e}.lora_B.weight"].double()
                                                    @ got[f"{name}.expert{e}.lora_A.weight"].double())
                assert torch.allclose(product, expected, atol=1e-4, rtol=0), (name, e)


class TestSvdInitGoat(TestSvdInitPissa):
    """GOAT: the min(out, in) = 96 directions split into 2 segments; expert e takes the first r
    directions of segment e (0 and 48)."""

    params = {"rank": RANK, "scaling": 2.0, "experts": 2, "method": "goat"}
    experts = 2

    def segments(self):
        k = min(SHAPE)
        return [(e * k // 2, e * k // 2 + RANK) for e in range(2)]


def _adapters(gen, count=2):
    """Factors [A_0, B_0, A_1, B_1, ...] of ``count`` rank-RANK adapters."""
    out = []
    for _ in range(count):
        out += [0.1 * _randn(gen, (RANK, SHAPE[1])), 0.1 * _randn(gen, (SHAPE[0], RANK))]
    return out


def _deltas(inputs, params):
    f = inputs["factors"]
    return [s * (f[2 * i + 1] @ f[2 * i]) for i, s in enumerate(params["scalings"])]


class TestLoraCombineMergeLinear(OpConformance):
    """W + lambda * sum_i w_i s_i B_i A_i."""

    op = "lora_combine_merge"
    params = {"weights": [0.7, 0.4], "scalings": [2.0, 0.5], "method": "linear", "lam": 0.9}
    whole = ("factors",)
    small_budget = "4M"
    atol = 1e-5

    def make_inputs(self, gen):
        return {"w": _randn(gen), "factors": _adapters(gen)}

    def golden(self, inputs, params):
        mixed = sum(w * d for w, d in zip(params["weights"], _deltas(inputs, params)))
        return inputs["w"] + params["lam"] * mixed


class TestLoraCombineMergeTies(TestLoraCombineMergeLinear):
    """TIES on the full deltas with PEFT's rules (``peft.utils.merge_utils.ties``; written out
    here, since importing PEFT costs seconds): keep the int(density * numel) largest |D_i|, elect
    the sign of the unweighted sum, average the agreeing weighted entries."""

    params = {"weights": [0.7, 0.4], "scalings": [2.0, 0.5], "method": "ties", "density": 0.4}

    def golden(self, inputs, params):
        pruned = []
        for d in _deltas(inputs, params):
            k = int(params["density"] * d.numel())
            threshold = d.abs().flatten().sort(descending=True).values[k - 1]
            pruned.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))   # no ties at the cut
        total = sum(pruned)
        sign = torch.where(total >= 0, 1.0, -1.0)
        agree = [torch.sign(p) == sign for p in pruned]
        mixed = sum(w * p * a for w, p, a in zip(params["weights"], pruned, agree))
        return inputs["w"] + mixed / sum(a.float() for a in agree).clamp(min=1)


class TestLoraCombineMergeDare(TestLoraCombineMergeLinear):
    """DARE's keep masks are seeded per (run seed, module, adapter): the determinism checks."""

    params = {"weights": [0.7, 0.4], "scalings": [2.0, 0.5], "method": "dare_linear", "density": 0.5}

    def golden(self, inputs, params):
        return None


class TestLoraCombineFactors(_FactorOp):
    """A linear combination re-factored at the sum of the ranks: B @ A is the combined delta."""

    op = "lora_combine_factors"
    params = {"weights": [0.7, 0.4], "scalings": [2.0, 0.5], "method": "linear", "lam": 0.9, "rank": 2 * RANK}
    whole = ("factors",)

    def make_inputs(self, gen):
        return {"factors": _adapters(gen)}

    def outputs(self, name, inputs):
        r = self.params["rank"]
        return [TensorMeta(f"{name}.lora_A.weight", (r, SHAPE[1]), "float32"),
                TensorMeta(f"{name}.lora_B.weight", (SHAPE[0], r), "float32"),
                TensorMeta(f"{name}.lora_record", (1,), "float32")]

    def test_golden_formula(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        got, _ = self._run(tmp_path, store, per_name, sources, budget="256M")
        for name, inputs in per_name.items():
            expected = self.params["lam"] * sum(w * d.double() for w, d in zip(self.params["weights"],
                                                                               _deltas(inputs, self.params)))
            product = got[f"{name}.lora_B.weight"].double() @ got[f"{name}.lora_A.weight"].double()
            assert torch.allclose(product, expected, atol=1e-5, rtol=0), name
            assert float(got[f"{name}.lora_record"][0]) == pytest.approx(float(expected.pow(2).sum()), rel=1e-5)
