"""Arithmetic that rounds the same on every device.

CUDA's ``tensor / python_number`` multiplies by the reciprocal of the number (one rounding more
than a division: off by one ulp in a few percent of entries), while the CPU divides. Kernels
divide through ``divide_`` so that a merge on the GPU is bit-identical to the same merge on
the CPU.
"""
from __future__ import annotations

import torch


def divide_(tensor: torch.Tensor, divisor: float | torch.Tensor) -> torch.Tensor:
    """``tensor /= divisor`` in place, correctly rounded (IEEE division) on every device."""
    if tensor.device.type == "cpu" or isinstance(divisor, torch.Tensor):
        return tensor.div_(divisor)
    # a 0-dim tensor on the device is not a "CPU scalar", so CUDA takes its true-division path
    return tensor.div_(torch.full((), divisor, dtype=tensor.dtype, device=tensor.device))
