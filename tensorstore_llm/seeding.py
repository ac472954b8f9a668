"""Deterministic randomness: one generator per (run seed, op, tensor, block), never a global RNG.

A generator is derived by hashing its identity, so a random draw is the same whatever the job
order, block size, worker count or resume point. Draws happen on the CPU so CUDA and CPU runs
agree bit for bit; the generators are recorded in manifests.

Uniform draws (DARE / DELLA masks) come from NumPy's SFC64 bit generator (raw 64-bit outputs,
whose streams NumPy keeps stable across releases) as 24-bit fractions k / 2^24: 4x faster than
``torch.rand``'s Mersenne twister on CPU, which made the random draws the largest cost of a
DARE merge. Normal draws (synthetic checkpoints) use a seeded ``torch.Generator``.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

GENERATOR_DEVICE = "cpu"
UNIFORM_GENERATOR = "numpy-sfc64-24bit"
RNG_GROUP_ELEMENTS = 1 << 19  # the executor's CPU tile size too, so tiles and groups coincide


def seed_value(run_seed: int, op: str, tensor: str, block: int = 0) -> int:
    """The 63-bit seed for one (run seed, op, tensor, block); stable across Python runs.

    Example:
        >>> seed_value(0, "dare", "model.layers.0.mlp.up_proj.weight") == seed_value(0, "dare", "model.layers.0.mlp.up_proj.weight")
        True
    """
    key = f"{int(run_seed)}\x00{op}\x00{tensor}\x00{int(block)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def seed_for(run_seed: int, op: str, tensor: str, block: int = 0) -> torch.Generator:
    """A fresh CPU ``torch.Generator`` seeded for one (run seed, op, tensor, block)."""
    gen = torch.Generator(device=GENERATOR_DEVICE)
    gen.manual_seed(seed_value(run_seed, op, tensor, block))
    return gen


def rng_group_rows(shape: tuple[int, ...], target_elements: int = RNG_GROUP_ELEMENTS) -> int:
    """Rows per canonical random group of a tensor: fixed by its shape, never by the block size."""
    row = 1
    for d in shape[1:]:
        row *= d
    return max(1, target_elements // max(row, 1))


def uniform_rows(run_seed: int, op: str, tensor: str, shape: tuple[int, ...], start: int, stop: int,
                 pool=None) -> torch.Tensor:
    """Uniform [0, 1) float32 values for rows ``start:stop`` of a tensor of ``shape``.

    Values are drawn per canonical group of rows (see ``rng_group_rows``) and sliced, so any
    blocking of the rows sees exactly the same numbers. ``pool`` (an executor's thread pool, if
    given) draws many groups at once, each by its own generator: the values are the same.
    """
    return random_rows(run_seed, op, tensor, shape, start, stop, _uniform, pool)


def normal_rows(run_seed: int, op: str, tensor: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
    """Standard normal float32 values for rows ``start:stop``; blocking-independent like ``uniform_rows``."""
    return random_rows(run_seed, op, tensor, shape, start, stop, _normal)


def _uniform(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    count = int(np.prod(shape, dtype=np.int64))
    words = np.random.SFC64(seed).random_raw((count + 1) // 2).view(np.int32)[:count]
    return (torch.from_numpy(words) & 0xFFFFFF).to(torch.float32).mul_(2.0 ** -24).reshape(shape)


def _normal(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator(device=GENERATOR_DEVICE).manual_seed(seed))


def random_rows(run_seed, op, tensor, shape, start, stop, draw, pool=None) -> torch.Tensor:
    """Rows ``start:stop`` of a tensor-sized draw of ``draw(shape, seed)``, made per row group."""
    shape = tuple(shape)
    if len(shape) == 0:
        return draw((), seed_value(run_seed, op, tensor, 0))
    group = rng_group_rows(shape)
    row_shape = tuple(shape[1:])
    groups = range(start // group, (stop - 1) // group + 1 if stop > start else start // group)

    def rows_of(g: int) -> torch.Tensor:
        g_start, g_stop = g * group, min((g + 1) * group, shape[0])
        values = draw((g_stop - g_start, *row_shape), seed_value(run_seed, op, tensor, g))
        return values[max(start, g_start) - g_start: min(stop, g_stop) - g_start]

    if len(groups) <= 1:
        return rows_of(groups[0]) if groups else torch.empty((0, *row_shape))
    out = torch.empty((stop - start, *row_shape))

    def fill(g: int) -> None:
        first = max(start, g * group) - start
        values = rows_of(g)
        out[first:first + values.shape[0]] = values
    if pool is not None and len(groups) >= 4:   # many groups at once (a GPU tile): in parallel
        list(pool.map(fill, groups))
    else:
        for g in groups:
            fill(g)
    return out
