"""Hugging Face checkpoint directories: sharded safetensors + index, config and tokenizer files.

``HFCheckpointSource`` reads a directory (index or bare ``*.safetensors``) or a single file;
``HFCheckpointSink`` writes one, shard by shard at final offsets, and publishes it by rename.
Pickle checkpoints (``.bin``/``.pt``/``.pth``/``.ckpt``) are refused, never unpickled.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil

import numpy as np

from ..dtypes import by_name, from_storage
from ..errors import ArtifactNotFound, FormatError, OutputExists, TensorNotFound, UnsafeFormat
from .base import SourceBase, TensorMeta, check_tensor_name
from .export_partials import LOCK_NAME, ExportLock, partial_dir
from .fsutil import DirectWrites, fsync_path, fsync_tree, map_range, start_writeback, storage_errors
from .journal import Journal
from .safetensors_format import Entry, build_header, check_shape_size, parse_header, pread_into, pwrite_all
from .staged import JOURNAL_NAME, StagedSink

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
WEIGHT_SUFFIXES = PICKLE_SUFFIXES + (".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", ".npz", ".npy", ".ot", ".tflite")
MAX_CARRIED_FILE_BYTES = 1 << 30   # carried files are read whole when committed; a bigger one is an error
MAX_INDEX_BYTES = 64 * 1024 * 1024


def carried_files(directory: str) -> dict[str, str]:
    """Config, tokenizer and other small files of a checkpoint directory that travel with it.

    Every such file is carried, whatever its size (tokenizers of large vocabularies pass 30 MB),
    up to ``MAX_CARRIED_FILE_BYTES``; a bigger one is an error naming it, never silently dropped.

    Returns:
        file name -> path, for top-level regular files that are not weights or the index.
    """
    found = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if (name.startswith(".") or not os.path.isfile(path) or name.endswith(WEIGHT_SUFFIXES)
                or name.endswith(".safetensors.index.json") or name.endswith(".bin.index.json")):
            continue
        size = os.path.getsize(path)
        if size > MAX_CARRIED_FILE_BYTES:
            raise FormatError(f"{path}: {size} bytes; files carried with a checkpoint (config, tokenizer, ...) may "
                              f"have at most {MAX_CARRIED_FILE_BYTES} bytes; move it out of {directory} to import the weights")
        found[name] = path
    return found


class HFCheckpointSource(SourceBase):
    """Tensors of a Hugging Face checkpoint directory or of one ``.safetensors`` file.

    Example:
        >>> with HFCheckpointSource("path/to/model") as src:   # doctest: +SKIP
        ...     embed = src.read_rows("model.embed_tokens.weight", 0, 16)
    """

    def __init__(self, path: str):
        self.path = path
        self._fds: dict[str, int] = {}
        self._sizes: dict[str, int] = {}
        self._entries: dict[str, tuple[str, Entry]] = {}
        self._index: dict[str, str] | None = None
        if os.path.isfile(path):
            if not path.endswith(".safetensors"):
                _refuse_or_reject(path, [os.path.basename(path)])
            files, self.directory = [path], None
        elif os.path.isdir(path):
            self.directory = path
            files = self._shard_files(path)
        else:
            raise ArtifactNotFound(f"{path}: no such file or directory")
        try:
            self._open_all(files)
        except BaseException:
            self.close()
            raise
        self.identity = self._fingerprint(files)

    def _shard_files(self, directory: str) -> list[str]:
        index_path = os.path.join(directory, INDEX_NAME)
        if os.path.exists(index_path):
            self._index = read_index(index_path)
            return [os.path.join(directory, f) for f in sorted(set(self._index.values()))]
        names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        if not names:
            _refuse_or_reject(directory, os.listdir(directory))
        return [os.path.join(directory, n) for n in names]

    def _open_all(self, files: list[str]) -> None:
        for path in files:
            if not os.path.isfile(path):
                raise FormatError(f"{path}: listed in {INDEX_NAME} but missing")
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
            self._sizes[path] = os.fstat(fd).st_size
            header = parse_header(path, fd, self._sizes[path])
            for name, entry in header.entries.items():
                if name in self._entries:
                    raise FormatError(f"{path}: tensor {name!r} also appears in {self._entries[name][0]}")
                self._entries[name] = (path, entry)
        if self._index is not None:
            for name, file in self._index.items():
                located = self._entries.get(name)
                if located is None or os.path.basename(located[0]) != file:
                    raise FormatError(f"{os.path.join(self.directory, INDEX_NAME)}: tensor {name!r} is mapped to {file} but that file does not hold it")
            extra = set(self._entries) - set(self._index)
            if extra:
                raise FormatError(f"{os.path.join(self.directory, INDEX_NAME)}: does not list tensors found in the shards, e.g. {sorted(extra)[0]!r}")

    def _fingerprint(self, files: list[str]) -> str:
        h = hashlib.sha256()
        for path in files:
            st = os.stat(path)
            h.update(f"{os.path.basename(path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        return "hf-dir:" + h.hexdigest()

    def keys(self) -> list[str]:
        return list(self._entries)

    def meta(self, name: str) -> TensorMeta:
        return self._locate(name)[1].meta

    def files(self) -> dict[str, str]:
        """Carried config / tokenizer files (empty for a single-file source)."""
        return carried_files(self.directory) if self.directory else {}

    def read_rows(self, name: str, start: int, stop: int):
        """Rows ``start:stop`` of ``name`` (the whole value for a scalar), reading only those bytes."""
        path, entry = self._locate(name)
        meta = entry.meta
        dt = by_name(meta.dtype)
        if not meta.shape:
            shape, offset = (), entry.start
        else:
            if not 0 <= start <= stop <= meta.shape[0]:
                raise IndexError(f"{path}: rows {start}:{stop} outside tensor {name!r} of shape {meta.shape}")
            shape = (stop - start, *meta.shape[1:])
            offset = entry.start + start * meta.row_numel * dt.itemsize
        nbytes = math.prod(shape) * dt.itemsize
        mapped = map_range(self._fds[path], offset, nbytes, self._sizes[path]) if offset % dt.itemsize == 0 else None
        if mapped is not None:
            return from_storage(mapped.view(dt.storage).reshape(shape), dt)
        buf = np.empty(shape, dtype=dt.storage)
        if buf.nbytes:
            pread_into(path, self._fds[path], memoryview(buf.reshape(-1)).cast("B"), offset)
        return from_storage(buf, dt)

    def _locate(self, name: str) -> tuple[str, Entry]:
        if name not in self._entries:
            raise TensorNotFound(f"{self.path}: has no tensor {name!r}")
        return self._entries[name]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def read_index(index_path: str) -> dict[str, str]:
    """Parse ``model.safetensors.index.json`` into tensor name -> shard file name, validated."""
    if os.path.getsize(index_path) > MAX_INDEX_BYTES:
        raise FormatError(f"{index_path}: index is larger than {MAX_INDEX_BYTES} bytes")
    try:
        with open(index_path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"{index_path}: not valid JSON ({e.__class__.__name__})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index_path}: expected an object with a 'weight_map' of tensor name -> file")
    for name, file in weight_map.items():
        check_tensor_name(name, index_path)
        if (not isinstance(file, str) or not file.endswith(".safetensors") or "/" in file
                or "\\" in file or "\x00" in file or file.startswith(".")):
            raise FormatError(f"{index_path}: tensor {name!r} maps to {file!r}; expected a .safetensors file name in the same directory")
    return weight_map


def _refuse_or_reject(where: str, names: list[str]) -> None:
    pickled = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise UnsafeFormat(
            f"{where}: holds only pickle checkpoints ({', '.join(pickled[:3])}); they can run arbitrary code "
            "when loaded, so tensorstore_llm never unpickles them. Convert them to safetensors with a "
            "tool you trust (e.g. transformers' save_pretrained(safe_serialization=True)) and import that.")
    raise FormatError(f"{where}: no .safetensors files found; expected a Hugging Face checkpoint directory or a .safetensors file")


def plan_shards(metas: list[TensorMeta], max_shard_bytes: int) -> list[list[TensorMeta]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor alone)."""
    shards: list[list[TensorMeta]] = [[]]
    size = 0
    for meta in metas:
        if shards[-1] and size + meta.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(meta)
        size += meta.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """Hugging Face's shard names: ``model.safetensors`` or ``model-0000k-of-0000n.safetensors``."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _check_output_free(out_dir: str) -> None:
    if os.path.lexists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise OutputExists(f"{out_dir}: already exists and is not an empty directory; choose a new output path")


class HFCheckpointSink(StagedSink):
    """Writes a Hugging Face checkpoint directory, resumable, published atomically by rename.

    Every shard's header is written first and each tensor goes straight to its final offset, so
    neither a shard nor the model is ever held in memory, and a killed export resumes. Tensor
    bytes bypass the page cache where the file system allows (``fsutil.DirectWrites``: no copy
    into fresh cache pages, no dirty pages for the kernel to write back); every file is still
    fsynced before the directory is published. The
    staging directory (``.OUT.tsllm-partial-KEY`` beside OUT) is locked for the sink's lifetime,
    so a second export of the same job fails at once (StorageError) instead of writing into it;
    with ``store_root`` it is also registered there, so ``gc`` can remove it if the export dies
    (see ``export_partials``).
    """

    def __init__(self, out_dir: str, *, max_shard_bytes: int = 5 * 1024**3, job_key: str = "default",
                 files: dict[str, str | bytes] | None = None, store_root: str | None = None):
        out_dir = os.path.abspath(out_dir)
        _check_output_free(out_dir)
        staging = partial_dir(out_dir, job_key)
        self._lock = ExportLock(staging, out_dir, store_root)
        self._lock.acquire()
        try:
            _check_output_free(out_dir)   # again: a holder of the lock may have published meanwhile
            super().__init__(staging, out_dir)
        except BaseException:
            self._lock.abandon()
            raise
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.files = dict(files or {})
        self._offsets: dict[str, tuple[int, int]] = {}   # name -> (fd, absolute offset)
        self._weight_map: dict[str, str] = {}
        self._fds: list[int] = []
        self._direct = DirectWrites()        # tensor bytes past the page cache (fsutil.DirectWrites)
        self._direct_fds: dict[int, int | None] = {}   # fd -> its O_DIRECT twin (None: buffered)

    def _prepare_storage(self, metas: list[TensorMeta]) -> None:
        for meta in metas:
            check_shape_size(f"{self.out_dir}: tensor {meta.name!r}", meta.shape, by_name(meta.dtype).itemsize)
        shards = plan_shards(metas, self.max_shard_bytes)
        names = shard_file_names(len(shards))
        layout = json.dumps([[n, [[m.name, list(m.shape), m.dtype] for m in s]] for n, s in zip(names, shards)])
        layout_path = os.path.join(self.staging_dir, "layout.json")
        fresh = not (os.path.exists(layout_path) and open(layout_path).read() == layout)
        if fresh:
            self.journal.close()
            for entry in os.listdir(self.staging_dir):
                if entry != LOCK_NAME:
                    os.remove(os.path.join(self.staging_dir, entry))
            self.journal = Journal(os.path.join(self.staging_dir, JOURNAL_NAME))
        for file_name, shard in zip(names, shards):
            path = os.path.join(self.staging_dir, file_name)
            header, offsets = build_header(shard)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            self._fds.append(fd)
            if fresh:
                pwrite_all(fd, memoryview(header), 0)
                os.ftruncate(fd, len(header) + sum(m.nbytes for m in shard))
            self._direct_fds[fd] = self._direct.open(path)
            for meta in shard:
                self._offsets[meta.name] = (fd, offsets[meta.name])
                self._weight_map[meta.name] = file_name
        if fresh:
            with open(layout_path, "w") as f:
                f.write(layout)

    def _write_block(self, meta: TensorMeta, start: int, block, raw: memoryview) -> None:
        fd, offset = self._offsets[meta.name]
        direct_fd = self._direct_fds.get(fd)
        self._direct.pwrite(fd, direct_fd, raw, offset + start * meta.row_numel * by_name(meta.dtype).itemsize)
        if direct_fd is None or not self._direct.enabled:
            start_writeback(fd)   # buffered: start the disk writes now, so the fsync at commit waits less

    def _read_back(self, meta: TensorMeta, start: int, stop: int):
        fd, offset = self._offsets[meta.name]
        dt = by_name(meta.dtype)
        buf = np.empty((stop - start, *meta.shape[1:]) if meta.shape else (), dtype=dt.storage)
        if buf.nbytes:
            pread_into(self.staging_dir, fd, memoryview(buf.reshape(-1)).cast("B"), offset + start * meta.row_numel * dt.itemsize)
        return from_storage(buf, dt)

    def commit(self) -> str:
        """Write the index and carried files, then move the directory into place. Returns its path."""
        with storage_errors(self.out_dir):
            self._close_files()
            self.journal.close()
            self.stop_hashing()
            for name in (JOURNAL_NAME, "layout.json"):
                os.remove(os.path.join(self.staging_dir, name))
            if len(set(self._weight_map.values())) > 1:
                total = sum(m.nbytes for m in self.metas.values())
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(self._weight_map.items()))}
                with open(os.path.join(self.staging_dir, INDEX_NAME), "w") as f:
                    json.dump(index, f, indent=2)
            for name, content in self.files.items():
                target = os.path.join(self.staging_dir, name)
                if isinstance(content, bytes):
                    with open(target, "wb") as f:
                        f.write(content)
                else:
                    shutil.copyfile(content, target)
            fsync_tree(self.staging_dir)
            try:   # another export (other settings, other staging) may have published meanwhile
                _check_output_free(self.out_dir)
                if os.path.isdir(self.out_dir):
                    os.rmdir(self.out_dir)  # empty
                os.rename(self.staging_dir, self.out_dir)
            except (OutputExists, OSError) as e:
                if isinstance(e, OutputExists) or e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise OutputExists(f"{self.out_dir}: appeared while this export ran (another export published it "
                                       "first); this one is discarded") from None
                raise
            fsync_path(os.path.dirname(self.out_dir))
            self._lock.published()
        return self.out_dir

    def _close_files(self) -> None:
        for fd in self._fds:
            os.close(fd)
            if self._direct_fds.get(fd) is not None:
                os.close(self._direct_fds[fd])
        self._fds.clear()
        self._direct_fds.clear()
        self._direct.close()

    def close(self) -> None:
        """Stop writing, keep the staging directory (a re-run resumes from it) and release its lock."""
        self._close_files()
        super().close()
        self._lock.release()

    def abort(self) -> None:
        """Remove the staging directory, still holding its lock, then release the lock."""
        self._close_files()
        StagedSink.close(self)
        self._lock.remove()
