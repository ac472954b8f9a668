"""Pruning: plans as artifacts (structured channels / KV heads, unstructured and N:M masks),
DarwinLM-style non-uniform search, and the pruned checkpoint (see :func:`prune`)."""
from .api import PruneResult, load_plan, prune
from .plan import PruningPlan, read_index_file
from .search import SearchSettings

__all__ = ["PruneResult", "PruningPlan", "SearchSettings", "load_plan", "prune", "read_index_file"]
