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
from ..errors import BaseMismatch, FormatError, IntegrityError, ShapeMismatch, TensorNotFound
from ..io.base import TensorMeta
from ..store.store import Store, job_key
from .store import DeltaSection, is_delta


@dataclass
class ApplyResult:
    """What ``apply_diff`` made: the artifact, and the shape rules it used (tensor -> rows)."""

    artifact: object
    transfer: bool
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
               name: str | None = None, max_memory=DEFAULT_MAX_MEMORY) -> ApplyResult:
    """Apply diff ``diff_ref`` onto ``onto_ref`` and commit the result as a checkpoint.

    Args:
        alpha: scale of Δ. Onto the diff's own base with alpha 1 the result is the fine-tune,
            checked tensor by tensor against the checksums the diff recorded.
        transfer: allow a base other than the diff's own (fine-tuning transfer).
        max_memory: budget for the rows held at once (about 3 input blocks and fp32 temporaries);
            ``"auto"`` (the default) is 2 GiB here (``default_budget.budget_bytes``).
    Returns:
        ApplyResult with the artifact and the tensors that grew or were copied.

    Example:
        >>> apply_diff(store, "ft-diff", "base-v2", transfer=True, name="ft-v2")   # doctest: +SKIP
    """
    diff, section, onto, exact, modes = plan_apply(store, diff_ref, onto_ref, transfer, alpha)
    result = ApplyResult(None, transfer or not same_base(section, onto))
    budget = budget_bytes(max_memory)
    key = job_key("apply", diff.id, onto.id, float(alpha), bool(transfer))
    with store.open(diff.id) as ft_src, store.open(section.base_id) as base_src, store.open(onto.id) as new_src:
        metas = list((diff if exact else onto).manifest.metas().values())
        writer = store.create(key)
        try:
            writer.prepare(metas)
            done = writer.completed()
            for meta in metas:
                mode, old = modes[meta.name]
                if mode == "grown":
                    result.grown[meta.name] = (old.rows, meta.rows)
                elif mode == "copy":
                    result.copied.append(meta.name)
                if meta.name in done:
                    result.skipped.append(meta.name)
                    continue
                rows = _block_rows(meta, budget, writer.preferred_rows(meta))
                for start in range(0, meta.rows if meta.numel else 0, rows):
                    stop = min(meta.rows, start + rows)
                    writer.write_rows(meta.name, start, _block(mode, old, meta, start, stop, alpha,
                                                               ft_src, base_src, new_src))
                checksum = writer.finish(meta.name)
                if exact and checksum != diff.manifest.tensors[meta.name].checksum:
                    raise IntegrityError(f"diff {diff.short_id}: tensor {meta.name!r} applied onto its own base does not "
                                         f"reproduce the fine-tune ({checksum[:23]}... != recorded "
                                         f"{diff.manifest.tensors[meta.name].checksum[:23]}...)")
        except KeyboardInterrupt:
            writer.close()
            raise
        except BaseException:
            writer.abort()
            raise
    op = "transfer" if result.transfer else "apply"
    recipe = {"op": op, "alpha": float(alpha), "from_base": section.base_id}
    info = {op: {"diff": diff.id, "from_base": section.base_id, "onto": onto.id, "alpha": float(alpha),
                 "grown": {n: list(r) for n, r in sorted(result.grown.items())}, "copied": sorted(result.copied)}}
    files = store.carried_files(onto.id if result.transfer else diff.id)
    result.artifact = writer.commit(kind="checkpoint", parents=[{"id": diff.id, "role": "diff"},
                                                               {"id": onto.id, "role": "onto"}],
                                    recipe=recipe, files=files, info=info)
    if name:
        store.tag(result.artifact.id, name)
    return result


def _block_rows(meta: TensorMeta, budget: int, align: int) -> int:
    """Rows per block: three stored inputs, the output and four fp32 temporaries per row."""
    per_row = max(1, meta.row_numel * (4 * by_name(meta.dtype).itemsize + 16))
    rows = max(1, min(meta.rows, budget // per_row))
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
