"""The typed, versioned ``info`` section of a manifest: what each kind of artifact must record.

``info`` holds the facts that make an artifact usable and safe to use: a logits dataset's
fingerprint (so a student with another tokenizer or packing is refused), a diff's or adapter's
binding to its exact base (so it is never applied to another base silently), a pruning plan's
base and method. Each kind that has such facts has a schema here, with a version; a commit
checks ``info`` against it (FormatError naming the field) and the manifest records
``info_schema`` ("logits/1"), so a later version can still read older artifacts. Fields beyond
the schema are kept as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import FormatError


@dataclass(frozen=True)
class InfoSchema:
    """Fields an artifact kind's ``info`` must have, with their JSON types."""

    kind: str
    version: int
    required: dict

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.version}"

    def check(self, info: dict, where: str) -> None:
        """Raise FormatError unless every required field is present with its type."""
        for field, types in self.required.items():
            if field not in info:
                raise FormatError(f"{where}: {self.kind} info lacks {field!r} (schema {self.name} needs "
                                  f"{', '.join(sorted(self.required))})")
            if not isinstance(info[field], types) or isinstance(info[field], bool) and bool not in _as_tuple(types):
                raise FormatError(f"{where}: {self.kind} info field {field!r} is {type(info[field]).__name__}, "
                                  f"expected {' or '.join(t.__name__ for t in _as_tuple(types))}")


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


# the base an artifact is bound to: its id (when it is in the store) and the checksums of the
# tensors the artifact depends on
_BINDING = {"base": dict}

SCHEMAS: dict[str, InfoSchema] = {s.kind: s for s in (
    InfoSchema("logits", 1, {"fingerprint": str, "kind": str, "tokenizer": str, "packing": dict, "sampling": dict,
                             "vocab": int, "seq_len": int}),
    # diff/2: the blocks of the delta-stored tensors and the parent's chain depth (diff/store.py)
    InfoSchema("diff", 2, {**_BINDING, "codec": str, "delta": dict}),
    InfoSchema("lora", 1, {**_BINDING, "ranks": dict, "alpha": (int, float)}),
    # 2: what recovery and export need without reading tensors: the structure (structured /
    # unstructured / n:m), the full model's sizes and the pruned sizes per layer
    InfoSchema("pruning_plan", 2, {**_BINDING, "method": str, "structure": str, "original": dict, "layers": list}),
    # a result written straight to a Hugging Face directory (tsllm merge -o): no tensors in the
    # store, only its lineage, the directory and each tensor's [shape, dtype, checksum]
    InfoSchema("export", 1, {"output": str, "tensors": dict}),
)}


def check_info(kind: str, info: dict, where: str) -> str | None:
    """Validate ``info`` for an artifact of ``kind``; returns the schema name to record (None for
    kinds without a schema, whose info is free-form)."""
    schema = SCHEMAS.get(kind)
    if schema is None:
        return None
    schema.check(info, where)
    return schema.name
