"""``tsllm quickstart``: the offline end-to-end demo."""
from __future__ import annotations

import click

from .common import max_memory_option


@click.command("quickstart")
@click.option("--workdir", default="tsllm-quickstart", show_default=True, type=click.Path(file_okay=False),
              help="Where models, the demo store and the export go.")
@click.option("--size", "preset", default="tiny", show_default=True,
              type=click.Choice(["tiny", "small", "100m", "1gb"]), help="Size of the generated models.")
@max_memory_option(default="256K", help="Budget for the streamed jobs.")
@click.pass_context
def quickstart_cmd(ctx, workdir, preset, max_memory):
    """Generate models, import, stream, export and verify: all offline, in a minute.

    Uses its own store under WORKDIR/store unless --store is given.
    """
    from tensorstore_llm.quickstart import run_quickstart

    echo = (lambda s: None) if ctx.obj["quiet"] else click.echo
    summary = run_quickstart(workdir, preset=preset, store_root=ctx.obj["store"], max_memory=max_memory,
                             echo=echo, progress=False if ctx.obj["quiet"] else None)
    if summary["max_abs_error"] != 0.0:
        raise click.ClickException(f"export differs from the direct formula by {summary['max_abs_error']}")
