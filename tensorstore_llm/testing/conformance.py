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
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]
            lo, hi = (0, 256) if bits == torch.uint8 else (-(2**15), 2**15) if bits == torch.int16 else (-(2**31), 2**31 - 1)
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
