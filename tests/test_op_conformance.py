"""Every built-in op through the op conformance base: golden formula, block size, job order,
resume and (on a GPU) CUDA parity. The merge methods' finer cases live in test_merge_ops.py."""
import torch

from tensorstore_llm.ops.registry import OpSpec, Role, register_op
from tensorstore_llm.testing.conformance import OpConformance

SHAPE = (96, 160)


def _sign_and_scale(ctx, params, x):
    return {ctx.output: torch.sign(x), ctx.output + ".scale": x.abs().mean(dim=1)}


register_op(OpSpec("test_sign_scale", _sign_and_scale, (Role("x"),)), clobber=True)


def _randn(gen, shape=SHAPE):
    return torch.randn(shape, generator=gen)


class TestCopy(OpConformance):
    op = "copy"

    def make_inputs(self, gen):
        return {"x": _randn(gen)}

    def golden(self, inputs, params):
        return inputs["x"]


class TestWeightedSum(OpConformance):
    op = "weighted_sum"
    params = {"weights": [0.2, 0.3, 0.5]}
    atol = 1e-6

    def make_inputs(self, gen):
        return {"models": [_randn(gen) for _ in range(3)]}

    def golden(self, inputs, params):
        return sum(w * x for w, x in zip(params["weights"], inputs["models"]))


class TestTaskArithmetic(OpConformance):
    op = "task_arithmetic"
    params = {"weights": [0.7, 0.4], "lam": 0.9}
    atol = 1e-6

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + 0.01 * _randn(gen) for _ in range(2)]}

    def golden(self, inputs, params):
        base = inputs["base"]
        return base + params["lam"] * sum(w * (m - base) for w, m in zip(params["weights"], inputs["models"]))


class TestTies(OpConformance):
    op = "task_arithmetic"
    params = {"weights": [1.0, 1.0], "densities": [0.3, 0.3], "sparsification": "magnitude", "consensus": "sum",
              "normalize": True}
    atol = 1e-6

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + 0.01 * _randn(gen) for _ in range(2)]}

    def golden(self, inputs, params):
        base = inputs["base"]
        trimmed = []
        for m, d in zip(inputs["models"], params["densities"]):
            tau = m - base
            k = int(d * tau.numel())
            threshold = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
            trimmed.append(torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau)))
        total = sum(trimmed)
        sign = torch.where(total >= 0, 1.0, -1.0)
        kept = [torch.where(torch.sign(t) == sign, t, torch.zeros_like(t)) for t in trimmed]
        count = sum((k != 0).float() for k in kept)
        return base + sum(kept) / count.clamp(min=1)


class TestDareTies(OpConformance):
    op = "task_arithmetic"
    params = {"weights": [0.5, 0.5], "densities": [0.5, 0.5], "sparsification": "random", "consensus": "sum",
              "rescale": True}

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + 0.01 * _randn(gen) for _ in range(2)]}

    def golden(self, inputs, params):
        return None   # random masks: the determinism checks are the point


class TestSlerp(OpConformance):
    op = "slerp"
    params = {"t": 0.3}
    atol = 1e-5

    def make_inputs(self, gen):
        return {"a": _randn(gen), "b": _randn(gen)}

    def golden(self, inputs, params):
        a, b, t = inputs["a"].double(), inputs["b"].double(), params["t"]
        an, bn = a / a.norm(), b / b.norm()
        omega = torch.arccos((an * bn).sum().clamp(-1, 1))
        return ((torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)).float()


class TestLoraMerge(OpConformance):
    op = "lora_merge"
    params = {"scaling": 2.0}
    whole = ("a", "b")
    atol = 1e-5
    blocking_exact = False
    cuda_exact = False

    def make_inputs(self, gen):
        return {"w": _randn(gen), "a": _randn(gen, (8, SHAPE[1])), "b": _randn(gen, (SHAPE[0], 8))}

    def golden(self, inputs, params):
        return inputs["w"] + params["scaling"] * (inputs["b"] @ inputs["a"])


class TestDoraMerge(TestLoraMerge):
    op = "dora_merge"

    def make_inputs(self, gen):
        return {**super().make_inputs(gen), "magnitude": _randn(gen, (SHAPE[0],)).abs() + 0.5}

    whole = ("a", "b", "magnitude")

    def golden(self, inputs, params):
        merged = inputs["w"] + params["scaling"] * (inputs["b"] @ inputs["a"])
        return inputs["magnitude"][:, None] * merged / merged.norm(dim=1, keepdim=True)


class TestLoraBiasMerge(OpConformance):
    op = "lora_bias_merge"
    params = {"scaling": 0.5}
    small_budget = "2K"

    def make_inputs(self, gen):
        return {"w": _randn(gen, (4000,)), "bias": _randn(gen, (4000,))}

    def golden(self, inputs, params):
        return inputs["w"] + inputs["bias"] * params["scaling"]


class TestTwoOutputs(OpConformance):
    """A two-output op through the base: signs and a per-row scale (BitDelta's shape)."""

    op = "test_sign_scale"

    def make_inputs(self, gen):
        return {"x": _randn(gen)}

    def extra_outputs(self, name, inputs):
        from tensorstore_llm.io.base import TensorMeta

        return [TensorMeta(name + ".scale", (SHAPE[0],), "float32")]

    def golden(self, inputs, params):
        return None

    def test_golden_formula(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        got, _ = self._run(tmp_path, store, per_name, sources, budget="256M")
        for name, inputs in per_name.items():
            assert torch.equal(got[name], torch.sign(inputs["x"]))
            assert torch.allclose(got[name + ".scale"], inputs["x"].abs().mean(dim=1))


def _slerp(a, b, t):
    a, b = a.double(), b.double()
    omega = torch.arccos(((a / a.norm()) * (b / b.norm())).sum().clamp(-1, 1))
    return ((torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)).float()


class TestNuslerp(OpConformance):
    op = "nuslerp"
    params = {"weights": [0.4, 0.6]}
    atol = 1e-5

    def make_inputs(self, gen):
        return {"models": [_randn(gen), _randn(gen)]}

    def golden(self, inputs, params):
        w0, w1 = params["weights"]
        return _slerp(inputs["models"][0], inputs["models"][1], w1 / (w0 + w1))


class TestNuslerpDelta(TestNuslerp):
    op = "nuslerp_delta"

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + 0.1 * _randn(gen), base + 0.1 * _randn(gen)]}

    def golden(self, inputs, params):
        w0, w1 = params["weights"]
        base = inputs["base"]
        m0, m1 = inputs["models"]
        return base + _slerp(m0 - base, m1 - base, w1 / (w0 + w1))


class TestModelStock(OpConformance):
    op = "model_stock"
    atol = 1e-5

    def make_inputs(self, gen):
        base = _randn(gen)
        shared = 0.05 * _randn(gen)
        return {"base": base, "models": [base + shared + 0.05 * _randn(gen) for _ in range(3)]}

    def golden(self, inputs, params):
        base, models = inputs["base"].double(), [m.double() for m in inputs["models"]]
        taus = [m - base for m in models]
        cos = [torch.nn.functional.cosine_similarity(taus[i].flatten(), taus[j].flatten(), dim=0)
               for i in range(3) for j in range(i + 1, 3)]
        c = sum(cos) / len(cos)
        t = 3 * c / (1 + 2 * c)
        return (t * sum(models) / 3 + (1 - t) * base).float()


class TestDoraMergeTransposed(TestDoraMerge):
    op = "dora_merge_transposed"      # whole-tensor op: its column norm needs every row
    params = {"scaling": 2.0, "transpose": True}
    small_budget = "1M"

    def make_inputs(self, gen):
        # stored in x out: W is (in, out); A: r x in, B: out x r; magnitude per stored column
        return {"w": _randn(gen), "a": _randn(gen, (8, SHAPE[0])), "b": _randn(gen, (SHAPE[1], 8)),
                "magnitude": _randn(gen, (SHAPE[1],)).abs() + 0.5}

    def golden(self, inputs, params):
        merged = inputs["w"] + params["scaling"] * (inputs["b"] @ inputs["a"]).T
        return inputs["magnitude"][None, :] * merged / merged.norm(dim=0, keepdim=True)


class TestMergekitLinear(OpConformance):
    """mergekit's linear merge replayed (fp32 addcmul), against the direct weighted mean."""

    op = "mergekit_linear"
    params = {"weights": [0.2, 0.3, 0.5], "normalize": True}
    atol = 1e-6

    def make_inputs(self, gen):
        return {"models": [_randn(gen) for _ in range(3)]}

    def golden(self, inputs, params):
        weights = params["weights"]
        return sum(w * x for w, x in zip(weights, inputs["models"])) / sum(weights)


class TestMergekitTies(TestTies):
    """mergekit's generalized task arithmetic replayed, TIES flags: the same formula as TestTies."""

    op = "mergekit_task_arithmetic"


class TestMergekitDareTies(OpConformance):
    """The replay draws task_arithmetic's DARE masks (the same seeded streams): on a zero base the
    two ops drop exactly the same entries and agree on the rest to rounding."""

    op = "mergekit_task_arithmetic"
    params = {"weights": [0.5, 0.5], "densities": [0.5, 0.5], "sparsification": "random", "consensus": "sum",
              "rescale": True}

    def make_inputs(self, gen):
        return {"base": torch.zeros(SHAPE), "models": [_randn(gen) for _ in range(2)]}

    def golden(self, inputs, params):
        return None   # random masks: the determinism checks, and the comparison below

    def test_draws_the_masks_of_task_arithmetic(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        replayed, _ = self._run(tmp_path, store, per_name, sources, budget="256M", key="job-replay")
        self.op = "task_arithmetic"
        ours, _ = self._run(tmp_path, store, per_name, sources, budget=self.small_budget, key="job-ours")
        for name in per_name:
            dropped = replayed[name] == 0
            assert 0.1 < dropped.float().mean() < 0.5, name        # DARE at density 0.5 on two models dropped some
            assert torch.equal(dropped, ours[name] == 0), name
            assert torch.allclose(replayed[name], ours[name], atol=1e-6, rtol=1e-6), name
