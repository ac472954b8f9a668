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
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DatasetMismatch
from ..seeding import seed_value
from .encoding import SequenceTargets, decode_table
from .shards import ShardDataset, open_dataset


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
        problems.append(f"packing {packing_fingerprint[:12]} != the dataset's {str(info.get('packing_fingerprint'))[:12]} "
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
        path: a committed dataset directory (or an opened :class:`ShardDataset`).
        tokenizer / packing_fingerprint / expect: checked against the dataset's fingerprint
            (``check_fingerprint``); a mismatch raises DatasetMismatch at construction.
        rank / world_size: this process's share (default: torch.distributed, else 0 / 1).
        shuffle: permute the shard order per epoch (seeded by ``seed`` and ``set_epoch``).

    Example:
        >>> ds = DistillDataset("/tmp/kd", tokenizer=tok)                     # doctest: +SKIP
        >>> loader = DataLoader(ds, batch_size=8, collate_fn=collate_sparse)  # doctest: +SKIP
    """

    def __init__(self, path, *, tokenizer=None, packing_fingerprint: str | None = None, expect: dict | None = None,
                 rank: int | None = None, world_size: int | None = None, shuffle: bool = True, seed: int = 0):
        self.dataset = path if isinstance(path, ShardDataset) else open_dataset(path)
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
            for seq in decode_table(self.dataset.read_shard(name), self.vocab, self.draws):
                if by_shard or seq.sequence % consumers == me:
                    yield seq

    def __iter__(self):
        for seq in self.sequences():
            yield to_item(seq, self.draws)
