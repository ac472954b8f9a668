"""Teacher-logit verbs: ``tsllm logits precompute`` and ``tsllm logits show``."""
from __future__ import annotations

import json
import sys

import click

from .common import device_option, seed_option


@click.group("logits")
def logits_group():
    """Precompute a teacher's output distribution once (RS-KD), train many students from it.

    \b
      tsllm logits precompute --teacher ./SmolLM2-135M --data data/corpus --name kd-smollm2 --seq-len 512
      tsllm logits show kd-smollm2            # a logits artifact in the store (or --out DIR: a directory)

    Per token position the teacher's softmax (fp32, temperature T) is sampled N times
    (--draws, default 50) with a generator seeded per sequence; the unique ids and their counts are
    kept: an unbiased sparse target (E[counts / N] = teacher probabilities). Train with
    tensorstore_llm.distill.dataset.DistillDataset and distill.losses.
    """


def _resolve_teacher(ctx, teacher: str) -> tuple[str, str | None, str | None]:
    """(HF directory or hub id, artifact id or None, label or None): a store artifact is exported
    to a temporary directory, removed when the command ends, and recorded by its artifact id, not
    by that directory."""
    import os

    from tensorstore_llm.io.hub import parse_hub_ref

    if os.path.isdir(teacher) or parse_hub_ref(teacher) is not None:
        return teacher, None, None
    import tempfile

    from tensorstore_llm.api import export

    from .common import store_of

    store = store_of(ctx)
    artifact = store.get(teacher)          # ArtifactNotFound names the ref when it is none of the three
    if artifact.kind != "checkpoint":
        from tensorstore_llm.errors import DatasetMismatch

        raise DatasetMismatch(f"teacher {teacher!r} is a {artifact.kind!r} artifact, not a checkpoint")
    import shutil

    scratch = tempfile.mkdtemp(prefix=f"tsllm-teacher-{artifact.id[:16]}-")
    ctx.call_on_close(lambda: shutil.rmtree(scratch, ignore_errors=True))
    out = os.path.join(scratch, "model")
    export(store, teacher, out, progress=False)
    return out, artifact.id, f"artifact {artifact.id}"


@logits_group.command("precompute")
@click.option("--teacher", "teachers", required=True, multiple=True, metavar="MODEL",
              help="transformers causal LM: HF directory, hub id (org/name[@rev]) or store artifact. Repeat it for "
                   "several teachers with one tokenizer: one dataset with per-teacher targets.")
@click.option("--data", "data", required=True, metavar="CORPUS",
              help="Corpus file or directory: .txt (documents split at two blank lines), .jsonl with "
                   "'text' or chat 'messages' (rendered with the teacher's chat template), .parquet.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Write the dataset to this directory (staged in OUT.partial) instead of the store.")
@click.option("--name", help="Tag for the new logits artifact in the store.")
@click.option("--method", type=click.Choice(["rs-kd", "top-k", "full"]), default="rs-kd", show_default=True,
              help="rs-kd: sampled ids + counts (unbiased); top-k: k ids + log-probs (biased baseline); "
                   "full: every log-prob (tiny tests only).")
@click.option("--draws", default=50, show_default=True, help="RS-KD draws N per position.")
@click.option("--tau", default=1.0, show_default=True, help="RS-KD proposal exponent: q ∝ t^tau; tau != 1 stores importance weights.")
@click.option("--self-normalise", is_flag=True, help="With tau != 1: divide each position's weights by their sum (biased).")
@click.option("--temperature", default=1.0, show_default=True, help="T in softmax(logits / T).")
@click.option("--top-k", "k", default=50, show_default=True, help="k for --method top-k.")
@click.option("--seq-len", default=2048, show_default=True, help="Tokens per packed sequence.")
@click.option("--shuffle-seed", default=0, show_default=True, type=int, help="Document order seed of the packing (-1: corpus order).")
@click.option("--add-bos/--no-add-bos", default=None,
              help="Start every document with BOS. Default: as the teacher's tokenizer does (Gemma, Llama 3: yes; "
                   "SmolLM2: no), unless documents already start with it.")
@click.option("--batch-size", default=4, show_default=True, help="Sequences per forward pass.")
@click.option("--shard-sequences", default=64, show_default=True, help="Sequences per Parquet shard (unit of resume).")
@click.option("--max-sequences", type=int, help="Only the first N packed sequences.")
@click.option("--alignment", is_flag=True, help="Also store teacher NLL, text and character offsets (for other tokenizers).")
@seed_option("Run seed of the per-sequence RS-KD generators.")
@device_option("cpu", help="cpu, cuda or cuda:N.")
@click.option("--dtype", default="float32", show_default=True, help="Compute dtype of the teacher (float32, bfloat16).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: teacher actors on Ray Data (pip install 'tensorstore-llm[ray]'), same dataset.")
@click.option("--address", help="With --engine ray: a running Ray cluster (default: start a local one).")
@click.option("--ray-actors", type=int, help="With --engine ray: teacher actors (default: one per GPU, else 1).")
@click.option("--ray-cpus-per-actor", default=1, show_default=True, help="With --engine ray: CPUs (torch threads) per actor.")
@click.pass_context
def precompute_cmd(ctx, teachers, data, out, name, method, draws, tau, self_normalise, temperature, k, seq_len, shuffle_seed,
                   add_bos, batch_size, shard_sequences, max_sequences, alignment, seed, device, dtype, engine, address,
                   ray_actors, ray_cpus_per_actor):
    """Run TEACHER over CORPUS once and store its sparse targets as a sharded Parquet dataset.

    The dataset becomes a store artifact of kind `logits` (tag it with --name), or a directory with
    --out. Interrupted? Run the same command again: finished shards are kept, the rest recomputed,
    and the result is identical to an uninterrupted run.

    The corpus is tokenised and packed by rule concat-eos-chunk-v1 (documents in shuffled order,
    each followed by EOS, concatenated and cut into --seq-len windows, the last partial window
    dropped). The dataset's fingerprint covers teacher, tokenizer, chat template, corpus, packing,
    method, N, tau and T; a reader with another tokenizer or packing is refused.
    """
    from tensorstore_llm.distill.precompute import SamplingConfig, precompute
    from tensorstore_llm.distill.shards import open_dataset
    from tensorstore_llm.distill.stats import dataset_stats

    from .common import store_of
    from tensorstore_llm.hf.models import load_causal_lm
    from tensorstore_llm.hf.packing import PackingRule

    from transformers import AutoTokenizer

    from tensorstore_llm.hf.corpus import read_corpus
    from tensorstore_llm.hf.packing import Packing

    quiet = ctx.obj["quiet"]
    if engine != "ray" and (address or ray_actors):
        raise click.UsageError("--address and --ray-actors need --engine ray")
    config = SamplingConfig(method=method, draws=draws, tau=tau, self_normalise=self_normalise,
                            temperature=temperature, k=k, seed=seed, alignment=alignment)
    config.validate()
    rule = PackingRule(seq_len=seq_len, shuffle_seed=None if shuffle_seed < 0 else shuffle_seed, add_bos=add_bos)
    resolved = [_resolve_teacher(ctx, t) for t in teachers]
    sources = [r[0] for r in resolved]
    parents = [r[1] for r in resolved if r[1]]
    tokenizer = AutoTokenizer.from_pretrained(sources[0])
    corpus = read_corpus(data, tokenizer=tokenizer)          # corpus and packing errors before the model loads
    Packing(corpus.documents, tokenizer, rule, corpus.fingerprint)

    def progress(done, total):
        if not quiet and sys.stderr.isatty():
            click.echo(f"\r{done}/{total} sequences", nl=False, err=True)
    store = None if out else store_of(ctx)
    common = dict(config=config, rule=rule, batch_size=batch_size, shard_sequences=shard_sequences,
                  max_sequences=max_sequences, progress=progress, store=store, name=name, parents=parents or None)
    if engine == "ray":
        from tensorstore_llm.distill.ray_engine import precompute_ray

        result = precompute_ray(sources, corpus, out, address=address, actors=ray_actors, cpus_per_actor=ray_cpus_per_actor,
                                dtype=dtype, fingerprints=[r[1] for r in resolved], labels=[r[2] for r in resolved], **common)
    else:
        lms = [load_causal_lm(src, dtype=dtype, device=device, fingerprint=fp, label=label) for src, fp, label in resolved]
        result = precompute(lms if len(lms) > 1 else lms[0], corpus, out, **common)
    where = result if out else result.short_id
    if quiet:
        click.echo(result if out else result.id)
        return
    if sys.stderr.isatty():
        click.echo("", err=True)
    s = dataset_stats(open_dataset(out or result.id, store))
    click.echo(f"wrote {where}{' (' + name + ')' if name and not out else ''}: {s['sequences']} sequences, {s['tokens']} tokens, {s['unique_per_position']:.1f} ids/position, "
               f"{s['bytes_per_token']:.1f} B/token, {s['bytes_per_pair']:.2f} B/pair")


@logits_group.command("show")
@click.argument("dataset")
@click.option("--json", "as_json", is_flag=True, help="Print fingerprint and statistics as JSON.")
@click.pass_context
def show_cmd(ctx, dataset, as_json):
    """Print a dataset's fingerprint, tokens, bytes per token / pair, ids per position and coverage.

    DATASET is a logits artifact in the store (tag or id) or a directory written with --out.
    Coverage is the teacher's probability mass on the stored ids, averaged over positions.
    """
    from tensorstore_llm.distill.shards import open_dataset
    from tensorstore_llm.distill.stats import dataset_stats

    import os

    from .common import store_of

    ds = open_dataset(dataset, None if os.path.isdir(dataset) else store_of(ctx))
    stats = dataset_stats(ds)
    if as_json:
        click.echo(json.dumps({"info": ds.info, "stats": stats}, indent=1, sort_keys=True))
        return
    info, sampling = ds.info, ds.info["sampling"]
    click.echo(f"dataset      {ds.path}")
    click.echo(f"fingerprint  {info['fingerprint']}")
    for j, t in enumerate(info.get("teachers") or [{"source": info["teacher_source"], "fingerprint": info["teacher"]}]):
        label = f"teacher{j}" if "teachers" in info else "teacher"
        click.echo(f"{label:13}{t['source']} ({t['fingerprint'][:16]})")
    click.echo(f"tokenizer    {info['tokenizer'][:16]}  vocab {info['vocab']}  chat template {info['chat_template'][:16] or '-'}")
    click.echo(f"corpus       {info['corpus'][:16]}  packing {info['packing']}")
    detail = {"rs-kd": f"N={sampling['draws']} tau={sampling['tau']}" + (" self-normalised" if sampling["self_normalise"] else ""),
              "top-k": f"k={sampling['k']}", "full": "all ids"}[sampling["method"]]
    click.echo(f"method       {sampling['method']} {detail} T={sampling['temperature']} seed={sampling['seed']}"
               f"{' +alignment' if sampling['alignment'] else ''}")
    click.echo(f"sequences    {stats['sequences']} x {info['seq_len']} = {stats['tokens']} tokens in {len(ds.files)} shard(s)")
    click.echo(f"ids/position {stats['unique_per_position']:.2f}   coverage {stats['coverage']:.3f}")
    click.echo(f"size         {stats['bytes']} B: {stats['bytes_per_token']:.2f} B/token, {stats['bytes_per_pair']:.3f} B/pair "
               f"({stats['target_bytes_per_pair']:.3f} B/pair in the target columns)")
