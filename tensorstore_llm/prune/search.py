"""DarwinLM-style evolutionary search for non-uniform per-layer sparsity (arXiv 2502.07780).

Units (here: the MLP of each prunable layer) have integer sparsity levels 0..L-1 (level ``l``
removes ``l / L`` of the unit). The search starts from the uniform allocation at the target ratio.
Each offspring is the parent with a few mutations; a mutation raises one unit's level by one and
lowers another's by one, so the total (the overall ratio) never changes. Offspring are selected in
several steps: every step scores the remaining candidates (the parent among them, so the result is
never worse than the parent on the last step's sample) on more calibration samples and keeps
fewer of them, as in the paper's multi-step selection; the last survivor is the next parent. The
paper's short training of offspring between steps is left out (optional there, too slow on CPU).

Seeded (numpy PCG64) and resumable: after every generation the state (parent, RNG state, log) is
written atomically to ``state_path``; a re-run with the same settings continues from it. The
log (one entry per generation: parent fitness, the survivors of each step) goes into the plan's
lineage.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidParameter


@dataclass(frozen=True)
class SearchSettings:
    """``levels`` per unit (L), ``generations``, ``offspring`` per generation, ``steps``: list of
    (survivors, samples) for the selection steps (survivors shrink, samples grow), ``max_mutations``
    per offspring, ``seed``."""

    levels: int = 20
    generations: int = 10
    offspring: int = 16
    steps: tuple[tuple[int, int], ...] = ((4, 2), (2, 4), (1, 8))
    max_mutations: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.levels < 2 or self.generations < 0 or self.offspring < 1 or not self.steps or self.max_mutations < 1:
            raise InvalidParameter("search: levels >= 2, generations >= 0, offspring >= 1, max_mutations >= 1 and "
                                   "at least one selection step are needed")
        survivors = [s for s, _ in self.steps]
        samples = [n for _, n in self.steps]
        if (survivors != sorted(survivors, reverse=True) or survivors[-1] != 1 or samples != sorted(samples)
                or samples[0] < 1):
            raise InvalidParameter(f"search: selection steps must keep fewer survivors (ending at 1) on more samples, "
                                   f"got {list(self.steps)}")


@dataclass
class SearchResult:
    levels: list[int]
    fitness: float
    uniform_fitness: float
    log: list[dict] = field(default_factory=list)


def uniform_levels(units: int, target_ratio: float, levels: int) -> list[int]:
    """Levels summing to ``round(target_ratio * levels * units)``, as even as possible (the
    remainder spread over the first units)."""
    total = int(round(target_ratio * levels * units))
    if total > (levels - 1) * units:
        raise InvalidParameter(f"search: a target ratio of {target_ratio} leaves no room below "
                               f"{levels - 1}/{levels} per unit")
    base, extra = divmod(total, units)
    return [base + (1 if i < extra else 0) for i in range(units)]


def mutate(parent: list[int], rng: np.random.Generator, levels: int, max_mutations: int) -> list[int]:
    """``parent`` with 1..max_mutations (raise one unit, lower another) moves; the sum is kept."""
    child = list(parent)
    for _ in range(int(rng.integers(1, max_mutations + 1))):
        up = [i for i, v in enumerate(child) if v < levels - 1]
        down = [i for i, v in enumerate(child) if v > 0]
        if not up or not down:
            break
        a = int(rng.choice(up))
        down = [i for i in down if i != a]
        if not down:
            break
        b = int(rng.choice(down))
        child[a] += 1
        child[b] -= 1
    return child


def search(fitness: Callable[[list[int], int], float], units: int, target_ratio: float, settings: SearchSettings,
           state_path: str | None = None, identity: str = "") -> SearchResult:
    """Minimise ``fitness(levels, samples)`` over allocations with the target total.

    Args:
        fitness: lower is better; ``samples`` is how much calibration data to use.
        units: number of units searched.
        state_path: JSON file for resuming (written after every generation).
        identity: what else determines the result (model, corpus); a state made with other
            settings is ignored and overwritten.
    """
    key = hashlib.sha256(json.dumps([units, target_ratio, settings.__dict__, identity], default=list,
                                    sort_keys=True).encode()).hexdigest()
    rng = np.random.Generator(np.random.PCG64(settings.seed))
    parent = uniform_levels(units, target_ratio, settings.levels)
    final_samples = settings.steps[-1][1]
    uniform_fit = fitness(parent, final_samples)
    log: list[dict] = []
    start = 0
    if state_path and os.path.exists(state_path):
        with open(state_path, "rb") as f:
            state = json.loads(f.read())
        if state.get("key") == key:
            parent, log, start = state["parent"], state["log"], state["generation"]
            rng.bit_generator.state = state["rng"]
    for generation in range(start, settings.generations):
        candidates = [parent] + [mutate(parent, rng, settings.levels, settings.max_mutations)
                                 for _ in range(settings.offspring)]
        entry = {"generation": generation, "steps": []}
        for survivors, samples in settings.steps:
            scored = sorted(((fitness(c, samples), i, c) for i, c in enumerate(candidates)), key=lambda t: (t[0], t[1]))
            candidates = [c for _, _, c in scored[:survivors]]
            entry["steps"].append({"samples": samples, "kept": survivors, "best": scored[0][0]})
        parent = candidates[0]
        entry["parent"] = list(parent)
        log.append(entry)
        if state_path:
            _write_state(state_path, {"key": key, "generation": generation + 1, "parent": parent, "log": log,
                                      "rng": rng.bit_generator.state})
    return SearchResult(list(parent), fitness(parent, final_samples), uniform_fit, log)


def _write_state(path: str, state: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
