"""Checking an artifact against its manifest: every tensor's sha256 (the reader checks each
chunk's recorded digest as it reads), dataset shards and carried files; upgrading old artifacts
with chunk digests."""
from __future__ import annotations

import contextlib
import os

from ..errors import IntegrityError, TsllmError
from ..io.base import checksum_bytes, digest_rows
from ..io.fsutil import storage_errors, write_file_atomic
from ..io.zarr_tensors import chunk_shape
from .manifest import record_from


def verify_artifact(store, artifact, progress=None, upgrade: bool = False):
    """What ``Store.verify`` promises, for an already resolved ``artifact`` of ``store``."""
    problems = []
    manifest = artifact.manifest
    metas = manifest.metas()
    added = {}
    with (store.open(artifact.id) if metas else contextlib.nullcontext()) as source:
        for name, meta in metas.items():
            record = manifest.tensors[name]
            chunk_rows = None
            if record.chunks is None and upgrade:
                chunk_rows = chunk_shape(meta)[0] if meta.shape else 1
            try:
                # the reader checks recorded chunk digests as it reads; only an upgrade computes them here
                actual, chunks = digest_rows(meta, lambda a, b, n=name: source.read_rows(n, a, b), source.path,
                                             chunk_rows or (record.chunks.rows if record.chunks else None),
                                             chunk_digests=chunk_rows is not None)
            except TsllmError as e:
                problems.append(str(e))
                continue
            except MemoryError:   # the machine's limit, not a problem of the artifact
                raise
            except Exception as e:  # a corrupt chunk can fail inside zarr's decoders
                problems.append(f"tensor {name!r}: unreadable ({e.__class__.__name__}: {e})")
                continue
            if actual != record.checksum:
                problems.append(f"tensor {name!r}: checksum {actual[:20]}... != recorded {record.checksum[:20]}...")
            elif chunk_rows is not None:
                added[name] = chunks
            if progress:
                progress(meta.nbytes)
    if manifest.shards:
        problems.extend(store.open_dataset(artifact.id).verify())
    for name, checksum in manifest.files.items():
        path = os.path.join(artifact.path, "files", name)
        if not os.path.isfile(path):
            problems.append(f"file {name!r}: missing")
            continue
        with open(path, "rb") as f:
            if checksum_bytes(f.read()) != checksum:
                problems.append(f"file {name!r}: checksum mismatch")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise IntegrityError(f"artifact {artifact.short_id} in {store.root}: {len(problems)} problem(s): {shown}")
    if added:
        for name, chunks in added.items():
            r = manifest.tensors[name]
            manifest.tensors[name] = record_from(metas[name], r.checksum, chunks)
        manifest.check_id(artifact.id, artifact.path)   # chunk digests are not part of the id
        with storage_errors(f"manifest of artifact {artifact.short_id} in store {store.root}"):
            write_file_atomic(os.path.join(artifact.path, "manifest.json"), manifest.to_json())
        artifact = store.get(artifact.id)
    return artifact
