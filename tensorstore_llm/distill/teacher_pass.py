"""The teacher's pass over one batch: forward, LM head over position chunks, sampling on the device,
and the sparse results on their way back to the host.

The final hidden states are turned into logits ``position_chunk`` positions at a time (the
[batch, seq, vocab] tensor never exists); each chunk is softmaxed in fp32 and sampled (RS-KD),
truncated (top-k) or kept (full) where the model is, then freed. Only the sparse result of a
chunk leaves the device: on a GPU through pinned host buffers, ``non_blocking`` copies on a side
stream and a CUDA event per chunk (``host_copy.HostCopy``), so :func:`teacher_targets_async`
returns with the copies in flight and the next forward pass can be queued; on the CPU the same
code runs and the copy is a pass-through.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..hf.models import CausalLM, final_hidden, head_logits
from . import sampling
from .host_copy import HostCopy
from .sampling import SparseRows

if TYPE_CHECKING:
    from .precompute import SamplingConfig


def _concat_rows(parts: list[SparseRows]) -> SparseRows:
    offsets = [np.zeros(1, dtype=np.int64)]
    base = 0
    for p in parts:
        offsets.append(p.offsets[1:] + base)
        base += int(p.offsets[-1])

    def cat(field):
        values = [getattr(p, field) for p in parts]
        return None if values[0] is None else np.concatenate(values)
    return SparseRows(np.concatenate(offsets), cat("ids"), cat("counts"), cat("weights"), cat("logprobs"),
                      cat("coverage"))


class PendingTargets:
    """One batch's sparse targets on their way to the host (see ``host_copy``).

    Holds one :class:`~tensorstore_llm.distill.host_copy.HostCopy` per position chunk (the
    sampled rows and, with alignment, the teacher NLL). :meth:`result` waits for the copies and
    assembles the per-sequence rows; on the CPU the copies are pass-throughs and ``result`` does
    what ``teacher_targets`` always did.
    """

    def __init__(self, batch: int, seq_len: int, method: str, draws: int):
        self.batch, self.seq_len, self.method, self.draws = batch, seq_len, method, draws
        self.chunks: list[tuple[int, int, HostCopy]] = []          # (start, stop, copies)

    def add(self, start: int, stop: int, tensors: dict) -> None:
        self.chunks.append((start, stop, HostCopy(tensors)))

    def result(self) -> tuple[list[SparseRows], list[np.ndarray]]:
        """(rows per sequence, nll per sequence), as :func:`teacher_targets` returns them."""
        parts: list[list[SparseRows]] = [[] for _ in range(self.batch)]
        nll = np.full((self.batch, self.seq_len), np.nan, dtype=np.float32)
        for s, _e, copy in self.chunks:
            host = copy.wait()
            if host.get("nll") is not None:
                c = host["nll"].shape[1]
                nll[:, s + 1:s + 1 + c] = host["nll"].numpy()
            if self.method == "rs-kd":                           # one set of rows for the whole batch
                for b, r in enumerate(sampling.split_rows(sampling.rows_from_tensors(host, self.draws), self.batch)):
                    parts[b].append(r)
            else:                                                # one set per sequence
                for b in range(self.batch):
                    parts[b].append(sampling.rows_from_tensors({k[len(f"{b}."):]: v for k, v in host.items()
                                                                if k.startswith(f"{b}.")}))
        return [_concat_rows(p) for p in parts], list(nll)


def teacher_targets_async(lm: CausalLM, input_ids: torch.Tensor, sequence_indices: list[int], config: SamplingConfig,
                          *, position_chunk: int = 128, teacher: int = 0) -> PendingTargets:
    """Run the teacher over a batch and sample it on the model's device; the sparse results are
    copied to the host asynchronously (CUDA) and collected by ``PendingTargets.result()``.

    Arguments as :func:`teacher_targets`. On a GPU this returns once the last chunk's kernels and
    copies are queued (the unique-id step's data-dependent sizes make the CPU wait for each
    chunk's sampling kernels, not for its copy), so the caller can start the next forward pass.
    """
    V = lm.real_vocab
    B, L = input_ids.shape
    pending = PendingTargets(B, L, config.method, config.draws)
    with torch.inference_mode():
        hidden = final_hidden(lm.model, input_ids.to(lm.model.device))
        for s in range(0, L, position_chunk):
            e = min(L, s + position_chunk)
            logits = head_logits(lm.model, hidden[:, s:e], V)                      # [B, c, V] fp32, on the device
            tensors: dict = {"nll": None}
            if config.alignment:                                                      # teacher NLL at T = 1
                nxt = input_ids[:, s + 1:e + 1].to(logits.device)                    # [B, c'] next tokens
                c = nxt.shape[1]
                lse = torch.logsumexp(logits[:, :c], dim=-1)
                tensors["nll"] = lse - torch.gather(logits[:, :c], 2, nxt.unsqueeze(-1)).squeeze(-1)
            if config.method == "rs-kd":                                   # all sequences of the batch at once
                c = e - s
                probs = sampling.proportional_probs_(logits, config.temperature).view(B * c, V)   # overwrites logits
                u = torch.cat([sampling.sequence_uniforms(config.seed, sequence_indices[b], L, config.draws, s, e,
                                                          teacher)
                               for b in range(B)])                                    # [B * c, N]
                tensors.update(sampling.rs_kd_tensors(probs, u, tau=config.tau, self_normalise=config.self_normalise))
            else:
                probs = sampling.teacher_probs(logits, config.temperature)         # [B, c, V]
                for b in range(B):
                    one = (sampling.top_k_tensors(probs[b], config.k) if config.method == "top-k"
                           else sampling.full_tensors(probs[b]))
                    tensors.update({f"{b}.{k}": v for k, v in one.items()})
            pending.add(s, e, tensors)
            del logits, probs
    return pending


def teacher_targets(lm: CausalLM, input_ids: torch.Tensor, sequence_indices: list[int], config: SamplingConfig,
                    *, position_chunk: int = 128, teacher: int = 0) -> tuple[list[SparseRows], list[np.ndarray]]:
    """Sparse targets (and per-token teacher NLL) for a batch of packed sequences.

    Args:
        lm: the teacher.
        input_ids: int64 [batch, seq_len].
        sequence_indices: global index of each row (seeds its RS-KD draws).
        config: what to keep per position.
        position_chunk: positions per LM-head application.
        teacher: the teacher's index in a several-teacher dataset (selects its draw stream).
    Returns:
        (rows per sequence, nll per sequence) where nll[j] = -log p(x_j | x_<j) at T = 1 and
        nll[0] = NaN (all NaN unless ``config.alignment``).
    """
    return teacher_targets_async(lm, input_ids, sequence_indices, config, position_chunk=position_chunk,
                                 teacher=teacher).result()
