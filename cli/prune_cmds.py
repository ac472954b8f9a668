"""``tsllm prune``, ``tsllm loram`` and ``tsllm plan``: pruning plans, LoRAM recovery, memory planning."""
from __future__ import annotations

import click

from .common import compute_options, print_estimate, progress_flag, seed_option, size_option, store_of


@click.command("prune")
@click.argument("base")
@click.option("--method", type=click.Choice(["magnitude", "wanda", "scores", "index"]), default="magnitude",
              show_default=True, help="Unit scores: L2 norm, Wanda |W|*||x|| (needs --calibration), --scores FILE, or --index FILE.")
@click.option("--pattern", type=click.Choice(["structured", "unstructured", "2:4", "4:8"]), default="structured",
              show_default=True, help="Remove channels / heads, or zero entries (per row, or n of every m).")
@click.option("--ratio", type=float, help="Fraction of MLP channels (structured) or of each row's entries (unstructured) to remove.")
@click.option("--head-ratio", type=float, default=0.0, show_default=True, help="Fraction of KV heads (with their query groups) to remove.")
@click.option("--per-layer", type=click.Path(exists=True, dir_okay=False), help='JSON: [r0, r1, ...] or {"mlp": [...], "kv_heads": [...]}.')
@click.option("--keep-first", default=0, show_default=True, help="Leave the first N layers whole (LoRAM's reference: 4).")
@click.option("--keep-last", default=0, show_default=True, help="Leave the last N layers whole (LoRAM's reference: 2).")
@click.option("--calibration", type=click.Path(exists=True), help="Corpus (file or directory) for Wanda norms and the search.")
@click.option("--calibration-samples", default=16, show_default=True, help="Calibration sequences.")
@click.option("--seq-len", default=128, show_default=True, help="Tokens per calibration sequence.")
@click.option("--scores", "score_file", type=click.Path(exists=True, dir_okay=False), help="safetensors: layers.<i>.channels / layers.<i>.kv_heads.")
@click.option("--index", "index_file", type=click.Path(exists=True, dir_okay=False), help="JSON index file of kept / pruned units per layer.")
@click.option("--plan", "from_plan", help="Apply an existing pruning-plan artifact (it must belong to BASE).")
@click.option("--search", type=click.Choice(["evolutionary"]), help="DarwinLM-style non-uniform search (needs --target-ratio, --calibration).")
@click.option("--target-ratio", type=float, help="Overall fraction of MLP channels the search removes.")
@click.option("--generations", default=10, show_default=True)
@click.option("--offspring", default=16, show_default=True)
@click.option("--levels", default=20, show_default=True, help="Sparsity levels per layer (level l removes l/levels).")
@seed_option("Search seed.")
@click.option("--search-state", type=click.Path(dir_okay=False), help="Resume file of the search (default: none).")
@click.option("--name", help="Tag of the pruned checkpoint (the plan gets NAME-plan).")
@click.option("-o", "--output", "out_dir", type=click.Path(), help="Also export the pruned checkpoint as an HF directory.")
@click.option("--max-shard-size", default="5G", show_default=True, callback=size_option, help="Shard size of the export with -o.")
@compute_options
@click.pass_context
def prune_cmd(ctx, base, method, pattern, ratio, head_ratio, per_layer, keep_first, keep_last, calibration,
              calibration_samples, seq_len, score_file, index_file, from_plan, search, target_ratio, generations,
              offspring, levels, seed, search_state, name, out_dir, max_shard_size, device, max_memory, compression, dry_run):
    """Prune BASE: a pruning-plan artifact bound to BASE, and the pruned checkpoint, streamed.

    \b
      tsllm prune base --ratio 0.4 --keep-first 4 --keep-last 2 --name small -o ./small-hf
      tsllm prune base --method wanda --calibration corpus.txt --ratio 0.3 --head-ratio 0.25
      tsllm prune base --pattern 2:4 --name base-24
      tsllm prune base --search evolutionary --target-ratio 0.4 --calibration corpus.txt

    Structured plans remove MLP channels (gate/up rows, down columns) and whole KV heads with their
    query-head group (q/k/v rows, o columns); the pruned config matches, so transformers loads the
    export. Layers of different sizes cannot be described by a transformers config of these
    families and are refused for -o (the plan and the recovery still work).
    """
    from tensorstore_llm.prune import prune
    from tensorstore_llm.prune.search import SearchSettings

    settings = None
    if search:
        steps = ((max(1, offspring // 4), 2), (2, max(3, calibration_samples // 2)), (1, calibration_samples))
        steps = tuple(sorted({(k, n) for k, n in steps}, key=lambda t: (-t[0], t[1])))
        settings = SearchSettings(levels=levels, generations=generations, offspring=offspring, steps=steps, seed=seed)
    result = prune(store_of(ctx), base, method=method, pattern=pattern, ratio=ratio, head_ratio=head_ratio,
                   per_layer=per_layer, keep_first=keep_first, keep_last=keep_last, calibration=calibration,
                   calibration_samples=calibration_samples, seq_len=seq_len, score_file=score_file,
                   index_file=index_file, search=settings, target_ratio=target_ratio, search_state=search_state,
                   from_plan=from_plan, name=name, out_dir=out_dir, max_shard_size=max_shard_size, device=device,
                   max_memory=max_memory, compression=compression, progress=progress_flag(ctx), dry_run=dry_run)
    if dry_run:
        return print_estimate(result.checkpoint.estimate)
    quiet = ctx.obj["quiet"]
    if quiet:
        click.echo(result.checkpoint.artifact.id if result.checkpoint else result.plan_artifact.id)
        return
    plan = result.plan
    if plan.structure == "structured":
        removed = plan.removed_fraction()
        what = f"removed {removed['mlp_channels']:.1%} of MLP channels, {removed['kv_heads']:.1%} of KV heads"
    else:
        what = f"{plan.mask['pattern']} mask, {plan.mask['sparsity']:.1%} of each linear weight zeroed by {plan.mask['score']}"
    click.echo(f"plan: {result.plan_artifact.short_id} ({plan.structure}, {plan.method}; {what})")
    if result.search is not None:
        click.echo(f"search: calibration loss {result.search.fitness:.4f} (uniform {result.search.uniform_fitness:.4f}); "
                   f"levels {result.search.levels}")
    if result.checkpoint is not None:
        click.echo(f"pruned checkpoint: {result.checkpoint.artifact.short_id}" + (f" -> {result.output}" if result.output else ""))
    for note in result.notes:
        click.echo(f"note: no pruned checkpoint: {note}")


@click.group("loram")
def loram_group():
    """LoRAM: train a LoRA on the pruned model, recover it to the full model, merge it there.

    \b
      tsllm prune base --ratio 0.4 --name small -o ./small-hf      # train a LoRA on ./small-hf
      tsllm loram recover ./small-lora --plan small-plan -o ./full-lora
      tsllm lora merge base ./full-lora --name tuned
    """


@loram_group.command("recover")
@click.argument("adapter", type=click.Path(exists=True))
@click.option("--plan", "plan_ref", required=True, help="The pruning-plan artifact the adapter's model came from.")
@click.option("--pruned", help="The checkpoint the adapter was trained on (pruned or aligned); checked when given.")
@click.option("--base", "base_ref", help="The full model it will be merged into; checked against the plan's binding.")
@click.option("--name", help="Tag of the recovered lora artifact.")
@click.option("-o", "--output", "out_dir", type=click.Path(), help="Write the recovered PEFT adapter directory here.")
@click.pass_context
def recover_cmd(ctx, adapter, plan_ref, pruned, base_ref, name, out_dir):
    """Expand ADAPTER (PEFT, trained on a pruned model) to the full model's shapes.

    lora_B of q/k/v/gate/up gets zero rows at pruned outputs, lora_A of o/down zero columns at
    pruned inputs; B*A is then exactly zero at every pruned position. Mask plans need no change.
    """
    from tensorstore_llm.loram.api import check_plan_base, recover_adapter

    store = store_of(ctx)
    if base_ref:
        check_plan_base(store, plan_ref, base_ref)
    result = recover_adapter(store, adapter, plan_ref, out_dir=out_dir, name=name, pruned=pruned)
    if ctx.obj["quiet"]:
        click.echo(result.artifact.id)
        return
    changed = sum(1 for a in result.recovery.actions.values() if not a.startswith("unchanged"))
    click.echo(f"recovered: {result.artifact.short_id} ({changed} of {len(result.recovery.actions)} modules expanded)"
               + (f" -> {out_dir}" if out_dir else ""))


@click.command("plan")
@click.argument("model")
@click.option("--method", "methods", multiple=True, type=click.Choice(["full", "lora", "qlora", "loram"]),
              help="Methods to compare (repeatable; default: all).")
@click.option("--batch", default=1, show_default=True)
@click.option("--seq-len", default=2048, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit", "sgd"]), default="adamw", show_default=True)
@click.option("--grad-checkpointing", is_flag=True, help="Recompute activations (keep one layer input per layer).")
@click.option("--zero", default=0, show_default=True, help="ZeRO stage (1: optimizer, 2: + gradients, 3: + weights sharded).")
@click.option("--gpus", default=1, show_default=True)
@click.option("--rank", default=16, show_default=True, help="LoRA rank.")
@click.option("--prune-ratio", default=0.5, show_default=True, help="LoRAM: fraction of MLP channels pruned.")
@click.option("--head-prune-ratio", default=0.0, show_default=True, help="LoRAM: fraction of KV heads pruned.")
@click.pass_context
def plan_cmd(ctx, model, methods, batch, seq_len, dtype, optimizer, grad_checkpointing, zero, gpus, rank, prune_ratio,
             head_prune_ratio):
    """Estimate per-GPU fine-tuning memory of MODEL (directory, config.json, artifact or hub id).

    Reads the config only. Weights, gradients, optimizer states and activations per method.
    """
    from tensorstore_llm.planner import METHODS, PlanSettings, compare, config_of, table

    settings = PlanSettings(batch=batch, seq_len=seq_len, dtype=dtype, optimizer=optimizer,
                            grad_checkpointing=grad_checkpointing, zero=zero, gpus=gpus, lora_rank=rank,
                            prune_ratio=prune_ratio, head_prune_ratio=head_prune_ratio)
    click.echo(table(compare(config_of(model, store_of(ctx)), methods or METHODS, settings)))
