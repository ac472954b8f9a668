"""Export partials: the staging directory an export keeps beside its output, its lock, and the
registration under the store root through which ``gc`` finds it after the export was killed.

An export of OUT stages in ``.OUT.tsllm-partial-KEY`` next to it (same file system, so publishing
is one rename). ``ExportLock`` guards it in two places:

- ``<store>/exports/<hash>.json``, the registration, is written before the partial directory is
  created and stays locked (``flock``) by the exporting process until it publishes or aborts,
  when it is removed. A registration that no process holds names a partial left behind by a
  killed or interrupted export: ``remove_export_partials`` removes both.
- ``.tsllm-export.lock`` inside the partial, locked for the export's lifetime (also when the store
  is read-only and nothing can be registered): a second export of the same job fails at once
  instead of writing into, or wiping, the first one's files.

Nothing is ever removed that an export did not create: a partial is removed only when a
registration names it, its name has the partial form, it is a real directory (symlinks are never
followed) holding the export's lock file (or nothing at all), and no process holds that lock.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat

from ..errors import StorageError
from .fsutil import fsync_path, storage_errors

LOCK_NAME = ".tsllm-export.lock"
REGISTRY_DIR = "exports"
PARTIAL_RE = re.compile(r"^\.(?P<base>.+)\.tsllm-partial-(?P<key>[A-Za-z0-9_-]{1,64})$")
_REGISTRATION_RE = re.compile(r"^[0-9a-f]{32}\.json$")
_MAX_REGISTRATION_BYTES = 64 * 1024


def partial_dir(out_dir: str, job_key: str) -> str:
    """Where an export of ``out_dir`` keyed ``job_key`` stages: ``.OUT.tsllm-partial-KEY`` beside it."""
    parent, base = os.path.split(os.path.abspath(out_dir))
    return os.path.join(parent, f".{base}.tsllm-partial-{job_key[:16]}")


def registration_path(store_root: str, partial: str) -> str:
    """The registration file of ``partial`` under ``store_root``."""
    name = hashlib.sha256(os.path.abspath(partial).encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return os.path.join(os.path.abspath(store_root), REGISTRY_DIR, f"{name}.json")


def _flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _lock_file(name: str, *, dir_fd: int | None = None, create: bool) -> int | None:
    """Open and lock ``name`` (relative to ``dir_fd`` if given) without waiting and without
    following a symlink. None if it is missing (when not creating), not a regular file, or held.

    A holder may unlink the file while it holds the lock (publishing does), so a lock taken on a
    file that is no longer the one at ``name`` is dropped and the open is retried.
    """
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    for _attempt in range(8):
        try:
            fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.ENXIO) and not create:
                return None
            raise
        opened = os.fstat(fd)
        if not _flock(fd):
            os.close(fd)
            return None
        try:
            current = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
            if not stat.S_ISREG(opened.st_mode):
                os.close(fd)
                return None
            return fd
        os.close(fd)   # unlinked by its holder meanwhile: take the lock on the file there now
        if not create:
            return None
    return None


class ExportLock:
    """The locks and registration of one export's partial directory (see the module docstring).

    Args:
        partial: the staging directory (``partial_dir(out_dir, key)``).
        out_dir: where the export is published.
        store_root: the store exported from, where the registration goes; None (or a store this
            process cannot write) leaves the partial unregistered, still locked.
    Example:
        >>> lock = ExportLock(partial_dir("out", "job-1"), "out", "tsllm-store")   # doctest: +SKIP
        >>> lock.acquire(); ...; lock.published()                                   # doctest: +SKIP
    """

    def __init__(self, partial: str, out_dir: str, store_root: str | None):
        self.partial = os.path.abspath(partial)
        self.out_dir = os.path.abspath(out_dir)
        self.registration = registration_path(store_root, self.partial) if store_root else None
        self._registration_fd: int | None = None
        self._partial_fd: int | None = None
        self.created = False   # the partial directory did not exist before acquire()
        self._published = False

    def _busy(self) -> StorageError:
        return StorageError(f"{self.out_dir}: another process is exporting the same job to it right now "
                            f"(staging {self.partial} is locked); wait for it to finish")

    def acquire(self) -> None:
        """Register and lock the partial, creating it; StorageError if another process holds it."""
        try:
            self._register()
            with storage_errors(self.out_dir):
                if os.path.islink(self.partial) or (os.path.lexists(self.partial) and not os.path.isdir(self.partial)):
                    raise StorageError(f"{self.out_dir}: staging path {self.partial} exists and is not a directory")
                self.created = not os.path.lexists(self.partial)
                os.makedirs(self.partial, exist_ok=True)
                dir_fd = os.open(self.partial, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    self._partial_fd = _lock_file(LOCK_NAME, dir_fd=dir_fd, create=True)
                finally:
                    os.close(dir_fd)
            if self._partial_fd is None:
                self.created = False
                raise self._busy()
        except BaseException:
            self._release()
            raise

    def _register(self) -> None:
        if self.registration is None:
            return
        try:
            os.makedirs(os.path.dirname(self.registration), exist_ok=True)
            fd = _lock_file(self.registration, create=True)
        except OSError:
            self.registration = None   # a store we cannot write (read-only): stay unregistered
            return
        if fd is None:
            raise self._busy()
        self._registration_fd = fd
        body = json.dumps({"partial": self.partial, "out": self.out_dir, "pid": os.getpid()}).encode()
        with storage_errors(self.registration):
            os.ftruncate(fd, 0)
            os.pwrite(fd, body, 0)
            os.fsync(fd)
            fsync_path(os.path.dirname(self.registration))

    def published(self) -> None:
        """The partial was renamed to ``out_dir``: drop its lock file there and the registration."""
        self._published = True
        try:   # best effort: the export is complete and published already
            os.remove(os.path.join(self.out_dir, LOCK_NAME))
            fsync_path(self.out_dir)
        except OSError:
            pass
        self._unregister()
        self._release()

    def remove(self) -> None:
        """Remove the partial directory and the registration, holding their locks while they go
        (taken again if released before; left alone if another process holds them now)."""
        if not self._published:
            if self._partial_fd is None:
                self._partial_fd = _lock_partial(self.partial)
            if self._registration_fd is None and self.registration:
                try:
                    self._registration_fd = _lock_file(self.registration, create=False)
                except OSError:
                    pass
            if self._partial_fd is not None:
                shutil.rmtree(self.partial, ignore_errors=True)
                self._unregister()
        self._release()

    def abandon(self) -> None:
        """Give up before anything was staged: remove the partial only if this lock created it."""
        if self.created:
            self.remove()
        else:
            self._release()

    def release(self) -> None:
        """Stop holding the partial but keep it (and its registration) so the export can resume."""
        self._release()

    def _unregister(self) -> None:
        if self._registration_fd is not None:
            try:
                os.remove(self.registration)   # while still holding its lock (see _lock_file)
            except OSError:
                pass

    def _release(self) -> None:
        for attr in ("_partial_fd", "_registration_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)


def stale_export_partials(store_root: str) -> list[str]:
    """Partial directories of exports from ``store_root`` that no running process holds.

    They were left by exports that were killed or interrupted (an interrupted export would resume
    from its partial if re-run; once removed, it starts over). Read-only: nothing is changed.

    Returns:
        Absolute paths of the partial directories, sorted.
    Example:
        >>> stale_export_partials("tsllm-store")   # doctest: +SKIP
        ['/data/.llama-hf.tsllm-partial-job-3f2a9c1d0e4b']
    """
    return _sweep(store_root, remove=False)


def remove_export_partials(store_root: str, dry_run: bool = False) -> list[str]:
    """Remove the stale export partials of ``store_root`` and their registrations (see
    ``stale_export_partials``); registrations whose partial no longer exists are dropped too.

    Args:
        dry_run: only return what would be removed.
    Returns:
        Absolute paths of the partial directories removed (or that would be), sorted.
    Example:
        >>> remove_export_partials("tsllm-store")   # doctest: +SKIP
        ['/data/.llama-hf.tsllm-partial-job-3f2a9c1d0e4b']
    """
    return _sweep(store_root, remove=not dry_run)


def _sweep(store_root: str, remove: bool) -> list[str]:
    registry = os.path.join(os.path.abspath(store_root), REGISTRY_DIR)
    if os.path.islink(registry) or not os.path.isdir(registry):
        return []
    found = []
    for name in sorted(os.listdir(registry)):
        path = os.path.join(registry, name)
        if not _REGISTRATION_RE.match(name):
            continue
        fd = _lock_file(path, create=False)
        if fd is None:
            continue   # held by a running export (or not a regular file)
        try:
            partial = _registered_partial(fd, store_root, path)
            state = _partial_state(partial) if partial else "gone"
            if state == "stale":
                partial_fd = _lock_partial(partial)
                if partial_fd is None:
                    continue   # a running export that could not register holds it
                try:
                    if remove:
                        shutil.rmtree(partial, ignore_errors=True)   # never follows symlinks
                        if os.path.lexists(partial):
                            continue   # could not remove it all: keep the registration, report nothing
                    found.append(partial)
                finally:
                    os.close(partial_fd)
            elif state == "empty":
                if remove:
                    try:
                        os.rmdir(partial)
                    except OSError:
                        continue
                found.append(partial)
            if remove and state != "foreign-kept":
                os.remove(path)   # while holding its lock
        except OSError:
            continue   # e.g. a read-only store: leave it for a gc that can write
        finally:
            os.close(fd)
    return sorted(found)


def _registered_partial(fd: int, store_root: str, path: str) -> str | None:
    """The partial a registration names, if it is well-formed and consistent; else None."""
    data = os.pread(fd, _MAX_REGISTRATION_BYTES + 1, 0)
    try:
        record = json.loads(data.decode("utf-8")) if len(data) <= _MAX_REGISTRATION_BYTES else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    partial = record.get("partial") if isinstance(record, dict) else None
    if (not isinstance(partial, str) or "\x00" in partial or not os.path.isabs(partial)
            or os.path.normpath(partial) != partial or not PARTIAL_RE.match(os.path.basename(partial))
            or registration_path(store_root, partial) != path):
        return None
    return partial


def _partial_state(partial: str) -> str:
    """``gone`` (nothing there), ``stale`` (an export's directory with its lock file), ``empty``
    (an empty directory: killed before its lock file existed) or ``foreign-kept`` (anything else,
    e.g. a symlink or a directory without the lock file: never touched)."""
    try:
        dir_fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "foreign-kept"   # a symlink (ELOOP), a file (ENOTDIR), unreadable
    try:
        entries = os.listdir(dir_fd)
        if not entries:
            return "empty"
        try:
            st = os.stat(LOCK_NAME, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return "foreign-kept"
        return "stale" if stat.S_ISREG(st.st_mode) else "foreign-kept"
    finally:
        os.close(dir_fd)


def _lock_partial(partial: str) -> int | None:
    try:
        dir_fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _lock_file(LOCK_NAME, dir_fd=dir_fd, create=False)
    finally:
        os.close(dir_fd)
