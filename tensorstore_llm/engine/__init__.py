"""Plan -> executor: validated tensor jobs streamed in row blocks within a memory budget."""
from .devices import resolve_device
from .executor import Estimate, Executor
from .plan import InputRef, Plan, TensorJob, plan_map

__all__ = ["Estimate", "Executor", "InputRef", "Plan", "TensorJob", "plan_map", "resolve_device"]
