"""Greedy model soup (Wortsman et al. 2022, "Model soups"): add models in order of their own
score and keep each one only if the uniform average with it scores at least as well.

The score is user-supplied: a Python callable, or a command run on the candidate's exported
Hugging Face directory that prints a number on its last line of output. Commands run without a
shell; ``{path}`` in any argument is replaced by the directory.
"""
from __future__ import annotations

import math
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Callable

from . import api
from .errors import ExternalCommandError, RecipeError
from .store import Artifact, Store

Score = Callable[[str], float]


@dataclass
class SoupResult:
    artifact: Artifact
    kept: list[str]
    history: list[dict] = field(default_factory=list)   # every candidate tried and its score


def command_score(command: str, timeout: float | None = None) -> Score:
    """A Score that runs ``command`` (``{path}`` = the exported directory) and reads the number it prints."""
    args = shlex.split(command)
    if not args:
        raise RecipeError("the score command is empty")

    def score(path: str) -> float:
        argv = [a.replace("{path}", path) for a in args]
        if not any("{path}" in a for a in args):
            argv.append(path)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ExternalCommandError(f"score command {command!r} could not run on {path}: {e}") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [""])[-1][-300:]
            raise ExternalCommandError(f"score command {command!r} failed on {path} (exit {done.returncode}): {last}")
        lines = done.stdout.strip().splitlines()
        try:
            value = float(lines[-1].split()[-1])
        except (IndexError, ValueError):
            value = None
        if value is None or not math.isfinite(value):
            got = lines[-1][-100:] if lines else ""
            raise ExternalCommandError(f"score command {command!r} printed no number (or a NaN / infinite one) on its last line (got {got!r})")
        return value

    return score


def greedy_soup(store: Store, refs: list[str], score: Score, *, name: str | None = None, **run_options) -> SoupResult:
    """Build a greedy soup of ``refs`` (store refs, HF directories or hub ids) under ``score``.

    Returns:
        The soup artifact (a uniform average of the kept models), the kept refs in the order they
        were added, and the score of every candidate.
    Example:
        >>> greedy_soup(store, ["ft1", "ft2", "ft3"], command_score("python eval.py {path}"), name="soup")  # doctest: +SKIP
    """
    if len(refs) < 1:
        raise RecipeError("greedy soup needs at least one model")
    with tempfile.TemporaryDirectory(prefix="tsllm-soup-") as scratch:
        history = []

        def evaluate(members: list[str], label: str) -> tuple[float, Artifact]:
            result = api.weighted_sum(store, members, [1.0] * len(members), normalize=True, **run_options)
            out = os.path.join(scratch, f"candidate-{len(history)}")
            api.export(store, result.artifact.id, out, max_memory=run_options.get("max_memory", "2G"),
                       progress=run_options.get("progress"))
            value = float(score(out))
            history.append({"candidate": label, "members": list(members), "score": value})
            return value, result.artifact

        individual = sorted(((evaluate([r], r)[0], i, r) for i, r in enumerate(refs)), key=lambda x: (-x[0], x[1]))
        kept = [individual[0][2]]
        best, artifact = evaluate(kept, f"soup of {kept}")
        for _, _, ref in individual[1:]:
            value, candidate = evaluate(kept + [ref], f"soup + {ref}")
            if value >= best:
                kept, best, artifact = kept + [ref], value, candidate
        if name:
            store.tag(artifact.id, name)
        return SoupResult(artifact, kept, history)
