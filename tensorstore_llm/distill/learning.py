"""A small, reproducible check of RS-KD's claim, and a worked example of training from the cache.

A random 2-layer student with the teacher's tokenizer (hidden 128, tied embeddings: ~7M
parameters at SmolLM2's 49k vocabulary) is trained with AdamW from a precomputed cache, with

- ``rs-kd``: RS-KD targets (N draws), forward KL against counts / N;
- ``top-k``: top-k targets with k = the RS-KD cache's mean unique ids per position (so at least
  as many stored ids), "ignore tail" loss;
- ``hard``: next-token cross-entropy only;
- ``full``: full-vocabulary KD against the teacher's whole distribution (the reference; its
  log-probs for the training sequences are held in memory in fp16, not stored);

and evaluated on held-out packed sequences that are not in the cache by KL(teacher ‖ student)
over the full vocabulary and by the expected calibration error of the student's top-1 prediction
against the held-out next tokens (:func:`held_out_metrics`). The corpus is ``data/corpus`` or
(:func:`cpython_docstrings`) docstrings of the running interpreter's standard library. This is the
plain-PyTorch training loop the dataset and losses are made for::

    ds = DistillDataset(path, tokenizer=tokenizer)
    for batch in DataLoader(ds, batch_size=8, collate_fn=collate_sparse):
        logits = student(input_ids=batch["input_ids"]).logits
        loss = distill_loss(logits, batch, alpha=1.0)
        loss.backward(); optimiser.step(); optimiser.zero_grad()
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from .dataset import DistillDataset, collate_sparse, to_item
from .losses import dense_kd_loss, distill_loss, hard_ce_loss, topk_kd_loss
from .precompute import SamplingConfig, precompute
from .stats import dataset_stats

METHODS = ("rs-kd", "top-k", "hard", "full")


def tiny_student(vocab: int, *, hidden: int = 128, layers: int = 2, seed: int = 0, tokenizer=None):
    """A randomly initialised Llama-style causal LM with tied embeddings (fp32, train mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=True,
                         bos_token_id=getattr(tokenizer, "bos_token_id", None),
                         eos_token_id=getattr(tokenizer, "eos_token_id", None))
    with torch.random.fork_rng():   # seeded initialisation, the caller's RNG state left as it was
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).float().train()


def calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error of top-1 predictions: positions binned by their predicted
    probability p_max (``confidence``, [P]) into ``bins`` equal-width bins over [0, 1];
    ECE = Σ_b (n_b / P) · |accuracy_b − mean p_max in b|, where ``correct`` [P] says whether the
    top-1 id was the actual next token."""
    conf = confidence.double()
    which = torch.clamp((conf * bins).long(), max=bins - 1)
    hits = torch.bincount(which, weights=correct.double(), minlength=bins)
    gap = (hits - torch.bincount(which, weights=conf, minlength=bins)).abs()
    return float(gap.sum() / conf.numel())


def held_out_metrics(student, input_ids: torch.Tensor, teacher_logp: torch.Tensor,
                     bins: int = 15) -> tuple[float, float]:
    """(KL, ECE) of a student on held-out sequences.

    KL: mean over every position of KL(teacher ‖ student) over the full vocabulary; teacher_logp
    is [H, L, V]. ECE: :func:`calibration_error` of the student's top-1 against the actual next
    token, pooled over the positions that have one in their sequence (all but the last of each).
    """
    student.eval()
    total, confidence, correct = 0.0, [], []
    with torch.no_grad():
        for i in range(input_ids.shape[0]):
            logs = torch.log_softmax(student(input_ids=input_ids[i:i + 1]).logits.float(), -1)[0]
            t = teacher_logp[i]
            total += float((t.exp() * (t - logs)).sum(-1).mean())
            top_logp, top = logs[:-1].max(-1)
            confidence.append(top_logp.exp())
            correct.append(top == input_ids[i, 1:])
    student.train()
    return total / input_ids.shape[0], calibration_error(torch.cat(confidence), torch.cat(correct), bins)


def train_student(method: str, cache: str, tokenizer, vocab: int, *, steps: int, seed: int, eval_ids, teacher_logp,
                  batch_size: int = 8, lr: float = 3e-3, checkpoints=None, log=None, train_logp=None) -> list[dict]:
    """Train one student for ``steps`` and evaluate it at the ``checkpoints`` steps (by default
    steps/3, 2·steps/3 and steps).

    Every method sees the same sequences in the same order (the cache's shard order per epoch,
    which ``seed`` shuffles; ``seed`` also sets the initialisation); ``full`` needs ``train_logp``
    {sequence index: teacher log-probs [L, V]}. Returns, per checkpoint in order,
    {"step", "kl", "ece", "loss"} (see :func:`held_out_metrics`).
    """
    student = tiny_student(vocab, seed=seed, tokenizer=tokenizer)
    optimiser = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    ds = DistillDataset(cache, tokenizer=tokenizer, seed=seed)
    marks = set(checkpoints or [round(steps * (j + 1) / 3) for j in range(3)])
    evaluations, step, epoch = [], 0, 0
    while step < steps:
        ds.set_epoch(epoch)
        for indices, batch in _batches(ds, batch_size):
            logits = student(input_ids=batch["input_ids"]).logits
            if method == "rs-kd":
                loss = distill_loss(logits, batch, alpha=1.0)
            elif method == "top-k":
                loss = topk_kd_loss(logits, batch["target_ids"], batch["target_weights"], batch["target_mask"],
                                    mode="ignore-tail")
            elif method == "full":
                loss = dense_kd_loss(logits, torch.stack([train_logp[i] for i in indices]).float())
            else:
                loss = hard_ce_loss(logits, batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            step += 1
            if step in marks:
                kl, ece = held_out_metrics(student, eval_ids, teacher_logp)
                evaluations.append({"step": step, "kl": kl, "ece": ece, "loss": loss.item()})
                if log:
                    log(f"  {method} seed {seed} step {step} (epoch {epoch}): loss {loss.item():.3f} "
                        f"held-out KL {kl:.3f} ECE {ece:.4f}")
            if step >= steps:
                break
        epoch += 1
    return evaluations


def _batches(ds: DistillDataset, batch_size: int):
    """(sequence indices, collated batch) in the dataset's reading order (what a DataLoader with
    ``batch_size`` and ``collate_sparse`` yields, plus the indices)."""
    group = []
    for seq in ds.sequences():
        group.append(seq)
        if len(group) == batch_size:
            yield [s.sequence for s in group], collate_sparse([to_item(s, ds.draws) for s in group])
            group = []
    if group:
        yield [s.sequence for s in group], collate_sparse([to_item(s, ds.draws) for s in group])


SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def cpython_docstrings(out_dir: str, tokenizer, *, train_tokens: int = 41_000, held_out_tokens: int = 2_200,
                       held_out_every: int = 10) -> dict:
    """Write a corpus of CPython docstrings taken from the running interpreter's standard library.

    The ``*.py`` files under ``sysconfig.get_paths()["stdlib"]`` are walked in sorted relative-path
    order (directories named in ``SKIPPED_DIRS`` are not entered; files that do not parse are
    skipped); from each, ``ast.get_docstring`` of the module, then of its classes and functions
    in ``ast.walk`` order, each docstring one document. A docstring equal to one already taken is
    dropped, so the two sets share no document. Every ``held_out_every``-th file (counting from 1)
    feeds the held-out set until it holds ``held_out_tokens`` tokens; the other files feed the
    training set until it holds ``train_tokens``. Tokens are counted with ``tokenizer`` as the
    packing counts them (no special tokens, one EOS per document). No network, nothing shipped:
    the corpus is fixed by the Python version, returned as ``python``.

    Writes ``train/docstrings.jsonl`` and ``held_out/docstrings.jsonl`` (``{"text": ...}`` lines)
    under ``out_dir``; returns their paths, token and document counts, files read, and the version.
    """
    import ast
    import json
    import platform
    import sysconfig
    import warnings

    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        files += [os.path.relpath(os.path.join(folder, n), root) for n in names if n.endswith(".py")]
    files.sort()
    sets = {"train": [[], 0, train_tokens], "held_out": [[], 0, held_out_tokens]}
    seen: set[str] = set()
    used = 0
    for number, rel in enumerate(files, start=1):
        part = sets["held_out" if number % held_out_every == 0 else "train"]
        if part[1] >= part[2]:
            if all(p[1] >= p[2] for p in sets.values()):
                break
            continue
        try:
            with open(os.path.join(root, rel), "rb") as f, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(f.read(), filename=rel)
        except (SyntaxError, ValueError):
            continue
        used += 1
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            text = ast.get_docstring(node)
            if not text or not text.strip() or text in seen or part[1] >= part[2]:
                continue
            seen.add(text)
            part[0].append(text)
            part[1] += len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
    info = {"python": platform.python_version(), "stdlib_files_read": used, "stdlib_files": len(files)}
    for name, (docs, tokens, target) in sets.items():
        if tokens < target:
            raise ValueError(f"the standard library under {root!r} gave only {tokens} {name} tokens of docstrings; "
                             f"{target} were asked for")
        path = os.path.join(out_dir, name, "docstrings.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
        info[name] = {"path": os.path.dirname(path), "documents": len(docs), "tokens": tokens}
    return info


def _cached(path: str, make) -> None:
    """Precompute a cache unless ``workdir`` already holds a committed one (a re-run of the experiment)."""
    if not os.path.isfile(os.path.join(path, "dataset.json")):
        make()


def run_learning_experiment(*, steps: int = 150, seeds=(0,), seq_len: int = 128, held_out: int = 6,
                            corpus: str | None = None, held_out_corpus: str | None = None, teacher=None,
                            max_train: int | None = None, batch_size: int = 8, checkpoints=None,
                            workdir: str | None = None, log=None, methods=METHODS) -> dict:
    """Precompute RS-KD and top-k caches with the SmolLM2 teacher, train students, evaluate them.

    Training sequences are the packed ``corpus`` (``data/corpus`` by default). Held-out sequences
    are the first ``held_out`` packed sequences of ``held_out_corpus`` when given, else the last
    ``held_out`` of ``corpus`` (not cached, not trained on). Returns {method: [per seed, in
    order, the list :func:`train_student` returns]}, plus "unique_per_position" (RS-KD cache),
    "k", "train_sequences" and "teacher_ece" (the teacher's own ECE on the held-out positions).
    ``full`` holds the teacher's log-probs of every training sequence in memory (fp16:
    sequences x seq_len x vocabulary x 2 bytes).
    """
    from ..hf.corpus import read_corpus
    from ..hf.models import load_causal_lm
    from ..hf.packing import Packing, PackingRule
    from ..testing.real_models import smollm2_checkpoint

    lm = teacher or load_causal_lm(smollm2_checkpoint())
    default_corpus = os.path.join(os.path.dirname(__file__), "..", "..", "data", "corpus")
    corpus = read_corpus(corpus or default_corpus, tokenizer=lm.tokenizer)
    rule = PackingRule(seq_len=seq_len)
    packing = Packing(corpus.documents, lm.tokenizer, rule, corpus.fingerprint)
    if held_out_corpus:
        held = read_corpus(held_out_corpus, tokenizer=lm.tokenizer)
        held_packing = Packing(held.documents, lm.tokenizer, rule, held.fingerprint)
        if len(held_packing) < held_out:
            raise ValueError(f"held-out corpus {held_out_corpus!r} packs into {len(held_packing)} sequences of "
                             f"{seq_len} tokens; {held_out} were asked for")
        eval_rows = held_packing.sequences[:held_out]
        available = len(packing)
    else:
        eval_rows = packing.sequences[len(packing) - held_out:]
        available = len(packing) - held_out
    n_train = available if max_train is None else min(max_train, available)
    workdir = workdir or tempfile.mkdtemp(prefix="tsllm-learn-")
    rs = os.path.join(workdir, "rs-kd")
    _cached(rs, lambda: precompute(lm, corpus, rs, rule=rule, max_sequences=n_train, shard_sequences=8, batch_size=4))
    unique = dataset_stats(rs)["unique_per_position"]
    k = int(np.ceil(unique))
    tk = os.path.join(workdir, "top-k")
    if "top-k" in methods:
        _cached(tk, lambda: precompute(lm, corpus, tk, rule=rule, max_sequences=n_train, shard_sequences=8,
                                       batch_size=4, config=SamplingConfig(method="top-k", k=k)))
    eval_ids = torch.from_numpy(eval_rows.astype(np.int64))
    with torch.inference_mode():
        teacher_logp = torch.cat([torch.log_softmax(lm.model(input_ids=eval_ids[i:i + 1])
                                                    .logits[..., :lm.real_vocab].float(), -1)
                                  for i in range(held_out)])
    top_logp, top = teacher_logp[:, :-1].max(-1)
    teacher_ece = calibration_error(top_logp.exp().reshape(-1), (top == eval_ids[:, 1:]).reshape(-1))
    if log:
        log(f"{n_train} training sequences x {seq_len} tokens, {held_out} held out; RS-KD {unique:.1f} ids/position, "
            f"top-k k={k}; teacher's own held-out ECE {teacher_ece:.4f}")
    results: dict = {"unique_per_position": unique, "k": k, "train_sequences": n_train, "teacher_ece": teacher_ece}
    train_logp = None
    if "full" in methods:
        with torch.inference_mode():
            train_ids = [torch.from_numpy(packing.sequences[i:i + 1].astype(np.int64)) for i in range(n_train)]
            train_logp = {i: torch.log_softmax(lm.model(input_ids=ids).logits[0, :, :lm.real_vocab].float(), -1).half()
                          for i, ids in enumerate(train_ids)}
    for method in methods:
        results[method] = []
    for seed in seeds:                   # every method for a seed, then the next seed: partial runs compare
        for method in methods:
            results[method].append(train_student(method, rs if method != "top-k" else tk, lm.tokenizer, lm.real_vocab,
                                                 steps=steps, seed=seed, eval_ids=eval_ids, teacher_logp=teacher_logp,
                                                 batch_size=batch_size, checkpoints=checkpoints, log=log,
                                                 train_logp=train_logp))
    return results
