"""Copying sparse results from the model's device back to the host without stalling the teacher.

On a CUDA device, :class:`HostCopy` starts the device-to-host copies of a group of tensors at
once and returns: each tensor goes into a pinned (page-locked) host buffer with a
``non_blocking`` copy issued on a side stream that first waits for the compute stream, and a
CUDA event is recorded after the copies. The caller queues the next forward pass while the copy
engine works; only :meth:`HostCopy.wait` (called by the shard writer thread, behind the forward
pass) blocks, on that event. The source tensors are kept alive and marked with
``record_stream`` so that the caching allocator does not hand their memory to the next forward
before the copy has read it.

On the CPU it is a pass-through: no copy, no stream, the same tensor objects come back, so the
CPU path computes exactly what it did before.
"""
from __future__ import annotations

import torch

_COPY_STREAMS: dict = {}


def copy_stream(device: torch.device):
    """One side stream per CUDA device for device-to-host copies (created on first use)."""
    key = torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()
    if key not in _COPY_STREAMS:
        _COPY_STREAMS[key] = torch.cuda.Stream(device=key)
    return _COPY_STREAMS[key]


class HostCopy:
    """Tensors (a dict of name -> tensor or None) on their way to the host.

    Args:
        tensors: tensors on one device (None values pass through).
    On construction the copies are started (CUDA) or nothing happens (CPU); :meth:`wait`
    returns the dict of host tensors, in the same dtypes and shapes.

    Example:
        >>> x = torch.arange(3)
        >>> HostCopy({"x": x}).wait()["x"] is x      # CPU: a no-op pass-through
        True
    """

    def __init__(self, tensors: dict):
        self.event = None
        self._sources = None
        device = next((t.device for t in tensors.values() if t is not None), torch.device("cpu"))
        if device.type != "cuda":
            self.host = dict(tensors)
            return
        compute = torch.cuda.current_stream(device)
        stream = copy_stream(device)
        stream.wait_stream(compute)                       # the copies read what the compute stream wrote
        self.host = {}
        with torch.cuda.stream(stream):
            for name, t in tensors.items():
                if t is None:
                    self.host[name] = None
                    continue
                buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                buffer.copy_(t, non_blocking=True)
                t.record_stream(stream)                   # memory not reused before the copy has read it
                self.host[name] = buffer
            self.event = torch.cuda.Event()
            self.event.record(stream)
        self._sources = tensors                           # alive until the copy is known to be done

    @property
    def on_device(self) -> bool:
        """Whether a device-to-host copy was started (False on the CPU)."""
        return self.event is not None

    def ready(self) -> bool:
        """Whether the copies have finished (always True on the CPU); does not block."""
        return self.event is None or self.event.query()

    def wait(self) -> dict:
        """Block until the copies are done; the host tensors by name."""
        if self.event is not None:
            self.event.synchronize()
            self._sources = None
        return self.host
