"""Greedy model soup (Wortsman et al. 2022, "Model soups"): add models in order of their own
score and keep each one only if the uniform average with it scores at least as well.

The score is user-supplied: a Python callable, or a command run on the candidate's exported
Hugging Face directory that prints a number on its last line of output. Commands run without a
shell; ``{path}`` in any argument is replaced by the directory.

The search is independent of how candidates are made: ``SoupSteps`` says how to average members
into an artifact and how to export one (``api.greedy_soup`` streams both through the engine).
"""
from __future__ import annotations

import math
import os
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ExternalCommandError, RecipeError
from ..store import Artifact

Score = Callable[[str], float]


@dataclass(frozen=True)
class SoupSteps:
    """How candidates are made: ``average(refs) -> Artifact`` (the uniform average of the refs)
    and ``export(artifact, directory)`` (write it as a Hugging Face directory for the score)."""

    average: Callable[[list[str]], Artifact]
    export: Callable[[Artifact, str], None]


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


def greedy_soup(refs: list[str], score: Score, steps: SoupSteps) -> SoupResult:
    """Greedy soup of ``refs`` under ``score``: each model alone, best first, then each next model
    kept only if the soup with it scores at least as well.

    Returns:
        The soup artifact (a uniform average of the kept models), the kept refs in the order they
        were added, and the score of every candidate.
    Example:
        >>> greedy_soup(["ft1", "ft2"], command_score("python eval.py {path}"), steps)  # doctest: +SKIP
    """
    if len(refs) < 1:
        raise RecipeError("greedy soup needs at least one model")
    with tempfile.TemporaryDirectory(prefix="tsllm-soup-") as scratch:
        history = []

        def evaluate(members: list[str], label: str) -> tuple[float, Artifact]:
            artifact = steps.average(members)
            out = os.path.join(scratch, f"candidate-{len(history)}")
            steps.export(artifact, out)
            value = float(score(out))
            history.append({"candidate": label, "members": list(members), "score": value})
            return value, artifact

        individual = sorted(((evaluate([r], r)[0], i, r) for i, r in enumerate(refs)), key=lambda x: (-x[0], x[1]))
        kept = [individual[0][2]]
        best, artifact = evaluate(kept, f"soup of {kept}")
        for _, _, ref in individual[1:]:
            value, candidate = evaluate(kept + [ref], f"soup + {ref}")
            if value >= best:
                kept, best, artifact = kept + [ref], value, candidate
        return SoupResult(artifact, kept, history)
