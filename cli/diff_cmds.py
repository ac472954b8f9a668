"""Diff verbs: store a fine-tune as a delta of its base (``diff``), apply or transfer it (``apply``)."""
from __future__ import annotations

import json

import click

from tensorstore_llm.default_budget import DEFAULT_MAX_MEMORY, budget_bytes

from .common import max_memory_option, size_option, store_of


def store_as_delta(ctx, src: str, parent_ref: str, *, kind: str, name, codec="exact", codec_params=None,
                   max_memory=DEFAULT_MAX_MEMORY, revision=None):
    """Resolve SRC (store ref, HF directory, .safetensors file, hub repo) and store it as a delta
    of PARENT_REF; returns the artifact (and says so when it resumed an interrupted run)."""
    from tensorstore_llm.api import resolve_input
    from tensorstore_llm.diff.store import store_delta
    store = store_of(ctx)
    source, lineage, files = resolve_input(store, src, revision)
    resumed: list = []
    with source:
        parents = [{**lineage, "role": "fine-tune"}] if "id" in lineage else []
        artifact = store_delta(store, source, parent_ref, kind=kind, codec=codec, codec_params=codec_params,
                               parents=parents, source=lineage.get("external"), files=files, name=name,
                               max_memory=budget_bytes(max_memory), target_id=lineage.get("id", ""), resumed=resumed)
    if resumed and not ctx.obj["quiet"]:
        click.echo(f"resumed: {len(resumed)} tensors were already done")
    return artifact


def _describe(artifact) -> str:
    """One line on a just-stored delta artifact: its own coded size and ratio (independent of
    what else the store holds), then what it added to the store after dedup, labelled."""
    from tensorstore_llm.store.dedup import footprint
    from tensorstore_llm.units import format_size

    fp = footprint(artifact)
    logical = artifact.manifest.nbytes
    ratio = f", {logical / fp.disk:.2f}x smaller" if fp.disk else ""
    added = (f"{format_size(fp.unique)} new in the store, {format_size(fp.shared)} already there (shared with other "
             f"artifacts)" if fp.shared else "all of it new in the store")
    return (f"{artifact.short_id} ({format_size(fp.disk)} on disk for {format_size(logical)} of tensors{ratio}; "
            f"{added}; delta depth {artifact.manifest.info['delta']['depth']})")


def _parse_params(pairs) -> dict:
    params = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--param")
        key, value = pair.split("=", 1)
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


@click.command("diff")
@click.argument("ft")
@click.option("--base", "base", required=True, help="The store artifact (tag or id) FT was fine-tuned from.")
@click.option("--name", help="Tag to point at the new diff artifact.")
@click.option("--codec", default="exact", show_default=True,
              help="Delta codec: exact (bit for bit) or a lossy one: bf16, low-rank, top-k, dare, bitdelta, mixed-svd.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Codec parameter, e.g. --param rank=64 or --param density=0.1 (repeatable).")
@max_memory_option(help="Budget for blocks in flight.")
@click.pass_context
def diff_cmd(ctx, ft, base, name, codec, params, max_memory):
    """Store FT as a diff artifact against BASE, bound to BASE's exact tensors.

    FT is a store ref, a Hugging Face directory, a .safetensors file or a hub repo. The diff
    records BASE's id and tensor checksums, so `tsllm apply` refuses another base unless asked
    for a transfer. Reading the diff (export, show, verify, merge) gives the fine-tune's tensors,
    rebuilt from BASE and checked against the checksums recorded here.

    \b
      tsllm diff ./my-finetune --base base --name ft-diff
      tsllm diff ./my-finetune --base base --codec low-rank --param rank=64 --name ft-r64
    """
    artifact = store_as_delta(ctx, ft, base, kind="diff", name=name, codec=codec, codec_params=_parse_params(params),
                              max_memory=max_memory)
    if not ctx.obj["quiet"]:
        click.echo(f"stored diff {_describe(artifact)}" + (f"\ntagged {name}" if name else ""))
    else:
        click.echo(artifact.id)


@click.command("apply")
@click.argument("diff")
@click.option("--onto", required=True, help="The base (tag or id) to apply DIFF onto.")
@click.option("--alpha", default=1.0, show_default=True, type=float, help="Scale of the diff: base' + alpha * (ft - base).")
@click.option("--transfer", is_flag=True,
              help="Allow a base other than DIFF's own: fine-tuning transfer, recorded in the lineage.")
@click.option("--name", help="Tag to point at the result.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              help="Write the result straight into this Hugging Face directory (one write; the store keeps its "
                   "lineage, not a second copy).")
@click.option("--keep-artifact", is_flag=True,
              help="With -o: also keep the result as a checkpoint in the store (writes it twice).")
@click.option("--max-shard-size", default="5G", show_default=True, callback=size_option, help="Shard size of the -o output.")
@max_memory_option()
@click.pass_context
def apply_cmd(ctx, diff, onto, alpha, transfer, name, out_dir, keep_artifact, max_shard_size, max_memory):
    """Apply DIFF onto ONTO: its own base gives the fine-tune back (bit for bit, checked).

    Onto another base release it computes base' + alpha * (ft - base) in fp32, rounded once,
    only with --transfer (otherwise it fails before any work). Tensors the new release grew
    (vocabulary rows) keep the new base's values in the rows the diff does not have; tensors
    only in the new base are copied. Both are reported. With -o the result is written once,
    into the directory, and the store records its lineage (an export record, tagged --name).

    \b
      tsllm apply ft-diff --onto base -o ./ft-again
      tsllm apply ft-diff --onto base-v2 --transfer --name ft-on-v2
    """
    from tensorstore_llm.diff.apply import apply_diff

    if keep_artifact and not out_dir:
        raise click.UsageError("--keep-artifact only applies with -o/--out")
    result = apply_diff(store_of(ctx), diff, onto, alpha=alpha, transfer=transfer, name=name, max_memory=max_memory,
                        out_dir=out_dir, max_shard_size=max_shard_size, keep_artifact=keep_artifact)
    if ctx.obj["quiet"]:
        click.echo(result.artifact.id)
        return
    what = "transferred" if result.transfer else "applied"
    resumed = f" (resumed: {len(result.skipped)} tensors were already done)" if result.skipped else ""
    made = (f"written to {result.output}; lineage recorded as {result.artifact.short_id}" if out_dir and not keep_artifact
            else f"{result.artifact.short_id}")
    click.echo(f"{what} {diff} onto {onto}: {made}{resumed}")
    for tensor, (old, new) in sorted(result.grown.items()):
        click.echo(f"  grown: {tensor}: rows {old}..{new - 1} are not in the diff, kept from the new base")
    if result.copied:
        click.echo(f"  copied from the new base unchanged: {len(result.copied)} tensor(s), e.g. {result.copied[0]}")
    if name:
        click.echo(f"tagged {name}")
    if out_dir and keep_artifact:
        click.echo(f"exported to {result.output}")
