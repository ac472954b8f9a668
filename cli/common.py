"""Options and printing shared by the command modules (no heavy imports here)."""
from __future__ import annotations

import click

from tensorstore_llm.default_budget import DEFAULT_MAX_MEMORY, is_auto


def store_of(ctx):
    from tensorstore_llm.store import Store

    return Store(ctx.obj["store"])


def progress_flag(ctx):
    """None = bar when stderr is a terminal; False when --quiet."""
    return False if ctx.obj["quiet"] else None


def options_of(ctx, *, device: str = "auto", max_memory=DEFAULT_MAX_MEMORY, seed: int = 0, compression: str = "none",
               dry_run: bool = False):
    """The one RunOptions of a command, from its parsed options and the global --quiet.

    Example:
        >>> result = merge(store, text, options=options_of(ctx, max_memory=max_memory))   # doctest: +SKIP
    """
    from tensorstore_llm.engine.options import RunOptions

    return RunOptions(device=device, max_memory=max_memory, seed=seed, compression=compression,
                      progress=progress_flag(ctx), dry_run=dry_run)


def size_option(ctx, param, value):
    """Click callback: ``value`` must read as a size (else a usage error, exit 2) and be positive
    (else InvalidParameter, exit 7): the same rule as every option, parse first, then domain.
    ``auto`` passes for --max-memory (the budget sized from the plan, ``default_budget.py``)."""
    from tensorstore_llm.errors import InvalidParameter
    from tensorstore_llm.units import parse_size

    if value is None or (param.name == "max_memory" and is_auto(value)):
        return value
    try:
        size = parse_size(value)
    except InvalidParameter as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    if size <= 0:
        raise InvalidParameter(f"--{param.name.replace('_', '-')} must be a positive size, got {value!r}")
    return value


# -- the run options, each declared once; a command takes only those that mean something to it ----

def device_option(default: str = "auto", help: str = "auto, cpu, cuda or cuda:N."):
    """--device: where kernels run (only for commands that compute)."""
    return click.option("--device", default=default, show_default=True, help=help)


def max_memory_option(default: str = DEFAULT_MAX_MEMORY,
                      help: str = "Budget for tensor data held at once (e.g. 512M, 4G); big tensors are split "
                                  "into row blocks. auto: 1/8 of the bytes read, within 64M-2G (README)."):
    """--max-memory SIZE, checked by ``size_option`` (a usage error if it is not a size)."""
    return click.option("--max-memory", default=default, show_default=True, metavar="SIZE", callback=size_option, help=help)


def seed_option(help: str = "Run seed for ops that draw random numbers."):
    """--seed (only for commands that draw random numbers; ``help`` says which)."""
    return click.option("--seed", default=0, show_default=True, type=int, help=help)


def compression_option():
    """--compression of a new store artifact (only for commands that write one)."""
    return click.option("--compression", type=click.Choice(["none", "zstd", "lz4"]), default="none", show_default=True,
                        help="Chunk compression of the new artifact (float weights barely compress; see docs/formats.md).")


def dry_run_option(help: str = "Print the plan, its I/O and memory need; do nothing."):
    """--dry-run (only for commands that can estimate without running)."""
    return click.option("--dry-run", is_flag=True, help=help)


def stream_options(*, device: bool = True, seed: bool = True, compression: bool = True, dry_run: bool = True,
                   seed_help: str | None = None):
    """The run options a streamed command takes, in the usual order (--device, --max-memory,
    --seed, --compression, --dry-run), each as declared above; leave out what the command ignores.

    Example:
        >>> @stream_options(seed=False, dry_run=False)                      # doctest: +SKIP
        ... def init_cmd(ctx, base, device, max_memory, compression): ...
    """
    options = [device_option()] if device else []
    options.append(max_memory_option())
    if seed:
        options.append(seed_option(seed_help) if seed_help else seed_option())
    if compression:
        options.append(compression_option())
    if dry_run:
        options.append(dry_run_option())

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def run_options(fn):
    """--device / --max-memory / --seed / --compression / --dry-run for streamed commands that compute."""
    return stream_options()(fn)


def compute_options(fn):
    """run_options without --seed: for streamed commands that draw no random numbers."""
    return stream_options(seed=False)(fn)


def copy_options(fn):
    """--max-memory / --compression / --dry-run: for commands that only move stored values (import)."""
    return stream_options(device=False, seed=False)(fn)


def print_estimate(estimate, limit: int = 20, method: str | None = None) -> None:
    """The dry-run report: per-tensor blocking and memory, then totals. With ``method`` (a merge's
    ``merge_method``) the op column shows it, with the kernel op that runs it where that is
    named differently: ``ties (task_arithmetic)``."""
    from tensorstore_llm.units import format_size

    def op_of(job) -> str:
        return job.op if method is None or method == job.op else f"{method} ({job.op})"

    jobs = sorted(estimate.jobs, key=lambda j: -j.peak_bytes)
    width = max([12] + [len(op_of(j.job)) for j in jobs[:limit]])   # e.g. mergekit_task_arithmetic
    header = "op" if method is None else "method (op)"
    click.echo(f"{'tensor':56} {header:{width}} {'shape':>18} {'dtype':9} {'rows/blk':>8} {'blocks':>6} {'memory':>10}")
    for j in jobs[:limit]:
        shape = "x".join(map(str, j.job.output.shape)) or "scalar"
        click.echo(f"{j.job.output.name[:56]:56} {op_of(j.job):{width}} {shape:>18} {j.job.output.dtype:9} "
                   f"{j.block_rows:>8} {j.blocks:>6} {format_size(j.peak_bytes):>10}")
    if len(jobs) > limit:
        click.echo(f"... {len(jobs) - limit} more tensors (largest memory first)")
    click.echo(f"tensors: {len(jobs)}  read: {format_size(estimate.read_bytes)}  write: {format_size(estimate.write_bytes)}  "
               f"peak tensor memory: {format_size(estimate.peak_bytes)} (budget {format_size(estimate.budget)})")
    rss = getattr(estimate, "rss", None)
    if rss is not None:   # what the whole process will hold: plan RAM by this
        baseline = "" if rss.baseline_measured else " (modelled)"
        click.echo(f"predicted peak RSS: {format_size(rss.total)} = interpreter and libraries {format_size(rss.baseline)}"
                   f"{baseline} + runtime {format_size(rss.runtime)} + tensor data {format_size(rss.tensors)}")


def report(result, verb: str, quiet: bool) -> None:
    """One line on what a streamed job produced, and whether it resumed."""
    if quiet:
        if result.artifact is not None:
            click.echo(result.artifact.id)
        return
    resumed = f" (resumed: {len(result.skipped)} tensors were already done)" if result.skipped else ""
    target = result.output or (result.artifact.short_id if result.artifact else "")
    click.echo(f"{verb}: {target}{resumed}")
