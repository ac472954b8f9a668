"""``tsllm diff-stats`` and ``tsllm diff-eval``: what a fine-tuning diff changed, and what a lossy
reconstruction of it does to the model."""
from __future__ import annotations

import json

import click

from .common import (
    device_option,
    max_memory_option,
    progress_flag,
    seed_option,
    store_of,
)


def _open(store, ref: str, stack, what: str):
    """(TensorSource, carried files) of a model reference (store ref, directory or hub repo)."""
    from tensorstore_llm.api import resolve_input

    source, _, files = resolve_input(store, ref)
    if hasattr(source, "__exit__"):
        stack.enter_context(source)
    return source, files


def _delta_parent(store, ref: str) -> str | None:
    """The parent id a delta-stored artifact ``ref`` is bound to (None for anything else)."""
    import os

    if os.path.exists(ref) or not store.has(ref):
        return None
    base = store.get(ref).manifest.info.get("base")
    return str(base["id"]) if isinstance(base, dict) and "id" in base and "delta" in store.get(ref).manifest.info else None


@click.command("diff-stats")
@click.argument("diffs", nargs=-1, required=True, metavar="DIFF [DIFF2 ...]")
@click.option("--base", "base_ref", metavar="BASE",
              help="The base the DIFFs are fine-tunes of (needed unless a DIFF is a delta-stored artifact, "
                   "whose parent is its base).")
@click.option("--rank", default=16, show_default=True, type=click.IntRange(1),
              help="Report the share of ‖Δ‖² in this many top singular directions.")
@click.option("--power-iters", default=2, show_default=True, type=click.IntRange(0),
              help="Subspace iterations of the randomised SVD (each is two more read passes).")
@click.option("--layers-only", is_flag=True, help="Print the per-layer table only.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), metavar="FILE.png",
              help="Draw a per-layer figure (needs matplotlib: pip install 'tensorstore-llm[plot]').")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), metavar="FILE", help="Also write every figure as JSON.")
@max_memory_option()
@device_option()
@seed_option("Seed of the randomised SVD's sketch.")
@click.pass_context
def diff_stats_cmd(ctx, diffs, base_ref, rank, power_iters, layers_only, plot_path, json_path, max_memory, device, seed):
    """What fine-tuning changed: per tensor and per layer, for each DIFF.

    \b
    A DIFF is a fine-tune given with --base (its diff is FT - BASE), or a delta-stored artifact
    (tsllm diff / import --delta-of), whose parent is its base. References are store refs (tags,
    ids), Hugging Face directories or hub repos. Reported:
      rel‖Δ‖     ‖Δ‖ / ‖W‖ (W: the base weight)
      changed    share of weights whose value changed; bf16 chg: after rounding both to bf16
      E topR     share of ‖Δ‖² in the top --rank singular directions (randomised SVD, streamed;
                 a lower bound), st.rank = ‖Δ‖²/σ₁², r@90% = rank holding 90% of ‖Δ‖²
      conf i-j   between two diffs: share of weights whose deltas have opposite signs (Mediator)
      cos i-j    cosine of the two deltas
    Layers pool their tensors. Tensors stream in row blocks within --max-memory; the SVD
    sketch (rows x (rank + 8) floats of the tensor being analysed) comes on top.

    \b
    Examples:
      tsllm diff-stats ft --base base --plot ft.png
      tsllm diff-stats ./ft-math ./ft-code --base ./Llama-3-8B --layers-only
    """
    from contextlib import ExitStack

    from tensorstore_llm.diff.stats import diff_stats, format_table, plot
    from tensorstore_llm.errors import InvalidParameter

    if plot_path and not plot_path.lower().endswith(".png"):
        raise InvalidParameter(f"--plot writes a PNG file; give a name ending in .png, got {plot_path!r}")
    store = store_of(ctx)
    base_refs = []
    for ref in diffs:
        parent = _delta_parent(store, ref)
        if base_ref is None and parent is None:
            raise InvalidParameter(f"diff-stats: {ref!r} is not a delta-stored artifact, so give its base with --base")
        base_refs.append(base_ref if base_ref is not None else parent)
    distinct = list(dict.fromkeys(base_refs))
    with ExitStack() as stack:
        bases = [_open(store, r, stack, "base")[0] for r in distinct]
        targets = [_open(store, r, stack, "diff")[0] for r in diffs]
        stats = diff_stats(bases, targets, base_of=[distinct.index(r) for r in base_refs], labels=list(diffs),
                           rank=rank, power_iters=power_iters, seed=seed, max_memory=max_memory, device=device,
                           progress=progress_flag(ctx))
    for line in format_table(stats, per_tensor=not layers_only):
        click.echo(line)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(stats.to_json(), f, indent=1)
    if plot_path:
        plot(stats, plot_path)
        if not ctx.obj["quiet"]:
            click.echo(f"plot: {plot_path}")


@click.command("diff-eval")
@click.argument("recon", metavar="RECON")
@click.option("--reference", "reference", required=True, metavar="FT",
              help="The true fine-tune RECON approximates (its config and tokenizer are used for both).")
@click.option("--corpus", type=click.Path(exists=True), metavar="PATH",
              help="Held-out text: a .txt / .md / .jsonl / .parquet file or a directory of them "
                   "(default: Python standard-library docstrings).")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(2), help="Tokens per window.")
@click.option("--batches", default=4, show_default=True, type=click.IntRange(1), help="Batches of windows.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1), help="Windows per batch.")
@click.option("--chunk", default=64, show_default=True, type=click.IntRange(1),
              help="Positions whose fp32 logits are formed at once (bounds the logits' memory).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), metavar="FILE", help="Also write the figures as JSON.")
@click.pass_context
def diff_eval_cmd(ctx, recon, reference, corpus, seq_len, batches, batch_size, chunk, json_path):
    """KL divergence of RECON's next-token distribution to the reference fine-tune's.

    \b
    RECON is a reconstructed model (e.g. the base plus a lossy delta); FT the true fine-tune.
    Both are store refs, Hugging Face directories or hub repos (a delta-stored artifact reads
    as its full tensors). Both models are held in fp32; logits are streamed --chunk positions at
    a time. Prints the mean and max per-token KL(p_FT || p_RECON) in nats, both perplexities and
    how often the two models' top tokens agree.

    \b
    Example:
      tsllm diff-eval ft-lowrank64 --reference ft --corpus data/corpus
    """
    from contextlib import ExitStack

    from tensorstore_llm.diff.evaluate import check_corpus_length, diff_eval

    store = store_of(ctx)
    with ExitStack() as stack:
        ref_src, ref_files = _open(store, reference, stack, "reference")
        # a corpus too short fails here, in about a second, not after both models are loaded
        check_corpus_length(ref_files, corpus, seq_len=seq_len, batches=batches, batch_size=batch_size)
        cand_src, _ = _open(store, recon, stack, "candidate")
        result = diff_eval(cand_src, ref_src, ref_files, corpus=corpus, seq_len=seq_len, batches=batches,
                           batch_size=batch_size, chunk=chunk, where=(f"RECON {recon!r}", f"reference {reference!r}"))
    click.echo(f"text: {result['text']} ({result['windows']} windows of {seq_len} tokens, {result['tokens']} predicted)")
    click.echo(f"KL(reference || recon): mean {result['kl']:.6g} nats/token, max {result['kl_max']:.6g}")
    click.echo(f"perplexity: reference {result['ppl_reference']:.4f}, recon {result['ppl_candidate']:.4f} "
               f"({100 * result['ppl_change']:+.3f}%)")
    click.echo(f"top-1 agreement: {100 * result['top1_agreement']:.2f}%")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
