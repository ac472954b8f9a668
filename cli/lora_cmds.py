"""``tsllm lora``: LoRA adapters (PEFT format) and the base models they belong to."""
from __future__ import annotations

import click

from .common import (compute_options, device_option, max_memory_option, print_estimate, progress_flag, report, seed_option,
                     size_option, store_of, stream_options)


@click.group("lora")
def lora_group():
    """LoRA / DoRA / prefix-tuning adapters: store them bound to their base, merge, combine,
    extract, resize, drop layers, and initialise new ones from a base's SVD.

    \b
      tsllm lora import ./my-adapter --base base --name mine
      tsllm lora merge base mine --name merged --max-memory 1G
      tsllm lora extract ft --base base --rank 64 --name ft-lora
      tsllm lora combine math code --weights 0.5,0.5 --rank 32 --name both
      tsllm lora resize mine --rank 8 --name mine-r8
      tsllm lora export mine ./mine-peft
    """


def _weights(value: str) -> list[float]:
    try:
        return [float(x) for x in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"--weights must be comma-separated numbers, got {value!r}") from None


def _print_modules(modules: dict, keys: tuple[str, ...], quiet: bool, limit: int = 12) -> None:
    if quiet or not modules:
        return
    click.echo(f"{'module':56} " + " ".join(f"{k:>14}" for k in keys))
    for i, (name, row) in enumerate(modules.items()):
        if i == limit:
            click.echo(f"... {len(modules) - limit} more modules")
            break
        cells = []
        for k in keys:
            v = row.get(k)
            cells.append(f"{v:>14.6g}" if isinstance(v, float) else f"{str(v if v is not None else '-'):>14}")
        click.echo(f"{name[:56]:56} " + " ".join(cells))


def _done(ctx, result, verb: str) -> None:
    quiet = ctx.obj["quiet"]
    if result.report.get("resumed") and not quiet:
        click.echo(f"resumed: {result.report['resumed']} tensors were already done")
    for a in result.artifacts:
        click.echo(a.id if quiet else f"{verb}: {a.short_id} ({a.kind})")
    if result.output and not quiet:
        click.echo(f"exported to {result.output}")


@lora_group.command("import")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--base", required=True, help="The model the adapter belongs to (artifact, HF directory or hub repo).")
@click.option("--name", help="Tag for the adapter artifact.")
@click.pass_context
def import_cmd(ctx, adapter_dir, base, name):
    """Store the PEFT adapter in ADAPTER_DIR (LoRA, DoRA or prefix tuning) as a `lora` artifact
    bound to BASE: the checksums of the base weights it changes are recorded, so it is never
    merged into another base silently. adapter_model.bin (pickle) is refused."""
    from tensorstore_llm.lora.jobs import import_adapter

    result = import_adapter(store_of(ctx), adapter_dir, base, name=name)
    _done(ctx, result, f"imported {adapter_dir} as")


@lora_group.command("export")
@click.argument("ref")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--base", help="Refuse unless REF belongs to this model (checked against its recorded binding).")
@click.pass_context
def export_cmd(ctx, ref, out_dir, base):
    """Write adapter artifact REF as a PEFT directory (adapter_config.json +
    adapter_model.safetensors) that PeftModel.from_pretrained loads. With --base, first check
    that REF was made for that model: the weights a LoRA changes, or for a prefix-tuning adapter
    the config's layers / width / heads and the embedding and attention weights it depends on."""
    from tensorstore_llm.lora.artifacts import export_adapter

    if base:
        from tensorstore_llm.lora.jobs import check_base

        check_base(store_of(ctx), ref, base)
    path = export_adapter(store_of(ctx), ref, out_dir)
    if not ctx.obj["quiet"]:
        click.echo(f"exported {ref} to {path}")


@lora_group.command("merge")
@click.argument("base")
@click.argument("adapter")
@click.option("--scale", default=1.0, show_default=True, type=float, help="Extra factor on every update (1 = PEFT's merge).")
@click.option("--transfer", is_flag=True, help="Allow merging an adapter artifact into a base other than its own (reported).")
@click.option("--base-quant", type=click.Choice(["nf4"]), help="QLoRA: merge into dequant(NF4(W)), the weights the adapter was trained against (streamed; an already quantised base is dequantised in memory into -o DIR).")
@click.option("--requantize", type=click.Choice(["nf4", "nf4-packed"]), help="With --base-quant: report ||W' - dequant(NF4(W'))|| per layer and write nf4: dequant(NF4(W')) dense, or nf4-packed: a bitsandbytes 4-bit checkpoint (every Linear weight packed, quantization_config in config.json; loads with transformers + bitsandbytes).")
@click.option("--name", help="Tag for the merged artifact.")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False),
              help="Write the merge straight into this Hugging Face directory (one write, with a model card; the "
                   "store keeps its lineage, not a second copy).")
@click.option("--keep-artifact", is_flag=True, help="With -o: also keep the merged checkpoint in the store (writes it twice).")
@click.option("--max-shard-size", default="5G", show_default=True, callback=size_option, help="Shard size of the -o output.")
@compute_options
@click.pass_context
def merge_cmd(ctx, base, adapter, scale, transfer, base_quant, requantize, name, out_dir, keep_artifact, max_shard_size,
              device, max_memory, compression, dry_run):
    """Merge ADAPTER (a lora artifact or PEFT directory) into BASE (artifact, HF directory or hub repo).

    Targeted weights become W + s*B*A with s = lora_alpha/r (alpha/sqrt(r) with use_rslora),
    rank_pattern / alpha_pattern honoured; DoRA adapters give m*(W + s*B*A)/||W + s*B*A||.
    Computed in fp32 and rounded once to the base's dtype: PEFT's merge_and_unload() result.
    W streams in row blocks within --max-memory; the result is a new checkpoint artifact, or
    with -o DIR the Hugging Face directory DIR (written once, published whole or not at all; the
    store keeps a tensorless record of its lineage; --keep-artifact stores the checkpoint too).
    An adapter artifact bound to another base is refused unless --transfer. Prefix-tuning
    adapters cannot be merged (they are not weight updates).
    """
    if requantize and not base_quant:
        raise click.UsageError("--requantize needs --base-quant nf4")
    if keep_artifact and not out_dir:
        raise click.UsageError("--keep-artifact only applies with -o/--output")
    if base_quant and _quantized_dir(base):
        return _merge_nf4_in_memory(ctx, base, adapter, scale, requantize, out_dir)
    from tensorstore_llm.lora.jobs import lora_merge
    from tensorstore_llm.lora.qlora import qlora_merge

    options = dict(scale=scale, transfer=transfer, name=name, out_dir=out_dir, max_shard_size=max_shard_size,
                   device=device, max_memory=max_memory, compression=compression, progress=progress_flag(ctx),
                   dry_run=dry_run)
    if base_quant:
        result = qlora_merge(store_of(ctx), base, adapter, requantize=requantize, keep_artifact=keep_artifact, **options)
    else:
        result = lora_merge(store_of(ctx), base, adapter, keep_artifact=keep_artifact, **options)
    if dry_run:
        return print_estimate(result.estimate)
    moved = (result.analysis or {}).get("transfer")
    if moved and not ctx.obj["quiet"]:
        click.echo(f"transfer: {adapter} was made for another base; {len(moved['mismatched'])} of its base tensors "
                   f"differ in {base} (e.g. {moved['mismatched'][0]}); recorded in the lineage", err=True)
    if base_quant:
        _print_modules(result.analysis["modules"], ("rank", "q_over_delta") + (("requant_error",) if requantize else ()),
                       ctx.obj["quiet"], limit=1000)
    report(result, f"merged {adapter} into {'dequant(NF4(' + base + '))' if base_quant else base}", ctx.obj["quiet"])
    if out_dir and not ctx.obj["quiet"] and result.artifact is not None:
        kept = f"lineage record {result.artifact.short_id}" if result.artifact.kind == "export" \
            else f"checkpoint {result.artifact.short_id}"
        click.echo(f"written to {result.output} ({kept} in the store)")


def _quantized_dir(base: str) -> bool:
    """Whether BASE is a Hugging Face directory of an already quantised model (quantization_config)."""
    import json
    import os

    config = os.path.join(base, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as f:
        return "quantization_config" in json.load(f)


def _merge_nf4_in_memory(ctx, base, adapter, scale, requantize, out_dir):
    """A base that is already quantised (bitsandbytes NF4, GPTQ, AWQ) is dequantised shard by shard
    in memory and written to -o DIR."""
    import os

    if not out_dir or not os.path.isdir(adapter):
        raise click.UsageError("a quantised BASE (bitsandbytes / GPTQ / AWQ) is dequantised one shard at a time in "
                               "memory: give a PEFT directory ADAPTER and -o DIR")
    from tensorstore_llm.lora.api import merge_adapter

    rep = merge_adapter(base, adapter, out_dir, scale=scale, base_quant="nf4", requantize=requantize)
    _print_modules(rep["modules"], ("rank", "q_over_delta") + (("requant_error",) if requantize else ()),
                   ctx.obj["quiet"], limit=1000)
    if not ctx.obj["quiet"]:
        click.echo(f"merged {adapter} into dequant({base}): {out_dir}")


@lora_group.command("extract")
@click.argument("ft")
@click.option("--base", help="The model FT was fine-tuned from (default for a diff artifact or delta-stored "
              "checkpoint FT: its parent).")
@click.option("--rank", type=int, help="Rank of every module.")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ||W_ft - W_base||^2.")
@click.option("--max-rank", default=128, show_default=True, help="Largest rank --energy may choose.")
@click.option("--targets", help="Comma-separated module names or suffixes (default: every 2-D weight but embeddings and lm_head).")
@click.option("--name", help="Tag for the adapter artifact.")
@click.option("-o", "--output", "out_dir", type=click.Path(), help="Also export the adapter to this PEFT directory.")
@device_option()
@max_memory_option()
@click.option("--svd", type=click.Choice(["auto", "exact", "randomized"]), default="auto", show_default=True,
              help="exact: the truncated SVD to fp32 rounding (Gram matrix of each delta's smaller side); "
                   "randomized: seeded randomised SVD, cheaper for very wide modules, slightly less energy on a "
                   "flat spectrum; auto: exact while min(out, in) <= 4096, else randomized.")
@seed_option("Run seed, recorded in the adapter's lineage (only --svd randomized draws from it).")
@click.pass_context
def extract_cmd(ctx, ft, base, rank, energy, max_rank, targets, name, out_dir, device, max_memory, seed, svd):
    """A LoRA adapter approximating the full fine-tune FT (W_ft - W_base per target module),
    streamed one module at a time: the exact truncated SVD of each module's delta (eigenvectors of the
    Gram matrix of its smaller side, then the SVD of the delta's projection onto them), or a randomised
    SVD for modules wider than 4096 on both sides (see --svd). Reports the captured energy per module
    and in total.

    FT may be a diff artifact (tsllm diff) or a delta-stored checkpoint (import --delta-of): its
    tensors are rebuilt block by block from its parent, which is the base unless --base is given
    (a diff's --base must be its parent). A killed run resumes to the same adapter."""
    from tensorstore_llm.lora.jobs import extract

    result = extract(store_of(ctx), ft, base, rank=rank, energy=energy, max_rank=max_rank,
                     targets=targets.split(",") if targets else None, name=name, out_dir=out_dir, seed=seed,
                     svd=svd, device=device, max_memory=max_memory, progress=progress_flag(ctx))
    _print_modules(result.report["modules"], ("rank", "captured", "svd"), ctx.obj["quiet"])
    if not ctx.obj["quiet"]:
        click.echo(f"captured energy: {result.report['totals']['captured']:.4f} over "
                   f"{result.report['totals']['modules']} modules, {result.report['totals']['num_params']} parameters")
    _done(ctx, result, "extracted")


@lora_group.command("resize")
@click.argument("adapter")
@click.option("--rank", type=int, help="New rank (modules already smaller keep theirs).")
@click.option("--energy", type=float, help="Per module, the smallest rank keeping this fraction of ||s B A||^2.")
@click.option("--rank-pattern", type=click.Choice(["auto"]), help="auto: per-module ranks under the budget of --rank everywhere.")
@click.option("--budget", type=int, help="With --rank-pattern auto: total LoRA parameters allowed (default: rank --rank everywhere).")
@click.option("--base", help="For a PEFT directory ADAPTER: the model it belongs to.")
@click.option("--name", help="Tag for the resized adapter.")
@click.option("-o", "--output", "out_dir", type=click.Path(), help="Also export it to this PEFT directory.")
@click.pass_context
def resize_cmd(ctx, adapter, rank, energy, rank_pattern, budget, base, name, out_dir):
    """Truncate ADAPTER to a smaller rank by the SVD of s*B*A, computed through QR of the
    factors (no out x in matrix); reports each module's relative error (Eckart-Young)."""
    from tensorstore_llm.lora.jobs import resize

    if budget is not None and rank_pattern != "auto":
        raise click.UsageError("--budget needs --rank-pattern auto")
    result = resize(store_of(ctx), adapter, rank=rank, energy=energy, auto_budget=rank_pattern == "auto",
                    budget=budget, base=base, name=name, out_dir=out_dir)
    _print_modules(result.report["modules"], ("old_rank", "rank", "relative_error"), ctx.obj["quiet"])
    _done(ctx, result, "resized")


@lora_group.command("drop")
@click.argument("adapter")
@click.option("--layers", help="k: drop the lowest k layers; or comma-separated module names / suffixes.")
@click.option("--base", help="For a PEFT directory ADAPTER: the model it belongs to.")
@click.option("--name", help="Tag for the new adapter.")
@click.option("-o", "--output", "out_dir", type=click.Path(), help="Also export it to this PEFT directory.")
@click.pass_context
def drop_cmd(ctx, adapter, layers, base, name, out_dir):
    """AdapterDrop: ADAPTER without the LoRA of its lowest k layers (or of the named modules);
    reports the parameters removed."""
    from tensorstore_llm.lora.jobs import drop

    if not layers:
        raise click.UsageError("give --layers k or --layers name1,name2")
    lowest, names = (int(layers), []) if layers.isdigit() else (None, layers.split(","))
    result = drop(store_of(ctx), adapter, lowest=lowest, modules=names, base=base, name=name, out_dir=out_dir)
    if not ctx.obj["quiet"]:
        t = result.report["totals"]
        click.echo(f"removed {t['modules_removed']} modules, {t['params_removed']} parameters; {t['params_left']} left")
    _done(ctx, result, "dropped")


@lora_group.command("combine")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--weights", required=True, help="One weight per adapter, comma-separated.")
@click.option("--method", type=click.Choice(["linear", "ties", "dare_linear"]), default="linear", show_default=True)
@click.option("--density", default=1.0, show_default=True, help="ties / dare_linear: fraction of each delta kept.")
@click.option("--rank", type=int, help="Re-factor the combination as an adapter of this rank.")
@click.option("--energy", type=float, help="linear: re-factor keeping this fraction of each module's energy.")
@click.option("--merge-into", help="Merge the combination into this base instead (a checkpoint artifact).")
@click.option("--base", help="For PEFT directory ADAPTERS: the model they belong to.")
@click.option("--name", help="Tag for the result.")
@click.option("-o", "--output", "out_dir", type=click.Path(), help="Also export the result to this directory.")
@stream_options(dry_run=False)
@click.pass_context
def combine_cmd(ctx, adapters, weights, method, density, rank, energy, merge_into, base, name, out_dir, device,
                max_memory, seed, compression):
    """Combine ADAPTERS of one base on their full deltas B*A (never A and B separately).

    linear without --rank is exact (the scaled factors concatenated, rank sum r_i); with --rank
    or --energy it is re-factored through QR of the stacked factors, with the error per module.
    ties / dare_linear follow PEFT's rules on the full deltas; merged into --merge-into, or
    re-factored to --rank by randomised SVD.
    """
    from tensorstore_llm.lora.combine import combine

    result = combine(store_of(ctx), list(adapters), _weights(weights), method=method, density=density, rank=rank,
                     energy=energy, merge_into=merge_into, base=base, name=name, out_dir=out_dir, device=device,
                     max_memory=max_memory, seed=seed, compression=compression, progress=progress_flag(ctx))
    if hasattr(result, "estimate"):
        return report(result, f"combined {len(adapters)} adapters into {merge_into}", ctx.obj["quiet"])
    _print_modules(result.report["modules"], ("rank", "relative_error"), ctx.obj["quiet"])
    _done(ctx, result, "combined")


@lora_group.command("init")
@click.argument("base")
@click.option("--method", type=click.Choice(["pissa", "goat"]), default="pissa", show_default=True)
@click.option("--rank", type=int, required=True, help="Rank of the adapter (of each GOAT expert).")
@click.option("--experts", default=1, show_default=True, help="goat: number of experts (SVD segments).")
@click.option("--alpha", type=float, help="lora_alpha (default: the rank, s = 1).")
@click.option("--targets", help="Comma-separated module names or suffixes (default: every 2-D weight but embeddings and lm_head).")
@click.option("--name", help="Tag for the adapter; the residual base is tagged NAME-residual.")
@click.option("-o", "--output", "out_dir", type=click.Path(), help="Also export the adapter(s) to this PEFT directory.")
@device_option()
@max_memory_option()
@click.pass_context
def init_cmd(ctx, base, method, rank, experts, alpha, targets, name, out_dir, device, max_memory):
    """SVD initialisation for training: PiSSA (top-r singular triplets) or GOAT (one SVD segment
    per expert) adapters, plus the residual base W0 - s*B*A (fp32 targets) as a checkpoint
    artifact: residual + adapter(s) reproduce BASE to fp32 rounding."""
    from tensorstore_llm.lora.jobs import svd_init

    result = svd_init(store_of(ctx), base, rank=rank, method=method, experts=experts, alpha=alpha,
                      targets=targets.split(",") if targets else None, name=name, out_dir=out_dir, device=device,
                      max_memory=max_memory, progress=progress_flag(ctx))
    quiet = ctx.obj["quiet"]
    if result.report.get("resumed") and not quiet:
        click.echo(f"resumed: {result.report['resumed']} tensors were already done")
    residual, adapters = result.artifacts[0], result.artifacts[1:]
    click.echo(residual.id if quiet else f"residual base: {residual.short_id}")
    for a in adapters:
        click.echo(a.id if quiet else f"adapter: {a.short_id}")
