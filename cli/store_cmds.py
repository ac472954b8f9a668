"""Store verbs: import, export, ls, show, log, tag, verify, gc."""
from __future__ import annotations

import json
import os

import click

from .common import (
    copy_options,
    dry_run_option,
    max_memory_option,
    options_of,
    print_estimate,
    report,
    size_option,
    store_of,
)


@click.command("import")
@click.argument("src")
@click.option("--name", help="Tag to point at the new artifact (moved if it exists).")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SRC is a hub repo.")
@click.option("--dtype", help="Cast float tensors while importing (bf16, fp16, fp32).")
@click.option("--delta-of", "delta_of", metavar="PARENT",
              help="Store SRC as an exact delta of store artifact PARENT (a fine-tune of it, or the next training checkpoint).")
@click.option("--max-chain", default=3, show_default=True,
              help="With --delta-of: store a full snapshot instead once the chain of deltas would be deeper than this.")
@copy_options
@click.pass_context
def import_cmd(ctx, src, name, revision, dtype, delta_of, max_chain, max_memory, compression, dry_run):
    """Import SRC as a checkpoint artifact.

    SRC is a Hugging Face checkpoint directory (sharded safetensors + index, config and tokenizer
    files), a single .safetensors file, or a hub repo id (org/name or hf://org/name@rev; uses the
    local cache, works with HF_HUB_OFFLINE=1). Pickle checkpoints (.bin/.pt) are refused.
    Importing the same content twice gives the same artifact id.
    """
    import os

    from tensorstore_llm.api import import_checkpoint

    if os.path.isfile(os.path.join(src, "adapter_config.json")):
        raise click.UsageError(f"{src} is a PEFT adapter: store it with `tsllm lora import {src} --base BASE`, "
                               "which binds it to the model it belongs to")
    if delta_of and not _import_as_delta(ctx, src, delta_of, name, revision, dtype, max_chain, max_memory, dry_run):
        return
    result = import_checkpoint(src, store_of(ctx), name=name, revision=revision, dtype=dtype,
                               options=options_of(ctx, device="cpu", max_memory=max_memory, compression=compression,
                                                  dry_run=dry_run))
    if dry_run:
        return print_estimate(result.estimate)
    report(result, f"imported {src} as", ctx.obj["quiet"])
    if name and not ctx.obj["quiet"]:
        click.echo(f"tagged {name}")


def _import_as_delta(ctx, src, parent, name, revision, dtype, max_chain, max_memory, dry_run) -> bool:
    """Store SRC as a delta of PARENT; True when the depth rule asks for a full snapshot instead."""
    from tensorstore_llm.diff.store import chain_depth, needs_snapshot
    from tensorstore_llm.errors import InvalidParameter

    from .diff_cmds import _describe, store_as_delta

    if dtype:
        raise InvalidParameter("--dtype cannot be combined with --delta-of: a delta keeps the fine-tune's own dtype")
    store = store_of(ctx)
    if needs_snapshot(store, parent, max_chain):
        if not ctx.obj["quiet"]:
            depth = chain_depth(store, store.get(parent))
            click.echo(f"{parent} is {depth} delta link(s) deep; one more would exceed --max-chain {max_chain}: "
                       f"storing a full snapshot")
        return True
    if dry_run:
        click.echo(f"would store {src} as an exact delta of {store.get(parent).short_id}")
        return False
    artifact = store_as_delta(ctx, src, parent, kind="checkpoint", name=name, max_memory=max_memory, revision=revision)
    if ctx.obj["quiet"]:
        click.echo(artifact.id)
    else:
        click.echo(f"imported {src} as a delta of {parent}: {_describe(artifact)}" + (f"\ntagged {name}" if name else ""))
    return False


@click.command("export")
@click.argument("ref")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--max-shard-size", default="5G", show_default=True, callback=size_option, help="Largest safetensors shard (e.g. 2G).")
@click.option("--dtype", help="Cast float tensors on the way out (bf16, fp16, fp32).")
@max_memory_option()
@dry_run_option("Print the plan; write nothing.")
@click.pass_context
def export_cmd(ctx, ref, out_dir, max_shard_size, dtype, max_memory, dry_run):
    """Write artifact REF to OUT_DIR as a Hugging Face checkpoint directory.

    Shards are named model-0000k-of-0000n.safetensors with a model.safetensors.index.json (or one
    model.safetensors); config and tokenizer files come along. OUT_DIR must not exist or be empty;
    it appears complete or not at all.
    """
    from tensorstore_llm.api import export

    result = export(store_of(ctx), ref, out_dir, max_shard_size=max_shard_size, dtype=dtype,
                    options=options_of(ctx, device="cpu", max_memory=max_memory, dry_run=dry_run))
    if dry_run:
        return print_estimate(result.estimate)
    report(result, f"exported {ref} to", ctx.obj["quiet"])


@click.command("ls")
@click.option("--kind", help="Only artifacts of this kind (checkpoint, diff, lora, pruning_plan, logits).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def ls_cmd(ctx, kind, as_json):
    """List the committed artifacts of the store (work in progress is never listed).

    SIZE is the logical tensor bytes; STORED every file of the artifact, shared or not (its own
    coded size, the same whatever else the store holds); UNIQUE the part no other artifact links
    (what it added to the store, what removing it would free). The total counts each file once.
    """
    from tensorstore_llm.store.dedup import disk_total, footprint
    from tensorstore_llm.units import format_size

    store = store_of(ctx)
    damaged: list = []
    artifacts = store.list(kind, damaged=damaged)
    tags = store.tags()
    for entry, reason in damaged:
        click.echo(f"warning: skipped damaged entry artifacts/{entry}: {reason}", err=True)
    prints = {a.id: footprint(a) for a in artifacts}
    if as_json:
        rows = [{"id": a.id, "kind": a.kind, "tags": [t for t, i in tags.items() if i == a.id],
                 "tensors": len(a.manifest.tensors), "bytes": a.manifest.nbytes, "stored_bytes": prints[a.id].disk,
                 "shared_bytes": prints[a.id].shared, "unique_bytes": prints[a.id].unique,
                 "created_at": a.manifest.created_at}
                for a in artifacts]
        return click.echo(json.dumps(rows, indent=1))
    if not artifacts:
        return click.echo(f"no artifacts in {store.root}")
    click.echo(f"{'ID':12}  {'KIND':11} {'TENSORS':>7} {'SIZE':>10} {'STORED':>10} {'UNIQUE':>10}  {'CREATED':25} TAGS")
    for a in artifacts:
        names = ",".join(t for t, i in tags.items() if i == a.id)
        fp = prints[a.id]
        click.echo(f"{a.short_id:12}  {a.kind:11} {len(a.manifest.tensors):>7} {format_size(a.manifest.nbytes):>10} "
                   f"{format_size(fp.disk):>10} {format_size(fp.unique):>10}  {a.manifest.created_at:25} {names}")
    click.echo("SIZE: logical tensor bytes; STORED: the artifact's files on disk, shared ones included (its own "
               "coded size); UNIQUE: the part no other artifact shares (what it added, what removing it frees); "
               f"total on disk {format_size(disk_total(artifacts))} (each shared file once)")


@click.command("show")
@click.argument("ref")
@click.option("--all", "show_all", is_flag=True, help="List every tensor (default: the first 40).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
@click.pass_context
def show_cmd(ctx, ref, show_all, as_json):
    """Show artifact REF: kind, lineage, files, and its tensors with shapes, dtypes and sizes."""
    from tensorstore_llm.store.dedup import footprint
    from tensorstore_llm.units import format_size

    store = store_of(ctx)
    artifact = store.get(ref)
    m = artifact.manifest
    if as_json:
        return click.echo(m.to_json().decode())
    click.echo(f"artifact  {artifact.id}")
    click.echo(f"kind      {m.kind}")
    click.echo(f"tags      {', '.join(store.tags_of(artifact.id)) or '-'}")
    click.echo(f"created   {m.created_at} by {m.tool.get('name', '?')} {m.tool.get('version', '')}")
    click.echo(f"size      {format_size(m.nbytes)} in {len(m.tensors)} tensors")
    fp = footprint(artifact)
    ratio = ""
    if not m.tensors:   # an export record (merge -o, apply -o): lineage only, its tensors live in the exported dir
        ratio = ", a record without tensors"
    elif fp.disk:   # carried files (a 33 MB tokenizer.json) can make a checkpoint larger on disk than its tensors
        ratio = (f", {m.nbytes / fp.disk:.2f}x smaller than its tensors" if fp.disk <= m.nbytes else
                 f", {fp.disk / max(m.nbytes, 1):.2f}x its tensors' size (carried files and metadata included)")
    click.echo(f"stored    {format_size(fp.disk)} on disk{ratio}" +
               (f"; {format_size(fp.shared)} of it shared with other artifacts, {format_size(fp.unique)} its own only"
                if fp.shared else "; none of it shared with other artifacts"))
    if not m.tensors and m.info.get("output"):
        click.echo(f"output    {m.info['output']}")
    if isinstance(m.info.get("delta"), dict):
        delta = m.info["delta"]
        click.echo(f"delta     of {m.info.get('base', {}).get('id', '?')[:12]}, codec {delta['codec'].get('name')}, "
                   f"chain depth {delta['depth']}")
    if m.source:
        click.echo(f"source    {_describe_external(m.source)}")
    if m.recipe:
        click.echo(f"recipe    {json.dumps(m.recipe)}")
    for parent in m.parents:
        click.echo(f"parent    {parent.get('role', '?')}: {_describe_parent(parent)}")
    if m.files:
        click.echo(f"files     {', '.join(m.files)}")
    if m.kind == "lora":
        _show_adapter(m.info)
    dtypes = {}
    for r in m.tensors.values():
        dtypes[r.dtype] = dtypes.get(r.dtype, 0) + 1
    click.echo(f"dtypes    {', '.join(f'{d} x{n}' for d, n in sorted(dtypes.items()))}")
    metas = list(m.metas().values())
    shown = metas if show_all else metas[:40]
    click.echo(f"\n{'tensor':60} {'shape':>18} {'dtype':9} {'size':>10}")
    for meta in shown:
        click.echo(f"{meta.name[:60]:60} {'x'.join(map(str, meta.shape)) or 'scalar':>18} {meta.dtype:9} {format_size(meta.nbytes):>10}")
    if len(shown) < len(metas):
        click.echo(f"... {len(metas) - len(shown)} more (use --all)")


def _show_adapter(info: dict) -> None:
    """An adapter's base, rank per module and parameter count (``tsllm show`` of a lora artifact)."""
    from tensorstore_llm.lora.artifacts import adapter_summary, describe_base

    click.echo(f"adapter   {adapter_summary(info)}")
    click.echo(f"base      {describe_base(info.get('base') or {})}")
    for module, r in sorted((info.get("ranks") or {}).items()):
        click.echo(f"  r={r:<5} {module}")


def _describe_external(ext: dict) -> str:
    from tensorstore_llm.store.store import describe_external

    return describe_external(ext)


def _describe_parent(parent: dict) -> str:
    if "id" in parent:
        return parent["id"][:12]
    return _describe_external(parent.get("external", {}))


@click.command("log")
@click.argument("ref", required=False)
@click.option("--family", metavar="BASE",
              help="Instead: the family of base release BASE: the deltas stored on it and the transfers onto later releases, as a tree.")
@click.pass_context
def log_cmd(ctx, ref, family):
    """Print the lineage graph of REF: what it was made from, recursively."""
    store = store_of(ctx)
    if family:
        from tensorstore_llm.diff.family import family_lines

        for line in family_lines(store, family):
            click.echo(line)
        return
    if not ref:
        raise click.UsageError("give REF (or --family BASE)")
    tags = store.tags()

    def show(node, prefix, last):
        branch = "" if node.role is None else ("└── " if last else "├── ")
        label = f"{node.role}: " if node.role else ""
        if node.artifact is None:
            what = f"{node.id[:12]} (not in this store)" if node.missing else node.external
            return click.echo(f"{prefix}{branch}{label}{what}")
        a = node.artifact
        names = ",".join(t for t, i in tags.items() if i == a.id)
        what = (a.manifest.recipe or {}).get("op", a.kind)
        if a.kind == "lora":
            from tensorstore_llm.lora.artifacts import adapter_summary

            what += f" ({adapter_summary(a.manifest.info)})"
        if (a.manifest.recipe or {}).get("transfer"):
            what += " (adapter transferred from another base)"
        origin = f"  <- {_describe_external(a.manifest.source)}" if a.manifest.source else ""
        click.echo(f"{prefix}{branch}{label}{a.short_id} {a.kind} {what}{f' [{names}]' if names else ''} {a.manifest.created_at}{origin}")
        child_prefix = prefix + ("" if node.role is None else ("    " if last else "│   "))
        for i, child in enumerate(node.children):
            show(child, child_prefix, i == len(node.children) - 1)

    show(store.lineage(ref), "", True)


@click.command("tag")
@click.argument("ref")
@click.argument("name", required=False)
@click.option("-f", "--force", is_flag=True, help="Move NAME if it already points elsewhere.")
@click.option("-d", "--delete", is_flag=True, help="Delete tag REF instead.")
@click.pass_context
def tag_cmd(ctx, ref, name, force, delete):
    """Point tag NAME at artifact REF (id, id prefix or another tag); -d REF deletes tag REF."""
    store = store_of(ctx)
    if delete:
        store.untag(ref)
        return click.echo(f"deleted tag {ref}")
    if not name:
        raise click.UsageError("give the tag NAME (or use -d to delete a tag)")
    previous = store.tag(ref, name, force=force)
    target = store.get(name).short_id
    click.echo(f"{name} -> {target}" + (f" (was {previous[:12]})" if previous else ""))


@click.command("verify")
@click.argument("refs", nargs=-1, required=True)
@click.option("--upgrade", is_flag=True,
              help="Also add per-chunk checksums to artifacts written before they existed (their ids do not change).")
@click.pass_context
def verify_cmd(ctx, refs, upgrade):
    """Re-read every tensor and file of each REF and check it against the manifest's checksums.

    Every read of an artifact is checked anyway (per-chunk checksums, exit 5 on a mismatch);
    this reads all of it at once, e.g. after copying a store or a disk scare.
    """
    store = store_of(ctx)
    for ref in refs:
        missing = store.needs_upgrade(ref) if upgrade else []
        artifact = store.verify(ref, upgrade=upgrade)
        if not ctx.obj["quiet"]:
            added = f"; added chunk checksums to {len(missing)} tensors" if missing else ""
            click.echo(f"ok {artifact.short_id}: {len(artifact.manifest.tensors)} tensors, {len(artifact.manifest.files)} files match{added}")


@click.command("gc")
@dry_run_option("Only list what would be removed.")
@click.pass_context
def gc_cmd(ctx, dry_run):
    """Remove staging leftovers of interrupted or failed jobs that no running process holds, and
    stored tensors / coded blocks (store objects) that no artifact uses any more.

    Note that an interrupted job can no longer resume after its staging is removed.
    """
    store = store_of(ctx)
    removed = store.gc(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    objects = sum(1 for p in removed if p.startswith(os.path.join(store.root, "objects") + os.sep))
    click.echo(f"{verb} {len(removed) - objects} staging director{'y' if len(removed) - objects == 1 else 'ies'}"
               + (f" and {objects} unused stored object(s)" if objects else ""))
    for path in removed:
        click.echo(f"  {path}")
