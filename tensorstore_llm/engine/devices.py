"""Where kernels run: choosing the device, CPU tile workers, and uploads to a GPU."""
from __future__ import annotations

import os

import torch

from ..errors import DeviceUnavailable, InvalidParameter


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else must name an available device."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidParameter(f"--device: {device!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidParameter(f"--device: {device!r} is not supported; expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {device!r} was asked for but CUDA is not available here; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {device!r} was asked for but this machine has {torch.cuda.device_count()} "
                                f"CUDA device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return dev


def default_tile_workers() -> int:
    """Cores this process may run on, at most 8 (tiles are memory-bound beyond that)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class Uploader:
    """Moves input blocks to a GPU from the reader thread, on a stream of its own.

    Each block goes up once in its input dtype (every statistics pass reuses it), overlapping
    the kernels and downloads of the previous block, staged through pinned memory: a parallel
    memcpy plus a DMA at bus speed is ~3x faster than the driver's pageable copy.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.free_bytes = torch.cuda.mem_get_info(device)[0]   # when the run started

    def upload(self, block: torch.Tensor) -> torch.Tensor:
        """``block`` on the device, ready to use from the compute stream."""
        staging = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)  # torch caches pinned blocks
        staging.copy_(block)
        with torch.cuda.stream(self.stream):
            on_device = staging.to(self.device, non_blocking=True)
        self.stream.synchronize()
        on_device.record_stream(torch.cuda.default_stream(self.device))  # freed only after its kernels ran
        return on_device
