"""How a streamed job runs: device, memory budget, seed, compression, progress, dry run.

One frozen ``RunOptions`` is built once (by the CLI from its options, or by a caller) and passed
down through the API to the executor, instead of loose ``**run_options`` keywords.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..default_budget import DEFAULT_MAX_MEMORY, auto_budget, budget_bytes, is_auto  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class RunOptions:
    """Settings of a streamed run; none of them changes which tensors a plan computes.

    Attributes:
        device: 'auto', 'cpu', 'cuda' or 'cuda:N'.
        max_memory: budget for tensor data held at once (a size such as '512M', or bytes), or
            ``"auto"`` (the default): sized from the plan by ``auto_budget``.
        seed: run seed for ops that draw random numbers (DARE / DELLA masks, SVD sketches).
        compression: chunk compression of a new store artifact ('none', 'zstd', 'lz4').
        progress: show a progress bar (None: when stderr is a terminal).
        dry_run: plan and estimate only; compute and write nothing.

    Example:
        >>> RunOptions(max_memory="512M").replace(seed=7).seed
        7
    """

    device: str = "auto"
    max_memory: str | int = DEFAULT_MAX_MEMORY
    seed: int = 0
    compression: str = "none"
    progress: bool | None = None
    dry_run: bool = False

    def replace(self, **changes) -> RunOptions:
        """A copy with ``changes`` (TypeError naming any unknown setting)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def of(cls, options: RunOptions | None = None, **keywords) -> RunOptions:
        """``options`` (default: the defaults) updated with ``keywords``: the adapter that keeps
        the keyword form (``merge(..., max_memory="1G")``) working beside ``options=``.

        Example:
            >>> RunOptions.of(None, device="cpu").device
            'cpu'
        """
        base = options if options is not None else cls()
        if not isinstance(base, cls):
            raise TypeError(f"options must be a RunOptions, got {type(base).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keywords) - names)
        if unknown:
            raise TypeError(f"unknown run option(s) {unknown}; known: {sorted(names)}")
        return dataclasses.replace(base, **keywords) if keywords else base
