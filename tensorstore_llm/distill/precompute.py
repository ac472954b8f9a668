"""Precompute a teacher's sparse targets over a packed corpus once, as a sharded dataset.

The teacher runs over the packed sequences in batches; its final hidden states are turned into
logits ``position_chunk`` positions at a time (the [batch, seq, vocab] tensor never exists), each
chunk is softmaxed in fp32, sampled (RS-KD), truncated (top-k) or kept (full) on the model's device,
and freed; only the sparse result is copied to the CPU. Shard k
holds sequences ``[k * shard_sequences, (k + 1) * shard_sequences)``; a re-run after a crash
keeps the journalled shards and recomputes the rest, and because draws are seeded per sequence
(``sampling.sequence_uniforms``) the result is byte-identical to an uninterrupted run. A shard is
encoded, compressed, written, read back and journalled in a background thread while the teacher
computes the next one (at most one shard waits).
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import DatasetMismatch
from ..hf.corpus import Corpus, read_corpus
from ..hf.models import CausalLM, check_vocab, final_hidden, head_logits, load_causal_lm
from ..hf.packing import Packing, PackingRule
from . import sampling
from .encoding import CODEC, SequenceTargets, encode_rows
from .sampling import SparseRows
from .shards import ZSTD_LEVEL, ShardWriter

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


def dataset_info(lm: CausalLM, corpus: Corpus, packing: Packing, config: SamplingConfig,
                 num_sequences: int | None = None) -> dict:
    """The dataset's fingerprint fields and the ``fingerprint`` digest over them.

    ``num_sequences`` is the slice precomputed (the first so many packed sequences; all by default).
    """
    info = {
        "format": FORMAT, "codec": CODEC, "kind": config.kind,
        "teacher": lm.fingerprint, "teacher_source": lm.source,
        "tokenizer": packing.tokenizer_fingerprint, "chat_template": corpus.chat_template_sha,
        "corpus": corpus.fingerprint, "packing": packing.rule.to_dict(), "packing_fingerprint": packing.fingerprint(),
        "vocab": lm.real_vocab, "seq_len": packing.rule.seq_len,
        "num_sequences": len(packing) if num_sequences is None else int(num_sequences),
        "sampling": asdict(config),
    }
    info["fingerprint"] = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()
    return info


def _concat_rows(parts: list[SparseRows]) -> SparseRows:
    offsets = [np.zeros(1, dtype=np.int64)]
    base = 0
    for p in parts:
        offsets.append(p.offsets[1:] + base)
        base += int(p.offsets[-1])

    def cat(field):
        values = [getattr(p, field) for p in parts]
        return None if values[0] is None else np.concatenate(values)
    return SparseRows(np.concatenate(offsets), cat("ids"), cat("counts"), cat("weights"), cat("logprobs"), cat("coverage"))


def teacher_targets(lm: CausalLM, input_ids: torch.Tensor, sequence_indices: list[int], config: SamplingConfig,
                    *, position_chunk: int = 128) -> tuple[list[SparseRows], list[np.ndarray]]:
    """Sparse targets (and per-token teacher NLL) for a batch of packed sequences.

    Args:
        lm: the teacher.
        input_ids: int64 [batch, seq_len].
        sequence_indices: global index of each row (seeds its RS-KD draws).
        config: what to keep per position.
        position_chunk: positions per LM-head application.
    Returns:
        (rows per sequence, nll per sequence) where nll[j] = -log p(x_j | x_<j) at T = 1 and
        nll[0] = NaN (all NaN unless ``config.alignment``).
    """
    V = lm.real_vocab
    B, L = input_ids.shape
    parts: list[list[SparseRows]] = [[] for _ in range(B)]
    nll = np.full((B, L), np.nan, dtype=np.float32)
    with torch.inference_mode():
        hidden = final_hidden(lm.model, input_ids.to(lm.model.device))
        for s in range(0, L, position_chunk):
            e = min(L, s + position_chunk)
            logits = head_logits(lm.model, hidden[:, s:e], V)                      # [B, c, V] fp32, on the device
            if config.alignment:                                                      # teacher NLL at T = 1
                nxt = input_ids[:, s + 1:e + 1].to(logits.device)                    # [B, c'] next tokens
                c = nxt.shape[1]
                lse = torch.logsumexp(logits[:, :c], dim=-1)
                nll[:, s + 1:s + 1 + c] = (lse - torch.gather(logits[:, :c], 2, nxt.unsqueeze(-1)).squeeze(-1)).cpu().numpy()
            if config.method == "rs-kd":                                             # all sequences of the batch at once
                c = e - s
                probs = sampling.proportional_probs_(logits, config.temperature).view(B * c, V)   # overwrites logits
                u = torch.cat([sampling.sequence_uniforms(config.seed, sequence_indices[b], L, config.draws, s, e)
                               for b in range(B)])                                    # [B * c, N]
                rows = sampling.rs_kd(probs, u, tau=config.tau, self_normalise=config.self_normalise)
                for b, r in enumerate(sampling.split_rows(rows, B)):
                    parts[b].append(r)
            else:
                probs = sampling.teacher_probs(logits, config.temperature)         # [B, c, V]
                for b in range(B):
                    parts[b].append(sampling.top_k(probs[b], config.k) if config.method == "top-k" else sampling.full(probs[b]))
            del logits, probs
    return [_concat_rows(p) for p in parts], list(nll)


def precompute(teacher: CausalLM | str, corpus: Corpus | str, out_dir: str | None = None, *,
               config: SamplingConfig = SamplingConfig(), rule: PackingRule = PackingRule(), batch_size: int = 4,
               shard_sequences: int = 64, max_sequences: int | None = None, position_chunk: int = 128,
               progress=None, store=None, name: str | None = None, parents: list[str] | None = None):
    """Run ``teacher`` over ``corpus`` once and commit the sparse-target dataset at ``out_dir``.

    Args:
        teacher: a loaded :class:`CausalLM`, or an HF directory / hub id to load.
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
            tokenizer, or a partial run at ``out_dir`` made with other settings.

    Example:
        >>> precompute(smollm2_checkpoint(), "data/corpus", "/tmp/kd",
        ...            rule=PackingRule(seq_len=256), max_sequences=8)   # doctest: +SKIP
    """
    config.validate()
    for label, value in (("batch_size", batch_size), ("shard_sequences", shard_sequences),
                         ("position_chunk", position_chunk), ("max_sequences", 1 if max_sequences is None else max_sequences)):
        if int(value) < 1:
            raise DatasetMismatch(f"{label} must be at least 1, got {value}")
    lm = teacher if isinstance(teacher, CausalLM) else load_causal_lm(teacher)
    check_vocab(lm.model, lm.tokenizer)
    if not isinstance(corpus, Corpus):
        corpus = read_corpus(corpus, tokenizer=lm.tokenizer)
    packing = Packing(corpus.documents, lm.tokenizer, rule, corpus.fingerprint)
    total = len(packing) if max_sequences is None else min(len(packing), int(max_sequences))
    info = dataset_info(lm, corpus, packing, config, total)
    if store is not None:
        from ..store import job_key

        writer = store.create_dataset(job_key("logits", info["fingerprint"]))
        write_options = {"compression_level": ZSTD_LEVEL}
    elif out_dir is not None:
        writer = ShardWriter(out_dir, job_key=info["fingerprint"])
        write_options = {}
    else:
        raise DatasetMismatch("precompute needs an output directory or a store")
    done = writer.completed_shards()
    names = [f"shard-{k:05d}.parquet" for k in range((total + shard_sequences - 1) // shard_sequences)]

    def write(shard, sequences):
        done[shard] = writer.write_shard(shard, encode_rows(config.kind, sequences, lm.real_vocab, config.draws),
                                        **write_options)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="tsllm-shard-writer") as behind:   # writes behind the forward passes
            pending = None
            for k, shard in enumerate(names):
                lo, hi = k * shard_sequences, min(total, (k + 1) * shard_sequences)
                if shard in done:
                    if progress:
                        progress(hi, total)
                    continue
                sequences = []
                for b in range(lo, hi, batch_size):
                    idx = list(range(b, min(hi, b + batch_size)))
                    ids = torch.from_numpy(packing.sequences[idx].astype(np.int64))
                    rows, nll = teacher_targets(lm, ids, idx, config, position_chunk=position_chunk)
                    for i, r, n in zip(idx, rows, nll):
                        seq = SequenceTargets(i, packing.sequences[i], r)
                        if config.alignment:
                            seq.text, seq.char_offsets = packing.text_and_offsets(i)
                            seq.nll = n
                        sequences.append(seq)
                    if progress:
                        progress(idx[-1] + 1, total)
                if pending is not None:
                    pending.result()                  # at most one shard waits to be written
                pending = behind.submit(write, shard, sequences)
            if pending is not None:
                pending.result()
    except BaseException:
        writer.close()                            # keep what is staged: a re-run resumes from it
        raise
    if store is not None:
        artifact = writer.commit(kind="logits", parents=list(parents or []), info=info)
        if name:
            store.tag(artifact.id, name)
        return artifact
    files = {shard: {"sha256": done[shard]} for shard in names}
    return writer.commit(kind="logits", parents=[lm.fingerprint], info=info, files=files)
