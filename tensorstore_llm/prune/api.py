"""``prune``: a pruning-plan artifact bound to its base, and the pruned checkpoint, streamed.

Steps: open the base; score units (reduction jobs) or read an index / score file; choose what
each layer keeps (uniform, per-layer ratios, or an evolutionary search); commit the plan; stream
the pruned checkpoint (gathers or masks) into a second artifact whose config matches its shapes;
optionally export it as a Hugging Face directory. Every check runs before anything is written.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..arch import Architecture
from ..default_budget import DEFAULT_MAX_MEMORY
from ..errors import FormatError, InvalidParameter
from ..io.base import checksum_rows
from ..runs import export, resolve_input, run_plan
from ..store import Artifact, Store, job_key
from . import scores as S
from .apply import (
    NonUniformLayers,
    plan_pruned_checkpoint,
    pruned_config,
    pruned_config_bytes,
)
from .plan import PRUNED_ROLES, PruningPlan, read_index_file

METHODS = ("magnitude", "wanda", "scores", "index")
PATTERNS = {"structured": None, "unstructured": None, "2:4": (2, 4), "4:8": (4, 8)}


@dataclass
class PruneResult:
    """The plan (object and artifact), the pruned checkpoint's JobResult, and the search result."""

    plan: PruningPlan
    plan_artifact: Artifact | None = None
    checkpoint: object = None
    output: str | None = None
    search: object = None
    notes: list[str] = field(default_factory=list)


def base_binding(store: Store | None, ref: str, source, lineage: dict, arch: Architecture) -> dict:
    """{"id", "external", "checksums"} (the form lora artifacts use): the checksums of the base's
    prunable weights (from the manifest for an artifact, computed for an outside checkpoint)."""
    names = [n for n in source.keys() if arch.role(n).role in PRUNED_ROLES and arch.role(n).layer is not None]
    if "id" in lineage:
        manifest = store.get(ref).manifest.checksums()
        return {"id": lineage["id"], "external": None, "checksums": {n: manifest[n] for n in names}}
    checksums = {n: checksum_rows(source.meta(n), lambda a, b, n=n: source.read_rows(n, a, b), str(ref)) for n in names}
    return {"id": None, "external": lineage.get("external"), "checksums": checksums}


def model_checksums(store: Store | None, ref: str, names) -> dict[str, str]:
    """Checksums of tensors ``names`` of a model reference (artifact, directory or file)."""
    source, lineage, _ = resolve_input(store, ref)
    with source:
        keys = set(source.keys())
        if "id" in lineage:
            manifest = store.get(ref).manifest.checksums()
            return {n: manifest[n] for n in names if n in manifest}
        return {n: checksum_rows(source.meta(n), lambda a, b, n=n: source.read_rows(n, a, b), str(ref))
                for n in names if n in keys}


def _config_of(files: dict, where: str) -> tuple[dict, bytes]:
    if "config.json" not in files:
        raise FormatError(f"{where}: no config.json, so the model's structure is unknown")
    with open(files["config.json"], "rb") as f:
        raw = f.read()
    return json.loads(raw), raw


def prune(store: Store, base: str, *, method: str = "magnitude", pattern: str = "structured",
          ratio: float | None = None, head_ratio: float = 0.0, per_layer: str | None = None, keep_first: int = 0,
          keep_last: int = 0, calibration: str | None = None, calibration_samples: int = 16, seq_len: int = 128,
          score_file: str | None = None, index_file: str | None = None, search=None, target_ratio: float | None = None,
          search_state: str | None = None, from_plan: str | None = None, name: str | None = None,
          out_dir: str | None = None,
          max_shard_size: str = "5G", device="auto", max_memory=DEFAULT_MAX_MEMORY, compression="none", progress=None,
          dry_run: bool = False) -> PruneResult:
    """Prune ``base`` and store the plan and the pruned checkpoint.

    Args:
        method: magnitude | wanda (needs ``calibration``) | scores (``score_file``) | index (``index_file``).
        pattern: structured (MLP channels via ``ratio``, KV heads via ``head_ratio``), unstructured
            (``ratio`` of each row zeroed), 2:4 or 4:8.
        per_layer: JSON file of per-layer ratios (instead of ``ratio``).
        keep_first, keep_last: layers left whole (LoRAM's reference: 4 and 2).
        search: a :class:`~.search.SearchSettings` for DarwinLM's search at ``target_ratio``.
        name: tag of the pruned checkpoint; the plan is tagged ``{name}-plan``.
        out_dir: also export the pruned checkpoint there (refused for non-uniform layers).
        from_plan: apply this existing pruning-plan artifact instead of making one (it must have
            been made from ``base``: BaseMismatch otherwise).
    Returns:
        :class:`PruneResult`. Raises InvalidParameter (ratio >= 1, a layer left without heads /
        channels), FormatError, NonUniformLayers, before anything is written.
    Example:
        >>> prune(store, "base", ratio=0.3, keep_first=4, keep_last=2, name="small")   # doctest: +SKIP
    """
    if method not in METHODS:
        raise InvalidParameter(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if pattern not in PATTERNS:
        raise InvalidParameter(f"--pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    if pattern != "structured" and method in ("scores", "index"):
        raise InvalidParameter(f"--method {method} gives structured plans; masks use magnitude or wanda")
    if method == "wanda" and not calibration:
        raise InvalidParameter("--method wanda needs --calibration CORPUS (its activation norms)")
    if search is not None and (pattern != "structured" or target_ratio is None or not calibration):
        raise InvalidParameter("--search evolutionary needs --target-ratio R and --calibration CORPUS (structured)")
    source, lineage, files = resolve_input(store, base)
    with source:
        config, config_raw = _config_of(files, base)
        arch = Architecture.from_config(config, f"{base}/config.json")
        if from_plan is not None:
            return _apply_existing(store, base, source, lineage, files, config_raw, from_plan, name, out_dir,
                                   max_shard_size, dict(device=device, max_memory=max_memory, compression=compression,
                                                        progress=progress), dry_run)
        mlp_ratios, head_ratios = _ratios(arch, method, pattern, ratio, head_ratio, per_layer, keep_first, keep_last,
                                          search is not None, target_ratio)
        binding = base_binding(store, base, source, lineage, arch)
        settings = {"ratio": ratio, "head_ratio": head_ratio, "keep_first": keep_first, "keep_last": keep_last,
                    "pattern": pattern, "per_layer_file": os.path.basename(per_layer) if per_layer else None}
        norms, model, blocks = {}, None, None
        if calibration and (method == "wanda" or search is not None):
            from . import calibrate as C

            model, tokenizer = C.load_model(source, files)
            blocks = C.token_blocks(tokenizer, C.corpus_texts(calibration, tokenizer), seq_len, calibration_samples)
            settings["calibration"] = C.describe_calibration(calibration, seq_len, len(blocks))
            if method == "wanda":
                modules = [n[: -len(".weight")] for n in binding["checksums"]]
                norms = C.input_norms(model, blocks, modules)
        result = PruneResult(plan=None)
        if pattern == "structured":
            channels, heads = _structured(source, arch, method, norms, score_file, index_file, mlp_ratios, head_ratios,
                                          max_memory, device)
            if search is not None:
                channels, result.search = _search(model, blocks, arch, source, method, norms, score_file, head_ratios,
                                                  target_ratio, keep_first, keep_last, search, search_state,
                                                  binding, max_memory, device)
                settings["search"] = {"target_ratio": target_ratio, **search.__dict__}
            plan = PruningPlan(arch, "structured", "search" if search is not None else method, channels, heads,
                               settings=settings, base=binding)
        else:
            n, m = PATTERNS[pattern] or (None, None)
            if pattern == "unstructured" and len(set(mlp_ratios)) > 1:
                raise InvalidParameter("unstructured masks take one --ratio for every pruned weight")
            mask = {"pattern": pattern, "sparsity": mlp_ratios[0] if pattern == "unstructured" else (m - n) / m,
                    "n": n or 0, "m": m or 0, "score": "wanda" if method == "wanda" else "magnitude"}
            plan = PruningPlan(arch, "unstructured" if pattern == "unstructured" else "n:m", method, mask=mask,
                               norms=norms, settings=settings, base=binding)
        result.plan = plan
        new_config = None
        try:
            new_config = pruned_config_bytes(config_raw, plan)
        except NonUniformLayers as e:   # fatal only when an HF export is asked for
            if out_dir:
                raise
            result.notes.append(str(e))
        norms_source = S.MemorySource({f"norms.{k}": v for k, v in norms.items()}) if norms else None
        checkpoint_plan = plan_pruned_checkpoint(source, plan, norms_source, where=f"prune {base}")
        run = dict(device=device, max_memory=max_memory, compression=compression, progress=progress)
        if dry_run:
            result.checkpoint = run_plan(store, checkpoint_plan, kind="checkpoint", dry_run=True, **run)
            return result
        result.plan_artifact = _commit_plan(store, plan, lineage, name, result.search)
        if new_config is not None:
            carried = {**files, "config.json": new_config}
            parents = [{**lineage, "role": "base"}, {"id": result.plan_artifact.id, "role": "pruning_plan"}]
            result.checkpoint = run_plan(store, checkpoint_plan, kind="checkpoint", parents=parents,
                                         recipe={"op": "prune", "plan": result.plan_artifact.id}, files=carried,
                                         name=name, desc="prune", **run)
    if out_dir and result.checkpoint is not None:
        export(store, result.checkpoint.artifact.id, out_dir, max_shard_size=max_shard_size, max_memory=max_memory,
               progress=progress)
        result.output = out_dir
    return result


def _apply_existing(store, base, source, lineage, files, config_raw, plan_ref, name, out_dir, max_shard_size, run,
                    dry_run) -> PruneResult:
    """The pruned checkpoint of an existing plan, after checking the plan belongs to ``base``."""
    from .plan import check_binding, check_shapes

    plan, artifact = load_plan(store, plan_ref)
    check_shapes(plan, {m.name: m.shape for m in source.metas()}, f"base {base}")
    binding = base_binding(store, base, source, lineage, plan.arch)
    check_binding(plan, binding["checksums"], f"base {base}")
    new_config = pruned_config_bytes(config_raw, plan)
    norms = S.MemorySource({f"norms.{k}": v for k, v in plan.norms.items()}) if plan.norms else None
    checkpoint_plan = plan_pruned_checkpoint(source, plan, norms, where=f"prune {base}")
    result = PruneResult(plan=plan, plan_artifact=artifact)
    parents = [{**lineage, "role": "base"}, {"id": artifact.id, "role": "pruning_plan"}]
    result.checkpoint = run_plan(store, checkpoint_plan, kind="checkpoint", parents=parents,
                                 recipe={"op": "prune", "plan": artifact.id},
                                 files={**files, "config.json": new_config}, name=name, desc="prune", dry_run=dry_run,
                                 **run)
    if out_dir and not dry_run:
        export(store, result.checkpoint.artifact.id, out_dir, max_shard_size=max_shard_size,
               max_memory=run["max_memory"], progress=run["progress"])
        result.output = out_dir
    return result


def _ratios(arch, method, pattern, ratio, head_ratio, per_layer, keep_first, keep_last, searching, target_ratio):
    n = arch.num_layers
    if keep_first + keep_last >= n and (ratio or per_layer or searching):
        raise InvalidParameter(f"--keep-first {keep_first} and --keep-last {keep_last} leave none of the {n} layers "
                               "to prune")
    if method == "index" or PATTERNS[pattern] is not None:      # index files and n:m masks take no ratio
        return [0.0] * n, [0.0] * n
    if searching:
        S.check_ratio(target_ratio, "--target-ratio")
        return [0.0] * n, S.layer_ratios(n, head_ratio, keep_first=keep_first, keep_last=keep_last, what="--head-ratio")
    if per_layer:
        mlp, heads = S.read_per_layer_file(per_layer)
        keep = {"keep_first": keep_first, "keep_last": keep_last}
        return (S.layer_ratios(n, None, mlp if mlp is not None else [0.0] * n, **keep),
                S.layer_ratios(n, None, heads if heads is not None else [0.0] * n, **keep))
    if ratio is None:
        raise InvalidParameter("give --ratio R, --per-layer FILE, --index FILE or --search evolutionary")
    mlp = S.layer_ratios(n, ratio, keep_first=keep_first, keep_last=keep_last)
    heads = S.layer_ratios(n, head_ratio, keep_first=keep_first, keep_last=keep_last, what="--head-ratio")
    return mlp, (heads if pattern == "structured" else [0.0] * n)


def _structured(source, arch, method, norms, score_file, index_file, mlp_ratios, head_ratios, max_memory, device):
    if method == "index":
        if not index_file:
            raise InvalidParameter("--method index needs --index FILE")
        return read_index_file(index_file, arch)
    if method == "scores":
        if not score_file:
            raise InvalidParameter("--method scores needs --scores FILE")
        ch, hd = S.read_score_file(score_file, arch)
    elif any(mlp_ratios) or any(head_ratios):
        ch, hd = S.unit_scores(source, arch, "wanda" if method == "wanda" else "l2", norms, max_memory=max_memory,
                               device=device)
    else:
        return {}, {}
    return S.select(ch, hd, mlp_ratios, head_ratios)


def _search(model, blocks, arch, source, method, norms, score_file, head_ratios, target_ratio, keep_first, keep_last,
            settings, state_path, binding, max_memory, device):
    """Channel levels per prunable layer by DarwinLM's search; returns (channels, SearchResult)."""
    from . import calibrate as C
    from .search import search

    if method == "scores":
        ch, hd = S.read_score_file(score_file, arch)
    else:
        ch, hd = S.unit_scores(source, arch, "wanda" if method == "wanda" else "l2", norms, max_memory=max_memory,
                               device=device)
    layers = [i for i in range(arch.num_layers) if keep_first <= i < arch.num_layers - keep_last]
    order = {i: _ascending(ch[i]) for i in layers}          # lowest score first: pruned first
    heads = {i: [k for k in range(arch.num_kv_heads) if k not in S.keep_top(hd[i], r, f"layer {i} key-value heads")]
             for i, r in enumerate(head_ratios) if r > 0}
    zeroed = C.ZeroedModel(model, arch)
    size = arch.intermediate_size

    def pruned_of(levels):
        return {i: sorted(order[i][: int(round(lv / settings.levels * size))]) for i, lv in zip(layers, levels)}

    def fitness(levels, samples):
        zeroed.apply(pruned_of(levels), heads)
        return C.mean_loss(model, blocks[:samples])
    identity = json.dumps([binding.get("id") or binding["checksums"], method, head_ratios, len(blocks)], sort_keys=True)
    result = search(fitness, len(layers), target_ratio, settings, state_path, identity)
    pruned = pruned_of(result.levels)
    channels = {i: tuple(j for j in range(size) if j not in set(p)) for i, p in pruned.items() if p}
    for i, kept in channels.items():
        if not kept:
            raise InvalidParameter(f"search: layer {i} would lose every MLP channel")
    return channels, result


def _ascending(scores) -> list[int]:
    """Unit indices from the lowest score to the highest (ties: lower index first)."""
    import torch

    return [int(i) for i in torch.sort(scores, stable=True).indices]


def _commit_plan(store: Store, plan: PruningPlan, lineage: dict, name: str | None, search_result) -> Artifact:
    from ..io.base import TensorMeta

    tensors = plan.tensors()
    info = plan.info()
    recipe = {"op": "prune", "method": plan.method, "structure": plan.structure}
    if search_result is not None:
        recipe["search"] = {"levels": search_result.levels, "fitness": search_result.fitness,
                            "uniform_fitness": search_result.uniform_fitness, "log": search_result.log}
    writer = store.create(job_key("pruning_plan", info, recipe, sorted(tensors)))
    try:
        writer.prepare([TensorMeta(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in tensors.items()])
        done = writer.completed()
        for n, t in tensors.items():
            if n not in done:
                if t.numel():
                    writer.write_rows(n, 0, t)
                writer.finish(n)
        artifact = writer.commit(kind="pruning_plan", parents=[{**lineage, "role": "base"}], recipe=recipe, info=info)
    except BaseException:
        writer.abort()
        raise
    if name:
        store.tag(artifact.id, f"{name}-plan")
    return artifact


def load_plan(store: Store, ref: str) -> tuple[PruningPlan, Artifact]:
    """The pruning plan artifact ``ref`` (FormatError if it is another kind)."""
    artifact = store.get(ref)
    if artifact.kind != "pruning_plan":
        raise FormatError(f"artifact {artifact.short_id} ({ref}) is a {artifact.kind}, not a pruning_plan")
    with store.open(ref) as src:
        tensors = {n: src.read(n) for n in src.keys()}
    return PruningPlan.from_artifact(artifact.manifest.info, tensors, f"pruning plan {artifact.short_id}"), artifact


__all__ = ["PruneResult", "base_binding", "load_plan", "model_checksums", "prune", "pruned_config"]
