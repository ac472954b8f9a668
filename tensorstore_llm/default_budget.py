"""The default ``--max-memory``: ``"auto"``, a budget sized from the plan, and its rule.

Kept apart from ``engine/`` (which imports torch) so that the CLI can name the default at start-up.
Every API function and command whose ``max_memory`` has a default uses ``DEFAULT_MAX_MEMORY``.
"""
from __future__ import annotations

from collections.abc import Callable

from .units import parse_size

# --max-memory's default: sized from the plan (see ``auto_budget``), not one fixed number.
DEFAULT_MAX_MEMORY = "auto"
AUTO_FLOOR = 64 << 20       # the smallest automatic budget
AUTO_CAP = 2 << 30          # the largest automatic budget (the fixed default before "auto")
AUTO_INPUT_SHARE = 8        # an automatic budget is 1/8 of the bytes the plan reads, within [floor, cap]


def is_auto(max_memory: str | int) -> bool:
    """Whether ``max_memory`` asks for the automatic budget (``"auto"``, any case)."""
    return isinstance(max_memory, str) and max_memory.strip().lower() == "auto"


def auto_budget(plan, smallest_block: Callable[[object], int]) -> int:
    """The budget ``max_memory="auto"`` gives ``plan``, in bytes.

    One eighth of the bytes the plan reads (every distinct input tensor once), at least
    ``AUTO_FLOOR`` (64 MiB) and at most ``AUTO_CAP`` (2 GiB); and at least twice the largest
    smallest block of any job (``smallest_block(job)``: a job that needs its whole tensor, or
    delta-stored inputs with decode buffers), so that such a job runs with room for reading the
    next one ahead. Within the cap: a plan whose largest smallest block exceeds 2 GiB gets 2 GiB
    and is refused by the executor's budget check with the bytes it needs, as under the old
    fixed 2G default. Small models thus stream in small blocks (their peak RSS is mostly the
    interpreter), models of 16 GB of inputs and more in blocks as large as before.

    Args:
        plan: an engine Plan (its ``jobs``, each job's ``refs()``, and ``input_meta(ref)``).
        smallest_block: bytes the smallest block of a job holds (``Executor.min_block_bytes``).
    Returns:
        The budget in bytes.

    Example:
        >>> class EmptyPlan: jobs = []
        >>> auto_budget(EmptyPlan(), lambda job: 0) == AUTO_FLOOR
        True
    """
    read = {}
    for job in plan.jobs:
        for ref in job.refs():
            read[(ref.source, ref.name)] = plan.input_meta(ref).nbytes
    need = max((smallest_block(job) for job in plan.jobs), default=0)
    return min(AUTO_CAP, max(AUTO_FLOOR, sum(read.values()) // AUTO_INPUT_SHARE, 2 * need))


def budget_bytes(max_memory: str | int) -> int:
    """``max_memory`` in bytes where no plan is streamed (diff creation and apply): a size as
    ``parse_size`` reads it; ``"auto"`` is ``AUTO_CAP`` there, the budget those commands always had.

    Raises:
        InvalidParameter: ``max_memory`` is neither ``"auto"`` nor a size.

    Example:
        >>> budget_bytes("512M"), budget_bytes("auto") == AUTO_CAP
        (536870912, True)
    """
    return AUTO_CAP if is_auto(max_memory) else parse_size(max_memory)
