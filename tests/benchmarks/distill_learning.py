"""The ``learn`` and ``learn-report`` verbs of bench_distill.py: students trained from the teacher
caches (RS-KD, top-k, hard labels, full KD), their held-out KL and ECE, and the table / margin
check over one or more ``learn --json`` records (or logs of runs stopped early). See
bench_distill.py's docstring for the commands.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

from tensorstore_llm.hf.models import load_causal_lm
from tensorstore_llm.testing.real_models import smollm2_checkpoint

CORPUS = os.path.join(os.path.dirname(__file__), "..", "..", "data", "corpus")


def cmd_learn(args):
    """Train the students (``--methods``, ``--seeds``) and print / save their held-out KL and ECE."""
    import json

    from tensorstore_llm.distill.learning import cpython_docstrings, run_learning_experiment

    seeds = [int(x) for x in args.seeds.split(",")]
    methods = tuple(args.methods.split(","))
    checkpoints = [int(x) for x in args.checkpoints.split(",")] if args.checkpoints else None
    workdir = args.workdir or tempfile.mkdtemp(prefix="tsllm-learn-")
    lm = load_causal_lm(smollm2_checkpoint())
    setup = {"corpus": args.corpus, "seq_len": args.seq_len, "steps": args.steps, "held_out": args.held_out}
    corpus, held_out_corpus = CORPUS, None
    if args.corpus == "cpython":
        built = cpython_docstrings(os.path.join(workdir, "cpython-docstrings"), lm.tokenizer,
                                   train_tokens=args.train_tokens, held_out_tokens=args.held_out * args.seq_len + 256)
        corpus, held_out_corpus = built["train"]["path"], built["held_out"]["path"]
        setup["cpython_docstrings"] = built
        print(f"corpus: docstrings of Python {built['python']}'s standard library ({built['stdlib_files_read']} files): "
              f"{built['train']['tokens']} training tokens in {built['train']['documents']} docstrings, "
              f"{built['held_out']['tokens']} held-out tokens in {built['held_out']['documents']}")
    t0 = time.perf_counter()
    results = run_learning_experiment(steps=args.steps, seeds=seeds, seq_len=args.seq_len, log=print, methods=methods,
                                      workdir=workdir, corpus=corpus, held_out_corpus=held_out_corpus,
                                      held_out=args.held_out, checkpoints=checkpoints, teacher=lm)
    setup["seconds"] = time.perf_counter() - t0
    setup["load_average"] = os.getloadavg()
    runs = {m: dict(zip(map(str, seeds), results[m])) for m in methods}
    record = {"setup": setup, **{k: results[k] for k in ("unique_per_position", "k", "train_sequences", "teacher_ece")},
              "runs": runs}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    report([record], args.margin)


def report(records: list[dict], margin: float | None) -> None:
    """Print the learning table of one or more ``learn --json`` records (same setup and caches).

    With ``margin``, exit non-zero unless RS-KD's held-out KL is below top-k's for every seed at
    every checkpoint (the seed fixes both students' initialisation and batches: a paired
    comparison) and, at the last checkpoint, below it on average by at least ``margin`` nats and by
    more than twice the standard deviation across seeds of the per-seed gap."""
    runs: dict = {}
    for r in records:
        for method, per_seed in r["runs"].items():
            runs.setdefault(method, {}).update(per_seed)
    first = records[0]
    print(f"{first['train_sequences']} training sequences; RS-KD cache {first['unique_per_position']:.2f} unique "
          f"ids/position, top-k k = {first['k']}; teacher's own held-out ECE {first['teacher_ece']:.4f}")
    steps = sorted(set.intersection(*({e["step"] for e in evals} for per_seed in runs.values()
                                      for evals in per_seed.values())))
    runs = {m: {s: [e for e in evals if e["step"] in steps] for s, evals in per_seed.items()} for m, per_seed in runs.items()}
    print(f"held-out KL to the teacher | ECE of top-1 vs the next token, at steps {steps}; mean [min, max] over seeds")
    table = {}
    for method, per_seed in sorted(runs.items(), key=lambda kv: ("full", "rs-kd", "top-k", "hard").index(kv[0])):
        kl = np.array([[e["kl"] for e in evals] for evals in per_seed.values()])
        ece = np.array([[e["ece"] for e in evals] for evals in per_seed.values()])
        table[method] = (sorted(per_seed, key=int), kl)
        cells = "  ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}] | {e:.4f}" for m, lo, hi, e in
                          zip(kl.mean(0), kl.min(0), kl.max(0), ece.mean(0)))
        print(f"{method:6} seeds {','.join(sorted(per_seed, key=int)):6} {cells}")
    if "rs-kd" not in table or "top-k" not in table:
        if margin is not None:
            sys.exit("--margin needs RS-KD and top-k runs")
        return
    seeds = sorted(set(table["rs-kd"][0]) & set(table["top-k"][0]), key=int)
    def pick(method):
        return table[method][1][[table[method][0].index(s) for s in seeds]]
    gap = pick("top-k") - pick("rs-kd")
    spread = gap.std(0, ddof=1) if len(seeds) > 1 else np.zeros(gap.shape[1])
    print(f"top-k minus RS-KD, seeds {', '.join(seeds)}: per seed {np.round(gap, 3).tolist()}")
    print(f"  mean {np.round(gap.mean(0), 3).tolist()}, standard deviation across seeds {np.round(spread, 3).tolist()}")
    if margin is not None:
        if len(seeds) < 2:
            sys.exit(f"--margin needs RS-KD and top-k runs of at least two common seeds (have {seeds})")
        behind = [(int(seeds[i]), steps[j]) for i, j in zip(*np.nonzero(gap <= 0))]
        end, end_spread = float(gap.mean(0)[-1]), float(spread[-1])
        if behind or end < max(margin, 2 * end_spread):
            sys.exit(f"RS-KD's lead over top-k missed the margin: (seed, step) where top-k was as close or closer: "
                     f"{behind}; mean lead at step {steps[-1]} {end:.3f} nats, needed >= {margin} and > 2 x {end_spread:.3f} "
                     f"(the per-seed standard deviation)")
        print(f"RS-KD ahead of top-k for every seed at every checkpoint; at step {steps[-1]} by {end:.3f} nats on average "
              f"(>= {margin}, > 2 standard deviations of the per-seed gap)")


def read_learn_record(path: str) -> dict:
    """A ``learn --json`` record, or the same rebuilt from a ``learn`` log (stdout) of a run that was
    stopped early: its printed evaluations (KL to 3 decimals, ECE to 4) and set-up line."""
    import json
    import re

    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            return json.load(f)
        text = f.read()
    head = re.search(r"(\d+) training sequences x \d+ tokens, \d+ held out; RS-KD ([\d.]+) ids/position, top-k k=(\d+); "
                     r"teacher's own held-out ECE ([\d.]+)", text)
    if head is None:
        sys.exit(f"{path}: no set-up line of a learn run")
    runs: dict = {}
    for m in re.finditer(r"^  (\S+) seed (\d+) step (\d+) \(epoch \d+\): loss ([\d.]+) held-out KL ([\d.]+) ECE ([\d.]+)$",
                         text, re.MULTILINE):
        runs.setdefault(m[1], {}).setdefault(m[2], []).append(
            {"step": int(m[3]), "loss": float(m[4]), "kl": float(m[5]), "ece": float(m[6])})
    return {"setup": {"log": os.path.basename(path)}, "train_sequences": int(head[1]),
            "unique_per_position": float(head[2]), "k": int(head[3]), "teacher_ece": float(head[4]), "runs": runs}


def cmd_learn_report(args):
    records = [read_learn_record(path) for path in args.records]
    report(records, args.margin)
