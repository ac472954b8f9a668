"""Reading a teacher-logit dataset for training: a torch IterableDataset and its collate function.

Each item is one packed sequence::

    {"input_ids": int64 [L], "labels": int64 [L] (= input_ids, Hugging Face convention: the
     model / loss shifts), "target_ids": int64 [L, K], "target_weights": float32 [L, K],
     "target_mask": bool [L, K]}

``target_*[p]`` is the teacher's distribution over token p + 1 given tokens <= p, i.e. aligned
with the student's logits at position p. Weights are counts / N (RS-KD, τ = 1), the stored
importance weights (τ ≠ 1) or the stored probabilities exp(logprob) (top-k, full). K is the most
ids any position of the sequence holds; ``collate_sparse`` pads K across a batch.

Sharding: with R ranks (``torch.distributed`` when initialised, or given) and W DataLoader
workers, the shard order of an epoch is a permutation seeded by (seed, epoch), and consumer
``rank * W + worker`` reads every (R * W)-th shard of it; when there are fewer shards than
consumers, every consumer reads all shards and keeps every (R * W)-th sequence instead. Either
way the shares are disjoint, cover the dataset, and are the same for the same (seed, epoch).

Several teachers: a dataset precomputed with several teachers (one shard, per-teacher columns),
or several datasets over the same packing (:class:`MultiTeacherDataset`), are combined per
sequence at read time by weights: ``average`` (t̂ = Σ_j w_j t̂_j over the union of the ids) or
``choice`` (each sequence takes teacher j's targets with probability w_j, seeded by (seed, epoch,
sequence)).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DatasetMismatch
from ..seeding import seed_value
from .encoding import SequenceTargets, decode_table
from .shards import open_dataset


def check_fingerprint(info: dict, *, tokenizer=None, packing_fingerprint: str | None = None,
                      expect: dict | None = None, where: str = "dataset") -> None:
    """Raise DatasetMismatch unless the dataset was made with this tokenizer / packing / settings.

    Args:
        info: the dataset's info (``ShardDataset.info``).
        tokenizer: the student's tokenizer; its fingerprint must equal the dataset's.
        packing_fingerprint: the packing fingerprint the training run uses.
        expect: other info fields that must be equal, e.g. {"seq_len": 2048, "kind": "rs-kd"}.
    """
    problems = []
    if tokenizer is not None:
        from ..hf.packing import tokenizer_fingerprint

        mine = tokenizer_fingerprint(tokenizer)
        if mine != info.get("tokenizer"):
            problems.append(f"tokenizer {mine[:12]} != the dataset's {str(info.get('tokenizer'))[:12]} "
                            f"(another tokenizer, vocabulary or chat template)")
    if packing_fingerprint is not None and packing_fingerprint != info.get("packing_fingerprint"):
        theirs = str(info.get("packing_fingerprint"))[:12]
        problems.append(f"packing {packing_fingerprint[:12]} != the dataset's {theirs} "
                        f"(dataset packing: {info.get('packing')})")
    for key, value in (expect or {}).items():
        have = info.get(key, info.get("sampling", {}).get(key))
        if have != value:
            problems.append(f"{key} = {have!r}, expected {value!r}")
    if problems:
        raise DatasetMismatch(f"{where} does not match this training run: " + "; ".join(problems))


def target_weights(seq: SequenceTargets, draws: int) -> np.ndarray:
    """Per stored pair the target weight t̂ (see the module docstring)."""
    r = seq.rows
    if r.weights is not None:
        return r.weights.astype(np.float32)
    if r.counts is not None:
        return r.counts.astype(np.float32) / float(draws)
    return np.exp(r.logprobs).astype(np.float32)


def to_item(seq: SequenceTargets, draws: int) -> dict:
    """One decoded sequence as the padded tensors described in the module docstring."""
    r = seq.rows
    lengths = np.diff(r.offsets)
    L, K = len(lengths), int(lengths.max(initial=1))
    slot = np.arange(len(r.ids)) - np.repeat(r.offsets[:-1], lengths)
    pos = np.repeat(np.arange(L), lengths)
    ids = np.zeros((L, K), dtype=np.int64)
    weights = np.zeros((L, K), dtype=np.float32)
    mask = np.zeros((L, K), dtype=bool)
    ids[pos, slot] = r.ids
    weights[pos, slot] = target_weights(seq, draws)
    mask[pos, slot] = True
    input_ids = torch.from_numpy(seq.input_ids.astype(np.int64))
    return {"input_ids": input_ids, "labels": input_ids.clone(), "target_ids": torch.from_numpy(ids),
            "target_weights": torch.from_numpy(weights), "target_mask": torch.from_numpy(mask)}


def collate_sparse(items: list[dict]) -> dict:
    """Stack items into a batch, padding the K axis of the targets (mask False, weight 0)."""
    K = max(it["target_ids"].shape[1] for it in items)
    out = {"input_ids": torch.stack([it["input_ids"] for it in items]),
           "labels": torch.stack([it["labels"] for it in items])}
    for name in ("target_ids", "target_weights", "target_mask"):
        out[name] = torch.stack([torch.nn.functional.pad(it[name], (0, K - it[name].shape[1])) for it in items])
    return out


class DistillDataset(IterableDataset):
    """Sequences of a teacher-logit dataset with their sparse targets, for a training loop.

    Args:
        path: a committed dataset directory, a store ref (with ``store``), or an opened dataset.
        store: a :class:`~tensorstore_llm.store.Store` to resolve ``path`` in when it is no directory.
        tokenizer / packing_fingerprint / expect: checked against the dataset's fingerprint
            (``check_fingerprint``); a mismatch raises DatasetMismatch at construction.
        rank / world_size: this process's share (default: torch.distributed, else 0 / 1).
        shuffle: permute the shard order per epoch (seeded by ``seed`` and ``set_epoch``).
        teacher_weights / teacher_mode: for a dataset of several teachers, one weight per teacher
            (default equal; a weight of 0 leaves that teacher out) and 'average' or 'choice'.

    Example:
        >>> ds = DistillDataset("/tmp/kd", tokenizer=tok)                     # doctest: +SKIP
        >>> loader = DataLoader(ds, batch_size=8, collate_fn=collate_sparse)  # doctest: +SKIP
    """

    def __init__(self, path, *, tokenizer=None, packing_fingerprint: str | None = None, expect: dict | None = None,
                 rank: int | None = None, world_size: int | None = None, shuffle: bool = True, seed: int = 0,
                 store=None, teacher_weights: list[float] | None = None, teacher_mode: str = "average"):
        self.dataset = open_dataset(path, store) if isinstance(path, str) else path
        self.info = self.dataset.info
        if self.dataset.kind != "logits":
            raise DatasetMismatch(f"{self.dataset.path} is a {self.dataset.kind!r} dataset, not teacher logits")
        check_fingerprint(self.info, tokenizer=tokenizer, packing_fingerprint=packing_fingerprint, expect=expect,
                          where=self.dataset.path)
        if rank is None or world_size is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if ready else 0
            world_size = dist.get_world_size() if ready else 1
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.draws = int(self.info["sampling"]["draws"])
        self.vocab = int(self.info["vocab"])
        self.teachers = len(self.info.get("teachers", [])) or 1
        self.teacher_weights = teacher_mix(teacher_weights, self.teachers, teacher_mode)
        self.teacher_mode = teacher_mode

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shard order is used (call before each epoch, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def shard_order(self) -> list[str]:
        names = self.dataset.shard_names()
        if not self.shuffle:
            return names
        rng = np.random.Generator(np.random.SFC64(seed_value(self.seed, "distill-shards", f"epoch/{self.epoch}")))
        return [names[i] for i in rng.permutation(len(names))]

    def _consumer(self) -> tuple[int, int]:
        worker = get_worker_info()
        workers, wid = (worker.num_workers, worker.id) if worker else (1, 0)
        return self.rank * workers + wid, self.world_size * workers

    def sequences(self):
        """Decoded :class:`SequenceTargets` of this consumer's share, in reading order."""
        me, consumers = self._consumer()
        order = self.shard_order()
        by_shard = len(order) >= consumers
        for k, name in enumerate(order):
            if by_shard and k % consumers != me:
                continue
            table = self.dataset.read_shard(name)
            if self.teachers == 1:
                decoded = decode_table(table, self.vocab, self.draws)
            else:
                per_teacher = [decode_table(table, self.vocab, self.draws, teacher=j) for j in range(self.teachers)]
                decoded = (mix_teachers(list(group), self.teacher_weights, [self.draws] * self.teachers,
                                        self.teacher_mode, self.seed, self.epoch) for group in zip(*per_teacher))
            for seq in decoded:
                if by_shard or seq.sequence % consumers == me:
                    yield seq

    def __iter__(self):
        for seq in self.sequences():
            yield to_item(seq, self.draws)


def combine_targets(seqs: list[SequenceTargets], weights: list[float], draws: list[int]) -> SequenceTargets:
    """One sequence's targets from several teachers: t̂ = Σ_j w_j t̂_j over the union of their ids.

    All ``seqs`` must be the same packed sequence (same index and token ids). The result carries
    float ``weights`` (no counts); ids stay ascending per position.
    """
    from .sampling import SparseRows

    first = seqs[0]
    for s in seqs[1:]:
        if s.sequence != first.sequence or not np.array_equal(s.input_ids, first.input_ids):
            raise DatasetMismatch(f"teachers disagree on sequence {first.sequence}: not the same corpus packing")
    L = len(first.input_ids)
    V = 1 + max(int(s.rows.ids.max(initial=0)) for s in seqs)
    keys, values = [], []
    for s, w, n in zip(seqs, weights, draws):
        pos = np.repeat(np.arange(L, dtype=np.int64), np.diff(s.rows.offsets))
        keys.append(pos * V + s.rows.ids)
        values.append(w * target_weights(s, n).astype(np.float64))
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    summed = np.bincount(inverse, weights=np.concatenate(values))
    offsets = np.searchsorted(unique // V, np.arange(L + 1), side="left").astype(np.int64)
    rows = SparseRows(offsets, (unique % V).astype(np.int32), weights=summed.astype(np.float32))
    return SequenceTargets(first.sequence, first.input_ids, rows)


def teacher_mix(weights: list[float] | None, teachers: int, mode: str) -> list[float]:
    """Validated teacher weights, normalised to sum to 1 (equal when None)."""
    if mode not in ("average", "choice"):
        raise DatasetMismatch(f"mode must be 'average' or 'choice', got {mode!r}")
    w = np.asarray(weights if weights is not None else [1.0] * teachers, dtype=np.float64)
    if len(w) != teachers or np.any(w < 0) or w.sum() <= 0:
        raise DatasetMismatch(f"need one non-negative weight per teacher ({teachers}), got {list(w)}")
    return (w / w.sum()).tolist()


def mix_teachers(seqs: list[SequenceTargets], weights: list[float], draws: list[int], mode: str, seed: int,
                 epoch: int) -> SequenceTargets:
    """One sequence's targets from several teachers' (see the module docstring); zero weights drop out."""
    if mode == "average":
        keep = [j for j, w in enumerate(weights) if w > 0]
        return combine_targets([seqs[j] for j in keep], [weights[j] for j in keep], [draws[j] for j in keep])
    rng = np.random.Generator(np.random.SFC64(seed_value(seed, "distill-teacher", f"epoch/{epoch}", seqs[0].sequence)))
    j = int(rng.choice(len(seqs), p=weights))
    return combine_targets([seqs[j]], [1.0], [draws[j]])


class MultiTeacherDataset(IterableDataset):
    """Several teacher-logit datasets over the same corpus packing and tokenizer, combined per sequence.

    Args:
        paths: datasets precomputed with the same tokenizer, packing and shard layout (same
            ``--seq-len``, ``--shard-sequences``, ``--max-sequences``); checked at construction.
        weights: one per teacher (normalised to sum to 1).
        mode: 'average' (t̂ = Σ_j w_j t̂_j) or 'choice' (each sequence takes one teacher's targets,
            teacher j with probability w_j, drawn from (seed, epoch, sequence)).
        other arguments as for :class:`DistillDataset` (applied to every teacher).
    """

    def __init__(self, paths: list, weights: list[float] | None = None, *, mode: str = "average", **kwargs):
        self.weights = teacher_mix(weights, len(paths), mode)
        self.parts = [DistillDataset(p, **kwargs) for p in paths]
        self.mode = mode
        base = self.parts[0]
        for p in self.parts[1:]:
            for key in ("tokenizer", "packing_fingerprint", "num_sequences", "vocab"):
                if p.info.get(key) != base.info.get(key):
                    raise DatasetMismatch(f"{p.dataset.path} and {base.dataset.path} differ in {key}: teachers must "
                                          f"share the tokenizer and the corpus packing")
            if p.dataset.shard_names() != base.dataset.shard_names():
                raise DatasetMismatch(f"{p.dataset.path} has other shards than {base.dataset.path}; precompute "
                                      f"every teacher with the same --shard-sequences")

    def set_epoch(self, epoch: int) -> None:
        for p in self.parts:
            p.set_epoch(epoch)

    def sequences(self):
        streams = [p.sequences() for p in self.parts]
        for seqs in zip(*streams):
            yield mix_teachers(list(seqs), self.weights, [p.draws for p in self.parts], self.mode,
                               self.parts[0].seed, self.parts[0].epoch)

    def __iter__(self):
        for seq in self.sequences():
            yield to_item(seq, 1)
