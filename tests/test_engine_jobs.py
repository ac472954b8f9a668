"""Jobs beyond "one output shaped like its input": several outputs, whole-tensor side inputs,
reduction jobs. Each against a direct torch formula, at several block sizes, and resumed."""
import pytest
import torch

from tensorstore_llm.engine.executor import Executor
from tensorstore_llm.engine.plan import GATHER, WHOLE, InputRef, Plan, TensorJob
from tensorstore_llm.errors import OpError, RecipeError, ShapeMismatch
from tensorstore_llm.io.base import TensorMeta
from tensorstore_llm.ops.registry import OpSpec, Role, StatsPass, register_op
from tensorstore_llm.testing.conformance import SinkConformance


def _sign_and_scale(ctx, params, x):
    return {ctx.output: torch.sign(x), ctx.output + ".scale": x.abs().mean(dim=1)}


def _lora_like(ctx, params, w, b, a):
    return w + b @ a           # w, b: rows of the block; a: the whole r x in factor


def _factors(ctx, params, x):
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    r = 4
    return {ctx.output: u[:, :r] * s[:r], ctx.output + ".A": vh[:r]}


def _row_stats_map(ctx, params, x):
    # the engine's contract: partials per row or integer counts, so blocking cannot change a sum
    return {"row_sumsq": (x.double() ** 2).sum(dim=1), "positive": int((x > 0).sum()), "rows": x.shape[0]}


def _row_stats_fold(a, b):
    return {"row_sumsq": torch.cat([a["row_sumsq"], b["row_sumsq"]]), "positive": a["positive"] + b["positive"],
            "rows": a["rows"] + b["rows"]}


def _row_stats_reduce(params, partials, ctx):
    total = partials[0]
    for p in partials[1:]:
        total = _row_stats_fold(total, p)
    return {"sumsq": float(total["row_sumsq"].sum()), "positive": total["positive"], "rows": total["rows"]}


register_op(OpSpec("test_sign_scale", _sign_and_scale, (Role("x"),)), clobber=True)
register_op(OpSpec("test_lora_like", _lora_like, (Role("w"), Role("b"), Role("a")), temps=3), clobber=True)
register_op(OpSpec("test_add_gathered", lambda ctx, params, y, g: y + g, (Role("y"), Role("g"))), clobber=True)
register_op(OpSpec("test_factors", _factors, (Role("x"),), rowwise=False), clobber=True)
register_op(OpSpec("test_row_stats", lambda ctx, params, x: x, (Role("x"),),
                   passes=(StatsPass(_row_stats_map, _row_stats_reduce, _row_stats_fold),)), clobber=True)


def _artifact(store, tensors, key):
    writer = store.create(key)
    SinkConformance.write_all(None, writer, tensors, rows_per_block=1 << 20)
    return store.open(writer.commit(kind="checkpoint").id)


def _run(store, plan, key, budget, **kw):
    sink = store.create(key)
    ex = Executor(plan, sink, max_memory=budget, progress=False, **kw)
    ex.run()
    art = sink.commit(kind="checkpoint")
    with store.open(art.id) as out:
        return {n: out.read(n) for n in out.keys()}, ex


def test_two_outputs_per_block(store):
    x = torch.randn(3000, 256)
    src = _artifact(store, {"x": x}, "job-in")
    job = TensorJob(TensorMeta("x", (3000, 256), "float32"), "test_sign_scale", (("x", InputRef("s", "x")),),
                    extra_outputs=(TensorMeta("x.scale", (3000,), "float32"),))
    plan = Plan([job], {"s": src})
    results = []
    for i, budget in enumerate(("64M", "1M")):
        out, ex = _run(store, plan, f"job-two-{i}", budget)
        results.append(out)
        assert torch.equal(out["x"], torch.sign(x)) and torch.allclose(out["x.scale"], x.abs().mean(dim=1))
    assert ex.estimate().jobs[0].blocks > 1                       # the small budget split the job
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_whole_side_input_read_once_and_counted(store):
    w, b, a = torch.randn(2048, 256), torch.randn(2048, 8), torch.randn(8, 256)
    src = _artifact(store, {"w": w, "B": b, "A": a}, "job-in")
    job = TensorJob(TensorMeta("w", (2048, 256), "float32"), "test_lora_like",
                    (("w", InputRef("s", "w")), ("b", InputRef("s", "B")), ("a", InputRef("s", "A", WHOLE))))
    plan = Plan([job], {"s": src})
    expected = w + b @ a
    for i, budget in enumerate(("256M", "1M")):
        out, ex = _run(store, plan, f"job-lora-{i}", budget)
        assert torch.allclose(out["w"], expected, atol=1e-5)
    est = ex.estimate().jobs[0]
    assert est.blocks > 1 and est.peak_bytes <= ex.budget
    assert ex.whole_bytes(job) == a.numel() * 4 * 2                 # stored fp32 + its fp32 copy
    assert est.read_bytes == (w.numel() + b.numel()) * 4 + a.numel() * 4   # A read once


def test_gathered_input_reads_the_rows_its_index_names(store):
    """A GATHER input (a vocabulary remap, a pruning gather): output row r gets input row index[r],
    block by block, repeated and reordered rows included, the same at any budget."""
    x, y = torch.randn(1000, 64), torch.randn(1500, 64)
    gen = torch.Generator().manual_seed(0)
    index = torch.cat([torch.arange(200, 700), torch.randint(0, 1000, (1000,), generator=gen)])
    src = _artifact(store, {"x": x, "y": y}, "job-in")
    ref = InputRef("s", "x", GATHER, tuple(index.tolist()))
    job = TensorJob(TensorMeta("y", (1500, 64), "float32"), "test_add_gathered", (("y", InputRef("s", "y")), ("g", ref)))
    plan = Plan([job], {"s": src})
    results = []
    for i, budget in enumerate(("64M", "96K")):
        out, ex = _run(store, plan, f"job-gather-{i}", budget)
        assert torch.equal(out["y"], y + x[index])
        results.append(out["y"])
    assert ex.estimate().jobs[0].blocks > 1                        # the small budget split the job
    assert torch.equal(results[0], results[1])
    assert "index=<1500 rows sha256:" in repr(ref)                  # the index is part of the plan's fingerprint
    for bad, what in (((0,) * 10, "needs an index of 1500 rows"), ((1000,) * 1500, "names row 1000")):
        wrong = TensorJob(job.output, job.op, (("y", InputRef("s", "y")), ("g", InputRef("s", "x", GATHER, bad))))
        with pytest.raises(ShapeMismatch, match=what):
            Plan([wrong], {"s": src}).validate()


def test_whole_tensor_job_with_outputs_of_other_shapes(store):
    x = torch.randn(64, 4) @ torch.randn(4, 48)                     # exactly rank 4
    src = _artifact(store, {"x": x}, "job-in")
    job = TensorJob(TensorMeta("x", (64, 4), "float32"), "test_factors", (("x", InputRef("s", "x")),),
                    extra_outputs=(TensorMeta("x.A", (4, 48), "float32"),))
    # the job's output B has x's rows but not its columns: the input is read by rows all the same
    out, _ = _run(store, Plan([job], {"s": src}), "job-f", "64M")
    assert out["x"].shape == (64, 4) and out["x.A"].shape == (4, 48)
    assert torch.allclose(out["x"] @ out["x.A"], x, atol=1e-4)


def test_bad_jobs_are_refused_before_any_work(store):
    x = torch.randn(16, 8)
    src = _artifact(store, {"x": x, "y": torch.randn(4, 8)}, "job-in")
    rowwise_bad = TensorJob(TensorMeta("x", (16, 8), "float32"), "test_sign_scale", (("x", InputRef("s", "x")),),
                            extra_outputs=(TensorMeta("x.scale", (3,), "float32"),))
    with pytest.raises(RecipeError, match="must have the 16 rows"):
        Executor(Plan([rowwise_bad], {"s": src}), None, progress=False)
    wrong_rows = TensorJob(TensorMeta("x", (16, 8), "float32"), "test_sign_scale", (("x", InputRef("s", "y")),))
    with pytest.raises(Exception, match="4 rows"):
        Executor(Plan([wrong_rows], {"s": src}), None, progress=False)
    missing = TensorJob(TensorMeta("x", (16, 8), "float32"), "test_sign_scale", (("x", InputRef("s", "x")),))
    sink = store.create("job-miss")
    with pytest.raises(OpError, match=r"returned no tensor for output\(s\) \['x.other'\]"):
        bad = TensorJob(TensorMeta("x", (16, 8), "float32"), "test_sign_scale", (("x", InputRef("s", "x")),),
                        extra_outputs=(TensorMeta("x.scale", (16,), "float32"), TensorMeta("x.other", (16,), "float32")))
        Executor(Plan([bad], {"s": src}), sink, progress=False).run()
    sink.abort()
    assert missing.outputs() == (missing.output,)


def test_reduction_jobs_identical_at_any_block_size_and_resumed(store, tmp_path):
    x = torch.randn(2000, 100)
    src = _artifact(store, {"x": x}, "job-in")
    job = TensorJob(TensorMeta("x-stats", (2000, 100), "float32"), "test_row_stats", (("x", InputRef("s", "x")),),
                    reduce_only=True)
    records = []
    for budget in ("128M", "300K", "100K"):
        ex = Executor(Plan([job], {"s": src}), None, max_memory=budget, progress=False)
        ex.run()
        records.append(ex.records["x-stats"])
    assert records[0]["rows"] == 2000 and records[0]["positive"] == int((x > 0).sum())
    assert records[0]["sumsq"] == pytest.approx(float((x.double() ** 2).sum()), rel=1e-12)
    assert records[0] == records[1] == records[2]
    journal = str(tmp_path / "records.jsonl")
    first = Executor(Plan([job], {"s": src}), None, max_memory="300K", progress=False, records_path=journal)
    first.run()
    again = Executor(Plan([job], {"s": src}), None, max_memory="300K", progress=False, records_path=journal)
    again.run()
    assert again.skipped == ["x-stats"] and again.computed == [] and again.records == first.records == {"x-stats": records[0]}


def test_mediator_conflict_table_runs_as_reduction_jobs(store, small_family):
    """The per-layer sign-conflict ratios equal a direct count, whatever the budget."""
    from tensorstore_llm.io.hf_dir import HFCheckpointSource
    from tensorstore_llm.merge.mediator import conflict_table
    from tensorstore_llm.ops.layers import layer_key

    with HFCheckpointSource(small_family["base"]) as b, HFCheckpointSource(small_family["ft1"]) as f1, \
            HFCheckpointSource(small_family["ft2"]) as f2:
        names = b.keys()
        tables = [conflict_table(b, [f1, f2], names, 1.0, max_memory=budget) for budget in ("256M", "64K")]
        direct = {}
        for name in names:
            base = b.read(name).float()
            s1, s2 = torch.sign(f1.read(name).float() - base), torch.sign(f2.read(name).float() - base)
            c, t = direct.get(layer_key(name), (0, 0))
            direct[layer_key(name)] = (c + int(((s1 * s2) < 0).sum()), t + base.numel())
    assert tables[0].ratios == tables[1].ratios == {k: c / t for k, (c, t) in direct.items()}
    assert tables[0].threshold == tables[1].threshold
