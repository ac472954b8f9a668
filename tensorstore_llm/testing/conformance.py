"""Conformance base classes: every TensorSource, TensorSink and op implementation subclasses these
(plugin authors too: they ship inside the package, as zarr.testing does; they need pytest).

A subclass only says how to build its source (from a dict of tensors) or its sink and how to
read back what a sink wrote; the behaviour every format must share is tested here once.
"""
import hashlib

import pytest
import torch

from tensorstore_llm.dtypes import names, raw_bytes
from tensorstore_llm.errors import TensorNotFound
from tensorstore_llm.io.base import TensorMeta


def sample_tensors() -> dict[str, torch.Tensor]:
    """One tensor per dtype with awkward bit patterns (NaN payloads, -0, inf, subnormals)."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for i, name in enumerate(names()):
        dtype = getattr(torch, name)
        shape = (37, 5) if i % 2 else (11, 3, 4)
        if dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=gen).bool()
        else:
            size = torch.empty((), dtype=dtype).element_size()
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
            lo, hi = {torch.uint8: (0, 256), torch.int16: (-(2**15), 2**15)}.get(bits, (-(2**31), 2**31 - 1))
            t = torch.randint(lo, hi, shape, generator=gen, dtype=torch.int64).to(bits).view(dtype)
        out[f"t.{name}"] = t
    out["scalar.f32"] = torch.tensor(3.5)
    out["vector.bf16"] = torch.randn(1000, generator=gen).to(torch.bfloat16)
    out["empty.f16"] = torch.empty((0, 8), dtype=torch.float16)
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and bytes(raw_bytes(a)) == bytes(raw_bytes(b))


class SourceConformance:
    """Subclass and implement ``make_source(tmp_path, tensors) -> TensorSource``."""

    def make_source(self, tmp_path, tensors):
        raise NotImplementedError

    @pytest.fixture
    def source(self, tmp_path):
        tensors = sample_tensors()
        src = self.make_source(tmp_path, tensors)
        yield src, tensors
        src.close()

    def test_keys_and_meta(self, source):
        src, tensors = source
        assert sorted(src.keys()) == sorted(tensors)
        for name, t in tensors.items():
            meta = src.meta(name)
            assert meta == TensorMeta(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))

    def test_read_is_bit_exact(self, source):
        src, tensors = source
        for name, t in tensors.items():
            assert same_bits(src.read(name), t), name

    def test_read_rows_equals_slices(self, source):
        src, tensors = source
        for name, t in tensors.items():
            if t.dim() == 0:
                continue
            n = t.shape[0]
            for start, stop in [(0, n), (0, min(1, n)), (n // 3, n // 2), (n, n), (max(n - 2, 0), n)]:
                assert same_bits(src.read_rows(name, start, stop), t[start:stop]), (name, start, stop)

    def test_missing_tensor(self, source):
        src, _ = source
        with pytest.raises(TensorNotFound, match="nope"):
            src.meta("nope")

    def test_identity_is_stable(self, tmp_path):
        tensors = sample_tensors()
        a = self.make_source(tmp_path / "a", tensors)
        assert a.identity and a.identity == a.identity
        a.close()


class SinkConformance:
    """Subclass and implement ``make_sink(tmp_path)`` and ``finish_and_open(sink) -> TensorSource``."""

    def make_sink(self, tmp_path):
        raise NotImplementedError

    def finish_and_open(self, sink):
        raise NotImplementedError

    def write_all(self, sink, tensors, rows_per_block=4):
        sink.prepare([TensorMeta(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()])
        checksums = {}
        for name, t in tensors.items():
            if t.dim() and t.numel():
                for start in range(0, t.shape[0], rows_per_block):
                    sink.write_rows(name, start, t[start:start + rows_per_block])
            elif t.dim() == 0:
                sink.write_rows(name, 0, t)
            checksums[name] = sink.finish(name)
        return checksums

    def test_blocks_round_trip_bit_exact(self, tmp_path):
        tensors = sample_tensors()
        sink = self.make_sink(tmp_path)
        checksums = self.write_all(sink, tensors)
        with self.finish_and_open(sink) as src:
            for name, t in tensors.items():
                assert same_bits(src.read(name), t), name
        for name, t in tensors.items():
            assert checksums[name] == "sha256:" + hashlib.sha256(bytes(raw_bytes(t))).hexdigest()

    def test_blocks_must_come_in_order(self, tmp_path):
        t = torch.arange(40, dtype=torch.float32).reshape(10, 4)
        sink = self.make_sink(tmp_path)
        sink.prepare([TensorMeta("w", (10, 4), "float32")])
        sink.write_rows("w", 0, t[:4])
        with pytest.raises(ValueError, match="expected 4"):
            sink.write_rows("w", 6, t[6:])
        sink.abort()

    def test_unfinished_tensor_cannot_finish(self, tmp_path):
        t = torch.zeros(10, 4)
        sink = self.make_sink(tmp_path)
        sink.prepare([TensorMeta("w", (10, 4), "float32")])
        sink.write_rows("w", 0, t[:4])
        with pytest.raises(ValueError, match="4 of 10 rows"):
            sink.finish("w")
        sink.abort()

    def test_completed_survives_a_new_sink(self, tmp_path):
        tensors = {"a": torch.ones(6, 2), "b": torch.zeros(3)}
        sink = self.make_sink(tmp_path)
        sink.prepare([TensorMeta(n, tuple(t.shape), "float32") for n, t in tensors.items()])
        sink.write_rows("a", 0, tensors["a"])
        digest = sink.finish("a")
        sink.close()  # stop here, keeping the staging directory
        again = self.make_sink(tmp_path)
        again.prepare([TensorMeta(n, tuple(t.shape), "float32") for n, t in tensors.items()])
        assert again.completed() == {"a": digest}
        again.write_rows("b", 0, tensors["b"])
        again.finish("b")
        with self.finish_and_open(again) as src:
            assert torch.equal(src.read("a"), tensors["a"]) and torch.equal(src.read("b"), tensors["b"])


class OpConformance:
    """Subclass for every op: give its name, its inputs and a direct formula; the base checks the
    op through the engine the way users run it.

    Set ``op`` and ``params`` (a dict, validated like a recipe's), and implement
    ``make_inputs(gen) -> {role: tensor or [tensors]}`` (one tensor's inputs) and
    ``golden(inputs, params) -> tensor`` (a direct torch formula; None for a random op, whose
    draws are checked by the determinism tests). ``whole`` names roles read whole
    (WHOLE relation), ``extra_outputs(name, inputs) -> [TensorMeta]`` declares further outputs
    (then ``golden`` returns a dict). ``atol`` is 0 where the op is exact.

    Checked: the golden formula; bit-identical results at a budget that holds whole tensors and
    one that splits them into row blocks; with the jobs in shuffled order; after a resume; and,
    on a GPU, CUDA against the CPU (bit for bit where ``cuda_exact``).
    """

    op: str = ""
    params: dict = {}
    whole: tuple[str, ...] = ()
    dtype = "float32"
    small_budget = "48K"
    atol = 0.0
    cuda_exact = True
    blocking_exact = True   # False for ops whose matrix products BLAS may sum in another order per block shape
    names = ("t0", "t1", "t2")

    def make_inputs(self, gen):
        raise NotImplementedError

    def golden(self, inputs, params):
        raise NotImplementedError

    def extra_outputs(self, name, inputs) -> list:
        return []

    def finished_output(self, name, inputs) -> str:
        """The output by which the engine reports the job for tensor ``name`` finished (its entry
        in ``Executor.skipped``: the job's first output); ``name`` itself unless overridden."""
        return name

    def assert_cuda_matches(self, cpu: dict, gpu: dict) -> None:
        """The CUDA run's results (``gpu``) against the CPU's: bit for bit where ``cuda_exact``,
        else within 1e-5. Override to compare other results (reduction records)."""
        for name in cpu:
            if self.cuda_exact:
                assert same_bits(cpu[name], gpu[name]), name
            else:
                assert torch.allclose(cpu[name].float(), gpu[name].float(), atol=1e-5, rtol=1e-5), name

    # -- machinery --------------------------------------------------------------------------------
    def _store(self, tmp_path):
        from tensorstore_llm.store import Store

        gen = torch.Generator().manual_seed(7)
        per_name = {n: self.make_inputs(gen) for n in self.names}
        store = Store(str(tmp_path / "op-store"))
        tensors = {}
        for name, inputs in per_name.items():
            for role, value in inputs.items():
                for i, t in enumerate(value if isinstance(value, list) else [value]):
                    tensors.setdefault(f"{role}{i}", {})[name] = t
        sources = {}
        for key, group in tensors.items():
            writer = store.create(f"job-in-{key}")
            self.write_all_sink(writer, group)
            sources[key] = store.open(writer.commit(kind="checkpoint").id)
        return store, per_name, sources

    @staticmethod
    def write_all_sink(sink, tensors):
        SinkConformance.write_all(None, sink, tensors, rows_per_block=1 << 20)

    def _plan(self, per_name, sources, order):
        from tensorstore_llm.engine.plan import Plan, TensorJob
        from tensorstore_llm.ops.registry import get_op

        spec = get_op(self.op)
        params = spec.make_params(self.params, f"{type(self).__name__}")
        jobs = []
        for name in order:
            inputs = per_name[name]
            first = next(iter(inputs.values()))
            first = first[0] if isinstance(first, list) else first
            out = TensorMeta(name, tuple(first.shape), self.dtype)
            jobs.append(TensorJob(out, self.op, self.input_roles(spec, name, inputs), params,
                                  extra_outputs=tuple(self.extra_outputs(name, inputs))))
        return Plan(jobs, sources), params

    def input_roles(self, spec, name: str, inputs: dict) -> tuple:
        """The job's ``(role, InputRef or tuple of InputRefs)`` pairs for tensor ``name``: role
        ``r``'s i-th tensor is read from source ``f"{r}{i}"`` (see ``_store``), whole where ``r``
        is in ``whole``, else by rows."""
        from tensorstore_llm.engine.plan import ROWS, WHOLE, InputRef

        roles = []
        for role in spec.roles:
            relation = WHOLE if role.name in self.whole else ROWS
            value = inputs[role.name]
            if isinstance(value, list):
                roles.append((role.name, tuple(InputRef(f"{role.name}{i}", name, relation) for i in range(len(value)))))
            else:
                roles.append((role.name, InputRef(f"{role.name}0", name, relation)))
        return tuple(roles)

    def _run(self, tmp_path, store, per_name, sources, *, budget, order=None, key="job-out", device="cpu",
             stop_after=None):
        from tensorstore_llm.engine.executor import Executor
        from tensorstore_llm.engine.options import RunOptions

        options = RunOptions(max_memory=budget, progress=False, device=device)
        plan, _ = self._plan(per_name, sources, order or self.names)
        sink = store.create(key)
        if stop_after is not None:   # an interrupted run: only some jobs finish, the staging stays
            partial, _ = self._plan(per_name, sources, order[:stop_after])
            partial_sink = sink
            Executor(partial, partial_sink, options).run()
            partial_sink.close()
            sink = store.create(key)
        executor = Executor(plan, sink, options)
        executor.run()
        artifact = sink.commit(kind="checkpoint")
        with store.open(artifact.id) as out:
            return {n: out.read(n) for n in out.keys()}, executor

    def _expected(self, per_name):
        out = {}
        for name, inputs in per_name.items():
            value = self.golden(inputs, self.params)
            if value is None:
                continue
            if isinstance(value, dict):
                out.update(value)
            else:
                out[name] = value
        return out

    # -- the checks -------------------------------------------------------------------------------
    def test_golden_formula(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        got, _ = self._run(tmp_path, store, per_name, sources, budget="256M")
        for name, value in self._expected(per_name).items():
            expected = value.to(got[name].dtype)
            if self.atol:
                assert torch.allclose(got[name].float(), expected.float(), atol=self.atol, rtol=0), name
            else:
                assert same_bits(got[name], expected), name

    def test_block_size_and_job_order_do_not_change_bits(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        whole, _ = self._run(tmp_path, store, per_name, sources, budget="256M", key="job-a")
        split, executor = self._run(tmp_path, store, per_name, sources, budget=self.small_budget,
                                    order=list(reversed(self.names)), key="job-b")
        from tensorstore_llm.ops.registry import get_op
        if get_op(self.op).rowwise:
            assert max(j.blocks for j in executor.estimate().jobs) > 1, "the small budget should split a tensor"
        assert set(whole) == set(split)
        for n in whole:
            if self.blocking_exact:
                assert same_bits(whole[n], split[n]), n
            else:
                assert torch.allclose(whole[n].float(), split[n].float(), rtol=1e-5, atol=1e-5), n

    def test_resume_is_bit_identical(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        straight, _ = self._run(tmp_path, store, per_name, sources, budget="256M", key="job-a")
        order = list(self.names)
        resumed, executor = self._run(tmp_path, store, per_name, sources, budget=self.small_budget, order=order,
                                      key="job-r", stop_after=1)
        assert executor.skipped == [self.finished_output(order[0], per_name[order[0]])]
        assert set(straight) == set(resumed)
        for n in straight:
            if self.blocking_exact:
                assert same_bits(straight[n], resumed[n]), n
            else:
                assert torch.allclose(straight[n].float(), resumed[n].float(), rtol=1e-5, atol=1e-5), n

    def test_cuda_parity(self, tmp_path):
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device on this machine")
        store, per_name, sources = self._store(tmp_path)
        cpu, _ = self._run(tmp_path, store, per_name, sources, budget="256M", key="job-cpu")
        gpu, _ = self._run(tmp_path, store, per_name, sources, budget=self.small_budget, key="job-gpu", device="cuda")
        self.assert_cuda_matches(cpu, gpu)
