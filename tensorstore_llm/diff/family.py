"""Families of base releases: the deltas stored on each, and the transfers between them.

A *release* is a fully stored artifact that deltas hang off; its tree holds every artifact
stored as a delta of it (recursively: chains), and every artifact made by ``apply`` onto it.
A transfer made from a diff of release A onto release B links A to B, so the family of a base
is every release reachable through transfers, in either direction, oldest first.
"""
from __future__ import annotations

from ..units import format_size
from .store import is_delta


def _links(artifact) -> tuple[str | None, dict | None]:
    """(delta parent id, apply / transfer record) of one artifact."""
    info = artifact.manifest.info
    parent = info.get("base", {}).get("id") if is_delta(artifact) else None
    record = info.get("transfer") or info.get("apply")
    return parent, record if isinstance(record, dict) else None


def family_tree(store, ref: str) -> tuple[list, dict, dict]:
    """(releases oldest first, children by id, artifacts by id) of the family of base ``ref``."""
    artifacts = {a.id: a for a in store.list()}
    children: dict[str, list] = {}
    delta_parent, applied = {}, {}
    for a in artifacts.values():
        parent, record = _links(a)
        if parent:
            delta_parent[a.id] = parent
            children.setdefault(parent, []).append(a.id)
        if record and record.get("onto"):
            applied[a.id] = record
            children.setdefault(record["onto"], []).append(a.id)

    def root(artifact_id: str) -> str:
        seen = set()
        while artifact_id in delta_parent and artifact_id not in seen:
            seen.add(artifact_id)
            artifact_id = delta_parent[artifact_id]
        return artifact_id

    edges: dict[str, set] = {}
    for record in applied.values():
        a, b = root(record.get("from_base", "")), root(record["onto"])
        if a != b:
            edges.setdefault(a, set()).add(b)
            edges.setdefault(b, set()).add(a)
    start = root(store.resolve(ref))
    family, todo = {start}, [start]
    while todo:
        for other in edges.get(todo.pop(), ()):
            if other not in family:
                family.add(other)
                todo.append(other)
    order = sorted(family, key=lambda i: (artifacts[i].manifest.created_at, i) if i in artifacts else ("", i))
    return order, children, artifacts


def family_lines(store, ref: str) -> list[str]:
    """The family of base ``ref`` as printable tree lines (``tsllm log --family``)."""
    releases, children, artifacts = family_tree(store, ref)
    tags: dict[str, list] = {}
    for tag, artifact_id in store.tags().items():
        tags.setdefault(artifact_id, []).append(tag)

    def label(artifact_id: str) -> str:
        names = ",".join(tags.get(artifact_id, []))
        return f"{artifact_id[:12]}{f' [{names}]' if names else ''}"

    def describe(artifact_id: str) -> str:
        from ..store.dedup import footprint

        a = artifacts[artifact_id]
        info = a.manifest.info
        if is_delta(a):
            codec = info["delta"]["codec"].get("name")
            return (f"{a.kind} as delta ({codec}, depth {info['delta']['depth']}) {label(a.id)}: "
                    f"{format_size(footprint(a).disk)} on disk for {format_size(a.manifest.nbytes)}")
        record = info.get("transfer") or info.get("apply")
        verb = "transfer" if "transfer" in info else "apply"
        grown = len(record.get("grown", {}))
        extra = f", {grown} tensor(s) grown" if grown else ""
        return (f"{verb} of {label(record['diff'])} from {label(record['from_base'])} (alpha {record['alpha']}{extra}) "
                f"-> {label(a.id)}")

    lines = []

    def walk(artifact_id: str, prefix: str) -> None:
        kids = sorted(children.get(artifact_id, []), key=lambda i: (artifacts[i].manifest.created_at, i))
        for n, child in enumerate(kids):
            last = n == len(kids) - 1
            lines.append(f"{prefix}{'└── ' if last else '├── '}{describe(child)}")
            walk(child, prefix + ("    " if last else "│   "))

    for release in releases:
        a = artifacts.get(release)
        what = f"{a.kind}, {format_size(a.manifest.nbytes)}, {a.manifest.created_at}" if a else "not in this store"
        lines.append(f"release {label(release)} ({what})")
        walk(release, "")
    return lines
