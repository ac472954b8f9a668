"""The manifest: what an artifact is, where it came from, and a checksum for every byte of it.

Written last, into the staging directory, just before the rename that publishes the artifact:
an artifact directory with a readable manifest is complete by construction.

The artifact id is decided in one place, :meth:`Manifest.content_id`: the sha256 of the canonical
JSON of the artifact's content (tensors' shapes, dtypes and checksums; dataset shards; carried
files) and lineage (kind, parents, source, recipe, kind-specific info). Run settings that leave
the bytes unchanged (seed, device, random generator) are recorded but are not part of the id
(format 2; format-1 manifests, written before, included them and keep their ids), and neither are
derived data (chunk checksums), creation time or tool version. The same content made the same
way is therefore the same artifact.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from ..errors import FormatError, IntegrityError
from ..io.base import ChunkDigests, TensorMeta
from .datasets import ShardRecord

FORMAT = "tsllm-artifact/2"
FORMATS = ("tsllm-artifact/1", FORMAT)   # readable; /1 ids included the run settings
KINDS = ("checkpoint", "diff", "lora", "pruning_plan", "logits", "dataset", "export")


@dataclass(frozen=True)
class TensorRecord:
    """What the manifest knows of one tensor. ``chunks`` (per-chunk digests, checked on every
    read) is derived from the bytes, so it is not part of the artifact id and can be added to
    an older artifact later (``tsllm verify --upgrade``)."""

    shape: tuple[int, ...]
    dtype: str
    checksum: str
    chunks: ChunkDigests | None = None

    def to_json(self) -> dict:
        body = {"shape": list(self.shape), "dtype": self.dtype, "checksum": self.checksum}
        if self.chunks is not None:
            body["chunks"] = self.chunks.to_json()
        return body

    @classmethod
    def from_json(cls, body: dict) -> TensorRecord:
        chunks = body.get("chunks")
        return cls(tuple(int(d) for d in body["shape"]), str(body["dtype"]), str(body["checksum"]),
                   ChunkDigests.from_json(chunks) if chunks is not None else None)


@dataclass
class Manifest:
    """Everything known about one artifact; ``id`` is derived from the rest."""

    kind: str
    tensors: dict[str, TensorRecord]
    files: dict[str, str] = field(default_factory=dict)       # carried file name -> checksum
    parents: list[dict] = field(default_factory=list)         # [{"id": ..., "role": ...}]
    source: dict | None = None                                # where an import came from
    recipe: dict | None = None                                # the op / recipe that produced it
    run: dict = field(default_factory=dict)                   # seed, device, generator device
    created_at: str = ""
    tool: dict = field(default_factory=dict)
    id: str = ""
    shards: dict = field(default_factory=dict)                # dataset shard name -> ShardRecord
    info: dict = field(default_factory=dict)                  # kind-specific facts (fingerprints, bindings)
    info_schema: str | None = None                            # e.g. "logits/1" (store/info.py)
    format: str = FORMAT

    def metas(self) -> dict[str, TensorMeta]:
        return {n: TensorMeta(n, tuple(r.shape), r.dtype) for n, r in self.tensors.items()}

    def chunk_digests(self) -> dict[str, ChunkDigests | None]:
        return {n: r.chunks for n, r in self.tensors.items()}

    def checksums(self) -> dict[str, str]:
        return {n: r.checksum for n, r in self.tensors.items()}

    def check_id(self, directory_name: str, where: str) -> None:
        """Raise IntegrityError unless the recorded id, the directory name and the id computed
        from the content agree: a hand-edited or damaged manifest is never trusted."""
        computed = self.content_id()
        if not (self.id == directory_name == computed):
            raise IntegrityError(f"{where}: manifest does not match its artifact id (directory {directory_name[:12]}, "
                                 f"recorded {self.id[:12]}, content hashes to {computed[:12]}): it was edited or damaged")

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.metas().values())

    def content_id(self) -> str:
        """The artifact id: sha256 of the canonical JSON of the content fields."""
        body = self._content()
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def _content(self) -> dict:
        """The fields the id is made of (see the module docstring)."""
        body = {"kind": self.kind, "tensors": {n: [list(r.shape), r.dtype, r.checksum] for n, r in self.tensors.items()},
                "files": self.files, "parents": self.parents, "source": self.source, "recipe": self.recipe}
        if self.format == "tsllm-artifact/1":
            body["run"] = self.run
        # fields added later enter the id only when present, so older artifacts keep theirs
        if self.shards:
            body["shards"] = {n: [r.checksum, r.bytes, r.rows] for n, r in self.shards.items()}
        if self.info:
            body["info"] = self.info
        if self.info_schema:
            body["info_schema"] = self.info_schema
        return body

    def to_json(self) -> bytes:
        body = {"format": self.format, "id": self.id, **self._content(), "run": self.run,
                "created_at": self.created_at, "tool": self.tool}
        body["tensors"] = {n: r.to_json() for n, r in self.tensors.items()}
        if self.shards:
            body["shards"] = {n: r.to_json() for n, r in self.shards.items()}
        return json.dumps(body, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            body = json.loads(data)
            if body.get("format") not in FORMATS:
                raise ValueError(f"format {body.get('format')!r}, expected one of {', '.join(FORMATS)}")
            tensors = {n: TensorRecord.from_json(r) for n, r in body["tensors"].items()}
            return cls(kind=body["kind"], tensors=tensors, files=dict(body.get("files") or {}),
                       parents=list(body.get("parents") or []), source=body.get("source"),
                       recipe=body.get("recipe"), run=dict(body.get("run") or {}),
                       created_at=body.get("created_at", ""), tool=dict(body.get("tool") or {}), id=body["id"],
                       shards={n: ShardRecord.from_json(r) for n, r in (body.get("shards") or {}).items()},
                       info=dict(body.get("info") or {}), info_schema=body.get("info_schema"), format=body["format"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{where}: manifest is unreadable ({e})") from None


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_from(meta: TensorMeta, checksum: str, chunks: ChunkDigests | None = None) -> TensorRecord:
    return TensorRecord(tuple(meta.shape), meta.dtype, checksum, chunks)


__all__ = ["Manifest", "TensorRecord", "KINDS", "FORMAT", "now_utc", "record_from", "asdict"]
