"""The streaming engine: exact results, independent of block size, order, and device draws."""
import random

import pytest
import torch

from tensorstore_llm import api
from tensorstore_llm.engine import Executor, plan_map
from tensorstore_llm.errors import DTypeError, RecipeError, ShapeMismatch, TensorNotFound, TsllmError
from tensorstore_llm.io.hf_dir import HFCheckpointSource
from tensorstore_llm.ops.registry import OpSpec, Role, register_op
from tensorstore_llm.seeding import normal_rows, seed_value, uniform_rows


def _sources(tiny_family, *names):
    return {n: HFCheckpointSource(tiny_family[n]) for n in names}


def test_weighted_sum_equals_direct_formula(store, tiny_family):
    art = api.weighted_sum(store, [tiny_family["base"], tiny_family["ft1"], tiny_family["ft2"]], [0.2, -0.5, 1.3],
                           max_memory="16K", progress=False).artifact
    srcs = _sources(tiny_family, "base", "ft1", "ft2")
    with store.open(art.id) as out:
        for name in out.keys():
            x = [srcs[k].read(name).float() for k in ("base", "ft1", "ft2")]
            expected = (x[0] * 0.2 + x[1] * -0.5 + x[2] * 1.3).to(torch.bfloat16)
            assert torch.equal(out.read(name), expected), name


def test_normalised_weighted_sum(store, tiny_family):
    art = api.weighted_sum(store, [tiny_family["ft1"], tiny_family["ft2"]], [1.0, 3.0], normalize=True,
                           dtype="float32", progress=False).artifact
    srcs = _sources(tiny_family, "ft1", "ft2")
    with store.open(art.id) as out:
        name = "model.layers.1.mlp.down_proj.weight"
        expected = (srcs["ft1"].read(name).float() * 1.0 + srcs["ft2"].read(name).float() * 3.0) / 4.0
        assert out.read(name).dtype == torch.float32 and torch.equal(out.read(name), expected)


def test_result_is_independent_of_block_size_and_order(tmp_path, tiny_family):
    from tensorstore_llm.store import Store

    ids = set()
    for i, budget in enumerate(["8K", "64K", "1G"]):
        store = Store(str(tmp_path / f"s{i}"))
        srcs = _sources(tiny_family, "ft1", "ft2")
        plan = plan_map("weighted_sum", srcs, {"models": ["ft1", "ft2"]}, params={"weights": [0.7, 0.3]})
        random.Random(i).shuffle(plan.jobs)
        result = api.run_plan(store, plan, kind="checkpoint", max_memory=budget, progress=False)
        assert max(j.blocks for j in result.estimate.jobs) == (1 if budget == "1G" else max(j.blocks for j in result.estimate.jobs))
        ids.add(result.artifact.id)
    assert len(ids) == 1


def test_budget_splits_big_tensors_and_bounds_memory(tiny_family):
    srcs = _sources(tiny_family, "base", "ft1", "ft2")
    plan = plan_map("weighted_sum", srcs, {"models": ["base", "ft1", "ft2"]}, params={"weights": [1, 1, 1]})
    est = Executor(plan, None, max_memory="32K").estimate()
    embed = next(j for j in est.jobs if j.job.output.name == "model.embed_tokens.weight")
    assert embed.blocks > 1 and embed.peak_bytes <= 32 * 1024
    assert all(j.peak_bytes <= 32 * 1024 for j in est.jobs)
    assert est.read_bytes == 3 * est.write_bytes
    big = Executor(plan, None, max_memory="1G").estimate()
    assert all(j.blocks == 1 for j in big.jobs)


def test_dry_run_writes_nothing(store, tiny_family):
    result = api.weighted_sum(store, [tiny_family["ft1"], tiny_family["ft2"]], [0.5, 0.5], dry_run=True)
    assert result.artifact is None and result.estimate.jobs
    assert not (store._dir("staging") and __import__("os").path.exists(store._dir("staging")))


def test_plan_validation_fails_before_any_work(store, tmp_path, tiny_family):
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(3, 3, dtype=torch.bfloat16)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(ShapeMismatch, match=r"model.embed_tokens.weight.*\(512, 64\).*\(3, 3\) in input model0 \(.*odd.safetensors"):
        api.weighted_sum(store, [str(tmp_path / "odd.safetensors"), tiny_family["base"]], [1, 1], progress=False)
    save_file({"model.embed_tokens.weight": torch.zeros(512, 64, dtype=torch.bfloat16)}, str(tmp_path / "part.safetensors"))
    with pytest.raises(TensorNotFound, match="model.layers.0.*part.safetensors"):
        api.weighted_sum(store, [tiny_family["base"], str(tmp_path / "part.safetensors")], [1, 1], progress=False)
    save_file({"model.embed_tokens.weight": torch.zeros(512, 64, dtype=torch.float16)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(DTypeError, match=r"model.embed_tokens.weight.*float16.*half.safetensors.*bfloat16"):
        api.weighted_sum(store, [tiny_family["base"], str(tmp_path / "half.safetensors")], [1, 1], progress=False)
    with pytest.raises(TsllmError, match="2 models but 3 weights"):
        api.weighted_sum(store, [tiny_family["base"], tiny_family["ft1"]], [1, 1, 1])
    srcs = _sources(tiny_family, "ft1")
    with pytest.raises(RecipeError, match="unknown parameter"):
        plan_map("weighted_sum", srcs, {"models": ["ft1"]}, params={"weights": [1], "bogus": 2})
    with pytest.raises(RecipeError, match="unknown op"):
        plan_map("no-such-op", srcs, {"x": "ft1"})
    with pytest.raises(RecipeError, match="sum to 0"):
        plan_map("weighted_sum", srcs, {"models": ["ft1"]}, params={"weights": [0], "normalize": True})
    assert store.list() == []


def test_seeded_draws_are_blocking_independent():
    shape = (5000, 300)
    whole = uniform_rows(7, "dare", "w", shape, 0, 5000)
    parts = torch.cat([uniform_rows(7, "dare", "w", shape, a, min(a + 777, 5000)) for a in range(0, 5000, 777)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, uniform_rows(8, "dare", "w", shape, 0, 5000))
    assert not torch.equal(whole, uniform_rows(7, "dare", "w2", shape, 0, 5000))
    assert torch.equal(normal_rows(1, "x", "t", (10,), 2, 7), normal_rows(1, "x", "t", (10,), 0, 10)[2:7])
    many = (30000, 100)                                 # 6 groups of 5242 rows: drawn in parallel
    whole = uniform_rows(7, "dare", "w", many, 1000, 29000)
    parts = torch.cat([uniform_rows(7, "dare", "w", many, a, min(a + 5000, 29000)) for a in range(1000, 29000, 5000)])
    assert torch.equal(whole, parts)
    assert seed_value(1, "a", "b", 2) == seed_value(1, "a", "b", 2) != seed_value(1, "a", "b", 3)


def _noisy(ctx, params, x):
    """Test op: x + uniform noise drawn through the context (seeded per tensor and rows)."""
    return x + ctx.uniform()


register_op(OpSpec("test_noisy", _noisy, (Role("x"),), random=True), clobber=True)


def test_random_op_is_reproducible_across_blocks_and_seeds(tmp_path, tiny_family):
    from tensorstore_llm.store import Store

    results = {}
    for label, budget, seed in [("a", "8K", 1), ("b", "1G", 1), ("c", "1G", 2)]:  # 8K: one row per block
        srcs = _sources(tiny_family, "base")
        plan = plan_map("test_noisy", srcs, {"x": "base"}, dtype="float32")
        results[label] = api.run_plan(Store(str(tmp_path / label)), plan, kind="checkpoint", seed=seed,
                                      max_memory=budget, progress=False).artifact
    assert results["a"].manifest.tensors == results["b"].manifest.tensors
    assert results["a"].manifest.tensors != results["c"].manifest.tensors
    assert results["a"].manifest.run["generator_device"] == "cpu"


def test_failing_input_leaves_no_artifact_and_no_staging(store, tmp_path, tiny_family):
    import os
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_family["base"], broken)
    src = HFCheckpointSource(str(broken))
    plan = plan_map("copy", {"s": src}, {"x": "s"})
    with open(broken / "model.safetensors", "r+b") as f:  # truncate after the header was validated
        f.truncate(os.path.getsize(broken / "model.safetensors") // 2)
    with pytest.raises(TsllmError, match="truncated"):
        api.run_plan(store, plan, kind="checkpoint", progress=False)
    assert store.list() == [] and os.listdir(store._dir("staging")) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu_bit_for_bit(tmp_path, tiny_family):
    from tensorstore_llm.store import Store

    ids = []
    for device in ("cpu", "cuda"):
        srcs = _sources(tiny_family, "base", "ft1", "ft2")
        plan = plan_map("weighted_sum", srcs, {"models": ["base", "ft1", "ft2"]}, params={"weights": [0.2, 0.3, 0.5]})
        art = api.run_plan(Store(str(tmp_path / device)), plan, kind="checkpoint", device=device, progress=False).artifact
        ids.append(art.manifest.tensors)
    assert ids[0] == ids[1]


def test_output_block_buffers_are_recycled_within_their_bound():
    from tensorstore_llm.engine.memory import BlockBuffers as _BlockBuffers

    pool = _BlockBuffers(keep=2)
    a = pool.take((64, 1024), torch.bfloat16)
    ptr = a.data_ptr()
    pool.give(a)
    b = pool.take((32, 1024), torch.float32)             # fits in a's 128 KiB: same memory
    assert b.data_ptr() == ptr and b.shape == (32, 1024) and b.dtype == torch.float32
    pool.give(torch.empty(10))                           # not made here: ignored
    pool.give(b)
    c = pool.take((64, 1024), torch.float32)             # fits nothing free: fresh memory
    assert c.data_ptr() != ptr and len(pool._free) == 0
    d, e = pool.take((4,), torch.int8), pool.take((4,), torch.int8)   # 3 in use: more than `keep`
    pool.give(c)
    assert len(pool._free) == 0                          # in use + kept never exceeds `keep`
    pool.give(d)
    pool.give(e)
    assert len(pool._free) == 2
