"""Progress on long work: a tqdm bar in bytes with rate and ETA, silent when not on a terminal."""
from __future__ import annotations

import sys


class Progress:
    """Counts bytes done out of ``total``; prints a bar to stderr only when ``enabled``."""

    def __init__(self, total: int, desc: str, enabled: bool | None = None, initial: int = 0):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.done = initial
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True,
                             unit_divisor=1024, file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
