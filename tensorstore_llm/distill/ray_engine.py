"""Precompute on Ray Data: the same dataset, computed by a pool of teacher actors.

The driver packs the corpus, fingerprints the dataset and plans its shards exactly as the local
engine does (:class:`~tensorstore_llm.distill.precompute.PrecomputeJob`). Each pending batch,
formed exactly as the local engine forms it, becomes one row of a Ray dataset; ``map_batches``
sends the rows to a pool of :class:`TeacherActor` (``num_gpus=1`` each when the cluster has
GPUs), which run ``precompute.encode_batch``, the local engine's own code. The encoded rows
stream back to the driver, which assembles a shard as soon as all its sequences have arrived
and writes it behind (staged, checksummed, journalled).

So a killed run resumes from the journal (finished shards are kept), and the shards are
byte-identical to the local engine's for the same inputs, seed and kind of hardware (float
reductions of a CPU and a GPU kernel differ in the last bits, and so may the draws near a
CDF step). Actors need ``tensorstore_llm`` importable (installed on every node).

Example:
    >>> precompute_ray([smollm2_checkpoint()], "data/corpus", "/tmp/kd",
    ...                rule=PackingRule(seq_len=256), max_sequences=8)   # doctest: +SKIP
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from ..errors import DatasetMismatch, IncompleteRun, MissingDependency
from ..hf.corpus import Corpus, read_corpus
from ..hf.models import describe_causal_lm, head_width
from ..hf.packing import PackingRule
from .precompute import (
    PrecomputeJob,
    SamplingConfig,
    check_settings,
    same_tokenizer,
    shard_table,
)


class TeacherActor:
    """A Ray actor holding the teacher(s); called with batches of rows, one row per teacher batch.

    Args (as ``fn_constructor_kwargs``): sources (HF directories / hub ids reachable from the
    actor), fingerprints and labels (recorded as the driver's), dtype, config (a
    :class:`SamplingConfig` as a dict), position_chunk, threads (torch intra-op threads).
    """

    def __init__(self, sources: list[str], fingerprints: list[str], labels: list[str], dtype: str, config: dict,
                 position_chunk: int, threads: int):
        import torch

        from ..hf.models import check_vocab, load_causal_lm

        torch.set_num_threads(max(1, int(threads)))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.lms = [load_causal_lm(s, dtype=dtype, device=device, fingerprint=f, label=lab)
                    for s, f, lab in zip(sources, fingerprints, labels)]
        for lm in self.lms:
            check_vocab(lm.model, lm.tokenizer)
        self.config = SamplingConfig(**config)
        self.position_chunk = int(position_chunk)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .precompute import encode_batch

        out = []
        for row in batch.to_pylist():
            idx = row["sequences"]
            input_ids = np.frombuffer(row["input_ids"], dtype="<i4").reshape(len(idx), -1)
            alignment = None
            if self.config.alignment:
                alignment = [(text, np.frombuffer(offsets, dtype="<i4").reshape(-1, 2))
                             for text, offsets in zip(row["texts"], row["offsets"])]
            table = encode_batch(self.lms, input_ids, idx, self.config, alignment=alignment,
                                 position_chunk=self.position_chunk)
            out.append(table.add_column(0, "shard", pa.array([row["shard"]] * table.num_rows, pa.int64())))
        return pa.concat_tables(out)


def _describe(teachers: list[str], fingerprints, labels):
    lms = [describe_causal_lm(t, fingerprint=f, label=lab) for t, f, lab in
           zip(teachers, fingerprints or [None] * len(teachers), labels or [None] * len(teachers))]
    for lm in lms:
        width = head_width(lm.model)
        if width is not None and width < lm.real_vocab:
            raise DatasetMismatch(f"{lm.source}: the model's logits have {width} columns but its tokenizer has "
                                  f"{lm.real_vocab} tokens: model and tokenizer do not belong together")
    same_tokenizer(lms)
    return lms


def precompute_ray(teachers: list[str] | str, corpus: Corpus | str, out_dir: str | None = None, *,
                   config: SamplingConfig = SamplingConfig(), rule: PackingRule = PackingRule(), batch_size: int = 4,
                   shard_sequences: int = 64, max_sequences: int | None = None, position_chunk: int = 128,
                   progress=None, store=None, name: str | None = None, parents: list[str] | None = None,
                   address: str | None = None, actors: int | None = None, cpus_per_actor: int = 1,
                   dtype: str = "float32", fingerprints: list[str] | None = None, labels: list[str] | None = None,
                   ray_init: dict | None = None):
    """``precompute`` on Ray Data: same arguments, same dataset; the teachers run in Ray actors.

    Args:
        teachers: HF directories or hub ids (paths the actors can read), one or several.
        address: a running Ray cluster (``ray.init(address=...)``); None starts a local Ray when
            none is initialised (and shuts it down afterwards). A Ray already initialised in this
            process is used as it is.
        actors: teacher actors (default: one per GPU, or 1 without GPUs).
        cpus_per_actor: CPUs each actor reserves (and torch threads it uses).
        dtype: compute dtype of the teachers in the actors.
        fingerprints / labels: recorded per teacher instead of checksums / paths (store artifacts).
        ray_init: further ``ray.init`` keyword arguments for a local Ray (e.g. ``num_cpus``).
        other arguments: as for :func:`~tensorstore_llm.distill.precompute.precompute`.
    Returns:
        ``out_dir``, or the committed store Artifact.
    Raises:
        MissingDependency: Ray is not installed. DatasetMismatch: as ``precompute``.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingDependency("the Ray engine needs Ray Data: pip install 'tensorstore-llm[ray]'") from None
    check_settings(config, batch_size=batch_size, shard_sequences=shard_sequences, position_chunk=position_chunk,
                   max_sequences=max_sequences, actors=actors, cpus_per_actor=cpus_per_actor)
    lms = _describe([teachers] if isinstance(teachers, str) else list(teachers), fingerprints, labels)
    if not isinstance(corpus, Corpus):
        corpus = read_corpus(corpus, tokenizer=lms[0].tokenizer)
    job = PrecomputeJob(lms, corpus, config, rule, batch_size=batch_size, shard_sequences=shard_sequences,
                        max_sequences=max_sequences, out_dir=out_dir, store=store)
    todo = job.pending()
    started = False
    try:
        if progress:
            for k in range(len(job.names)):
                if k not in todo:
                    progress(job.shard_range(k)[1], job.total)
        if todo:
            if not ray.is_initialized():
                ray.init(address=address, **(ray_init or {}))
                started = True
            _run(ray, job, todo, lms, config, dtype, position_chunk, actors, cpus_per_actor, progress)
    except BaseException:
        job.writer.close()                        # keep what is staged: a re-run resumes from it
        raise
    finally:
        if started:
            ray.shutdown()
    return job.finish(name=name, parents=parents)


def _rows(job: PrecomputeJob, todo: list[int]) -> list[dict]:
    rows = []
    for k in todo:
        for idx in job.batches(k):
            input_ids, alignment = job.batch_inputs(idx)
            row = {"shard": k, "sequences": idx, "input_ids": np.ascontiguousarray(input_ids, dtype="<i4").tobytes()}
            if alignment is not None:
                row["texts"] = [text for text, _ in alignment]
                row["offsets"] = [offsets.astype("<i4").tobytes() for _, offsets in alignment]
            rows.append(row)
    return rows


def _run(ray, job, todo, lms, config, dtype, position_chunk, actors, cpus_per_actor, progress) -> None:
    gpus = int(ray.cluster_resources().get("GPU", 0))
    pool = int(actors) if actors else max(1, gpus)
    dataset = ray.data.from_items(_rows(job, todo))
    results = dataset.map_batches(
        TeacherActor, batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=pool),
        num_gpus=1 if gpus else 0, num_cpus=cpus_per_actor,
        fn_constructor_kwargs={"sources": [lm.model for lm in lms], "fingerprints": [lm.fingerprint for lm in lms],
                               "labels": [lm.source for lm in lms], "dtype": dtype, "config": asdict(config),
                               "position_chunk": position_chunk, "threads": cpus_per_actor})
    expected = {k: job.shard_range(k)[1] - job.shard_range(k)[0] for k in todo}
    parts: dict[int, list[pa.Table]] = {k: [] for k in todo}
    arrived = {k: 0 for k in todo}
    done = sum(job.shard_range(k)[1] - job.shard_range(k)[0] for k in range(len(job.names)) if k not in todo)
    with ThreadPoolExecutor(1, thread_name_prefix="tsllm-shard-writer") as behind:
        pending = None
        for block in results.iter_batches(batch_format="pyarrow", batch_size=None):
            shards = block.column("shard").to_numpy()
            for k in np.unique(shards).tolist():
                part = block.filter(pa.array(shards == k)).drop_columns(["shard"])
                parts[k].append(part)
                arrived[k] += part.num_rows
                done += part.num_rows
                if arrived[k] == expected[k]:
                    table = shard_table([shard_table(parts.pop(k), job.schema).sort_by("sequence")], job.schema)
                    if pending is not None:
                        pending.result()          # at most one shard waits to be written
                    pending = behind.submit(job.write, k, table)
            if progress:
                progress(done, job.total)
        if pending is not None:
            pending.result()
    missing = [job.names[k] for k in parts]
    if missing:
        raise IncompleteRun(f"the Ray engine returned no results for {', '.join(missing)}; re-run to resume")
