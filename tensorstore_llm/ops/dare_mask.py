"""DARE's random drop (Yu et al. 2024, "Language Models are Super Mario") fused with its draw:
``delta * (u < p)`` for one model's task-vector tile, where u are the tile's seeded uniforms.

The uniforms are ``seeding.uniform_rows``'s, bit for bit: per canonical row group a NumPy SFC64
generator seeded by ``seeding.seed_value``, each raw 64-bit word giving two 32-bit halves (low
first) whose low 24 bits k make u = k / 2^24. Drawn through NumPy, then masked by torch, that is
five passes over the tile and a 2 MiB float temporary; here one compiled loop steps the same
SFC64 state (its recurrence, NumPy's ``sfc64.h``) and writes ``delta * keep`` directly, the keep
factor being what the torch path computes (``sign(p − u)`` clamped at 0, in fp32). So masks and
results are unchanged for every recorded seed (``tests/test_exact_topk.py`` checks them against
the torch path). Used when numba is installed, on fp32 CPU tiles; None otherwise (callers then
take the torch path).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..seeding import rng_group_rows, seed_value
from .topk_kernels import compiled

USE_NUMBA = True   # tests switch it off to compare with the torch path


def dropped(ctx, stream_op: str, delta: torch.Tensor, probability: float) -> torch.Tensor | None:
    """``delta * (u < probability)`` for the tile ``ctx.start:ctx.stop`` of ``ctx.output``, u
    being ``seeding.uniform_rows(ctx.seed, stream_op, ctx.output, ctx.shape, start, stop)``;
    None where the compiled loop does not apply (no numba, not an fp32 CPU tile, a 0-d tensor)."""
    shape = tuple(ctx.shape)
    if (not USE_NUMBA or compiled() is None or delta.device.type != "cpu" or delta.dtype != torch.float32 or not shape
            or not isinstance(probability, (int, float))):
        return None
    row = math.prod(shape[1:])
    if delta.numel() != (ctx.stop - ctx.start) * row:
        return None
    source = delta.detach().reshape(-1).contiguous().numpy()
    out = np.empty_like(source)
    group = rng_group_rows(shape)
    p = np.float32(probability)
    r = ctx.start
    while r < ctx.stop:
        g = r // group
        g_stop = min(ctx.stop, (g + 1) * group, shape[0])
        state = np.random.SFC64(seed_value(ctx.seed, stream_op, ctx.output, g)).state["state"]["state"]
        first, last = (r - ctx.start) * row, (g_stop - ctx.start) * row
        compiled().drop(np.array(state, dtype=np.uint64), (r - g * group) * row, source[first:last], out[first:last], p)
        r = g_stop
    return torch.from_numpy(out).reshape(delta.shape)
