"""The reader holds at most one job ahead for WHOLE inputs (read once, held for all of a job's
blocks), and the memory model counts exactly that; ``lora extract`` from directories never
loads numba (the diff package's decoder).

Before, the one-block queues alone bounded whole inputs, so three jobs' inputs were alive at once
(being computed, queued, being read) whatever ``--max-memory`` said: three modules' bf16 pairs,
132 MiB, in ``lora extract`` at 1 GB.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
import weakref

import torch

from tensorstore_llm.engine.budget import WHOLE_JOBS_HELD
from tensorstore_llm.engine.executor import Executor
from tensorstore_llm.engine.plan import WHOLE, InputRef, Plan, TensorJob
from tensorstore_llm.io.base import TensorMeta
from tensorstore_llm.ops.registry import OpSpec, Role, register_op
from tensorstore_llm.testing.conformance import SinkConformance
from tensorstore_llm.testing.synth import write_model_family

JOBS = 6
SHAPE = (512, 512)   # 1 MiB of fp32 per job
_alive_seen: list[int] = []   # per kernel call: other jobs' inputs alive at that moment
_reads: list[tuple[str, weakref.ref]] = []
_lock = threading.Lock()


def _doubled_after_a_pause(ctx, params, x):
    """A whole-tensor kernel slow enough that the reader runs ahead as far as it is allowed."""
    time.sleep(0.15)
    with _lock:
        _alive_seen.append(sum(1 for name, ref in _reads if name != ctx.output and ref() is not None))
    return x * 2


register_op(OpSpec("test_whole_doubled", _doubled_after_a_pause, (Role("x"),), rowwise=False), clobber=True)


class _RecordingSource:
    """A store artifact's source that remembers (weakly) the memory of every tensor it returned:
    a numpy array, alive as long as any tensor sharing its storage is."""

    def __init__(self, source):
        self._source = source

    def __getattr__(self, name):
        return getattr(self._source, name)

    def read_rows(self, name, start, stop):
        memory = self._source.read_rows(name, start, stop).numpy().copy()
        with _lock:
            _reads.append((name, weakref.ref(memory)))
        return torch.from_numpy(memory)


def _plan(store):
    inputs = {f"t{i}": torch.full(SHAPE, float(i)) for i in range(JOBS)}
    writer = store.create("whole-readahead-inputs")
    SinkConformance.write_all(None, writer, inputs, rows_per_block=1 << 20)
    source = _RecordingSource(store.open(writer.commit(kind="checkpoint").id))
    jobs = [TensorJob(TensorMeta(name, SHAPE, "float32"), "test_whole_doubled", (("x", InputRef("s", name, WHOLE)),))
            for name in inputs]
    return Plan(jobs, {"s": source}), inputs


def _run(store, plan, budget, key):
    _alive_seen.clear()
    _reads.clear()
    sink = store.create(key)
    ex = Executor(plan, sink, max_memory=budget, progress=False, tile_workers=1)
    ex.run()
    with store.open(sink.commit(kind="checkpoint").id) as out:
        return {n: out.read(n) for n in out.keys()}, ex


def test_reader_holds_one_whole_job_ahead_and_one_under_a_small_budget(store):
    plan, inputs = _plan(store)
    out, ex = _run(store, plan, "1G", "whole-readahead-1g")
    assert ex.whole_jobs_held == WHOLE_JOBS_HELD == 2
    assert max(_alive_seen) == 1      # the next job is read while one computes, never two ahead
    for name, x in inputs.items():
        assert torch.equal(out[name], x * 2)

    smallest = max(ex.min_block_bytes(job) for job in plan.jobs)
    out, ex = _run(store, plan, smallest, "whole-readahead-small")   # the next job's inputs do not fit
    assert ex.whole_jobs_held == 1
    assert max(_alive_seen) == 0      # a job's inputs are read once the previous job's are gone
    for name, x in inputs.items():
        assert torch.equal(out[name], x * 2)


def test_predicted_tensor_data_counts_the_job_read_ahead(store):
    plan, _ = _plan(store)
    ahead = Executor(plan, None, max_memory="1G")
    smallest = max(ahead.min_block_bytes(job) for job in plan.jobs)
    alone = Executor(plan, None, max_memory=smallest)
    assert (ahead.whole_jobs_held, alone.whole_jobs_held) == (2, 1)
    one_job_inputs = SHAPE[0] * SHAPE[1] * 4
    assert ahead.whole_ahead_bytes(plan.jobs[0]) == one_job_inputs
    assert ahead.whole_ahead_bytes(plan.jobs[-1]) == 0             # nothing follows the last job
    assert ahead.estimate().rss.tensors - alone.estimate().rss.tensors == one_job_inputs
    assert all(j.peak_bytes <= smallest for j in alone.estimate().jobs)


_EXTRACT_AND_LIST_MODULES = (
    "import sys\n"
    "from tensorstore_llm_cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except SystemExit as e:\n"
    "    assert not e.code, e.code\n"
    "print('imported:', [m for m in ('numba', 'llvmlite', 'scipy') if m in sys.modules])\n")


def test_lora_extract_from_directories_does_not_import_numba(tmp_path):
    base, ft = write_model_family(str(tmp_path / "models"), "tiny", seed=0, finetunes=1)
    out = subprocess.run([sys.executable, "-c", _EXTRACT_AND_LIST_MODULES, "-q", "--store", str(tmp_path / "store"),
                          "lora", "extract", ft, "--base", base, "--rank", "4", "-o", str(tmp_path / "adapter")],
                         check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert out.stdout.splitlines()[-1] == "imported: []", out.stdout


def test_lora_extract_export_from_memory_equals_the_export_of_the_artifact(tmp_path):
    """``-o DIR`` writes the adapter held in memory (no read-back of the factors): the files are
    byte for byte those ``tsllm lora export`` writes from the committed artifact."""
    base, ft = write_model_family(str(tmp_path / "models"), "tiny", seed=1, finetunes=1)
    cli = [sys.executable, "-m", "tensorstore_llm_cli", "-q", "--store", str(tmp_path / "store")]
    subprocess.run([*cli, "lora", "extract", ft, "--base", base, "--rank", "4", "--name", "x", "-o",
                    str(tmp_path / "direct")], check=True, capture_output=True, timeout=300)
    subprocess.run([*cli, "lora", "export", "x", str(tmp_path / "exported")], check=True, capture_output=True,
                   timeout=300)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "exported" / name).read_bytes(), name
