"""``tsllm lora``: LoRA adapters (PEFT format) and the base models they belong to."""
from __future__ import annotations

import click

from .common import compute_options, print_estimate, progress_flag, report, store_of


@click.group("lora")
def lora_group():
    """LoRA / DoRA adapters in the PEFT format: merge them into a base model, streamed.

    \b
      tsllm lora merge base ./my-adapter --name merged --max-memory 1G
      tsllm lora merge ./Llama-3-8B ./my-adapter -o ./merged-hf
    """


@lora_group.command("merge")
@click.argument("base")
@click.argument("adapter", type=click.Path(exists=True))
@click.option("--scale", default=1.0, show_default=True, type=float, help="Extra factor on every update (1 = PEFT's merge).")
@click.option("--name", help="Tag for the merged artifact.")
@click.option("-o", "--output", "out_dir", type=click.Path(), help="Also export the merge to this Hugging Face directory.")
@click.option("--max-shard-size", default="5G", show_default=True, help="Shard size of the export with -o.")
@compute_options
@click.pass_context
def merge_cmd(ctx, base, adapter, scale, name, out_dir, max_shard_size, device, max_memory, compression, dry_run):
    """Merge ADAPTER (a PEFT adapter directory) into BASE (artifact, HF directory or hub repo).

    Targeted weights become W + s*B*A with s = lora_alpha/r (alpha/sqrt(r) with use_rslora),
    rank_pattern / alpha_pattern honoured; DoRA adapters give m*(W + s*B*A)/||W + s*B*A||.
    Computed in fp32 and rounded once to the base's dtype: PEFT's merge_and_unload() result.
    W streams in row blocks within --max-memory; the result is a new checkpoint artifact.
    Prefix-tuning adapters cannot be merged (they are not weight updates).
    """
    from tensorstore_llm.api import lora_merge

    result = lora_merge(store_of(ctx), base, adapter, scale=scale, name=name, out_dir=out_dir,
                        max_shard_size=max_shard_size, device=device, max_memory=max_memory,
                        compression=compression, progress=progress_flag(ctx), dry_run=dry_run)
    if dry_run:
        return print_estimate(result.estimate)
    report(result, f"merged {adapter} into {base}", ctx.obj["quiet"])
