"""Immutable artifacts, lineage, tags, atomic commits, verification and garbage collection."""
from .manifest import KINDS, Manifest, TensorRecord
from .store import Artifact, Store, default_root
from .writer import ArtifactWriter, job_key

__all__ = ["Artifact", "ArtifactWriter", "KINDS", "Manifest", "Store", "TensorRecord", "default_root", "job_key"]
