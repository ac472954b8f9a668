"""The store: immutable artifacts under one root, tags that point at them, atomic commits.

Layout::

    <root>/store.json                     format marker
    <root>/artifacts/<id>/manifest.json   written last; its presence means "complete"
    <root>/artifacts/<id>/tensors/        Zarr v3 group, one array per tensor
    <root>/artifacts/<id>/files/          carried config / tokenizer files
    <root>/staging/<job-key>/             work in progress (resumable); never listed
    <root>/tags/<name>                    the id a tag points at

An artifact becomes visible by one ``rename`` of a staging directory that already holds every
chunk and the manifest, so a writer killed at any instant leaves nothing that looks valid.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field

from .. import __version__
from ..errors import ArtifactNotFound, FormatError, IntegrityError, RefError, StorageError, TsllmError
from ..io.base import checksum_bytes, digest_rows
from ..io.fsutil import fsync_path, fsync_tree, remove_tree, storage_errors, write_file_atomic
from ..io.zarr_tensors import chunk_shape
from ..io.zarr_tensors import ZarrTensorSink, ZarrTensorSource
from .datasets import DatasetPayload, DatasetSource
from .dedup import dedup_blocks, dedup_staged, gc_objects
from .info import check_info
from .manifest import KINDS, Manifest, now_utc, record_from

STORE_FORMAT = "tsllm-store/1"
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TEMP_RE = re.compile(r"\.tmp-\d+$")   # a temporary file of an atomic write (older versions left them visible)
ID_RE = re.compile(r"^[0-9a-f]{64}$")
MIN_PREFIX = 4


def default_root() -> str:
    """``$TSLLM_STORE`` if set, else ``./tsllm-store``."""
    return os.environ.get("TSLLM_STORE") or os.path.join(os.getcwd(), "tsllm-store")


@dataclass(frozen=True)
class Artifact:
    """A committed artifact: its id, directory and manifest."""

    id: str
    path: str
    manifest: Manifest

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def short_id(self) -> str:
        return self.id[:12]


@dataclass(frozen=True)
class LineageNode:
    """One node of a lineage tree: the ``role`` it plays for its child (None at the root), the
    artifact (or None for an external input, described by ``external``), and its parents."""

    role: str | None
    id: str | None
    artifact: Artifact | None
    external: str | None
    missing: bool = False
    children: list = field(default_factory=list)


def describe_external(ext: dict) -> str:
    """One line for an input from outside the store (a directory, a file, a hub revision)."""
    if ext.get("type") == "hub":
        return f"hub {ext.get('repo')}@{ext.get('revision')} (commit {ext.get('commit')})"
    return f"{ext.get('type')} {ext.get('path')}"


class Store:
    """Artifacts and tags under ``root``.

    Example:
        >>> store = Store("tsllm-store")                     # doctest: +SKIP
        >>> [a.short_id for a in store.list(kind="checkpoint")]   # doctest: +SKIP
    """

    def __init__(self, root: str | None = None):
        self.root = os.path.abspath(root or default_root())

    # -- layout ---------------------------------------------------------------------------------
    def _dir(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _ensure(self) -> None:
        with storage_errors(f"store {self.root}"):
            for sub in ("artifacts", "staging", "tags"):
                os.makedirs(self._dir(sub), exist_ok=True)
            marker = self._dir("store.json")
            if not os.path.exists(marker):
                write_file_atomic(marker, json.dumps({"format": STORE_FORMAT}).encode())

    # -- writing --------------------------------------------------------------------------------
    def create(self, job_key: str, compression: str = "none") -> ArtifactWriter:
        """A writer staging a new tensor artifact; the same ``job_key`` resumes an interrupted write."""
        self._ensure()
        return ArtifactWriter(self, self._dir("staging", job_key),
                              lambda staging, where: ZarrTensorSink(staging, where, compression))

    def create_with(self, job_key: str, make_payload) -> ArtifactWriter:
        """A writer staging a new artifact around ``make_payload(staging_dir, where)`` (e.g. the
        delta payload of diff/store.py); the same ``job_key`` resumes an interrupted write."""
        self._ensure()
        return ArtifactWriter(self, self._dir("staging", job_key), make_payload)

    def create_dataset(self, job_key: str) -> ArtifactWriter:
        """A writer staging a new dataset artifact (Parquet shards); the same ``job_key`` resumes.

        Example:
            >>> writer = store.create_dataset(job_key("logits", fingerprint))   # doctest: +SKIP
            >>> if "shard-00000.parquet" not in writer.completed_shards():
            ...     writer.write_shard("shard-00000.parquet", table)
            >>> writer.commit(kind="logits", info={"fingerprint": fingerprint})
        """
        self._ensure()
        return ArtifactWriter(self, self._dir("staging", job_key), DatasetPayload)

    def _publish(self, staging: str, manifest: Manifest) -> Artifact:
        manifest.id = manifest.content_id()
        target = self._dir("artifacts", manifest.id)
        with storage_errors(f"artifact {manifest.id[:12]} in store {self.root}"):
            write_file_atomic(os.path.join(staging, "manifest.json"), manifest.to_json())
            if os.path.exists(target):   # identical content already committed: keep the old one
                remove_tree(staging)
            else:
                os.rename(staging, target)
                fsync_path(self._dir("artifacts"))
                os.remove(os.path.join(target, ".lock"))
        return self.get(manifest.id)

    # -- reading --------------------------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """The full artifact id a ref names: a tag, a full id, or a unique id prefix."""
        tag_path = self._dir("tags", ref)
        if TAG_RE.match(ref) and os.path.isfile(tag_path):
            return self._read_tag(ref)
        if re.fullmatch(r"[0-9a-f]{%d,64}" % MIN_PREFIX, ref or ""):
            matches = [i for i in self._ids() if i.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise RefError(f"store {self.root}: id prefix {ref!r} is ambiguous ({len(matches)} artifacts); give more characters")
        raise ArtifactNotFound(f"store {self.root}: no artifact or tag named {ref!r} (see `tsllm ls`)")

    def _read_tag(self, name: str) -> str:
        """The artifact id tag ``name`` holds; a tag holding anything but an id is an error
        (a hand-edited ``../x`` must never lead outside the store)."""
        path = self._dir("tags", name)
        try:
            with open(path, "rb") as f:
                value = f.read(200).decode("ascii").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise RefError(f"store {self.root}: tag {name!r} is unreadable ({e})") from None
        if not ID_RE.match(value):
            raise RefError(f"store {self.root}: tag {name!r} ({path}) does not hold an artifact id: {value[:80]!r}")
        return value

    def has(self, ref: str) -> bool:
        try:
            self.resolve(ref)
            return True
        except (ArtifactNotFound, RefError):
            return False

    def get(self, ref: str) -> Artifact:
        """The committed artifact a ref names; ArtifactNotFound if there is none."""
        artifact_id = self.resolve(ref)
        path = self._dir("artifacts", artifact_id)
        manifest_path = os.path.join(path, "manifest.json")
        if not os.path.isfile(manifest_path):
            raise ArtifactNotFound(f"store {self.root}: artifact {artifact_id[:12]} (from {ref!r}) does not exist")
        with open(manifest_path, "rb") as f:
            manifest = Manifest.from_json(f.read(), manifest_path)
        manifest.check_id(artifact_id, manifest_path)
        return Artifact(artifact_id, path, manifest)

    def open(self, ref: str) -> ZarrTensorSource:
        """A TensorSource over the tensors of the artifact ``ref``; every read it serves is
        checked against the manifest's checksums (see ZarrTensorSource)."""
        artifact = self.get(ref)
        if "delta" in artifact.manifest.info:   # stored as deltas of a parent: rebuilt block by block
            from ..diff.reader import open_delta

            return open_delta(self, artifact)
        return ZarrTensorSource(artifact.path, artifact.manifest.metas(), "artifact:" + artifact.id,
                                chunks=artifact.manifest.chunk_digests(), checksums=artifact.manifest.checksums())

    def open_dataset(self, ref: str) -> DatasetSource:
        """Verified shard reads of the dataset artifact ``ref`` (see DatasetSource)."""
        artifact = self.get(ref)
        if not artifact.manifest.shards:
            raise FormatError(f"store {self.root}: artifact {artifact.short_id} ({artifact.kind}) is not a dataset")
        return DatasetSource(artifact.path, artifact.manifest.shards, f"artifact {artifact.short_id} ({artifact.path})",
                             artifact.manifest.info)

    def file_path(self, ref: str, name: str) -> str:
        return os.path.join(self.get(ref).path, "files", name)

    def carried_files(self, ref: str) -> dict[str, str]:
        """Carried file name -> path for an artifact."""
        artifact = self.get(ref)
        return {n: os.path.join(artifact.path, "files", n) for n in artifact.manifest.files}

    def _ids(self) -> list[str]:
        base = self._dir("artifacts")
        return sorted(os.listdir(base)) if os.path.isdir(base) else []

    def list(self, kind: str | None = None, damaged: list | None = None) -> list[Artifact]:
        """Committed artifacts, oldest first, optionally of one kind.

        An entry that is not a readable artifact (a truncated or edited manifest, a stray
        directory or file under ``artifacts/``) is skipped; pass a list as ``damaged`` to
        receive ``(entry name, reason)`` for each.
        """
        found = []
        for artifact_id in self._ids():
            try:
                if not ID_RE.match(artifact_id):
                    raise FormatError("not an artifact id")
                artifact = self.get(artifact_id)
            except TsllmError as e:
                if damaged is not None:
                    damaged.append((artifact_id, str(e)))
                continue
            if kind is None or artifact.kind == kind:
                found.append(artifact)
        return sorted(found, key=lambda a: (a.manifest.created_at, a.id))

    # -- lineage --------------------------------------------------------------------------------
    def lineage(self, ref: str) -> LineageNode:
        """The lineage tree of ``ref``: the artifact and, recursively, what it was made from.

        Parents outside the store (a Hugging Face directory, a hub repo) are leaves with their
        description; a parent id this store does not hold is a leaf marked missing; an artifact
        met twice on one path (never in a valid store) is not expanded again.
        """
        def walk(artifact_id: str, role: str | None, path: frozenset) -> LineageNode:
            try:
                artifact = self.get(artifact_id)
            except (ArtifactNotFound, FormatError, IntegrityError):
                return LineageNode(role, artifact_id, None, None, missing=True)
            children = []
            if artifact.id not in path:
                for parent in artifact.manifest.parents:
                    if "id" in parent:
                        children.append(walk(parent["id"], parent.get("role", "parent"), path | {artifact.id}))
                    else:
                        children.append(LineageNode(parent.get("role", "parent"), None, None,
                                                    describe_external(parent.get("external", {}))))
            return LineageNode(role, artifact.id, artifact, None, children=children)

        return walk(self.resolve(ref), None, frozenset())

    # -- tags -----------------------------------------------------------------------------------
    def tags(self) -> dict[str, str]:
        """Tag name -> artifact id."""
        base = self._dir("tags")
        if not os.path.isdir(base):
            return {}
        out = {}
        for name in sorted(os.listdir(base)):
            if TAG_RE.match(name) and not TEMP_RE.search(name):
                try:
                    out[name] = self._read_tag(name)
                except RefError:
                    continue   # a damaged tag names nothing; resolving it says why
        return out

    def tags_of(self, artifact_id: str) -> list[str]:
        return [t for t, i in self.tags().items() if i == artifact_id]

    def tag(self, ref: str, name: str, force: bool = True) -> str | None:
        """Point tag ``name`` at ``ref``. Returns the id it pointed at before, if any.

        With ``force=False`` an existing tag pointing elsewhere raises RefError.
        """
        if not TAG_RE.match(name) or TEMP_RE.search(name) or re.fullmatch(r"[0-9a-f]{%d,64}" % MIN_PREFIX, name):
            raise RefError(f"tag {name!r} is not allowed: use letters, digits, '.', '_', '-' (not starting with "
                           "a symbol) and not something that looks like an artifact id")
        artifact_id = self.get(ref).id
        previous = self.tags().get(name)
        if previous and previous != artifact_id and not force:
            raise RefError(f"tag {name!r} already points at {previous[:12]}; use --force to move it")
        self._ensure()
        with storage_errors(f"tag {name!r} in store {self.root}"):
            write_file_atomic(self._dir("tags", name), (artifact_id + "\n").encode())
        return previous if previous != artifact_id else None

    def untag(self, name: str) -> None:
        path = self._dir("tags", name)
        if not TAG_RE.match(name) or not os.path.isfile(path):
            raise ArtifactNotFound(f"store {self.root}: no tag {name!r}")
        with storage_errors(f"tag {name!r} in store {self.root}"):
            os.remove(path)
            fsync_path(self._dir("tags"))

    # -- checking and cleaning -------------------------------------------------------------------
    def verify(self, ref: str, progress=None, upgrade: bool = False) -> Artifact:
        """Re-read every tensor and carried file and compare with the manifest's checksums: each
        tensor's sha256 and, where recorded, each chunk's digest.

        With ``upgrade``, an artifact written before chunk digests existed gets them (computed
        in the same pass that checks its sha256, written only if everything matches); its id does
        not change. Returns the (possibly upgraded) artifact; raises IntegrityError listing what
        does not match.
        """
        artifact = self.get(ref)
        problems = []
        manifest = artifact.manifest
        metas = manifest.metas()
        added = {}
        with (self.open(artifact.id) if metas else contextlib.nullcontext()) as source:
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
            problems.extend(self.open_dataset(artifact.id).verify())
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
            raise IntegrityError(f"artifact {artifact.short_id} in {self.root}: {len(problems)} problem(s): {shown}")
        if added:
            for name, chunks in added.items():
                r = manifest.tensors[name]
                manifest.tensors[name] = record_from(metas[name], r.checksum, chunks)
            manifest.check_id(artifact.id, artifact.path)   # chunk digests are not part of the id
            with storage_errors(f"manifest of artifact {artifact.short_id} in store {self.root}"):
                write_file_atomic(os.path.join(artifact.path, "manifest.json"), manifest.to_json())
            artifact = self.get(artifact.id)
        return artifact

    def needs_upgrade(self, ref: str) -> list[str]:
        """Tensors of artifact ``ref`` that have no chunk digests (see ``verify(upgrade=True)``)."""
        return [n for n, r in self.get(ref).manifest.tensors.items() if r.chunks is None]

    def gc(self, dry_run: bool = False) -> list[str]:
        """Remove staging directories no running job holds, the partial directories that
        killed exports from this store left next to their outputs, and dedup objects no
        artifact links any more (store/dedup.py). Returns the removed paths."""
        from ..io.export_partials import remove_export_partials

        removed = []
        base = self._dir("staging")
        for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            path = os.path.join(base, name)
            if os.path.islink(path) or not os.path.isdir(path):
                # never ours to follow: a link is removed as a link, the target is left alone
                if not dry_run:
                    with storage_errors(f"staging entry {path}"):
                        os.unlink(path)
                removed.append(path)
                continue
            lock = _try_lock(path)
            if lock is None:
                continue  # a live job owns it
            try:
                if not dry_run:
                    shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            finally:
                os.close(lock)
        return removed + remove_export_partials(self.root, dry_run=dry_run) + gc_objects(self.root, dry_run=dry_run)


def _try_lock(path: str) -> int | None:
    """Take the job lock of a staging dir without waiting; None if another process holds it."""
    lock_path = os.path.join(path, ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


class ArtifactWriter:
    """Stages one artifact around a payload writer; ``commit`` publishes it, ``abort`` discards it.

    The payload is a Zarr tensor sink (checkpoints, diffs, adapters: the TensorSink verbs below
    are its) or a dataset payload (Parquet shards: ``write_shard`` / ``completed_shards``). Holds
    an exclusive lock on its staging directory for its lifetime, so a second process running the
    same job, or ``gc``, cannot interfere.
    """

    def __init__(self, store: Store, staging_dir: str, make_payload):
        where = f"store {store.root}"
        with storage_errors(where):
            os.makedirs(staging_dir, exist_ok=True)
        self._lock = _try_lock(staging_dir)
        if self._lock is None:
            raise StorageError(f"store {store.root}: job {os.path.basename(staging_dir)[:16]} is already running in another process")
        self.store = store
        self.staging_dir = staging_dir
        self.where = where
        self.payload = make_payload(staging_dir, where)

    # -- TensorSink, for tensor payloads ---------------------------------------------------------
    @property
    def metas(self):
        return self.payload.metas

    def prepare(self, metas) -> None:
        self.payload.prepare(metas)

    def preferred_rows(self, meta) -> int:
        return self.payload.preferred_rows(meta)

    def completed(self) -> dict[str, str]:
        return self.payload.completed()

    def write_rows(self, name: str, start: int, block) -> None:
        self.payload.write_rows(name, start, block)

    def finish(self, name: str) -> str:
        return self.payload.finish(name)

    def chunk_digests(self, name: str):
        return self.payload.chunk_digests(name)

    # -- datasets --------------------------------------------------------------------------------
    def completed_shards(self) -> dict[str, str]:
        """Shards of a dataset payload already finished (by an interrupted run too): name -> sha256."""
        return self.payload.completed_shards()

    def write_shard(self, name: str, table, **options) -> str:
        """Write one Parquet shard of a dataset payload (see DatasetPayload.write_shard)."""
        return self.payload.write_shard(name, table, **options)

    # -- publishing ------------------------------------------------------------------------------
    def commit(self, *, kind: str, parents=(), source=None, recipe=None, files=None, run=None,
               info: dict | None = None) -> Artifact:
        """Publish the staged payload as an artifact of ``kind``; every declared tensor must be finished.

        Args:
            files: carried file name -> path or bytes (config, tokenizer, ...).
            info: kind-specific facts (e.g. a logits dataset's fingerprint); part of the id.
        Returns:
            The committed Artifact (an existing one if identical content was committed before).
        """
        if kind not in KINDS:
            raise FormatError(f"{self.where}: unknown artifact kind {kind!r}; expected one of {', '.join(KINDS)}")
        schema = check_info(kind, dict(info or {}), self.where)
        tensors, shards = {}, {}
        if isinstance(self.payload, DatasetPayload):
            shards = self.payload.records()
            if not shards:
                raise StorageError(f"{self.where}: cannot commit a dataset without shards")
        else:
            done = self.completed()
            missing = [n for n in self.metas if n not in done]
            if missing:
                # a caller's bug, not bad input: never reached from the CLI
                raise ValueError(f"{self.where}: cannot commit, {len(missing)} tensor(s) unfinished, e.g. {missing[0]!r}")
            tensors = {n: record_from(m, done[n], self.chunk_digests(n)) for n, m in self.metas.items()}
        carried = {}
        with storage_errors(self.where):
            files_dir = os.path.join(self.staging_dir, "files")
            os.makedirs(files_dir, exist_ok=True)
            for name, content in (files or {}).items():
                data = content if isinstance(content, bytes) else open(content, "rb").read()
                with open(os.path.join(files_dir, name), "wb") as f:
                    f.write(data)
                carried[name] = checksum_bytes(data)
            self.payload.seal()
            if tensors:   # identical tensors and coded blocks stored once across the store (store/dedup.py)
                dedup_staged(self.store.root, self.staging_dir, {n: r.checksum for n, r in tensors.items()})
                dedup_blocks(self.store.root, self.staging_dir)
            fsync_tree(self.staging_dir)  # every chunk durable before the manifest exists
        manifest = Manifest(kind=kind, tensors=tensors, files=carried, parents=list(parents), source=source,
                            recipe=recipe, run=dict(run or {}), created_at=now_utc(),
                            tool={"name": "tensorstore_llm", "version": __version__},
                            shards=shards, info=dict(info or {}), info_schema=schema)
        try:
            return self.store._publish(self.staging_dir, manifest)
        finally:
            self._release()

    def close(self) -> None:
        """Stop writing but keep the staging directory, so the same job can resume later."""
        self.payload.close()
        self._release()

    def abort(self) -> None:
        """Throw away everything staged."""
        self.close()
        remove_tree(self.staging_dir)

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


def job_key(*parts) -> str:
    """A stable staging-directory name for a job from its identifying parts."""
    return "job-" + hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
