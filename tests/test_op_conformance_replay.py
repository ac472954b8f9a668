"""The whole-tensor mergekit replay ops through the op conformance base: Model Stock (one ratio
per tensor, and filter-wise: one per row) and NuSLERP (flattened, per row, per column, and on task
vectors), against direct fp64 formulas of the papers' definitions."""
import torch

from tensorstore_llm.testing.conformance import OpConformance

SHAPE = (96, 160)


def _randn(gen, shape=SHAPE):
    return torch.randn(shape, generator=gen)


def _slerp_rows(a, b, t):
    """Spherical interpolation between the rows of ``a`` and ``b`` (fp64): each row's own angle."""
    a, b = a.double(), b.double()
    cos = ((a / a.norm(dim=-1, keepdim=True)) * (b / b.norm(dim=-1, keepdim=True))).sum(dim=-1, keepdim=True)
    omega = torch.arccos(cos.clamp(-1, 1))
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


class TestMergekitModelStock(OpConformance):
    """Model Stock (Jang et al. 2024): t = N cos / (1 + (N - 1) cos) over the mean pairwise cosine
    of the task vectors; result t * mean(models) + (1 - t) * base."""

    op = "mergekit_model_stock"
    small_budget = "2M"       # a whole-tensor op: other order and resume
    atol = 1e-5

    def make_inputs(self, gen):
        base = _randn(gen)
        shared = 0.05 * _randn(gen)
        return {"base": base, "models": [base + shared + 0.05 * _randn(gen) for _ in range(3)]}

    def _cos(self, taus):
        """Mean pairwise cosine: one per tensor (flattened)."""
        flat = [t.flatten() for t in taus]
        pairs = [(i, j) for i in range(len(flat)) for j in range(i + 1, len(flat))]
        return sum(torch.dot(flat[i], flat[j]) / (flat[i].norm() * flat[j].norm()) for i, j in pairs) / len(pairs)

    def golden(self, inputs, params):
        base, models = inputs["base"].double(), [m.double() for m in inputs["models"]]
        n = len(models)
        cos = self._cos([m - base for m in models])
        t = n * cos / (1 + (n - 1) * cos)
        return (t * sum(models) / n + (1 - t) * base).float()


class TestMergekitModelStockFilterWise(TestMergekitModelStock):
    params = {"filter_wise": True}

    def _cos(self, taus):
        """Mean pairwise cosine per row: [rows, 1]."""
        pairs = [(i, j) for i in range(len(taus)) for j in range(i + 1, len(taus))]
        cos = [(taus[i] * taus[j]).sum(dim=1) / (taus[i].norm(dim=1) * taus[j].norm(dim=1)) for i, j in pairs]
        return (sum(cos) / len(pairs))[:, None]


class TestMergekitNuslerp(OpConformance):
    """NuSLERP of two models: slerp with t = w1 / (w0 + w1) over the flattened tensors."""

    op = "mergekit_nuslerp"
    params = {"weights": [0.4, 0.6]}
    small_budget = "2M"
    atol = 1e-5

    def make_inputs(self, gen):
        return {"models": [_randn(gen), _randn(gen)]}

    def _t(self, params):
        w0, w1 = params["weights"]
        return w1 / (w0 + w1)

    def _slerp(self, a, b, params):
        if params.get("flatten", True):
            return _slerp_rows(a.reshape(1, -1), b.reshape(1, -1), self._t(params)).reshape(a.shape)
        if params.get("row_wise", False):
            return _slerp_rows(a.T, b.T, self._t(params)).T
        return _slerp_rows(a, b, self._t(params))

    def golden(self, inputs, params):
        a, b = inputs["models"]
        return self._slerp(a, b, params).float()


class TestMergekitNuslerpPerRow(TestMergekitNuslerp):
    params = {"weights": [0.4, 0.6], "flatten": False}


class TestMergekitNuslerpPerColumn(TestMergekitNuslerp):
    params = {"weights": [0.4, 0.6], "flatten": False, "row_wise": True}


class TestMergekitNuslerpDelta(TestMergekitNuslerp):
    """NuSLERP of the task vectors, added back to the base."""

    op = "mergekit_nuslerp_delta"

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + 0.1 * _randn(gen), base + 0.1 * _randn(gen)]}

    def golden(self, inputs, params):
        base = inputs["base"].double()
        a, b = (m.double() - base for m in inputs["models"])
        return (base + self._slerp(a, b, params)).float()
