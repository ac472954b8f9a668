"""DarwinLM-style search on a seeded toy problem: better than uniform, total fixed, seeded, resumable."""
from __future__ import annotations

import numpy as np
import pytest

from tensorstore_llm.errors import InvalidParameter
from tensorstore_llm.prune.search import SearchSettings, mutate, search, uniform_levels

SENSITIVITY = np.random.default_rng(5).uniform(0.1, 3.0, size=8)   # some layers hurt far more when pruned


def toy_fitness(levels, samples):
    """A loss that grows with each unit's sparsity squared, weighted by its sensitivity; the
    samples add noise that shrinks as they grow (as calibration estimates do)."""
    x = np.asarray(levels, dtype=float) / 20
    noise = 0.02 * np.sin(sum(levels) * 7 + samples) / samples
    return float((SENSITIVITY * x ** 2).sum() + noise)


def test_search_beats_uniform_and_keeps_the_total():
    settings = SearchSettings(levels=20, generations=30, offspring=12, steps=((4, 1), (2, 2), (1, 4)), seed=3)
    result = search(toy_fitness, 8, 0.5, settings)
    assert sum(result.levels) == sum(uniform_levels(8, 0.5, 20)) == 80
    assert result.fitness < 0.8 * result.uniform_fitness
    # the optimum prunes insensitive layers more: levels fall as sensitivity rises
    order = np.argsort(SENSITIVITY)
    assert result.levels[order[0]] > result.levels[order[-1]]
    assert len(result.log) == 30 and all(e["steps"][-1]["kept"] == 1 for e in result.log)


def test_mutation_keeps_the_sum_and_bounds():
    rng = np.random.Generator(np.random.PCG64(0))
    parent = [0, 19, 5, 7]
    for _ in range(200):
        child = mutate(parent, rng, 20, 3)
        assert sum(child) == sum(parent) and all(0 <= v <= 19 for v in child)


def test_seeded_and_resumable(tmp_path):
    settings = SearchSettings(levels=20, generations=6, offspring=6, steps=((2, 1), (1, 2)), seed=9)
    straight = search(toy_fitness, 8, 0.4, settings)
    assert search(toy_fitness, 8, 0.4, settings).levels == straight.levels
    state = str(tmp_path / "state.json")
    calls = {"n": 0}

    def interrupted(levels, samples):
        calls["n"] += 1
        if calls["n"] > 40:
            raise KeyboardInterrupt
        return toy_fitness(levels, samples)
    with pytest.raises(KeyboardInterrupt):
        search(interrupted, 8, 0.4, settings, state)
    resumed = search(toy_fitness, 8, 0.4, settings, state)
    assert resumed.levels == straight.levels and resumed.log == straight.log


def test_bad_settings():
    with pytest.raises(InvalidParameter):
        SearchSettings(steps=((1, 4), (2, 2)))
    with pytest.raises(InvalidParameter):
        uniform_levels(4, 0.99, 10)
