"""The op registry: pure tensor kernels declared with ``@op`` and looked up by name.

An op declares its input roles (a trailing ``*`` marks a variadic role such as ``models*``), a
frozen params dataclass validated when the plan is built, whether it draws random numbers, and
how it may be streamed (``rowwise``: an output row depends only on the same input rows). Kernels
receive tensors already on the compute device in the compute dtype, and never move them.
Plugins register through the ``tensorstore_llm.ops`` entry-point group; nothing overrides a
built-in silently.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import RecipeError

_REGISTRY: dict[str, OpSpec] = {}
_BUILTIN_MODULES = ("tensorstore_llm.ops.basic", "tensorstore_llm.ops.merge", "tensorstore_llm.ops.geometry",
                    "tensorstore_llm.ops.replay", "tensorstore_llm.ops.lora", "tensorstore_llm.ops.stats",
                    "tensorstore_llm.ops.delta", "tensorstore_llm.ops.lora_streamed", "tensorstore_llm.ops.prune",
                    "tensorstore_llm.ops.seed_merges", "tensorstore_llm.ops.newer_merges",
                    "tensorstore_llm.ops.vocab")
_loaded = False


@dataclass(frozen=True)
class Role:
    name: str
    variadic: bool = False


@dataclass(frozen=True)
class StatsPass:
    """A read-only pass over a whole tensor before its output is computed.

    ``map(ctx, params, **tensors) -> dict`` runs on every row tile in row order (``ctx.stats``
    holds what earlier passes found); ``reduce(params, partials, ctx) -> dict`` turns the list of
    partials into statistics. Partials are per-row or integer counts, so the statistics do not
    depend on how the rows were blocked. ``fold(a, b)``, when given, merges two partials as they
    arrive (e.g. adds histograms), so memory does not grow with the number of tiles.
    """

    map: Callable
    reduce: Callable
    fold: Callable | None = None


@dataclass(frozen=True)
class OpSpec:
    """A registered op: the kernel and what the planner and executor need to know about it."""

    name: str
    fn: Callable
    roles: tuple[Role, ...]
    params: type | None = None
    random: bool = False
    compute: bool = True     # False: raw stored values pass through (no fp32 cast, no device)
    rowwise: bool = True     # may be split into row blocks
    # fp32 temporaries per element the kernel holds at its peak, including the copies it makes of
    # variadic inputs (those are cast on access); an int or a function of the number of inputs.
    temps: int | Callable[[int], int] = 2
    passes: tuple[StatsPass, ...] | Callable[[Any], tuple[StatsPass, ...]] = ()
    # warm(params): loads what the kernel would load on first use (compiled loops), called before
    # the run measures its starting RSS, so the memory model sees it in the baseline
    warm: Callable[[Any], None] | None = None

    def passes_for(self, params) -> tuple[StatsPass, ...]:
        """The statistics passes this op needs with ``params`` (none for most ops)."""
        return self.passes(params) if callable(self.passes) else self.passes

    def make_params(self, values: dict | None, where: str) -> Any:
        """Build and validate this op's params from a plain dict; RecipeError on anything wrong."""
        values = dict(values or {})
        if self.params is None:
            if values:
                raise RecipeError(f"{where}: op {self.name!r} takes no parameters, got {sorted(values)}")
            return None
        fields = {f.name: f for f in dataclasses.fields(self.params)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise RecipeError(f"{where}: unknown parameter(s) {unknown} for {self.name!r}; allowed: {sorted(fields)}")
        hints = typing.get_type_hints(self.params)
        coerced = {k: _coerce(v, hints.get(k), f"{where}: parameter {k!r} of {self.name!r}") for k, v in values.items()}
        try:
            return self.params(**coerced)
        except TypeError as e:
            raise RecipeError(f"{where}: {self.name!r}: {e}") from None
        except ValueError as e:
            raise RecipeError(f"{where}: {self.name!r}: {e}") from None


def _coerce(value, hint, where):
    origin = typing.get_origin(hint)
    try:
        if hint is float:
            return float(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is bool:
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if origin is tuple:
            args = typing.get_args(hint)
            inner = args[0] if args else None
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(_coerce(v, inner, where) for v in items)
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


def op(name: str, inputs: tuple[str, ...], params: type | None = None, *, random: bool = False,
       compute: bool = True, rowwise: bool = True, temps=2, passes=(), warm=None):
    """Decorator registering a kernel ``fn(ctx, params, **tensors) -> tensor`` as op ``name``.

    Example:
        >>> @op("negate_example", inputs=("x",))          # doctest: +SKIP
        ... def negate(ctx, params, x):
        ...     return -x
    """
    roles = tuple(Role(r.rstrip("*"), r.endswith("*")) for r in inputs)

    def decorate(fn):
        register_op(OpSpec(name, fn, roles, params, random, compute, rowwise, temps, passes, warm))
        return fn

    return decorate


def register_op(spec: OpSpec, clobber: bool = False) -> None:
    """Add ``spec`` to the registry; an existing name is an error unless ``clobber``."""
    if spec.name in _REGISTRY and not clobber and _REGISTRY[spec.name].fn is not spec.fn:
        raise RecipeError(f"op {spec.name!r} is already registered; pass clobber=True to replace it")
    _REGISTRY[spec.name] = spec


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    from importlib.metadata import entry_points

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    for ep in entry_points(group="tensorstore_llm.ops"):
        ep.load()


def get_op(name: str) -> OpSpec:
    """The op called ``name``; RecipeError listing the known ops if there is none."""
    _load()
    if name not in _REGISTRY:
        raise RecipeError(f"unknown op {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_ops() -> list[str]:
    _load()
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class OpContext:
    """What a kernel may know about the block it computes: which tensor, which rows, which seed."""

    op: str
    output: str
    shape: tuple[int, ...]
    start: int
    stop: int
    seed: int
    device: Any = "cpu"
    stats: Any = None
    pool: Any = None    # the executor's thread pool for parallel random draws (results do not depend on it)

    def uniform(self, stream: str = ""):
        """Uniform [0, 1) float32 values for this block, identical under any blocking or device.

        ``stream`` separates independent draws of one op on one tensor (e.g. one per model).
        """
        from ..seeding import uniform_rows

        op = f"{self.op}/{stream}" if stream else self.op
        return uniform_rows(self.seed, op, self.output, self.shape, self.start, self.stop, self.pool).to(self.device)
