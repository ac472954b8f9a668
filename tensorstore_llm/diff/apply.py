"""Apply a diff: onto its own base (the fine-tune back, bit for bit) or onto another release.

Fine-tuning transfer (arXiv 2503.20110; ParamΔ, arXiv 2504.21023): with Δ = θ_ft − θ_base from
an older base release, the new fine-tune is ``θ'_ft = θ'_base + α · Δ``, computed per element in
fp32 as ``base'.float() + α * (ft.float() − base.float())`` and rounded once to the new base's
dtype. It is allowed only when asked for (``transfer=True``) and is recorded in the lineage.

Shape rules between releases (checked before anything is computed):
- a tensor in both with the same shape: the formula above;
- vocabulary growth: the new release has more rows (same row shape) than the diff; rows the old
  diff does not have get Δ = 0, i.e. the new base's rows, and are reported;
- a tensor only in the new base (or not a float): copied from it, reported;
- a tensor the diff changes that the new base lacks, or any other shape change: an error;
- a tensor the fine-tune itself added or reshaped (stored raw, not as a delta of the old base)
  has no Δ: scaling or transferring it is an error (applying onto its own base copies it).

Applying a diff onto a base other than its own without ``transfer`` raises BaseMismatch before
any tensor is read. Onto its own base with α = 1 every output tensor is compared with the
checksum the diff recorded for the fine-tune, so the result is the fine-tune, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..default_budget import DEFAULT_MAX_MEMORY, budget_bytes
from ..dtypes import by_name
from ..engine.options import RunOptions
from ..errors import BaseMismatch, FormatError, IntegrityError, InvalidParameter, ShapeMismatch, TensorNotFound
from ..io.base import TensorMeta
from ..io.hf_dir import HFCheckpointSink
from ..runs import commit_export_record, export, keep_or_discard, run_record
from ..store.store import Store, job_key
from ..units import parse_size
from .store import DeltaSection, is_delta


@dataclass
class ApplyResult:
    """What ``apply_diff`` made: the artifact (a checkpoint, or the export record of a directory
    written in one pass), the directory written (``output``), and the shape rules it used."""

    artifact: object
    transfer: bool
    output: str | None = None
    grown: dict = field(default_factory=dict)     # tensor -> (rows in the diff, rows in the new base)
    copied: list = field(default_factory=list)    # tensors taken from the new base unchanged
    skipped: list = field(default_factory=list)   # finished by an interrupted earlier run


def same_base(section: DeltaSection, onto) -> bool:
    """Whether ``onto`` is the diff's own base: the same id, or every bound tensor's checksum
    (the same weights imported from another path)."""
    if onto.id == section.base_id:
        return True
    tensors = onto.manifest.tensors
    return all(n in tensors and tensors[n].checksum == c for n, c in section.base_checksums.items())


def plan_apply(store: Store, diff_ref: str, onto_ref: str, transfer: bool = False, alpha: float = 1.0):
    """Check a request before any work: (diff artifact, section, onto artifact, exact?,
    {output tensor: (mode, ft meta or None)}). ``exact``: onto its own base with alpha 1 and no
    transfer, the output is the fine-tune itself (mode "ft" for every tensor of the diff).
    Raises BaseMismatch, ShapeMismatch, TensorNotFound."""
    diff = store.get(diff_ref)
    where = f"diff {diff.short_id}"
    if not is_delta(diff):
        raise FormatError(f"{where}: artifact {diff_ref!r} ({diff.kind}) is not a diff or delta-stored checkpoint")
    section = DeltaSection.from_info(diff.manifest.info, where)
    onto = store.get(onto_ref)
    own = same_base(section, onto)
    if not own and not transfer:
        differing = next((n for n, c in section.base_checksums.items()
                          if n not in onto.manifest.tensors or onto.manifest.tensors[n].checksum != c), "?")
        raise BaseMismatch(f"{where} was made against base {section.base_id[:12]}; {onto_ref!r} ({onto.short_id}) is "
                           f"another base (tensor {differing!r} differs). Applying it there is fine-tuning transfer: "
                           f"pass --transfer to do it on purpose")
    ft_metas, onto_metas = diff.manifest.metas(), onto.manifest.metas()
    if own and not transfer and alpha == 1.0:
        return diff, section, onto, True, {n: ("ft", m) for n, m in ft_metas.items()}
    missing = [n for n in ft_metas if n not in onto_metas]
    if missing:
        raise TensorNotFound(f"{where}: the new base {onto.short_id} lacks {len(missing)} tensor(s) the diff holds, "
                             f"e.g. {missing[0]!r}")
    modes = {}
    for name, new in onto_metas.items():
        old = ft_metas.get(name)
        if old is None or not by_name(new.dtype).is_float:
            modes[name] = ("copy", None)
        elif old.shape == new.shape:
            modes[name] = ("delta", old)
        elif old.shape[1:] == new.shape[1:] and len(old.shape) >= 1 and new.shape[0] > old.shape[0]:
            modes[name] = ("grown", old)
        else:
            raise ShapeMismatch(f"{where}: tensor {name!r} is {list(old.shape)} in the diff and {list(new.shape)} in "
                                f"the new base {onto.short_id}; only growth of the first axis (vocabulary) is supported")
        entry = section.tensors.get(name)
        if modes[name][0] != "copy" and (entry is None or entry.mode != "delta"):
            raise ShapeMismatch(f"{where}: tensor {name!r} is not a delta of the old base {section.base_id[:12]} (the "
                                f"fine-tune added it or changed its shape), so it has no (ft - base) to scale or transfer")
    return diff, section, onto, False, modes


def apply_diff(store: Store, diff_ref: str, onto_ref: str, *, alpha: float = 1.0, transfer: bool = False,
               name: str | None = None, max_memory=DEFAULT_MAX_MEMORY, out_dir: str | None = None,
               max_shard_size="5G", keep_artifact: bool = False) -> ApplyResult:
    """Apply diff ``diff_ref`` onto ``onto_ref``: commit the result as a checkpoint, or with
    ``out_dir`` write it straight into a Hugging Face directory.

    Args:
        alpha: scale of Δ. Onto the diff's own base with alpha 1 the result is the fine-tune,
            checked tensor by tensor against the checksums the diff recorded.
        transfer: allow a base other than the diff's own (fine-tuning transfer).
        max_memory: budget for the rows held at once (three input blocks, the output and fp32
            temporaries per row, plus the decode buffers of delta-stored inputs, which are sized
            to their share of it); ``"auto"`` (the default) is 2 GiB here
            (``default_budget.budget_bytes``).
        out_dir: write the tensors once, into this directory (shards of ``max_shard_size``, the
            carried files), staged beside it and published whole or not at all; the store keeps
            a tensorless ``export`` record of the lineage (tagged ``name``), as ``merge -o`` does
            (``runs.commit_export_record``). ``keep_artifact=True`` commits the checkpoint to the
            store as well and exports it (two writes).
    Returns:
        ApplyResult with the artifact (the checkpoint, or the export record), the directory
        written, and the tensors that grew or were copied.

    Example:
        >>> apply_diff(store, "ft-diff", "base-v2", transfer=True, name="ft-v2")   # doctest: +SKIP
    """
    diff, section, onto, exact, modes = plan_apply(store, diff_ref, onto_ref, transfer, alpha)
    result = ApplyResult(None, transfer or not same_base(section, onto))
    budget = budget_bytes(max_memory)
    key = job_key("apply", diff.id, onto.id, float(alpha), bool(transfer))
    metas = list((diff if exact else onto).manifest.metas().values())
    result.grown = {m.name: (modes[m.name][1].rows, m.rows) for m in metas if modes[m.name][0] == "grown"}
    result.copied = [m.name for m in metas if modes[m.name][0] == "copy"]
    op = "transfer" if result.transfer else "apply"
    recipe = {"op": op, "alpha": float(alpha), "from_base": section.base_id}
    info = {op: {"diff": diff.id, "from_base": section.base_id, "onto": onto.id, "alpha": float(alpha),
                 "grown": {n: list(r) for n, r in sorted(result.grown.items())}, "copied": sorted(result.copied)}}
    parents = [{"id": diff.id, "role": "diff"}, {"id": onto.id, "role": "onto"}]
    files = store.carried_files(onto.id if result.transfer else diff.id)
    into_dir = bool(out_dir) and not keep_artifact
    with store.open(diff.id) as ft_src, store.open(section.base_id) as base_src, store.open(onto.id) as new_src:
        sources = (ft_src, base_src, new_src)
        _fit_sources(sources, budget)
        extras = {m.name: sum(s.extra_read_bytes(m.name) for s in sources
                              if hasattr(s, "extra_read_bytes") and m.name in s.keys()) for m in metas}
        for meta in metas:                               # before anything is written
            _block_rows(meta, budget, extras[meta.name], 1)
        if into_dir:
            shard_bytes = parse_size(max_shard_size)
            sink = HFCheckpointSink(out_dir, max_shard_bytes=shard_bytes, job_key=job_key("apply-into-dir", key, shard_bytes),
                                    files=files, store_root=store.root)
        else:
            sink = store.create(key)
        checksums = keep_or_discard(sink, lambda: _write_all(sink, metas, modes, diff, exact, alpha, budget, extras,
                                                               sources, result))
    if into_dir:
        result.output = keep_or_discard(sink, sink.commit)
        tensors = {m.name: [list(m.shape), m.dtype, checksums[m.name]] for m in metas}
        result.artifact = commit_export_record(store, key, result.output, tensors, parents=parents, recipe=recipe,
                                               run=run_record(RunOptions(device="cpu"), "cpu", max_shard_size=shard_bytes),
                                               info=info, name=name)
        return result
    result.artifact = sink.commit(kind="checkpoint", parents=parents, recipe=recipe, files=files, info=info)
    if name:
        store.tag(result.artifact.id, name)
    if out_dir:
        result.output = export(store, result.artifact.id, out_dir, max_shard_size=max_shard_size,
                               options=RunOptions(device="cpu", max_memory=max_memory)).output
    return result


def _fit_sources(sources, budget: int) -> None:
    """Give the delta-stored sources (``fit_read_memory``) equal shares of ``budget`` for their
    decode buffers (diff/reader.py)."""
    fitting = [s for s in sources if hasattr(s, "fit_read_memory")]
    for source in fitting:
        source.fit_read_memory(budget // len(fitting))


def _write_all(sink, metas, modes, diff, exact, alpha, budget, extras, sources, result) -> dict[str, str]:
    """Write every output tensor into ``sink`` block by block (skipping those an interrupted run
    finished); onto the diff's own base, each is checked against the fine-tune's checksum.
    Returns name -> checksum."""
    ft_src, base_src, new_src = sources
    sink.prepare(metas)
    done = sink.completed()
    checksums = dict(done)
    for meta in metas:
        mode, old = modes[meta.name]
        if meta.name in done:
            result.skipped.append(meta.name)
            continue
        rows = _block_rows(meta, budget, extras[meta.name], sink.preferred_rows(meta))
        for start in range(0, meta.rows if meta.numel else 0, rows):
            stop = min(meta.rows, start + rows)
            sink.write_rows(meta.name, start, _block(mode, old, meta, start, stop, alpha, ft_src, base_src, new_src))
        checksums[meta.name] = sink.finish(meta.name)
        if exact and checksums[meta.name] != diff.manifest.tensors[meta.name].checksum:
            raise IntegrityError(f"diff {diff.short_id}: tensor {meta.name!r} applied onto its own base does not "
                                 f"reproduce the fine-tune ({checksums[meta.name][:23]}... != recorded "
                                 f"{diff.manifest.tensors[meta.name].checksum[:23]}...)")
    return checksums


def _block_rows(meta: TensorMeta, budget: int, extra: int, align: int) -> int:
    """Rows per block: three stored inputs, the output and four fp32 temporaries per row, within
    what the budget leaves beside the inputs' decode buffers (``extra``). InvalidParameter when
    not even one row fits."""
    per_row = max(1, meta.row_numel * (4 * by_name(meta.dtype).itemsize + 16))
    if extra + per_row > budget:
        raise InvalidParameter(f"apply: tensor {meta.name!r} of shape {list(meta.shape)} needs {extra + per_row} bytes "
                               f"for one row and the decode buffers of its delta-stored inputs ({extra} bytes), more "
                               f"than --max-memory ({budget} bytes); give --max-memory {extra + per_row} or more")
    rows = max(1, min(meta.rows, (budget - extra) // per_row))
    return rows - rows % align if rows > align else rows


def _block(mode, old, meta, start, stop, alpha, ft_src, base_src, new_src):
    """Output rows ``start:stop`` of one tensor (see the module docstring for the rules)."""
    if mode == "copy":
        return new_src.read_rows(meta.name, start, stop)
    if mode == "ft":
        return ft_src.read_rows(meta.name, start, stop)
    new = new_src.read_rows(meta.name, start, stop)
    limit = min(stop, old.rows) if mode == "grown" else stop
    if limit <= start:
        return new                                    # rows the old diff does not have: Δ = 0
    ft = ft_src.read_rows(meta.name, start, limit).float()
    base = base_src.read_rows(meta.name, start, limit).float()
    delta = alpha * (ft - base)
    if limit == stop:
        return (new.float() + delta).to(new.dtype)
    head = (new[:limit - start].float() + delta).to(new.dtype)
    return torch.cat([head, new[limit - start:]])


__all__ = ["ApplyResult", "apply_diff", "plan_apply", "same_base"]
