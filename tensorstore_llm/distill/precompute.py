"""Precompute a teacher's sparse targets over a packed corpus once, as a sharded dataset.

The teacher runs over the packed sequences in batches (``teacher_pass``): its final hidden states
are turned into logits ``position_chunk`` positions at a time (the [batch, seq, vocab] tensor
never exists), each chunk is softmaxed in fp32, sampled (RS-KD), truncated (top-k) or kept (full)
on the model's device, and freed; only the sparse result is copied back to the host, on a GPU
asynchronously (pinned buffers, a side stream, an event per chunk). Shard k
holds sequences ``[k * shard_sequences, (k + 1) * shard_sequences)``; a re-run after a crash
keeps the journalled shards and recomputes the rest, and because draws are seeded per sequence
(``sampling.sequence_uniforms``) the result is byte-identical to an uninterrupted run. A shard is
collected from the device, encoded, compressed, written, read back and journalled in a background
thread while the teacher computes the next one (at most one shard waits).

Several teachers sharing a tokenizer go into one dataset: every batch runs through each teacher,
and each keeps its own target columns (``encoding.encode_teachers``); teacher j > 0 draws from its
own seeded stream. :class:`PrecomputeJob` is what the local loop here and the Ray Data engine
(``distill.ray_engine``) share: packing, fingerprint, writer, shard plan and the batches.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import torch

from ..errors import DatasetMismatch
from ..hf.corpus import Corpus, read_corpus
from ..hf.models import CausalLM, check_vocab, load_causal_lm
from ..hf.packing import Packing, PackingRule
from .encoding import CODEC, SequenceTargets, encode_teachers, schema
from .shards import ZSTD_LEVEL, ShardWriter
from .teacher_pass import PendingTargets, teacher_targets, teacher_targets_async  # noqa: F401  (re-exported)

FORMAT = "tsllm-logits-v1"
METHODS = ("rs-kd", "top-k", "full")


@dataclass(frozen=True)
class SamplingConfig:
    """What is kept per position. All fields are part of the dataset fingerprint.

    method: 'rs-kd' (N draws from q ∝ t^τ), 'top-k' (k ids + log-probs) or 'full' (tiny tests).
    draws: N for RS-KD. tau: proposal exponent. self_normalise: for τ ≠ 1, whether stored
    weights are divided by their per-position sum. temperature: T in softmax(logits / T).
    k: for top-k. seed: run seed of the per-sequence generators. alignment: also store the
    teacher's per-token NLL, the sequence text and token character offsets.
    """

    method: str = "rs-kd"
    draws: int = 50
    tau: float = 1.0
    self_normalise: bool = False
    temperature: float = 1.0
    k: int = 50
    seed: int = 0
    alignment: bool = False

    def validate(self) -> None:
        if self.method not in METHODS:
            raise DatasetMismatch(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method == "rs-kd" and not 1 <= self.draws <= 65535:
            raise DatasetMismatch(f"draws must be in 1..65535, got {self.draws}")
        if self.temperature <= 0 or self.tau <= 0:
            raise DatasetMismatch("temperature and tau must be positive")
        if self.method == "top-k" and self.k < 1:
            raise DatasetMismatch(f"k must be at least 1, got {self.k}")

    @property
    def kind(self) -> str:
        if self.method == "rs-kd":
            return "rs-kd" if self.tau == 1.0 else "rs-kd-weighted"
        return self.method


def dataset_info(lm: CausalLM | list[CausalLM], corpus: Corpus, packing: Packing, config: SamplingConfig,
                 num_sequences: int | None = None) -> dict:
    """The dataset's fingerprint fields and the ``fingerprint`` digest over them.

    ``lm`` is the teacher, or the list of teachers of a several-teacher dataset (then ``teacher``
    is sha256 over their fingerprints in order and ``teachers`` lists each). ``num_sequences`` is
    the slice precomputed (the first so many packed sequences; all by default).
    """
    lms = lm if isinstance(lm, list) else [lm]
    if len(lms) == 1:
        teacher, source = lms[0].fingerprint, lms[0].source
    else:
        teacher = hashlib.sha256("\n".join(t.fingerprint for t in lms).encode()).hexdigest()
        source = " + ".join(t.source for t in lms)
    info = {
        "format": FORMAT, "codec": CODEC, "kind": config.kind,
        "teacher": teacher, "teacher_source": source,
        "tokenizer": packing.tokenizer_fingerprint, "chat_template": corpus.chat_template_sha,
        "corpus": corpus.fingerprint, "packing": packing.rule.to_dict(), "packing_fingerprint": packing.fingerprint(),
        "vocab": lms[0].real_vocab, "seq_len": packing.rule.seq_len,
        "num_sequences": len(packing) if num_sequences is None else int(num_sequences),
        "sampling": asdict(config),
    }
    if len(lms) > 1:
        info["teachers"] = [{"fingerprint": t.fingerprint, "source": t.source} for t in lms]
    info["fingerprint"] = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()
    return info


def encode_batch_async(lms: list[CausalLM], input_ids: np.ndarray, sequence_indices: list[int],
                       config: SamplingConfig, *,
                       alignment: list[tuple[str, np.ndarray]] | None = None, position_chunk: int = 128):
    """Run every teacher over ``input_ids`` (int32 [batch, seq_len]) and return a function that
    waits for the results to reach the host and encodes the batch's shard rows (a ``pa.Table``).

    The precompute calls the function in its writer thread, so that on a GPU the copies back,
    the encoding and the writes run behind the next forward pass. ``alignment`` (text, character
    offsets) per sequence is stored when ``config.alignment``.
    """
    ids = torch.from_numpy(input_ids.astype(np.int64))
    pendings = [teacher_targets_async(lm, ids, sequence_indices, config, position_chunk=position_chunk, teacher=j)
                for j, lm in enumerate(lms)]

    def encode() -> pa.Table:
        per_teacher = []
        for pending in pendings:
            rows, nll = pending.result()
            seqs = []
            for b, (i, r) in enumerate(zip(sequence_indices, rows)):
                seq = SequenceTargets(i, input_ids[b], r)
                if config.alignment:
                    seq.text, seq.char_offsets = alignment[b]
                    seq.nll = nll[b]
                seqs.append(seq)
            per_teacher.append(seqs)
        return encode_teachers(config.kind, per_teacher, lms[0].real_vocab, config.draws)
    return encode


def encode_batch(lms: list[CausalLM], input_ids: np.ndarray, sequence_indices: list[int], config: SamplingConfig, *,
                 alignment: list[tuple[str, np.ndarray]] | None = None, position_chunk: int = 128) -> pa.Table:
    """The shard rows of one batch: every teacher's targets for ``input_ids`` (int32 [batch, seq_len]).

    ``alignment`` (text, character offsets) per sequence is stored when ``config.alignment``.
    """
    return encode_batch_async(lms, input_ids, sequence_indices, config, alignment=alignment,
                              position_chunk=position_chunk)()


def shard_table(batch_tables: list[pa.Table], target: pa.Schema) -> pa.Table:
    """The batches of one shard as one contiguous table of schema ``target`` (no metadata), so
    that the Parquet bytes do not depend on how the rows were batched or which engine made them."""
    table = pa.concat_tables([t.select(target.names).cast(target) for t in batch_tables]).combine_chunks()
    return pa.table([table.column(n) for n in target.names], schema=target)


class PrecomputeJob:
    """The engine-independent part of a precompute: packing, fingerprint, writer and shard plan.

    Shard k holds sequences ``[k * shard_sequences, min(total, (k + 1) * shard_sequences))``,
    computed in batches ``[b, b + batch_size)`` from the shard's first sequence. ``lms`` may be
    teachers without a model (``hf.models.describe_causal_lm``) when another process runs them.
    """

    def __init__(self, lms: list[CausalLM], corpus: Corpus, config: SamplingConfig, rule: PackingRule, *,
                 batch_size: int, shard_sequences: int, max_sequences: int | None, out_dir: str | None, store):
        self.lms, self.corpus, self.config, self.store = lms, corpus, config, store
        self.batch_size, self.shard_sequences = int(batch_size), int(shard_sequences)
        self.packing = Packing(corpus.documents, lms[0].tokenizer, rule, corpus.fingerprint)
        self.total = len(self.packing) if max_sequences is None else min(len(self.packing), int(max_sequences))
        self.info = dataset_info(lms if len(lms) > 1 else lms[0], corpus, self.packing, config, self.total)
        self.schema = schema(config.kind, with_alignment=config.alignment, teachers=len(lms))
        if store is not None:
            from ..store import job_key

            self.writer = store.create_dataset(job_key("logits", self.info["fingerprint"]))
            self.write_options = {"compression_level": ZSTD_LEVEL}
        elif out_dir is not None:
            self.writer = ShardWriter(out_dir, job_key=self.info["fingerprint"])
            self.write_options = {}
        else:
            raise DatasetMismatch("precompute needs an output directory or a store")
        self.done = self.writer.completed_shards()
        self.names = [f"shard-{k:05d}.parquet" for k in range((self.total + shard_sequences - 1) // shard_sequences)]

    def shard_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_sequences, min(self.total, (k + 1) * self.shard_sequences)

    def pending(self) -> list[int]:
        """Shards still to compute (those not journalled by an earlier run)."""
        return [k for k, name in enumerate(self.names) if name not in self.done]

    def batches(self, k: int) -> list[list[int]]:
        lo, hi = self.shard_range(k)
        return [list(range(b, min(hi, b + self.batch_size))) for b in range(lo, hi, self.batch_size)]

    def batch_inputs(self, idx: list[int]) -> tuple[np.ndarray, list | None]:
        """(int32 token ids [len(idx), seq_len], (text, offsets) per sequence when alignment is asked)."""
        alignment = [self.packing.text_and_offsets(i) for i in idx] if self.config.alignment else None
        return self.packing.sequences[idx], alignment

    def write(self, k: int, table: pa.Table) -> None:
        self.done[self.names[k]] = self.writer.write_shard(self.names[k], table, **self.write_options)

    def finish(self, *, name: str | None = None, parents: list[str] | None = None):
        """Commit: the store artifact (tagged ``name``; ``parents`` are teacher artifact ids) or the
        dataset directory."""
        if self.store is not None:
            lineage = [p if isinstance(p, dict) else {"id": p, "role": "teacher"} for p in parents or []]
            artifact = self.writer.commit(kind="logits", parents=lineage, info=self.info)
            if name:
                self.store.tag(artifact.id, name)
            return artifact
        files = {shard: {"sha256": self.done[shard]} for shard in self.names}
        return self.writer.commit(kind="logits", parents=list(parents or [t.fingerprint for t in self.lms]),
                                  info=self.info, files=files)


def _encode_and_write(job: PrecomputeJob, k: int, encoders: list) -> None:
    """Writer thread: wait for shard k's batches to reach the host, encode, write and journal it."""
    job.write(k, shard_table([encode() for encode in encoders], job.schema))


def check_settings(config: SamplingConfig, **sizes) -> None:
    """Refuse bad settings before anything is loaded."""
    config.validate()
    for label, value in sizes.items():
        if value is not None and int(value) < 1:
            raise DatasetMismatch(f"{label} must be at least 1, got {value}")


def same_tokenizer(lms: list[CausalLM]) -> None:
    """Teachers of one dataset must share the tokenizer (the targets index one vocabulary)."""
    from ..hf.packing import tokenizer_fingerprint

    first = tokenizer_fingerprint(lms[0].tokenizer)
    for lm in lms[1:]:
        if tokenizer_fingerprint(lm.tokenizer) != first:
            raise DatasetMismatch(f"teachers {lms[0].source} and {lm.source} have different tokenizers; several "
                                  f"teachers go into one dataset only when they share the tokenizer")


def precompute(teacher: CausalLM | str | list, corpus: Corpus | str, out_dir: str | None = None, *,
               config: SamplingConfig = SamplingConfig(), rule: PackingRule = PackingRule(), batch_size: int = 4,
               shard_sequences: int = 64, max_sequences: int | None = None, position_chunk: int = 128,
               progress=None, store=None, name: str | None = None, parents: list[str] | None = None):
    """Run ``teacher`` over ``corpus`` once and commit the sparse-target dataset at ``out_dir``.

    Args:
        teacher: a loaded :class:`CausalLM`, or an HF directory / hub id to load; or a list of
            them (several teachers with one tokenizer: one dataset with per-teacher targets).
        corpus: a :class:`Corpus` or a corpus path (chat corpora render with the teacher's template).
        out_dir: a directory to commit the dataset to (staged in ``<out_dir>.partial`` until then);
            or None with ``store``.
        store / name / parents: commit into this :class:`~tensorstore_llm.store.Store` instead, as an
            artifact of kind ``logits`` (staged under the store, resumable by its job key), tagged
            ``name``, with ``parents`` (e.g. the teacher's artifact id) as lineage.
        config: method, N, τ, T, k, seed, alignment data.
        rule: the packing rule (seq_len, shuffle seed, BOS).
        batch_size: sequences per forward pass.
        shard_sequences: sequences per Parquet shard (the unit of resume).
        max_sequences: only the first so many packed sequences (slices for tests / trials).
        position_chunk: positions per LM-head application.
        progress: optional callable(done_sequences, total_sequences).
    Returns:
        ``out_dir``, or the committed store Artifact.
    Raises:
        DatasetMismatch: bad settings, empty / too-short corpus, teacher logits narrower than its
            tokenizer, teachers with different tokenizers, or a partial run at ``out_dir`` made
            with other settings.

    Example:
        >>> precompute(smollm2_checkpoint(), "data/corpus", "/tmp/kd",
        ...            rule=PackingRule(seq_len=256), max_sequences=8)   # doctest: +SKIP
    """
    check_settings(config, batch_size=batch_size, shard_sequences=shard_sequences, position_chunk=position_chunk,
                   max_sequences=max_sequences)
    teachers = teacher if isinstance(teacher, list) else [teacher]
    lms = [t if isinstance(t, CausalLM) else load_causal_lm(t) for t in teachers]
    for lm in lms:
        check_vocab(lm.model, lm.tokenizer)
    same_tokenizer(lms)
    if not isinstance(corpus, Corpus):
        corpus = read_corpus(corpus, tokenizer=lms[0].tokenizer)
    job = PrecomputeJob(lms, corpus, config, rule, batch_size=batch_size, shard_sequences=shard_sequences,
                        max_sequences=max_sequences, out_dir=out_dir, store=store)
    try:
        # writes behind the forward passes
        with ThreadPoolExecutor(1, thread_name_prefix="tsllm-shard-writer") as behind:
            pending = None
            for k in range(len(job.names)):
                if job.names[k] in job.done:
                    if progress:
                        progress(job.shard_range(k)[1], job.total)
                    continue
                encoders = []                         # per batch: wait for its copies back, encode
                for idx in job.batches(k):
                    input_ids, alignment = job.batch_inputs(idx)
                    encoders.append(encode_batch_async(lms, input_ids, idx, config, alignment=alignment,
                                                       position_chunk=position_chunk))
                    if progress:
                        progress(idx[-1] + 1, job.total)
                if pending is not None:
                    pending.result()                  # at most one shard waits to be written
                pending = behind.submit(_encode_and_write, job, k, encoders)
            if pending is not None:
                pending.result()
    except BaseException:
        job.writer.close()                        # keep what is staged: a re-run resumes from it
        raise
    return job.finish(name=name, parents=parents)
