"""``tsllm merge``: mergekit-format recipes, streamed."""
from __future__ import annotations

import click

from .common import device_option, max_memory_option, options_of, print_estimate, report, run_options, size_option, store_of


@click.command("merge")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", help="Tag for the merged artifact.")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False),
              help="Write the result straight into this Hugging Face directory (one write; the store keeps "
                   "its lineage, not a second copy), with mergekit_config.yml and a model card.")
@click.option("--keep-artifact", is_flag=True,
              help="With -o: also keep the merged checkpoint in the store (writes it twice).")
@click.option("--max-shard-size", default="5G", show_default=True, callback=size_option, help="Shard size of the -o output.")
@click.option("--arithmetic", type=click.Choice(["fp32", "mergekit"]), default="fp32", show_default=True,
              help="fp32: compute in fp32, round once. mergekit: replay mergekit's operations in the recipe's "
                   "dtype (e.g. bf16 task vectors), bit-exact with mergekit for linear / task_arithmetic.")
@run_options
@click.pass_context
def merge_cmd(ctx, recipe, name, out_dir, keep_artifact, max_shard_size, arithmetic, device, max_memory, seed, compression,
              dry_run):
    """Merge models as RECIPE (a mergekit YAML file) says.

    \b
    Methods: linear (model soup), task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs,
    breadcrumbs_ties, della, della_linear, slerp, nuslerp, model_stock, mediator (per-layer
    sign-conflict analysis; prints its table), sens_merging (per-layer sensitivity scores from a
    file, or computed from a calibration corpus), passthrough (with slices: frankenmerges),
    lore (LoRE-Merging: low-rank task vectors, base optional), aim (activation-informed:
    weights that matter to the base are protected), twin (Twin-Merging: a shared model plus
    per-task expert adapters written to experts_dir), multislerp, karcher (Karcher mean), sce,
    nearswap, arcee_fusion, ram, ramplus_tl (mergekit's newer methods, same keys and defaults).
    tokenizer_source (base, union or a model) and tokenizer: blocks build the output vocabulary.
    slices: (sources with layer_range, per-slice parameters) work with every method that does
    not analyse whole models first. Model references are store refs (tags, ids),
    Hugging Face directories or hub repos. Parameters may be scalars, per-layer gradient lists
    or [{filter: substring, value: ...}] lists, as in mergekit. The recipe is fully validated
    (references, tensors, shapes, parameters) before any work; --dry-run prints the plan, the
    memory per tensor and the total I/O. DARE / DELLA masks come from --seed, per tensor.

    \b
    Example recipe:
      merge_method: ties
      base_model: base
      models:
        - model: ft1
          parameters: {weight: 1.0, density: 0.5}
        - model: ft2
          parameters: {weight: [0.2, 0.8], density: 0.5}   # gradient over layers
      parameters: {normalize: true}
      dtype: bfloat16
    """
    import warnings

    from tensorstore_llm.api import merge
    from tensorstore_llm.errors import RecipeWarning
    from tensorstore_llm.merge.recipe import read_recipe_file

    text = read_recipe_file(recipe)
    store = store_of(ctx)
    options = options_of(ctx, device=device, max_memory=max_memory, seed=seed, compression=compression, dry_run=dry_run)
    if keep_artifact and not out_dir:
        raise click.UsageError("--keep-artifact only applies with -o/--output")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RecipeWarning)
        result = merge(store, text, name=name, where=recipe, arithmetic=arithmetic, out_dir=out_dir,
                       max_shard_size=max_shard_size, keep_artifact=keep_artifact, options=options)
    for warning in caught:
        if issubclass(warning.category, RecipeWarning):
            click.echo(f"warning: {warning.message}", err=True)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if result.analysis and not ctx.obj["quiet"]:
        a = result.analysis
        click.echo(f"layer conflict ratios (mu {a['mu']:.4f}, sigma {a['sigma']:.4f}, averaged below {a['threshold']:.4f}):")
        for row in a["layers"]:
            click.echo(f"  {row['layer']:>6}  {row['conflict_ratio']:.4f}  {row['action']}")
    if dry_run:
        from tensorstore_llm.merge.recipe import load_recipe

        with warnings.catch_warnings():   # merge() reported them above
            warnings.simplefilter("ignore", RecipeWarning)
            method = load_recipe(text, recipe).method
        return print_estimate(result.estimate, method=method)
    report(result, "merged", ctx.obj["quiet"])
    if out_dir and not ctx.obj["quiet"]:
        kept = f"checkpoint {result.artifact.short_id}" if keep_artifact else f"lineage record {result.artifact.short_id}"
        click.echo(f"written to {result.output} ({kept} in the store)")


@click.command("soup")
@click.argument("refs", nargs=-1, required=True)
@click.option("--score-cmd", required=True,
              help="Command scoring a candidate: run on its exported HF directory ({path}, else appended), "
                   "it prints a number (higher is better) on its last line.")
@click.option("--name", help="Tag for the final soup.")
@max_memory_option()
@device_option()
@click.pass_context
def soup_cmd(ctx, refs, score_cmd, name, max_memory, device):
    """Greedy model soup of REFS: add models best-first, keep each only if the average improves.

    Example: tsllm soup ft1 ft2 ft3 --score-cmd "python eval.py --model {path}" --name soup
    """
    from tensorstore_llm.api import greedy_soup
    from tensorstore_llm.merge.soup import command_score

    result = greedy_soup(store_of(ctx), list(refs), command_score(score_cmd), name=name,
                         options=options_of(ctx, device=device, max_memory=max_memory))
    for step in result.history:
        click.echo(f"  {step['score']:12.6g}  {step['candidate']}")
    click.echo(f"soup of {', '.join(result.kept)}: {result.artifact.short_id}")
