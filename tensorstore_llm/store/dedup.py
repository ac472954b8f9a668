"""Content-addressed dedup: identical tensors are stored once across the whole store.

When an artifact is committed, each tensor array of its staging directory is looked up by its
content key: the sha256 of the tensor's checksum and its ``zarr.json`` (shape, dtype, chunking,
codecs). ``<root>/objects/<k[:2]>/<k>/`` holds the first copy ever committed; a later tensor with
the same key has its chunk files replaced by hard links to the object's files, so an untouched
embedding in a fine-tune, a frozen layer, or the same base imported from two paths takes its
bytes once. The coded blocks of delta-stored artifacts, and the carried files of every artifact
(config, tokenizer: 2-4 MB for a real model, repeated in every fine-tune of a family), are keyed
by their own sha256 (``objects/<h[:2]>/<h>.blk``). Artifacts stay ordinary directories of real
files:

- reads and ``verify`` are unchanged (the bytes behind a link are the bytes that were hashed;
  every read still checks the per-chunk digests the artifact recorded for itself);
- ``gc`` removes an object once no artifact links its files (every file's link count is 1);
  removing an artifact never needs to know who else shares its files;
- where the file system has no hard links, a tensor simply keeps its own copy.

Objects appear by one rename of a fully linked temporary directory, so a crash leaves either no
object or a complete one (temporaries are removed by ``gc``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass

OBJECTS = "objects"
BLOCK_SUFFIX = ".blk"


def content_key(checksum: str, array_meta: bytes) -> str:
    """The key of a stored tensor array: its logical checksum and its zarr metadata."""
    return hashlib.sha256(checksum.encode() + b"\0" + array_meta).hexdigest()


def _files(root: str) -> list[str]:
    """Regular files under ``root``, relative, sorted."""
    out = []
    for directory, _, names in os.walk(root):
        for n in names:
            out.append(os.path.relpath(os.path.join(directory, n), root))
    return sorted(out)


def dedup_staged(store_root: str, staging_dir: str, checksums: dict[str, str]) -> int:
    """Link the tensor arrays of ``staging_dir`` to the store's objects (creating the objects
    that do not exist yet). Returns the bytes that were already stored elsewhere."""
    saved = 0
    for name, checksum in checksums.items():
        array_dir = os.path.join(staging_dir, "tensors", name)
        try:
            with open(os.path.join(array_dir, "zarr.json"), "rb") as f:
                key = content_key(checksum, f.read())
            obj = os.path.join(store_root, OBJECTS, key[:2], key)
            if os.path.isdir(obj):
                saved += _link_from(obj, array_dir)
            else:
                _make_object(array_dir, obj)
        except OSError:
            continue   # no hard links here (or a race with gc): the tensor keeps its own copy
    return saved


def dedup_blocks(store_root: str, staging_dir: str, folder: str = "deltas") -> int:
    """Link the files under ``staging_dir/folder`` (a delta-stored artifact's coded blocks, or any
    artifact's carried ``files``) to ``objects/<h[:2]>/<h>.blk``, keyed by the sha256 of their
    bytes: the same delta stored twice (under another lineage, or as both a diff and a
    checkpoint), or the same tokenizer carried by every fine-tune of a base, takes its bytes once.
    Returns the bytes that were already stored."""
    saved = 0
    root = os.path.join(staging_dir, folder)
    for n in _files(root) if os.path.isdir(root) else []:
        path = os.path.join(root, n)
        try:
            with open(path, "rb") as f:
                data = f.read()
            key = hashlib.sha256(data).hexdigest()
            obj = os.path.join(store_root, OBJECTS, key[:2], key + BLOCK_SUFFIX)
            if os.path.isfile(obj) and os.path.getsize(obj) == len(data):
                temp = path + ".link-tmp"
                os.link(obj, temp)
                os.replace(temp, path)
                saved += len(data)
            else:
                os.makedirs(os.path.dirname(obj), exist_ok=True)
                os.link(path, obj)
        except OSError:
            continue   # no hard links here, or another commit linked it first: keep the copy
    return saved


def _link_from(obj: str, array_dir: str) -> int:
    """Replace the files of ``array_dir`` by links to the same files of ``obj`` when both hold
    the same file names and sizes; returns the bytes now shared."""
    names = _files(array_dir)
    if names != _files(obj) or any(os.path.getsize(os.path.join(obj, n)) != os.path.getsize(os.path.join(array_dir, n))
                                   for n in names):
        return 0
    saved = 0
    for n in names:
        target = os.path.join(array_dir, n)
        temp = target + ".link-tmp"
        os.link(os.path.join(obj, n), temp)
        os.replace(temp, target)
        saved += os.path.getsize(target)
    return saved


def _make_object(array_dir: str, obj: str) -> None:
    temp = f"{obj}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    for n in _files(array_dir):
        os.makedirs(os.path.dirname(os.path.join(temp, n)), exist_ok=True)
        os.link(os.path.join(array_dir, n), os.path.join(temp, n))
    try:
        os.rename(temp, obj)
    except OSError:   # another commit made the same object first
        shutil.rmtree(temp, ignore_errors=True)


def gc_objects(store_root: str, dry_run: bool = False) -> list[str]:
    """Remove objects no artifact links any more, and temporaries of interrupted commits."""
    removed = []
    base = os.path.join(store_root, OBJECTS)
    for prefix in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        for entry in sorted(os.listdir(os.path.join(base, prefix))):
            path = os.path.join(base, prefix, entry)
            if os.path.isfile(path):     # a coded block: in use while an artifact links it
                if ".tmp-" in entry or os.stat(path).st_nlink <= 1:
                    if not dry_run:
                        os.remove(path)
                    removed.append(path)
                continue
            unused = ".tmp-" in entry or all(os.stat(os.path.join(path, n)).st_nlink <= 1 for n in _files(path))
            if unused:
                if not dry_run:
                    shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def stored_bytes(artifact) -> tuple[int, int]:
    """(bytes this artifact accounts for, bytes it shares with other artifacts).

    A file linked by ``n`` artifacts counts ``1/n`` of its size to each (the objects directory's
    own link is not an artifact), so the store's total is the sum over its artifacts.
    """
    own = shared = 0
    objects_link = 1
    for n in _files(artifact.path):
        st = os.stat(os.path.join(artifact.path, n))
        if st.st_nlink <= 1:
            own += st.st_size
            continue
        holders = max(1, st.st_nlink - objects_link)
        own += st.st_size // holders
        if holders > 1:
            shared += st.st_size
    return own, shared


@dataclass(frozen=True)
class Footprint:
    """What an artifact takes on disk, read from its files' link counts.

    ``disk``: every file of the artifact (each file once), shared or not: its own stored (coded)
    size, the same whatever else the store holds, so ``logical / disk`` is what its codec and
    compression achieved. ``shared``: the part of ``disk`` in files another artifact links too
    (deduplicated). ``unique``: the rest, held by this artifact alone: what it added to the store
    when it was committed (bytes already stored were linked, not written) and what removing it
    would free.
    """

    disk: int
    shared: int

    @property
    def unique(self) -> int:
        return self.disk - self.shared


def footprint(artifact) -> Footprint:
    """The artifact's :class:`Footprint` (the objects directory's own link is not an artifact;
    a file linked twice within the artifact counts once and is not "shared")."""
    seen: dict[tuple, tuple[int, int]] = {}
    uses: dict[tuple, int] = {}
    for n in _files(artifact.path):
        st = os.stat(os.path.join(artifact.path, n))
        key = (st.st_dev, st.st_ino)
        seen[key] = (st.st_size, st.st_nlink)
        uses[key] = uses.get(key, 0) + 1
    disk = shared = 0
    for key, (size, links) in seen.items():
        disk += size
        if links > 1 and links - 1 - uses[key] > 0:     # minus the objects link and our own links
            shared += size
    return Footprint(disk, shared)


def disk_total(artifacts) -> int:
    """Bytes the given artifacts take on disk together, each shared file counted once."""
    sizes: dict[tuple, int] = {}
    for artifact in artifacts:
        for n in _files(artifact.path):
            st = os.stat(os.path.join(artifact.path, n))
            sizes[(st.st_dev, st.st_ino)] = st.st_size
    return sum(sizes.values())
