"""Writes past the page cache (io/fsutil.DirectWrites, used by the Hugging Face directory sink):
the same bytes as buffered writes for any offsets and lengths, a refusal falls back to buffered
writes with the same result, and an exported checkpoint (odd header length, tensors of a few MiB
at unaligned offsets, several shards) is byte-identical to its input and resumes after an
interruption. Copies (ops that do not compute) stream in blocks of at most COPY_BLOCK_BYTES
whatever the budget, while computing ops keep the budget's blocks.
"""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tensorstore_llm.engine import Executor, plan_map
from tensorstore_llm.engine.budget import COPY_BLOCK_BYTES
from tensorstore_llm.engine.options import RunOptions
from tensorstore_llm.io.fsutil import DIRECT_ALIGN, DirectWrites
from tensorstore_llm.io.hf_dir import HFCheckpointSink, HFCheckpointSource

MIB = 1 << 20


def _writes(size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(offset, length) pieces covering [0, size) in order: tiny ones, ones inside one block,
    ones across many direct chunks, and neighbours sharing a block."""
    cuts = sorted({0, size, 1, 7, DIRECT_ALIGN - 1, DIRECT_ALIGN + 5, 3 * DIRECT_ALIGN,
                   *rng.integers(1, size, 12).tolist()})
    return [(a, b - a) for a, b in zip(cuts, cuts[1:])]


def _write_pieces(path, data: np.ndarray, direct: DirectWrites, order) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, len(data))
    direct_fd = direct.open(str(path))
    try:
        for offset, length in order:
            direct.pwrite(fd, direct_fd, memoryview(data[offset:offset + length]), offset)
    finally:
        os.close(fd)
        if direct_fd is not None:
            os.close(direct_fd)
        direct.close()


@pytest.mark.parametrize("shuffle", [False, True])
def test_direct_writes_give_the_bytes_written(tmp_path, shuffle):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 9 * MIB + 1234, dtype=np.uint8)
    order = _writes(len(data), rng)
    if shuffle:   # tensors of a resumed export arrive in any order
        order = [order[i] for i in rng.permutation(len(order))]
    direct = DirectWrites(chunk=MIB)
    path = tmp_path / "out.bin"
    _write_pieces(path, data, direct, order)
    assert path.read_bytes() == data.tobytes()
    if direct.enabled:   # this file system takes O_DIRECT: most bytes went past the page cache
        assert direct.direct_bytes > len(data) // 2


def test_a_refused_direct_write_falls_back_to_buffered_writes(tmp_path):
    """Offsets aligned to 256 bytes only: a device of 512-byte sectors refuses them (EINVAL);
    every later write is buffered, and the file holds the same bytes."""
    rng = np.random.default_rng(4)
    data = rng.integers(0, 256, 3 * MIB + 999, dtype=np.uint8)
    direct = DirectWrites(align=256, chunk=64 * 1024)
    path = tmp_path / "out.bin"
    _write_pieces(path, data, direct, [(0, 100), (100, len(data) - 100)])
    assert path.read_bytes() == data.tobytes()


def _model(directory, shapes: dict) -> dict:
    directory.mkdir()
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(*shape, generator=gen).to(torch.bfloat16) for name, shape in shapes.items()}
    save_file(tensors, str(directory / "model.safetensors"))
    return tensors


SHAPES = {"a.weight": (1031, 997), "b.bias": (13,), "c.weight": (2049, 1500), "odd_name_to_shift_the_header": (3, 5)}


def test_exported_checkpoint_is_bit_identical_past_the_page_cache(tmp_path):
    tensors = _model(tmp_path / "in", SHAPES)
    with HFCheckpointSource(str(tmp_path / "in")) as src:
        sink = HFCheckpointSink(str(tmp_path / "out"), max_shard_bytes=3 * MIB)   # several shards
        Executor(plan_map("copy", {"s": src}, {"x": "s"}), sink, RunOptions(device="cpu", progress=False)).run()
        direct = sink._direct.direct_bytes
        sink.commit()
    shards = sorted(p for p in os.listdir(tmp_path / "out") if p.endswith(".safetensors"))
    assert len(shards) > 1
    out = {}
    for shard in shards:
        out.update(load_file(str(tmp_path / "out" / shard)))
    assert sorted(out) == sorted(tensors) and all(torch.equal(out[k], tensors[k]) for k in tensors)
    if sink._direct.enabled:
        assert direct > 4 * MIB


class _StopsAt(HFCheckpointSource):
    """A real source that raises KeyboardInterrupt (as Ctrl-C would) when ``stop_at`` is read."""

    stop_at = None

    def read_rows(self, name, start, stop):
        if name == self.stop_at:
            raise KeyboardInterrupt
        return super().read_rows(name, start, stop)


def test_interrupted_export_resumes_and_rechecks_direct_written_tensors(tmp_path):
    """A run stopped at the last tensor keeps the finished ones (journal); the next run reads them
    back through the page cache, finds their checksums, skips them and ends with the same bytes."""
    tensors = _model(tmp_path / "in", SHAPES)
    options = RunOptions(device="cpu", progress=False)
    with _StopsAt(str(tmp_path / "in")) as src:
        src.stop_at = src.keys()[-1]
        first = HFCheckpointSink(str(tmp_path / "out"), job_key="k")
        with pytest.raises(KeyboardInterrupt):
            Executor(plan_map("copy", {"s": src}, {"x": "s"}), first, options).run()
        first.close()   # interrupted: the staging stays for a resume
        src.stop_at = None
        second = HFCheckpointSink(str(tmp_path / "out"), job_key="k")
        ex = Executor(plan_map("copy", {"s": src}, {"x": "s"}), second, options)
        ex.run()
        second.commit()
    assert ex.skipped and set(ex.skipped) < set(tensors)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(out) == sorted(tensors) and all(torch.equal(out[k], tensors[k]) for k in tensors)


def test_copies_stream_in_small_blocks_computing_ops_in_the_budgets(tmp_path):
    _model(tmp_path / "in", {"big": (4096, 2048)})   # 16 MiB of bf16
    with HFCheckpointSource(str(tmp_path / "in")) as src:
        options = RunOptions(device="cpu", max_memory="1G", progress=False)
        copy = Executor(plan_map("copy", {"s": src}, {"x": "s"}), HFCheckpointSink(str(tmp_path / "c")), options)
        rows = copy.block_rows(copy.plan.jobs[0])
        assert rows * 2048 * 2 == COPY_BLOCK_BYTES
        summed = Executor(plan_map("weighted_sum", {"s": src}, {"models": ["s"]}, params={"weights": [1.0]}),
                          HFCheckpointSink(str(tmp_path / "w")), options)
        assert summed.block_rows(summed.plan.jobs[0]) == 4096   # the whole tensor fits the budget
        copy.sink.abort()
        summed.sink.abort()
