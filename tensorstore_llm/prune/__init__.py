"""Pruning: plans as artifacts (structured channels / KV heads, unstructured and N:M masks),
DarwinLM-style non-uniform search, and the pruned checkpoint (see :func:`prune`)."""
from .api import PruneResult, load_plan, prune
from .plan import PruningPlan, read_index_file
from .search import SearchSettings

__all__ = ["prune", "load_plan", "PruneResult", "PruningPlan", "read_index_file", "SearchSettings"]
