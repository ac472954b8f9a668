"""The queues between the executor's reader, compute and writer stages."""
from __future__ import annotations

import queue
import threading
import time
import weakref

from ..errors import PipelineStopped

DONE = object()   # the end of a stage's stream
SLOT_WAIT_S = 30.0  # a block whose inputs outlive this after the compute stage is done with them no longer holds the reader back


class BlockSlots:
    """At most ``count`` input blocks alive at once: a slot is taken before a block is read and
    given back when the last of its input tensors is gone (not when the compute stage is done
    with it: a tile worker or a view may still hold it for a moment, and reading a further
    block meanwhile put a fourth block in memory, ~240 MiB at 1G on 70B shapes).

    A slot still held after ``SLOT_WAIT_S`` seconds of waiting is overlooked, so a tensor kept
    alive by something unforeseen costs memory, never a hang.
    """

    def __init__(self, count: int):
        self._free = threading.Semaphore(count)

    def acquire(self, stop: threading.Event) -> bool | None:
        """Wait for a slot: True when taken, False when overlooked after ``SLOT_WAIT_S``, None if
        the pipeline stopped meanwhile."""
        deadline = time.monotonic() + SLOT_WAIT_S
        while not stop.is_set():
            if self._free.acquire(timeout=0.05):
                return True
            if time.monotonic() > deadline:
                return False
        return None

    def release_when_gone(self, tensors: list, taken: bool = True) -> None:
        """Give the slot back once every tensor of ``tensors`` has been freed (at once if none;
        never for a slot that was overlooked, ``taken=False``)."""
        if not taken:
            return
        if not tensors:
            self._free.release()
            return
        left = [len(tensors)]
        lock = threading.Lock()

        def one_gone():
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    self._free.release()
        for tensor in tensors:
            weakref.finalize(tensor, one_gone)


class Pipeline:
    """Two one-slot queues, the input block slots, the whole-input job slots, a stop flag, and the
    first error raised by any stage.

    ``whole_jobs`` bounds the jobs whose WHOLE inputs (read once, held for all of the job's
    blocks) are alive at once: 1 reads a job's whole inputs only once the previous job's are gone,
    2 reads one job ahead. Without it the queues alone let three jobs' whole inputs live at once
    (being computed, queued, being read), since row-block slots do not count whole inputs.
    """

    def __init__(self, input_blocks: int = 3, whole_jobs: int = 2):
        self.slots = BlockSlots(input_blocks)
        self.whole_slots = BlockSlots(whole_jobs)
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
                raise PipelineStopped("the streaming run was stopped (another stage failed or it was interrupted)")
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                continue

    def raise_error(self) -> None:
        if self.errors:
            raise self.errors[0]
