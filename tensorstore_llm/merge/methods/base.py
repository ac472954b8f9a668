"""What a merge method is: its parameters and their domains, its checks, its preparation, and the
job it plans for each output tensor.

A method is a small object (``MergeMethod``) registered under its recipe name
(``merge_method:``). The recipe layer (``merge/recipe.py``) parses and validates the YAML against
the method's declared parameters, asks the method to check the recipe's shape, lets it prepare
(Mediator's conflict table, Sens-Merging's scores; both stream through the engine) and then asks
it, tensor by tensor, for a :class:`JobSpec`: the op, its inputs and its parameters. A method
never reads tensors itself.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...engine.plan import InputRef
from ...errors import RecipeError

# -- parameters and their domains --------------------------------------------------------------

@dataclass(frozen=True)
class Domain:
    """What one parameter's values may be; ``text`` is the documentation (README's table)."""

    text: str
    check: Callable[[Any], bool]


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool, not an int too large for a float)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:   # an int too large for a float
        return False


def interval(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Domain:
    """Numbers between ``low`` and ``high`` (each end closed unless ``*_open``)."""
    brackets = ("(" if low_open else "[", ")" if high_open else "]")
    text = (f"a finite number {'>' if low_open else '>='} {low:g}" if high == math.inf
            else f"a number in {brackets[0]}{low:g}, {high:g}{brackets[1]}")
    return Domain(text, lambda v: is_number(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high))


def integer(low: int) -> Domain:
    """Integers >= ``low``."""
    return Domain(f"an integer >= {low}", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low)


REAL = Domain("a finite number", is_number)
BOOL = Domain("true or false", lambda v: isinstance(v, bool))
PATH = Domain("the path of a file", lambda v: isinstance(v, str) and v != "")
MODEL_REF = Domain("one of the recipe's models", lambda v: isinstance(v, (str, int)) and not isinstance(v, bool))


@dataclass(frozen=True)
class Param:
    """A recipe parameter: its domain, whether a model entry may set it (``per_model``), and
    whether it is read per tensor (scalars, gradients over layers, filter lists) or once for the
    whole merge (``per_tensor=False``: a plain value only)."""

    domain: Domain
    per_model: bool = False
    per_tensor: bool = True


# The parameters several methods share, defined once; a method may still give a name its own
# domain (nearswap's t is a distance, slerp's a fraction): domains are per method.
WEIGHT = Param(REAL, per_model=True)
DENSITY = Param(interval(0, 1), per_model=True)
GAMMA = Param(interval(0, 1), per_model=True)
EPSILON = Param(interval(0, 0.5, high_open=True), per_model=True)
LAMBDA = Param(REAL)
NORMALIZE = Param(BOOL)


# -- what a method plans -----------------------------------------------------------------------

@dataclass(frozen=True)
class JobSpec:
    """One output tensor's job: op name, input roles ((role, InputRef or tuple of them), ...) and
    the op's parameters as a plain dict (validated by the op's params class when planned)."""

    op: str
    roles: tuple
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TensorSlot:
    """One output tensor as a method sees it while planning.

    ``value(key, entry=None, default=None)`` is the parameter's value for this tensor (the model
    entry's setting first, then the recipe's, then ``default``; RecipeError when required and
    absent); ``base`` is the base model's ref (or None), ``others`` the model entries besides it;
    ``where`` names the recipe in errors.
    """

    name: str
    shape: tuple[int, ...]
    t: float
    base: str | None
    models: list
    others: list
    value: Callable[..., Any]
    where: str = "recipe"


@dataclass
class MergeInputs:
    """What ``prepare`` may use: the open sources and carried files per model ref, and
    ``validate(state)``, which plans the whole merge with ``state`` (raising on any error)
    without reading a tensor, so a method can check everything before a costly analysis."""

    sources: Mapping[str, Any]
    files: Mapping[str, dict]
    where: str
    validate: Callable[[Any], Any]


@dataclass
class Prepared:
    """What ``prepare`` found: ``state`` for ``job`` (Mediator's table, Sens-Merging's scores),
    ``record`` entries for the artifact's recipe record, ``analysis`` to show the user."""

    state: Any = None
    record: dict = field(default_factory=dict)
    analysis: dict | None = None


class MergeMethod:
    """Base of every merge method. Subclasses set ``name`` and ``parameters`` and implement
    ``job``; they override ``check`` / ``check_parameters`` / ``state`` / ``prepare`` as needed.

    Example:
        >>> from tensorstore_llm.merge.methods import get_method
        >>> sorted(get_method("slerp").parameters)
        ['t']
    """

    name: str = ""
    parameters: Mapping[str, Param] = {}
    replayable: bool = False   # arithmetic="mergekit" has replay ops for this method's jobs

    def check(self, recipe, where: str) -> None:
        """The recipe's shape (base model, number of models, unsupported settings); RecipeError.

        The default: a base_model and at least one other model."""
        if recipe.base is None:
            raise RecipeError(f"{where}: {self.name} needs base_model")
        if not others_of(recipe):
            raise RecipeError(f"{where}: {self.name} needs at least one model besides base_model")

    def check_parameters(self, recipe, where: str) -> None:
        """Checks across parameters, after each value was found in its domain (default: none)."""

    def state(self, recipe, where: str, given: Mapping[str, Any]) -> Any:
        """What ``job`` reads when planning without ``prepare`` (``given``: plan_merge's keyword
        inputs, e.g. ``averaged_layers`` or ``sensitivity``). Default: nothing."""
        return None

    def prepare(self, recipe, inputs: MergeInputs, options) -> Prepared:
        """Analyses that decide the plan, streamed by the engine under ``options`` (a RunOptions).
        Default: the planning state alone."""
        return Prepared(self.state(recipe, inputs.where, {}))

    def job(self, recipe, tensor: TensorSlot, state: Any) -> JobSpec:
        """The job computing ``tensor``."""
        raise NotImplementedError


def others_of(recipe) -> list:
    """The recipe's model entries besides the base model."""
    return [m for m in recipe.models if m.ref != recipe.base]


def model_inputs(refs, name: str) -> tuple:
    """The InputRefs of tensor ``name`` in each of ``refs`` (a variadic role's value)."""
    return tuple(InputRef(ref, name) for ref in refs)
