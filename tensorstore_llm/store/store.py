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

import json
import os
import re
import shutil
from dataclasses import dataclass, field

from ..errors import ArtifactNotFound, FormatError, IntegrityError, RefError, TsllmError
from ..io.fsutil import fsync_path, remove_tree, storage_errors, write_file_atomic
from ..io.zarr_tensors import ZarrTensorSink, ZarrTensorSource
from .datasets import DatasetPayload, DatasetSource
from .dedup import gc_objects
from .manifest import Manifest
from .writer import ArtifactWriter, job_key, try_lock  # noqa: F401  (job_key: callers import it from here)

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
    def create(self, key: str, compression: str = "none") -> ArtifactWriter:
        """A writer staging a new tensor artifact; the same ``key`` resumes an interrupted write."""
        self._ensure()
        return ArtifactWriter(self, self._dir("staging", key),
                              lambda staging, where: ZarrTensorSink(staging, where, compression))

    def create_with(self, key: str, make_payload) -> ArtifactWriter:
        """A writer staging a new artifact around ``make_payload(staging_dir, where)`` (e.g. the
        delta payload of diff/store.py); the same ``key`` resumes an interrupted write."""
        self._ensure()
        return ArtifactWriter(self, self._dir("staging", key), make_payload)

    def create_dataset(self, key: str) -> ArtifactWriter:
        """A writer staging a new dataset artifact (Parquet shards); the same ``key`` resumes.

        Example:
            >>> writer = store.create_dataset(job_key("logits", fingerprint))   # doctest: +SKIP
            >>> if "shard-00000.parquet" not in writer.completed_shards():
            ...     writer.write_shard("shard-00000.parquet", table)
            >>> writer.commit(kind="logits", info={"fingerprint": fingerprint})
        """
        self._ensure()
        return ArtifactWriter(self, self._dir("staging", key), DatasetPayload)

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
        if artifact.manifest.shards and not artifact.manifest.tensors:
            raise FormatError(f"store {self.root}: artifact {artifact.short_id} ({artifact.kind}) is a dataset of "
                              "Parquet shards, not tensors; read it with open_dataset")
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
        from .verify import verify_artifact

        return verify_artifact(self, self.get(ref), progress, upgrade)

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
            lock = try_lock(path)
            if lock is None:
                continue  # a live job owns it
            try:
                if not dry_run:
                    shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            finally:
                os.close(lock)
        return removed + remove_export_partials(self.root, dry_run=dry_run) + gc_objects(self.root, dry_run=dry_run)


