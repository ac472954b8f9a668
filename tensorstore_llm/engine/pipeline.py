"""The queues between the executor's reader, compute and writer stages."""
from __future__ import annotations

import queue
import threading

from ..errors import TsllmError

DONE = object()   # the end of a stage's stream


class Pipeline:
    """Two one-slot queues, a stop flag, and the first error raised by any stage."""

    def __init__(self):
        self.inputs: queue.Queue = queue.Queue(maxsize=1)
        self.outputs: queue.Queue = queue.Queue(maxsize=1)
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as e:  # handed to the main thread
            self.errors.append(e)
            self.stop.set()

    def put(self, q: queue.Queue, item) -> bool:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def get(self, q: queue.Queue):
        while True:
            if self.stop.is_set():
                self.raise_error()
                raise TsllmError("stopped")
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                continue

    def raise_error(self) -> None:
        if self.errors:
            raise self.errors[0]
