"""An append-only journal of finished outputs (name + checksum): what makes long jobs resumable.

A record is appended after a tensor's last block is written. Records are not trusted blindly: a
resuming sink re-reads each journaled tensor and keeps it only if its checksum still matches, so
a kill, a torn write or a power loss at any instant costs recomputation, never a wrong result.
A torn last line is ignored.
"""
from __future__ import annotations

import json
import os


class Journal:
    """Finished-tensor records stored as JSON lines at ``path``."""

    def __init__(self, path: str):
        self.path = path
        self._records: dict[str, dict] = {}
        if os.path.exists(path):
            with open(path, "rb") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        continue  # torn write at the moment of a kill
                    if isinstance(rec, dict) and "name" in rec and "checksum" in rec:
                        self._records[rec["name"]] = rec
        self._file = None

    def completed(self) -> dict[str, str]:
        """Names of finished tensors mapped to their checksums."""
        return {name: rec["checksum"] for name, rec in self._records.items()}

    def record(self, name: str, checksum: str) -> None:
        """Note that ``name`` is finished with ``checksum``."""
        if self._file is None:
            self._file = open(self.path, "ab")
        self._file.write(json.dumps({"name": name, "checksum": checksum}).encode() + b"\n")
        self._file.flush()
        self._records[name] = {"name": name, "checksum": checksum}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
