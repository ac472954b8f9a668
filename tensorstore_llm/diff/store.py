"""Delta-stored artifacts: a checkpoint (or a diff) kept as coded blocks against a parent artifact.

Layout inside the artifact directory::

    deltas/<tensor>/<block index>     one coded block of rows (exact or lossy codec, or raw)
    manifest.json                     tensors: the *reconstructed* tensors (shape, dtype, sha256,
                                      per-block xxh3 of the reconstructed rows); info["base"]:
                                      the parent's id and the checksums of every tensor a delta
                                      was taken against; info["delta"]: codec, chain depth and
                                      per tensor its block rows and each block's sha256 / size.

A tensor is coded as a delta of the parent tensor with the same name, shape and dtype (bf16,
fp16, fp32); any other tensor (new in the fine-tune, grown, integer) is stored raw, zstd-framed.
Exact deltas are coded in blocks of about ``BLOCK_BYTES`` (the parent's chunk rows, so a parent
block is one verified chunk); lossy codecs see whole tensors (SVD needs the whole matrix).

Writing goes through the store's staged, locked, manifest-last ``ArtifactWriter``: blocks land
in the staging directory, a tensor is journaled (with each block's sha256) once all its blocks
are written, and a re-run of the same job re-checks journaled tensors and resumes after them.
Everything that decides the bytes is in the job key, so a killed and re-run store produces a
bit-identical artifact.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import zstandard

from ..dtypes import by_name, raw_bytes
from ..errors import FormatError, InvalidParameter
from ..io.base import ChunkDigests, RowHasher, TensorMeta, check_tensor_name
from ..io.fsutil import storage_errors
from ..io.zarr_tensors import chunk_shape
from ..store.store import Store, job_key
from . import exact as exact_format
from .codecs import codec_from_dict, get_codec

DELTA_DIR = "deltas"
JOURNAL_NAME = "deltas.jsonl"
BLOCK_BYTES = 8 * 1024 * 1024          # = the zarr chunk size, so parent blocks are whole chunks
DELTA_DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_MAX_CHAIN = 3                  # the depth rule (needs_snapshot); measured in docs/benchmarks.md
RAW_LEVEL = 3
FORMAT_VERSION = 1                     # of the manifest's delta section
EXACT_BLOCK_FORMAT = exact_format.VERSION   # what exact blocks are written in (format 1 still read);
                                            # in the resume key, so a resumed run never mixes formats


@dataclass(frozen=True)
class TensorEntry:
    """How one tensor is stored: ``mode`` "delta" (coded against the parent) or "raw"; rows per
    block; and each block's (sha256 hex, size in bytes)."""

    mode: str
    rows: int
    blocks: tuple[tuple[str, int], ...]

    def to_json(self) -> dict:
        return {"mode": self.mode, "rows": self.rows, "blocks": [list(b) for b in self.blocks]}

    @classmethod
    def from_json(cls, body: dict, where: str) -> TensorEntry:
        try:
            entry = cls(str(body["mode"]), int(body["rows"]), tuple((str(s), int(n)) for s, n in body["blocks"]))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: delta entry is unreadable ({e})") from None
        if entry.mode not in ("delta", "raw") or entry.rows < 1:
            raise FormatError(f"{where}: delta entry has mode {entry.mode!r} and {entry.rows} rows per block")
        return entry

    @property
    def stored_bytes(self) -> int:
        return sum(n for _, n in self.blocks)


@dataclass(frozen=True)
class DeltaSection:
    """The ``info`` of a delta-stored artifact, parsed: parent binding, codec, depth, entries."""

    base_id: str
    base_checksums: dict
    codec: dict
    depth: int
    tensors: dict

    @classmethod
    def from_info(cls, info: dict, where: str) -> DeltaSection:
        """Parse and check ``info["base"]`` and ``info["delta"]``; FormatError naming the field."""
        try:
            base, delta = info["base"], info["delta"]
            section = cls(str(base["id"]), dict(base["checksums"]), dict(delta["codec"]), int(delta["depth"]),
                          {n: TensorEntry.from_json(e, f"{where} tensor {n!r}") for n, e in delta["tensors"].items()})
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"{where}: delta section of the manifest is unreadable ({e.__class__.__name__}: {e})") from None
        if delta.get("format") != FORMAT_VERSION:
            raise FormatError(f"{where}: delta format {delta.get('format')!r}, this version reads {FORMAT_VERSION}")
        return section


def is_delta(artifact) -> bool:
    """Whether ``artifact`` stores its tensors as deltas of a parent (see :func:`store_delta`)."""
    return isinstance(artifact.manifest.info.get("delta"), dict)


def block_path(artifact_dir: str, name: str, index: int) -> str:
    return os.path.join(artifact_dir, DELTA_DIR, name, str(index))


class DeltaPayload:
    """The payload an ``ArtifactWriter`` stages for a delta-stored artifact (TensorSink-like:
    ``prepare``, ``completed``, ``chunk_digests``, ``seal``, ``close``), written tensor by tensor
    with :meth:`write_block` and :meth:`finish_tensor`."""

    def __init__(self, staging_dir: str, where: str):
        self.staging_dir = staging_dir
        self.where = where
        self.metas: dict[str, TensorMeta] = {}
        self._journal_path = os.path.join(staging_dir, JOURNAL_NAME)
        self._done: dict[str, dict] = {}
        self._journal = None

    def prepare(self, metas) -> None:
        self.metas = {m.name: m for m in metas}
        for name in self.metas:
            check_tensor_name(name, self.where)
        self._done = self._resume()

    def _resume(self) -> dict[str, dict]:
        """Journaled tensors whose every block file still hashes as recorded."""
        kept = {}
        if not os.path.exists(self._journal_path):
            return kept
        with open(self._journal_path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    entry = TensorEntry.from_json(rec["entry"], self.where)
                except (ValueError, KeyError, TypeError, FormatError):
                    continue   # a torn last line
                if rec.get("name") in self.metas and all(
                        _file_sha256(block_path(self.staging_dir, rec["name"], i)) == sha
                        for i, (sha, _) in enumerate(entry.blocks)):
                    kept[rec["name"]] = rec
        return kept

    def completed(self) -> dict[str, str]:
        """Finished tensors (by an interrupted run too, re-checked): name -> reconstructed sha256."""
        return {n: r["checksum"] for n, r in self._done.items()}

    def chunk_digests(self, name: str) -> ChunkDigests:
        return ChunkDigests.from_json(self._done[name]["chunks"])

    def entries(self) -> dict[str, dict]:
        return {n: r["entry"] for n, r in sorted(self._done.items())}

    def write_block(self, name: str, index: int, data: bytes) -> tuple[str, int]:
        """Stage block ``index`` of tensor ``name``; returns its (sha256 hex, size)."""
        path = block_path(self.staging_dir, name, index)
        with storage_errors(self.where):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        return hashlib.sha256(data).hexdigest(), len(data)

    def finish_tensor(self, name: str, entry: TensorEntry, checksum: str, chunks: ChunkDigests) -> None:
        """Journal tensor ``name`` as finished (all its blocks are staged)."""
        rec = {"name": name, "checksum": checksum, "chunks": chunks.to_json(), "entry": entry.to_json()}
        with storage_errors(self.where):
            if self._journal is None:
                self._journal = open(self._journal_path, "ab")
            self._journal.write(json.dumps(rec).encode() + b"\n")
            self._journal.flush()
        self._done[name] = rec

    def seal(self) -> None:
        """Close and drop the journal before the manifest is written (commit fsyncs the tree)."""
        self.close()
        if os.path.exists(self._journal_path):
            os.remove(self._journal_path)

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None


def _file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def chain_depth(store: Store, artifact) -> int:
    """Delta links from ``artifact`` down to a fully stored artifact (0 for a full one)."""
    return int(artifact.manifest.info["delta"]["depth"]) if is_delta(artifact) else 0


def needs_snapshot(store: Store, parent_ref: str, max_chain: int = DEFAULT_MAX_CHAIN) -> bool:
    """The depth rule: a new link on ``parent_ref`` would be deeper than ``max_chain`` delta links,
    so it should be stored as a full snapshot instead (reads decode at most ``max_chain`` links)."""
    if max_chain < 1:
        raise InvalidParameter(f"--max-chain must be at least 1, got {max_chain}")
    return chain_depth(store, store.get(parent_ref)) + 1 > max_chain


def store_delta(store: Store, target, parent_ref: str, *, kind: str = "checkpoint", codec: str = "exact",
                codec_params: dict | None = None, parents=(), source=None, files=None, name: str | None = None,
                max_memory: int = 2 << 30, workers: int = 2, target_id: str = "", resumed: list | None = None):
    """Store the tensors of ``target`` (a TensorSource) as deltas of the store artifact ``parent_ref``.

    Args:
        target: the fine-tune (or next training checkpoint) to store.
        parent_ref: tag or id of the artifact the deltas are taken against.
        kind: "checkpoint" (``tsllm import --delta-of``) or "diff" (``tsllm diff``).
        codec, codec_params: a registered codec (``diff.codecs``); "exact" keeps every bit.
        parents, source, files: lineage beyond the parent binding, and carried files.
        max_memory: bounds the blocks in flight (each worker holds a target, a parent and a
            coded block).
        target_id: what identifies the target's content for the resume key (e.g. its artifact id).
        resumed: a list that receives the names of tensors an interrupted earlier run finished.
    Returns:
        The committed Artifact; its manifest records the reconstructed tensors' checksums.

    Example:
        >>> with store.open("ft") as ft:                                  # doctest: +SKIP
        ...     art = store_delta(store, ft, "base", name="ft-delta")
    """
    spec = get_codec(codec, **(codec_params or {}))
    parent = store.get(parent_ref)
    exact = spec.name == "exact"
    metas = [target.meta(n) for n in target.keys()]
    block_bytes = max(64 * 1024, min(BLOCK_BYTES, max_memory // (6 * max(1, workers))))
    with store.open(parent.id) as base_source:
        plan = {m.name: _plan_tensor(m, base_source, exact, block_bytes) for m in metas}
        key = job_key("delta", kind, getattr(target, "identity", ""), target_id, parent.id, spec.to_dict(),
                      block_bytes, source, list(parents), {"exact-block-format": EXACT_BLOCK_FORMAT})
        writer = store.create_with(key, DeltaPayload)
        payload = writer.payload
        try:
            writer.prepare(metas)
            done = payload.completed()
            if resumed is not None:
                resumed.extend(n for n in done)
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tsllm-delta") as pool:
                for meta in metas:
                    if meta.name not in done:
                        _store_tensor(payload, pool, workers, target, base_source, meta, plan[meta.name], spec)
        except KeyboardInterrupt:
            writer.close()
            raise
        except BaseException:
            writer.abort()
            raise
        bound = {n: parent.manifest.tensors[n].checksum for n, (mode, _) in plan.items() if mode == "delta"}
        info = {"base": {"id": parent.id, "checksums": bound}, "codec": spec.name,
                "delta": {"format": FORMAT_VERSION, "codec": spec.to_dict(), "depth": chain_depth(store, parent) + 1,
                          "tensors": payload.entries()}}
        role = "delta-of" if kind == "checkpoint" else "base"
        artifact = writer.commit(kind=kind, parents=[{"id": parent.id, "role": role}, *parents], source=source,
                                 recipe={"op": "delta", "codec": spec.to_dict()}, files=files, info=info)
    if name:
        store.tag(artifact.id, name)
    return artifact


def _plan_tensor(meta: TensorMeta, base_source, exact: bool, block_bytes: int) -> tuple[str, int]:
    """(mode, rows per block) for one tensor: a delta where the parent has it with the same shape
    and a float dtype the codecs take, raw otherwise; exact deltas in chunk-sized row blocks."""
    same = meta.name in base_source.keys() and base_source.meta(meta.name) == meta
    mode = "delta" if same and meta.dtype in DELTA_DTYPES and meta.numel else "raw"
    if mode == "delta" and not exact:
        return mode, meta.rows
    return mode, chunk_shape(meta, block_bytes)[0] if meta.shape else 1


def _store_tensor(payload: DeltaPayload, pool, workers: int, target, base_source, meta: TensorMeta,
                  plan: tuple[str, int], codec) -> None:
    """Code and stage every block of one tensor, ``workers`` blocks at a time, in row order."""
    mode, rows = plan
    hasher = RowHasher(meta, payload.where, rows)
    blocks: list[tuple[str, int]] = []
    pending = []

    def drain(limit: int) -> None:
        while len(pending) > limit:
            start, stop, future = pending.pop(0)
            data, rebuilt = future.result()
            blocks.append(payload.write_block(meta.name, len(blocks), data))
            hasher.update(start, raw_bytes(rebuilt), stop - start)

    for start in range(0, meta.rows if meta.numel else 0, rows):
        stop = min(meta.rows, start + rows)
        block = target.read_rows(meta.name, start, stop)
        base = base_source.read_rows(meta.name, start, stop) if mode == "delta" else None
        pending.append((start, stop, pool.submit(_code_block, codec, meta.name, start, block, base)))
        drain(workers)
    drain(0)
    payload.finish_tensor(meta.name, TensorEntry(mode, rows, tuple(blocks)), hasher.hexdigest(), hasher.chunk_digests())


def _code_block(codec, name: str, start: int, block, base):
    """(coded bytes, the rows a reader will rebuild): exact codecs rebuild ``block`` itself."""
    if base is None:
        return zstandard.ZstdCompressor(level=RAW_LEVEL).compress(bytes(raw_bytes(block))), block
    data = codec.encode(base, block, tensor=name, start=start)
    if codec.name == "exact":
        return data, block
    return data, codec.decode(base, data, tensor=name, start=start)


def decode_block(codec_dict: dict, entry: TensorEntry, meta: TensorMeta, start: int, stop: int, data: bytes, base):
    """The rows ``start:stop`` a stored block rebuilds (raw blocks need no ``base``)."""
    from ..dtypes import from_bytes

    shape = (stop - start, *meta.shape[1:]) if meta.shape else ()
    if entry.mode == "raw":
        raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=max(1, (stop - start) * meta.row_numel
                                                                                  * by_name(meta.dtype).itemsize))
        return from_bytes(bytearray(raw), meta.dtype, shape)
    return codec_from_dict(codec_dict).decode(base, data, tensor=meta.name, start=start)


__all__ = ["DEFAULT_MAX_CHAIN", "DeltaPayload", "DeltaSection", "TensorEntry", "block_path", "chain_depth", "decode_block",
           "is_delta", "needs_snapshot", "store_delta"]
