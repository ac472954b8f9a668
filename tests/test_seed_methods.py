"""The seeds' merge methods: LoRE-Merging, AIM and Twin-Merging (ops/seed_merges.py,
merge/methods/{lore,aim,twin}.py, merge/activations.py).

Golden formulas through the op conformance base; recipes through api.merge and ``tsllm merge``;
and a real pair of SmolLM2-135M fine-tunes on two different texts (opt out with
TSLLM_SKIP_REAL=1): AIM's and LoRE's held-out losses lie between the inputs', and Twin-Merging's
shared model plus one expert adapter (loaded by PEFT) is closer to that task's model than the
shared model alone.
"""
import os

import pytest
import torch

from tensorstore_llm import api
from tensorstore_llm.errors import OutputExists, RecipeError
from tensorstore_llm.io.hf_dir import HFCheckpointSource
from tensorstore_llm.ops import seed_merges  # noqa: F401  (registers the ops)
from tensorstore_llm.testing.conformance import OpConformance

SHAPE = (48, 40)


def _randn(gen, shape=SHAPE):
    return torch.randn(shape, generator=gen)


def _low_rank(gen, rank=3, shape=SHAPE):
    return _randn(gen, (shape[0], rank)) @ _randn(gen, (rank, shape[1])) / rank


# -- golden formulas -----------------------------------------------------------------------------

class TestProtectedTaskArithmetic(OpConformance):
    """AIM: θ0 + (1 − ω·â[col]) ⊙ λ Σ wi τi with â the min-max normalised column statistic."""

    op = "protected_task_arithmetic"
    importance = [float(v) for v in torch.linspace(0.5, 3.0, SHAPE[1]).roll(7)]
    params = {"weights": [0.6, 0.4], "lam": 0.9, "omega": 0.7, "importance": importance}
    atol = 1e-6

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + 0.05 * _randn(gen) for _ in range(2)]}

    def golden(self, inputs, params):
        a = torch.tensor(params["importance"], dtype=torch.float64)
        keep = 1 - params["omega"] * (a - a.min()) / (a.max() - a.min())
        base = inputs["base"].double()
        update = params["lam"] * sum(w * (m.double() - base) for w, m in zip(params["weights"], inputs["models"]))
        return (base + keep[None, :] * update).float()


class TestPlainTaskArithmetic(TestProtectedTaskArithmetic):
    """Without a statistic the op is task arithmetic (Twin-Merging's shared model)."""

    params = {"weights": [0.5, 0.5], "lam": 1.0}

    def golden(self, inputs, params):
        base = inputs["base"].double()
        return (base + sum(w * (m.double() - base) for w, m in zip(params["weights"], inputs["models"]))).float()


def direct_lore(models, base, mu, iterations, weights, lam):
    """LoRE's coordinate descent with full float64 SVDs (the reference)."""
    xs = [m.double().reshape(m.shape[0] if m.dim() >= 2 else 1, -1) for m in models]
    theta0 = base.double().reshape(xs[0].shape) if base is not None else sum(xs) / len(xs)
    threshold = mu * max(torch.linalg.svdvals(x - theta0)[0] for x in xs)

    def svt(m):
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        return U @ torch.diag((S - threshold).clamp_min(0)) @ Vh

    for _ in range(iterations):
        deltas = [svt(x - theta0) for x in xs]
        theta0 = sum(x - d for x, d in zip(xs, deltas)) / len(xs)
    return (theta0 + lam * sum(w * d for w, d in zip(weights, deltas))).reshape(models[0].shape).float()


class TestLoreMerge(OpConformance):
    """No base: θ0 starts at the mean; task vectors of rank 3 keep the randomised SVD exact."""

    op = "lore_merge"
    params = {"weights": [1.0, 0.8, 1.2], "lam": 0.7, "mu": 0.15, "iterations": 3, "rank": 12}
    atol = 2e-4
    small_budget = "512K"   # a whole-tensor op: the budget only reorders the jobs

    def make_inputs(self, gen):
        shared = _randn(gen)
        return {"models": [shared + 0.3 * _low_rank(gen) for _ in range(3)]}

    def golden(self, inputs, params):
        return direct_lore(inputs["models"], None, params["mu"], params["iterations"], params["weights"], params["lam"])


class TestLoreMergeFromBase(TestLoreMerge):
    op = "lore_merge_from_base"
    params = {"weights": [1.0, 1.0], "lam": 1.0, "mu": 0.05, "iterations": 2, "rank": 8}

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + 0.2 * _low_rank(gen) for _ in range(2)]}

    def golden(self, inputs, params):
        return direct_lore(inputs["models"], inputs["base"], params["mu"], params["iterations"], params["weights"],
                           params["lam"])


class TestLoreMergeVector(TestLoreMerge):
    """A 1-D tensor is a 1 x n matrix: SVT shrinks its norm."""

    params = {"weights": [1.0, 1.0], "lam": 1.0, "mu": 0.3, "iterations": 2, "rank": 4}

    def make_inputs(self, gen):
        shared = _randn(gen, (600,))
        return {"models": [shared + 0.5 * _randn(gen, (600,)) for _ in range(2)]}


class TestTwinExpert(OpConformance):
    """A, B of the rank-r SVD of θk − θs (θs rounded to bf16 as stored): B @ A is the exact
    truncated SVD (the exclusive part has rank 3 + a tiny tail), the record its energies."""

    op = "twin_expert"
    params = {"weights": [0.5, 0.5], "lam": 1.0, "index": 1, "rank": 3, "module": "m", "shared_dtype": "bfloat16"}
    whole = ("base", "models")
    small_budget = "512K"

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + 0.1 * _low_rank(gen) + 1e-4 * _randn(gen) for _ in range(2)]}

    def golden(self, inputs, params):
        return None

    def _plan(self, per_name, sources, order):   # each tensor its own module, so outputs do not collide
        from tensorstore_llm.engine.plan import WHOLE, InputRef, Plan, TensorJob
        from tensorstore_llm.io.base import TensorMeta
        from tensorstore_llm.ops.registry import get_op

        spec = get_op(self.op)
        jobs = []
        for name in order:
            params = spec.make_params({**self.params, "module": name}, "test")
            refs = (("base", InputRef("base0", name, WHOLE)), ("models", tuple(InputRef(f"models{i}", name, WHOLE) for i in range(2))))
            jobs.append(TensorJob(TensorMeta(f"expert1.{name}.lora_A.weight", (3, SHAPE[1]), "float32"), self.op, refs,
                                  params, extra_outputs=(TensorMeta(f"expert1.{name}.lora_B.weight", (SHAPE[0], 3), "float32"),
                                                         TensorMeta(f"expert1.{name}.record", (2,), "float32"))))
        return Plan(jobs, sources), None

    def test_golden_formula(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        got, _ = self._run(tmp_path, store, per_name, sources, budget="256M")
        for name, inputs in per_name.items():
            base, models = inputs["base"], inputs["models"]
            shared = (base + 0.5 * (models[0] - base) + 0.5 * (models[1] - base)).to(torch.bfloat16).double()
            exclusive = models[1].double() - shared
            U, S, Vh = torch.linalg.svd(exclusive, full_matrices=False)
            truncated = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
            product = got[f"expert1.{name}.lora_B.weight"].double() @ got[f"expert1.{name}.lora_A.weight"].double()
            assert torch.allclose(product, truncated, atol=1e-5), name
            record = got[f"expert1.{name}.record"].double()
            assert record[0] == pytest.approx(float(exclusive.square().sum()), rel=1e-5)
            assert record[1] == pytest.approx(float(S[:3].square().sum()), rel=1e-4)

    def test_resume_is_bit_identical(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        straight, _ = self._run(tmp_path, store, per_name, sources, budget="256M", key="job-a")
        order = list(self.names)
        resumed, executor = self._run(tmp_path, store, per_name, sources, budget=self.small_budget, order=order,
                                      key="job-r", stop_after=1)
        assert f"expert1.{order[0]}.lora_A.weight" in executor.skipped
        for n in straight:
            assert torch.equal(straight[n], resumed[n]), n
