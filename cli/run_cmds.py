"""Streamed compute verbs: convert, weighted-sum; and ``ops`` to list the registered kernels."""
from __future__ import annotations

import click

from .common import compute_options, options_of, print_estimate, report, store_of


@click.command("convert")
@click.argument("ref")
@click.option("--dtype", required=True, help="Target dtype of float tensors: bf16, fp16 or fp32 (float dtypes only).")
@click.option("--name", help="Tag for the new artifact.")
@compute_options
@click.pass_context
def convert_cmd(ctx, ref, dtype, name, device, max_memory, compression, dry_run):
    """Cast the float tensors of REF to --dtype (round to nearest even) as a new artifact.

    Integer and bool tensors are kept as they are; config.json's torch_dtype follows.
    """
    from tensorstore_llm.api import convert

    result = convert(store_of(ctx), ref, dtype, name=name,
                     options=options_of(ctx, device=device, max_memory=max_memory, compression=compression,
                                        dry_run=dry_run))
    if dry_run:
        return print_estimate(result.estimate)
    report(result, f"converted {ref} to {dtype}", ctx.obj["quiet"])


@click.command("weighted-sum")
@click.argument("refs", nargs=-1, required=True)
@click.option("--weights", required=True, help="Comma-separated weights, one per model, e.g. 0.5,0.3,0.2.")
@click.option("--normalize", is_flag=True, help="Divide by the sum of the weights.")
@click.option("--dtype", help="Output dtype (default: that of the first model).")
@click.option("--name", help="Tag for the new artifact.")
@compute_options
@click.pass_context
def weighted_sum_cmd(ctx, refs, weights, normalize, dtype, name, device, max_memory, compression, dry_run):
    """sum_i w_i * REF_i over every tensor, computed in fp32 and stored in the models' dtype.

    REFs are store artifacts, HF directories or hub repos; all must have the same tensors and shapes.
    """
    from tensorstore_llm.api import weighted_sum

    try:   # text that is no number is a usage error (exit 2); NaN, inf or a wrong count: InvalidParameter (7)
        values = [float(w) for w in weights.split(",")]
    except ValueError:
        raise click.BadParameter(f"{weights!r} is not a comma-separated list of numbers", param_hint="--weights")
    result = weighted_sum(store_of(ctx), list(refs), values, normalize=normalize, dtype=dtype, name=name,
                          options=options_of(ctx, device=device, max_memory=max_memory, compression=compression,
                                             dry_run=dry_run))
    if dry_run:
        return print_estimate(result.estimate)
    report(result, "weighted sum", ctx.obj["quiet"])


@click.command("ops")
def ops_cmd():
    """List the registered ops (built-ins and plugins from the tensorstore_llm.ops entry points)."""
    from tensorstore_llm.ops import get_op, list_ops

    names = list_ops()
    width = max(len(name) for name in names)
    for name in names:
        spec = get_op(name)
        doc = (spec.fn.__doc__ or "").strip().splitlines()[0] if spec.fn.__doc__ else ""
        roles = ", ".join(r.name + ("*" if r.variadic else "") for r in spec.roles)
        click.echo(f"{name:{width}} ({roles}) {doc}")
