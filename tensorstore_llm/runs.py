"""Running plans: the steps every domain package shares between a plan and a committed result.

- ``resolve_input``: a model reference (store ref, HF directory / file, hub repo) -> an open
  TensorSource, its lineage and the files it carries;
- ``run_plan``: stream a plan into a new store artifact and commit it (resumable);
- ``export``: stream an artifact into a Hugging Face directory that appears whole or not at all;
- ``stream_into`` / ``keep_or_discard``: what an interruption keeps and a failure removes.

This module sits between the engine / store / io layers and the domain packages (merge/, lora/,
prune/, loram/, diff/), which import it; the public facade ``tensorstore_llm.api`` re-exports
its public names. Nothing here imports a domain package's planning code or the facade.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .dtypes import by_name
from .engine import Estimate, Executor, Plan, plan_map, resolve_device
from .engine.options import RunOptions
from .errors import ArtifactNotFound, DTypeError
from .io import hub
from .io.hf_dir import HFCheckpointSink, HFCheckpointSource
from .merge.card import merge_files
from .seeding import GENERATOR_DEVICE, UNIFORM_GENERATOR
from .store import Artifact, Store, job_key
from .units import parse_size


@dataclass
class JobResult:
    """What a streamed job did: its artifact (or output path), what it computed and skipped."""

    estimate: Estimate
    artifact: Artifact | None = None
    output: str | None = None
    computed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    analysis: dict | None = None   # e.g. Mediator's per-layer conflict table


def open_store(root: str | None = None) -> Store:
    """The store at ``root`` (default ``$TSLLM_STORE`` or ``./tsllm-store``); created on first write.

    Example:
        >>> open_store("tsllm-store").root                                # doctest: +SKIP
    """
    return Store(root)


def resolve_input(store: Store | None, ref: str, revision: str | None = None):
    """Open a model reference: a store ref (tag / id), a local HF directory or file, or a hub repo.

    Returns:
        (TensorSource, lineage dict, carried files name -> path).
    Raises:
        ArtifactNotFound: ``ref`` is none of these, or a hub repo that cannot be fetched (exit 3).
    Example:
        >>> source, lineage, files = resolve_input(store, "base")          # doctest: +SKIP
    """
    if store is not None and not os.path.exists(ref) and store.has(ref):
        artifact = store.get(ref)
        return store.open(ref), {"id": artifact.id}, store.carried_files(ref)
    if os.path.exists(ref):
        source = HFCheckpointSource(ref)
        kind = "hf-dir" if os.path.isdir(ref) else "safetensors-file"
        return source, {"external": {"type": kind, "path": os.path.abspath(ref)}}, source.files()
    parsed = hub.parse_hub_ref(ref)
    if parsed is None:
        where = f" in store {store.root}" if store is not None else ""
        raise ArtifactNotFound(f"{ref!r} is not an artifact{where}, an existing path, or a hub repo id (org/name)")
    repo, rev = parsed
    path, commit = hub.snapshot(repo, revision or rev)
    source = HFCheckpointSource(path)
    return source, {"external": {"type": "hub", "repo": repo, "revision": revision or rev or "main", "commit": commit}}, source.files()


def run_record(opts: RunOptions, device_type: str, **extra) -> dict:
    """The ``run`` section of a manifest: seed, device and random-generator provenance, plus ``extra``."""
    return {"seed": opts.seed, "device": device_type, "generator_device": GENERATOR_DEVICE,
            "uniform_generator": UNIFORM_GENERATOR, **extra}


def run_plan(store: Store, plan: Plan, *, kind: str, parents=(), source=None, recipe=None, files=None,
             name: str | None = None, desc: str = "tsllm", options: RunOptions | None = None, **run_options) -> JobResult:
    """Stream ``plan`` into a new artifact of ``kind`` and commit it (tagging it ``name``).

    The staging directory is keyed by everything that determines the result, so re-running an
    interrupted call resumes it; any other failure removes what was staged.

    Args:
        options: how to run (RunOptions); ``run_options`` keywords (device, max_memory, seed,
            compression, progress, dry_run) override its fields.
    Returns:
        JobResult (only ``estimate`` on a dry run).
    Example:
        >>> run_plan(store, plan, kind="checkpoint", options=RunOptions(max_memory="1G"))  # doctest: +SKIP
    """
    opts = RunOptions.of(options, **run_options)
    executor = Executor(plan, None, opts, desc=desc)
    if opts.dry_run:
        return JobResult(executor.estimate())
    dev = resolve_device(opts.device)
    key = job_key(kind, plan.fingerprint(), opts.seed, dev.type, opts.compression, list(parents), source, recipe)
    writer = store.create(key, opts.compression)
    executor.sink = writer
    estimate = executor.estimate()
    stream_into(executor, writer)
    artifact = writer.commit(kind=kind, parents=parents, source=source, recipe=recipe, files=files,
                             run=run_record(opts, dev.type, compression=opts.compression))
    if name:
        store.tag(artifact.id, name)
    return JobResult(estimate, artifact, None, executor.computed, executor.skipped)


def run_plan_into_dir(store: Store, plan: Plan, out_dir: str, *, parents=(), recipe=None, files=None,
                      max_shard_size="5G", name: str | None = None, desc: str = "tsllm",
                      options: RunOptions | None = None, **run_options) -> JobResult:
    """Stream ``plan`` straight into the Hugging Face directory ``out_dir`` (one write), then
    commit its lineage as an ``export`` artifact that holds no tensors (tagged ``name``).

    The directory gets shards of ``max_shard_size``, the carried ``files`` and, for a merge
    recipe, the files :func:`merge.card.merge_files` adds (recipe, model card). It is staged beside
    ``out_dir``, resumable when interrupted, and published whole or not at all. The record's
    ``info`` holds the directory's path and each tensor's shape, dtype and checksum.

    Returns:
        JobResult (``artifact``: the record; ``output``: the directory; only ``estimate`` on a
        dry run).
    Example:
        >>> run_plan_into_dir(store, plan, "out/merged", recipe=recipe, max_memory="1G")  # doctest: +SKIP
    """
    opts = RunOptions.of(options, **run_options)
    executor = Executor(plan, None, opts, desc=desc)
    if opts.dry_run:
        return JobResult(executor.estimate())
    parents = list(parents)
    dev = resolve_device(opts.device)
    shard_bytes = parse_size(max_shard_size)
    key = job_key("merge-into-dir", plan.fingerprint(), opts.seed, dev.type, shard_bytes, parents, recipe)
    sink = HFCheckpointSink(out_dir, max_shard_bytes=shard_bytes, job_key=key,
                            files={**(files or {}), **merge_files(recipe, parents)}, store_root=store.root)
    executor.sink = sink
    estimate = executor.estimate()
    stream_into(executor, sink)
    checksums = dict(sink.completed())
    tensors = {m.name: [list(m.shape), m.dtype, checksums[m.name]] for j in plan.jobs for m in j.outputs()}
    path = keep_or_discard(sink, sink.commit)
    artifact = commit_export_record(store, key, path, tensors, parents=parents, recipe=recipe,
                                    run=run_record(opts, dev.type, max_shard_size=shard_bytes), name=name)
    return JobResult(estimate, artifact, path, executor.computed, executor.skipped)


def commit_export_record(store: Store, key: str, path: str, tensors: dict, *, parents=(), recipe=None, run=None,
                         info: dict | None = None, name: str | None = None) -> Artifact:
    """Commit the lineage of a directory written in one pass (``path``, already published) as an
    ``export`` artifact that holds no tensors: its parents, recipe and run, and in ``info`` the
    directory's path and ``tensors`` (name -> [shape, dtype, checksum]) beside any ``info`` given.
    Tagged ``name`` when given.

    Example:
        >>> commit_export_record(store, key, "out/merged", tensors, parents=parents)  # doctest: +SKIP
    """
    writer = store.create(job_key("export", key, tensors, path))
    try:
        writer.prepare([])
        artifact = writer.commit(kind="export", parents=list(parents), recipe=recipe, run=run,
                                 info={**(info or {}), "output": path, "tensors": tensors})
    except BaseException:
        writer.abort()
        raise
    if name:
        store.tag(artifact.id, name)
    return artifact


def stream_into(executor: Executor, sink) -> None:
    """Run ``executor`` into ``sink`` (see ``keep_or_discard``)."""
    keep_or_discard(sink, executor.run)


def keep_or_discard(sink, step):
    """``step()``: an interruption keeps the sink's staging (to resume), any other failure removes it.

    Example:
        >>> path = keep_or_discard(sink, sink.commit)                     # doctest: +SKIP
    """
    try:
        return step()
    except KeyboardInterrupt:
        sink.close()
        raise
    except BaseException:
        sink.abort()
        raise


def export(store: Store, ref: str, out_dir: str, *, max_shard_size="5G", dtype: str | None = None,
           options: RunOptions | None = None, **run_options) -> JobResult:
    """Write artifact ``ref`` as a Hugging Face directory (sharded safetensors + index + carried files).

    The directory appears complete or not at all; an interrupted export resumes. Its staging
    (``.OUT.tsllm-partial-*`` beside it) is locked while the export runs, so a concurrent export of
    the same job fails with StorageError, and registered in the store, so ``gc`` removes it if the
    export is killed. Of the run options it uses device (default 'cpu'), max_memory, progress and
    dry_run. A merge's export also carries its recipe and a model card.

    Example:
        >>> export(store, "merged", "out/merged", max_shard_size="2G")     # doctest: +SKIP
    """
    opts = RunOptions.of(options if options is not None else RunOptions(device="cpu"), **run_options)
    artifact = store.get(ref)
    with store.open(ref) as source:
        if dtype:
            check_float_target(source, dtype, f"export {ref}")
        plan = plan_map("copy", {"src": source}, {"x": "src"}, dtype=dtype, where=f"artifact {artifact.short_id}")
        executor = Executor(plan, None, opts, desc=f"export {artifact.short_id}")
        if opts.dry_run:
            return JobResult(executor.estimate())
        shard_bytes = parse_size(max_shard_size)
        key = job_key("export", plan.fingerprint(), shard_bytes)
        carried = {**with_dtype(store.carried_files(ref), dtype), **merge_files(artifact.manifest.recipe, artifact.manifest.parents)}
        sink = HFCheckpointSink(out_dir, max_shard_bytes=shard_bytes, job_key=key, files=carried, store_root=store.root)
        executor.sink = sink
        stream_into(executor, sink)
        path = keep_or_discard(sink, sink.commit)
    return JobResult(executor.estimate(), artifact, path, executor.computed, executor.skipped)


def check_float_target(source, dtype: str, where: str) -> None:
    """Refuse casting float weights to a non-float dtype (int8 would truncate them to integers).

    Raises:
        DTypeError: naming the first float tensor of ``source`` and the refused dtype.
    """
    target = by_name(dtype)
    if target.is_float:
        return
    for name in source.keys():
        meta = source.meta(name)
        if by_name(meta.dtype).is_float:
            raise DTypeError(f"{where}: --dtype {target.name} is not a float dtype: tensor {name!r} is {meta.dtype} and a cast "
                             f"would truncate its weights to integers (use bfloat16, float16 or float32; "
                             f"quantisation is not a dtype cast)")


def with_dtype(files: dict[str, str], dtype: str | None) -> dict[str, str | bytes]:
    """Carried files, with ``config.json``'s dtype updated when the weights change dtype.

    Example:
        >>> with_dtype({}, "bfloat16")
        {}
    """
    files = dict(files)
    if dtype and "config.json" in files and not isinstance(files["config.json"], bytes):
        try:
            with open(files["config.json"], "rb") as f:
                config = json.loads(f.read())
        except (OSError, ValueError):
            return files
        if isinstance(config, dict):
            config["torch_dtype"] = by_name(dtype).name
            if "dtype" in config:
                config["dtype"] = by_name(dtype).name
            files["config.json"] = json.dumps(config, indent=2).encode()
    return files
