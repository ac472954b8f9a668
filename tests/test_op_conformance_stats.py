"""The reduction ops through the op conformance base: ``delta_error``, ``diff_stats``,
``sign_conflicts`` (Mediator), ``unit_scores`` and ``unit_scores_wanda`` (pruning), ``row_mean``
(the padding rows of a merged vocabulary).

A reduction job writes no tensor: its statistics passes stream over the inputs and the last
pass's record is ``Executor.records[name]``. ``ReductionConformance`` runs the base's checks on
those records instead of on written tensors: the record against a direct formula, identical
records at a budget that splits every tensor into row blocks and in reversed job order, after a
resume from the records journal, and (on a GPU) CUDA against the CPU.
"""
import math

import torch

from tensorstore_llm.testing.conformance import OpConformance

SHAPE = (96, 160)

# Float sums (delta_error, diff_stats' norms and dot products, column scores) are summed per
# kernel tile of 2^19 elements on a fixed row grid. The engine gives a job with statistics passes
# blocks of whole tiles whenever the budget holds one tile, so those sums are bit-identical under
# any such blocking (the *OverWholeTiles classes). These small test tensors are smaller than one
# tile, so a budget that splits them must split a tile too and the fp64 sums may differ in their
# last bit: those classes set ``blocking_exact = False`` (agreement to 1e-12); integer counts and
# per-row sums stay exact at any budget.


def _same(a, b, path="record"):
    """Records equal to the last bit (floats compared exactly), with the path of the first difference."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def _close(got, expected, rel, path="record"):
    """``got`` matches ``expected`` (a dict, list or number) within relative tolerance ``rel``."""
    if isinstance(expected, dict):
        for k in expected:
            _close(got[k], expected[k], rel, f"{path}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), path
        for i, (x, y) in enumerate(zip(got, expected)):
            _close(x, y, rel, f"{path}[{i}]")
    else:
        assert math.isclose(got, expected, rel_tol=rel, abs_tol=rel), (path, got, expected)


class ReductionConformance(OpConformance):
    """OpConformance for a reduction op: ``golden(inputs, params)`` returns the expected record
    (or the part of it to check), compared within ``rel``; the determinism checks are exact, or
    within ``blocking_rel`` where ``blocking_exact`` is False (see the note on float sums)."""

    rel = 1e-9
    blocking_rel = 1e-12

    def _same_records(self, a, b):
        if self.blocking_exact:
            _same(a, b)
        else:
            _close(b, a, self.blocking_rel)

    def _plan(self, per_name, sources, order):
        import dataclasses

        plan, params = super()._plan(per_name, sources, order)
        plan.jobs = [dataclasses.replace(job, reduce_only=True) for job in plan.jobs]
        return plan, params

    def _run(self, tmp_path, store, per_name, sources, *, budget, order=None, key="job-out", device="cpu",
             stop_after=None):
        from tensorstore_llm.engine.executor import Executor
        from tensorstore_llm.engine.options import RunOptions

        options = RunOptions(max_memory=budget, device=device, progress=False)
        journal = str(tmp_path / f"{key}.records")
        order = list(order or self.names)
        if stop_after is not None:    # an interrupted run: some reductions finished and were journaled
            partial, _ = self._plan(per_name, sources, order[:stop_after])
            Executor(partial, None, options, records_path=journal).run()
        plan, _ = self._plan(per_name, sources, order)
        executor = Executor(plan, None, options, records_path=journal)
        executor.run()
        return dict(executor.records), executor

    def test_golden_formula(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        got, _ = self._run(tmp_path, store, per_name, sources, budget="256M")
        for name, inputs in per_name.items():
            _close(got[name], self.golden(inputs, self.params), self.rel, name)

    def test_block_size_and_job_order_do_not_change_bits(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        whole, _ = self._run(tmp_path, store, per_name, sources, budget="256M", key="job-a")
        split, executor = self._run(tmp_path, store, per_name, sources, budget=self.small_budget,
                                    order=list(reversed(self.names)), key="job-b")
        assert max(j.blocks for j in executor.estimate().jobs) > 1, "the small budget should split a tensor"
        self._same_records(whole, split)

    def test_resume_is_bit_identical(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        straight, _ = self._run(tmp_path, store, per_name, sources, budget="256M", key="job-a")
        resumed, executor = self._run(tmp_path, store, per_name, sources, budget=self.small_budget,
                                      order=list(self.names), key="job-r", stop_after=1)
        assert executor.skipped == [self.names[0]] and self.names[0] not in executor.computed
        self._same_records(straight, resumed)

    def assert_cuda_matches(self, cpu, gpu):
        for name in cpu:
            _close(gpu[name], cpu[name], 1e-5, name)


def _randn(gen, shape=SHAPE):
    return torch.randn(shape, generator=gen)


class TestDeltaError(ReductionConformance):
    op = "delta_error"
    blocking_exact = False    # fp64 sums per tile (see the note at the top)

    def make_inputs(self, gen):
        base = _randn(gen)
        target = base + 0.02 * _randn(gen)
        return {"base": base, "target": target, "recon": target + 0.001 * _randn(gen)}

    def golden(self, inputs, params):
        b, t, r = (inputs[k].double() for k in ("base", "target", "recon"))
        return {"err2": float((r - t).pow(2).sum()), "delta2": float((t - b).pow(2).sum()),
                "weight2": float(t.pow(2).sum()), "numel": t.numel()}


class TestSignConflicts(ReductionConformance):
    op = "sign_conflicts"

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + 0.01 * _randn(gen) for _ in range(3)]}

    def golden(self, inputs, params):
        taus = [m - inputs["base"] for m in inputs["models"]]
        signs = [torch.sign(t) for t in taus]
        pairs = [(i, j) for i in range(len(taus)) for j in range(i + 1, len(taus))]
        conflicts = sum(int((signs[i] * signs[j] < 0).sum()) for i, j in pairs)
        return {"conflicts": conflicts, "total": len(pairs) * taus[0].numel()}


class TestUnitScoresRows(ReductionConformance):
    op = "unit_scores"
    params = {"axis": 0, "metric": "l2"}

    def make_inputs(self, gen):
        return {"w": _randn(gen)}

    def golden(self, inputs, params):
        return {"scores": inputs["w"].double().pow(2).sum(dim=1).tolist()}


class TestUnitScoresColumns(TestUnitScoresRows):
    params = {"axis": 1, "metric": "l2"}
    blocking_exact = False    # column sums over the rows of a tile (see the note at the top)

    def golden(self, inputs, params):
        return {"scores": inputs["w"].double().pow(2).sum(dim=0).tolist()}


class TestUnitScoresWanda(ReductionConformance):
    """Wanda's |W| * ||X|| per input column, summed per output row; the norm is read whole."""

    op = "unit_scores_wanda"
    params = {"axis": 0, "metric": "wanda"}
    whole = ("norm",)

    def make_inputs(self, gen):
        return {"w": _randn(gen), "norm": _randn(gen, (SHAPE[1],)).abs() + 0.1}

    def golden(self, inputs, params):
        scores = inputs["w"].double().abs() * inputs["norm"].double()[None, :]
        return {"scores": scores.sum(dim=1 if params["axis"] == 0 else 0).tolist()}


class TestUnitScoresWandaColumns(TestUnitScoresWanda):
    params = {"axis": 1, "metric": "wanda"}
    blocking_exact = False


class TestDiffStats(ReductionConformance):
    """Two diffs against one base: norms and changed counts per diff, dot product and opposite
    signs between them, and the top singular values (randomised SVD, streamed by rows) of diffs
    of exact rank 3, against torch.linalg.svdvals."""

    op = "diff_stats"
    params = {"rank": 3, "oversample": 4, "power_iters": 2, "base_of": [0, 0]}
    rel = 1e-6
    blocking_exact = False    # fp64 sums per tile (see the note at the top)
    blocking_rel = 1e-6       # the randomised SVD runs in fp32 on sketches summed per tile

    def test_golden_formula(self, tmp_path):
        """The top ``rank`` singular values match (the sketch's others are noise of a rank-3 diff)."""
        store, per_name, sources = self._store(tmp_path)
        got, _ = self._run(tmp_path, store, per_name, sources, budget="256M")
        rank = self.params["rank"]
        for name, inputs in per_name.items():
            record = got[name]
            assert all(len(p["singular_values"]) == rank + self.params["oversample"] for p in record["per"])
            for p in record["per"]:
                assert max(p["singular_values"][rank:]) < 1e-4 * p["singular_values"][0]
                p["singular_values"] = p["singular_values"][:rank]
            _close(record, self.golden(inputs, self.params), self.rel, name)

    def make_inputs(self, gen):
        base = _randn(gen)
        scales = torch.tensor([3.0, 1.0, 0.3])[:, None]
        deltas = [0.01 * _randn(gen, (SHAPE[0], 3)) @ (scales * _randn(gen, (3, SHAPE[1]))) for _ in range(2)]
        deltas[1][:10] = 0    # rows left unchanged by the second fine-tune
        return {"bases": [base], "targets": [base + d for d in deltas]}

    def golden(self, inputs, params):
        base = inputs["bases"][0]
        per = []
        for t in inputs["targets"]:
            d = t.double() - base.double()
            per.append({"delta2": float(d.pow(2).sum()), "base2": float(base.double().pow(2).sum()),
                        "target2": float(t.double().pow(2).sum()), "changed": int((t != base).sum()),
                        "changed_bf16": int((t.to(torch.bfloat16) != base.to(torch.bfloat16)).sum()),
                        "singular_values": torch.linalg.svdvals(d)[: params["rank"]].tolist()})
        d0, d1 = (t.double() - base.double() for t in inputs["targets"])
        pairs = [{"dot": float((d0 * d1).sum()), "conflicts": int((torch.sign(d0) * torch.sign(d1) < 0).sum())}]
        return {"numel": base.numel(), "per": per, "pairs": pairs}


class TestRowMean(ReductionConformance):
    op = "row_mean"
    rel = 1e-6                # the mean is rounded once to float32
    blocking_exact = False    # fp64 sums per tile (see the note at the top), then that rounding
    blocking_rel = 1e-6

    def make_inputs(self, gen):
        return {"x": _randn(gen)}

    def golden(self, inputs, params):
        x = inputs["x"].double()
        return {"mean": x.mean(dim=0).tolist(), "rows": x.shape[0]}


class TestDeltaErrorOverWholeTiles(TestDeltaError):
    """Tensors of several 2^19-element tiles: blocks of whole tiles (engine/budget.py aligns the
    blocks of a job with statistics passes to the tile grid), so the float sums are bit-identical
    at any budget that holds a tile."""

    blocking_exact = True
    small_budget = "40M"

    def make_inputs(self, gen):
        shape = (2048, 1024)   # 4 tiles of 512 rows
        base = _randn(gen, shape)
        target = base + 0.02 * _randn(gen, shape)
        return {"base": base, "target": target, "recon": target + 0.001 * _randn(gen, shape)}


class TestUnitScoresColumnsOverWholeTiles(TestUnitScoresColumns):
    """Column sums over the rows of each tile: exact under blocking once blocks hold whole tiles."""

    blocking_exact = True
    small_budget = "24M"

    def make_inputs(self, gen):
        return {"w": _randn(gen, (2048, 1024))}
