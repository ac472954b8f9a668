"""Filesystem helpers: durable writes, atomic renames, and OS errors turned into StorageError."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil

from ..errors import StorageError

_MESSAGES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for this file system or limit",
}


@contextlib.contextmanager
def storage_errors(what: str):
    """Re-raise OSError raised inside the block as a StorageError that says what was being written."""
    try:
        yield
    except OSError as e:
        reason = _MESSAGES.get(e.errno, e.strerror or str(e))
        where = e.filename or what
        raise StorageError(f"cannot write {what} ({where}): {reason}") from e


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC


_LIBC = None


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages to disk now, without waiting.

    Spreads the disk writes over the job, so the ``fsync_tree`` before publishing has little left
    to wait for. No-op where ``sync_file_range`` is unavailable.
    """
    libc = _libc()
    if libc and hasattr(libc, "sync_file_range"):
        import ctypes

        libc.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0), 2)  # SYNC_FILE_RANGE_WRITE


def fsync_path(path: str) -> None:
    """fsync one file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root`` (data before the rename that publishes it)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def write_file_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a mix."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def remove_tree(path: str) -> None:
    """Remove a directory tree if it exists; errors while cleaning up are not the user's problem."""
    shutil.rmtree(path, ignore_errors=True)
