"""Plans: a flat list of independent tensor jobs, built and validated before any work starts.

Every check that can fail (unknown op, bad params, missing tensor, shape or dtype disagreement)
runs here, so a job that cannot succeed fails in its first second, not hours into a 70B merge.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ..dtypes import by_name
from ..errors import DTypeError, RecipeError, ShapeMismatch, TensorNotFound
from ..io.base import TensorMeta, TensorSource
from ..ops.registry import OpSpec, get_op

ROWS = "rows"     # the input's rows start:stop arrive with the output's rows start:stop
WHOLE = "whole"   # the whole input arrives with every block (read once per job, held for it)
GATHER = "gather"  # the input's rows index[start:stop] arrive with the output's rows start:stop
RELATIONS = (ROWS, WHOLE, GATHER)
ROW_RELATIONS = (ROWS, GATHER)   # read block by block, with the output's rows


@dataclass(frozen=True)
class InputRef:
    """Tensor ``name`` of the source registered under key ``source`` in the plan, and how it
    relates to the output's rows (``relation``: ROWS, WHOLE or GATHER; e.g. a LoRA merge reads W
    and B by rows and A whole; a vocabulary remap or a pruning gather reads the rows ``index``
    names, in that order, block by block).

    Example: ``InputRef("m", "model.embed_tokens.weight", GATHER, (7, 3, 3, 0))`` gives output
    row 0 the input's row 7, rows 1 and 2 its row 3, row 3 its row 0.
    """

    source: str
    name: str
    relation: str = ROWS
    index: tuple[int, ...] | None = None   # GATHER only: the input row of each output row

    def __repr__(self) -> str:   # the plan fingerprint (and so resume keys) of row inputs stays as it was
        extra = "" if self.relation == ROWS else f", relation={self.relation!r}"
        if self.index is not None:
            digest = hashlib.sha256(",".join(map(str, self.index)).encode()).hexdigest()[:16]
            extra += f", index=<{len(self.index)} rows sha256:{digest}>"
        return f"InputRef(source={self.source!r}, name={self.name!r}{extra})"


@dataclass(frozen=True)
class TensorJob:
    """Compute one output tensor (or several) with ``op`` from its inputs; ``inputs`` maps
    role -> ref(s).

    ``output`` drives the blocking: blocks are runs of its rows. ``extra_outputs`` are further
    tensors the kernel returns (as a dict name -> tensor, ``output`` included): for an op that is
    split into row blocks they must have ``output``'s rows (e.g. BitDelta's packed signs and
    per-row scales); an op that needs whole tensors may return any shapes (LoRA A and B). A
    ``reduce_only`` job writes nothing: its statistics passes run over the inputs and what the
    last one returns is ``Executor.records[output.name]`` (``output`` then names the record and
    gives the rows to block by).
    """

    output: TensorMeta
    op: str
    inputs: tuple[tuple[str, InputRef | tuple[InputRef, ...]], ...]
    params: Any = None
    compute_dtype: str = "float32"   # what inputs are cast to before the kernel sees them
    extra_outputs: tuple[TensorMeta, ...] = ()
    reduce_only: bool = False

    def refs(self) -> list[InputRef]:
        out = []
        for _role, refs in self.inputs:
            out.extend(refs if isinstance(refs, tuple) else (refs,))
        return out

    def outputs(self) -> tuple[TensorMeta, ...]:
        """Every tensor this job writes (none for a reduction)."""
        return () if self.reduce_only else (self.output, *self.extra_outputs)

    def row_aligned(self, meta: TensorMeta) -> bool:
        """Whether output ``meta`` is produced block by block with ``output``'s rows."""
        return bool(meta.shape) and bool(self.output.shape) and meta.shape[0] == self.output.shape[0]


@dataclass
class Plan:
    """Jobs plus the sources they read; ``fingerprint`` identifies the result for resume."""

    jobs: list[TensorJob]
    sources: dict[str, TensorSource]
    description: dict = field(default_factory=dict)

    def input_meta(self, ref: InputRef) -> TensorMeta:
        return self.sources[ref.source].meta(ref.name)

    def fingerprint(self) -> str:
        """Hash of the source identities and every job: equal fingerprints give equal results."""
        body = {"sources": {k: s.identity for k, s in sorted(self.sources.items())},
                "jobs": [[j.output.name, list(j.output.shape), j.output.dtype, j.op, repr(j.inputs), repr(j.params)]
                         + ([j.compute_dtype] if j.compute_dtype != "float32" else [])
                         + ([[m.name, list(m.shape), m.dtype] for m in j.extra_outputs] if j.extra_outputs else [])
                         + (["reduce"] if j.reduce_only else [])
                         for j in self.jobs]}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    @property
    def output_bytes(self) -> int:
        return sum(m.nbytes for j in self.jobs for m in j.outputs())

    @property
    def input_bytes(self) -> int:
        return sum(self.input_meta(r).nbytes for j in self.jobs for r in j.refs())

    def validate(self, where: str = "plan") -> None:
        """Check what every job promises about its inputs and outputs (RecipeError / ShapeMismatch
        naming the tensor): relations are known, ROWS inputs have the output's rows, output names
        are unique, and the extra outputs of a row-split op have the output's rows."""
        seen: set[str] = set()
        for job in self.jobs:
            spec = get_op(job.op)
            for ref in job.refs():
                if ref.relation not in RELATIONS:
                    raise RecipeError(f"{where}: input {ref.name!r} of {job.output.name!r} has relation {ref.relation!r}; "
                                      f"expected one of {', '.join(RELATIONS)}")
                meta = self.input_meta(ref)
                if ref.relation == ROWS and meta.rows != job.output.rows and job.output.numel:
                    raise ShapeMismatch(f"{where}: input {ref.name!r} ({meta.rows} rows) is read by rows for "
                                        f"{job.output.name!r}, which has {job.output.rows}")
                if ref.relation == GATHER:
                    _check_index(ref, meta, job, where)
            for meta in job.outputs():
                if meta.name in seen:
                    raise RecipeError(f"{where}: two jobs write tensor {meta.name!r}")
                seen.add(meta.name)
            if spec.rowwise and job.output.shape:
                for meta in job.extra_outputs:
                    if not job.row_aligned(meta):
                        raise RecipeError(f"{where}: op {job.op!r} is split into row blocks, so its extra output "
                                          f"{meta.name!r} {list(meta.shape)} must have the {job.output.rows} rows of "
                                          f"{job.output.name!r}")
            if job.reduce_only and not spec.passes_for(job.params):
                raise RecipeError(f"{where}: op {job.op!r} has no statistics passes, so it cannot be a reduction job")


def plan_map(op_name: str, sources: Mapping[str, TensorSource], roles: Mapping[str, str | list[str]], *,
             params: dict | None = None, names: Iterable[str] | None = None, dtype: str | None = None,
             float_only_dtype: bool = True, where: str = "plan") -> Plan:
    """Apply one op to every tensor name, reading the same-named tensor from each role's source(s).

    Args:
        sources: source key -> opened TensorSource.
        roles: op role -> source key (or list of keys for a variadic role).
        names: tensors to process (default: every tensor of the first role's first source).
        dtype: output dtype (default: the first input's); with ``float_only_dtype`` only float
            tensors are converted and integer / bool tensors keep their dtype.
    Returns:
        A validated Plan. Raises TensorNotFound / ShapeMismatch / RecipeError naming the tensor.
    """
    spec = get_op(op_name)
    _check_roles(spec, roles, where)
    op_params = spec.make_params(params, where)
    counts = {r: len(v) if isinstance(v, list) else 1 for r, v in roles.items()}
    if hasattr(op_params, "validate_inputs"):
        try:
            op_params.validate_inputs(counts)
        except ValueError as e:
            raise RecipeError(f"{where}: {op_name!r}: {e}") from None
    first_key = _keys(roles[spec.roles[0].name])[0]
    names = list(names) if names is not None else list(sources[first_key].keys())
    out_dtype = by_name(dtype).name if dtype else None
    jobs = []
    for name in names:
        inputs, metas = [], []
        for role in spec.roles:
            keys = _keys(roles[role.name])
            refs = tuple(InputRef(k, name) for k in keys)
            for ref in refs:
                metas.append((ref.source, _meta_of(sources, ref)))
            inputs.append((role.name, refs if role.variadic else refs[0]))
        check_agreement(name, metas, sources, where)
        shape = metas[0][1].shape
        in_dtype = metas[0][1].dtype
        target = out_dtype if out_dtype and (by_name(in_dtype).is_float or not float_only_dtype) else in_dtype
        jobs.append(TensorJob(TensorMeta(name, shape, target), op_name, tuple(inputs), op_params))
    return Plan(jobs, dict(sources))


def check_agreement(name: str, metas: list[tuple[str, TensorMeta]], sources: Mapping[str, TensorSource], where: str) -> None:
    """Every input of one output tensor must have the same shape and dtype (else a clear error)."""
    first_key, first = metas[0]
    for key, meta in metas[1:]:
        if meta.shape != first.shape:
            raise ShapeMismatch(f"{where}: tensor {name!r} has shape {meta.shape} in {_describe(sources, key)} "
                                f"but {first.shape} in {_describe(sources, first_key)}")
        if meta.dtype != first.dtype:
            raise DTypeError(f"{where}: tensor {name!r} is {meta.dtype} in {_describe(sources, key)} but {first.dtype} "
                             f"in {_describe(sources, first_key)}; convert one first (tsllm convert --dtype)")


def _keys(value: str | list[str]) -> list[str]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_roles(spec: OpSpec, roles: Mapping[str, Any], where: str) -> None:
    expected = {r.name for r in spec.roles}
    if set(roles) != expected:
        raise RecipeError(f"{where}: op {spec.name!r} takes inputs {sorted(expected)}, got {sorted(roles)}")
    for role in spec.roles:
        if not role.variadic and isinstance(roles[role.name], (list, tuple)) and len(roles[role.name]) != 1:
            raise RecipeError(f"{where}: op {spec.name!r} takes one {role.name!r} input")
        if role.variadic and not _keys(roles[role.name]):
            raise RecipeError(f"{where}: op {spec.name!r} needs at least one {role.name!r} input")


def _meta_of(sources: Mapping[str, TensorSource], ref: InputRef) -> TensorMeta:
    source = sources[ref.source]
    try:
        return source.meta(ref.name)
    except TensorNotFound:
        raise TensorNotFound(f"tensor {ref.name!r} is missing from {_describe(sources, ref.source)}") from None


def _describe(sources: Mapping[str, TensorSource], key: str) -> str:
    path = getattr(sources[key], "path", None)
    return f"input {key} ({path})" if path else f"input {key}"


def _check_index(ref: InputRef, meta: TensorMeta, job: TensorJob, where: str) -> None:
    """A GATHER input names one input row per output row, each within the input."""
    index = ref.index
    if index is None or len(index) != job.output.rows:
        raise ShapeMismatch(f"{where}: gathered input {ref.name!r} of {job.output.name!r} needs an index of "
                            f"{job.output.rows} rows (one per output row), got "
                            f"{'none' if index is None else len(index)}")
    bad = next((i for i in index if not 0 <= i < meta.rows), None)
    if bad is not None:
        raise ShapeMismatch(f"{where}: gathered input {ref.name!r} of {job.output.name!r} has {meta.rows} rows; "
                            f"its index names row {bad}")
