"""The store-level LoRA verbs that factor weights by SVD, streamed one target module at a time:
``extract`` (an adapter of a fine-tune, a diff artifact or a delta-stored checkpoint against its
base) and ``svd_init`` (PiSSA / GOAT adapters and their residual base). The factors are staged
in the store and journaled, so a killed run resumes to the same artifacts.
"""
from __future__ import annotations

import os

from ..engine.options import RunOptions
from ..errors import BaseMismatch, InvalidParameter
from ..runs import resolve_input, run_plan
from ..store.store import Store
from .artifacts import DictSource, adapter_info, base_checksums, binding, commit_adapter, export_adapter
from .verb_support import LoraResult, check_out_dir, check_rank_energy, device_type, finish


def diff_parent(store: Store, ft: str, base: str | None) -> tuple[str, bool]:
    """(the base to extract ``ft`` against, whether ``ft`` is a diff artifact).

    A diff artifact or a delta-stored checkpoint (``tsllm diff`` / ``import --delta-of``) is
    read through the diff reader, its tensors rebuilt block by block from its parent, and its
    parent is the base by default. A diff is ``ft - parent``: a ``base`` other than its parent
    (by id, or by the checksums the diff was stored against) is refused with BaseMismatch. A
    delta-stored checkpoint is a whole model and may be compared with any base.
    """
    artifact = store.get(ft) if store is not None and not os.path.exists(ft) and store.has(ft) else None
    # diff.store.is_delta, without importing the diff package: it loads numba (~60 MiB, ~1 s),
    # needed only to decode deltas (a directory or a plain checkpoint artifact has none)
    if artifact is None or not isinstance(artifact.manifest.info.get("delta"), dict):
        if base is None:
            raise InvalidParameter(f"lora extract: give --base, the model {ft} was fine-tuned from (it is not a diff "
                                   "artifact or a delta-stored checkpoint, whose parent would be the base)")
        return base, False
    from ..diff.store import DeltaSection

    section = DeltaSection.from_info(artifact.manifest.info, f"artifact {artifact.short_id}")
    is_diff = artifact.kind == "diff"
    if base is None:
        return section.base_id, is_diff
    if is_diff:
        source, lineage, _ = resolve_input(store, base)
        with source:
            if lineage.get("id") != section.base_id:
                names = sorted(section.base_checksums)
                missing = [n for n in names if n not in set(source.keys())]
                have = {} if missing else base_checksums(store, source, lineage, names)
                differ = missing or [n for n in names if have[n] != section.base_checksums[n]]
                if differ:
                    raise BaseMismatch(f"lora extract: diff {artifact.short_id} was taken against artifact "
                                       f"{section.base_id[:12]}, and --base {base} differs in {len(differ)} of its "
                                       f"tensors (e.g. {differ[0]!r}); leave --base out to use the diff's parent")
    return base, is_diff


def extract(store: Store, ft: str, base: str | None = None, *, rank: int | None = None, energy: float | None = None,
            max_rank: int = 128, targets: list[str] | None = None, name: str | None = None,
            out_dir: str | None = None, seed: int | None = None, svd: str = "auto",
            options: RunOptions | None = None, **run_options) -> LoraResult:
    """A LoRA adapter of the fine-tune ``ft`` against ``base``, streamed per target module
    (:func:`.streamed.extract`, ``svd``: auto / exact / randomized), committed bound to ``base``.

    ``ft`` may be a diff artifact or a delta-stored checkpoint: its tensors are rebuilt block by
    block by the diff reader and ``base`` defaults to its parent (see :func:`diff_parent`); the
    adapter equals the one extracted from the fine-tune and its base with the same seed. The
    factors are staged in the store and journaled, so a killed run resumes to the same artifact
    (``report["resumed"]``: tensors an earlier run had finished).

    Args:
        seed: the run seed (default: ``options.seed``, 0); only ``svd="randomized"`` draws from it.
        options / run_options: how to run (:class:`RunOptions`, or its fields as keywords).
    Example: ``extract(store, "ft", "base", rank=64, name="ft-lora", max_memory="512M")``.
    """
    from ..engine.memory import release_free_heap
    from ..ops.lora_extract import SVD_CHOICES
    from .resumable import StagedFactorSink
    from .streamed import extract as run_extract

    opts = RunOptions.of(options, **run_options)
    opts = opts if seed is None else opts.replace(seed=seed)
    check_rank_energy(rank, energy, "lora extract")
    if svd not in SVD_CHOICES:
        raise InvalidParameter(f"lora extract: --svd must be one of {', '.join(SVD_CHOICES)}, got {svd!r}")
    check_out_dir(out_dir)
    base, is_diff = diff_parent(store, ft, base)
    base_src, base_lineage, _ = resolve_input(store, base)
    ft_src, ft_lineage, _ = resolve_input(store, ft)
    key = ("lora_extract", base_src.identity, ft_src.identity, rank, energy, max_rank, targets, opts.seed, svd,
           device_type(opts))
    with base_src, ft_src, StagedFactorSink(store, key) as sink:
        ex = run_extract(base_src, ft_src, rank=rank, energy=energy, max_rank=max_rank, targets=targets, sink=sink,
                         svd=svd, options=opts)
        release_free_heap()   # the factors' read-back left ~30 MiB of freed buffers in the heap (1 GB, r64)
        bound = binding(store, base_src, base_lineage, ex.adapter)
        ft_role = "diff" if is_diff else "finetuned"
        return finish(store, ex.adapter, bound,
                      parents=[{**base_lineage, "role": "base"}, {**ft_lineage, "role": ft_role}],
                      recipe={"op": "lora_extract", "rank": rank, "energy": energy,
                              "max_rank": max_rank if energy else None, "seed": opts.seed, "svd": svd},
                      name=name, out_dir=out_dir, report={"modules": ex.modules, "totals": ex.totals},
                      resumed=sink.resumed)


def svd_init(store: Store, base: str, *, rank: int, method: str = "pissa", experts: int = 1,
             alpha: float | None = None, targets: list[str] | None = None, name: str | None = None,
             out_dir: str | None = None, options: RunOptions | None = None, **run_options) -> LoraResult:
    """PiSSA / GOAT initialisation: a residual-base checkpoint artifact (targets W0 - s·B·A in
    fp32) and the adapter(s) bound to it, so residual + adapter == W0 to fp32 rounding.

    The factors are staged in the store and journaled, the residual streams like any checkpoint
    job and each adapter's commit is keyed by its content, so a killed run resumes to the same
    artifacts (``report["resumed"]``: tensors an earlier run had finished).

    Args:
        options / run_options: how to run (:class:`RunOptions`, or its fields as keywords).
    Returns: artifacts = [residual base, adapter (or one per GOAT expert)].
    Example: ``svd_init(store, "base", rank=16, method="pissa", name="pissa16")``.
    """
    from .resumable import StagedFactorSink
    from .streamed import residual_plan, stacked_factors
    from .streamed import svd_init as run_init

    opts = RunOptions.of(options, **run_options)
    if method not in ("pissa", "goat"):
        raise InvalidParameter(f"lora init: --method must be pissa or goat, got {method!r}")
    if rank < 1:
        raise InvalidParameter(f"lora init: --rank must be >= 1, got {rank}")
    check_out_dir(out_dir)
    source, lineage, files = resolve_input(store, base)
    key = ("lora_init", source.identity, rank, method, experts, alpha, targets, device_type(opts))
    with source, StagedFactorSink(store, key) as sink:
        adapters = run_init(source, rank=rank, method=method, experts=experts, alpha=alpha, targets=targets, sink=sink,
                            options=opts)
        resumed = list(sink.resumed)
        plan = residual_plan(source, adapters, DictSource(stacked_factors(adapters)))
        recipe = {"op": "lora_init", "method": method, "rank": rank, "experts": len(adapters), "alpha": alpha}
        done = run_plan(store, plan, kind="checkpoint", parents=[{**lineage, "role": "base"}], recipe=recipe,
                        files=files, name=f"{name}-residual" if name else None, desc=f"lora init {method}",
                        options=opts)
        residual = done.artifact
        resumed += done.skipped
        out = LoraResult([residual], output=out_dir, report={"experts": len(adapters), "rank": rank})
        with store.open(residual.id) as res_src:
            for e, ad in enumerate(adapters):
                bound = binding(store, res_src, {"id": residual.id}, ad)
                tag = (name if len(adapters) == 1 else f"{name}-expert{e}") if name else None
                art = commit_adapter(store, ad, info=adapter_info(ad, bound),
                                     parents=[{"id": residual.id, "role": "base"}],
                                     recipe={**recipe, "expert": e}, name=tag, resumed=resumed)
                out.artifacts.append(art)
                if out_dir:
                    one_dir = out_dir if len(adapters) == 1 else os.path.join(out_dir, f"expert-{e}")
                    export_adapter(store, art.id, one_dir)
    out.report["resumed"] = len(resumed)
    return out


__all__ = ["diff_parent", "extract", "svd_init"]
