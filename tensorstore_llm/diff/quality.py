"""Model-level quality of a reconstructed fine-tune: KL of its next-token distribution to the truth.

A lossy delta is judged by what it does to the model, not only by its weight error:
:func:`delta_kl` loads the true fine-tune's weights and a candidate's (e.g. base + Δ̂) into the
same transformers model in turn, runs both on held-out token batches, and reports the mean over
tokens of KL(p_true || p_candidate), plus both perplexities (so a "+x% perplexity" figure such as
deltatensors' can be compared). ``tsllm diff-eval`` is meant to call it.
"""
from __future__ import annotations

import math

import torch

from ..default_budget import DEFAULT_MAX_MEMORY
from ..errors import ShapeMismatch, TensorNotFound


def load_weights(model, weights: dict) -> None:
    """Copy ``weights`` (name -> tensor, any float dtype) into ``model``'s parameters in place.

    Every name must be a parameter or buffer of the model with the same shape; parameters not
    named keep their values (tied ``lm_head`` weights follow the embedding).
    """
    state = model.state_dict()
    with torch.no_grad():
        for name, value in weights.items():
            if name not in state:
                raise TensorNotFound(f"delta_kl: tensor {name!r} is not in the model")
            if tuple(state[name].shape) != tuple(value.shape):
                raise ShapeMismatch(f"delta_kl: {name!r} has shape {tuple(value.shape)}, model expects {tuple(state[name].shape)}")
            state[name].copy_(value.to(state[name].dtype))


@torch.no_grad()
def _log_probs(model, batches) -> list[torch.Tensor]:
    out = []
    for ids in batches:
        logits = model(input_ids=ids).logits[:, :-1].float()          # [batch, seq-1, vocab]
        out.append(torch.log_softmax(logits, dim=-1))
    return out


@torch.no_grad()
def reference_log_probs(model, reference: dict, batches) -> list[torch.Tensor]:
    """The reference's next-token log-probabilities on ``batches``, to reuse across candidates."""
    load_weights(model, reference)
    return _log_probs(model, batches)


@torch.no_grad()
def delta_kl(model, reference: dict, candidate: dict, batches, reference_lp: list | None = None) -> dict:
    """Mean per-token KL(p_reference || p_candidate) and both perplexities on ``batches``.

    Args:
        model: a transformers causal LM whose parameters can hold both weight sets (fp32 keeps
            bf16-valued weights exact and the comparison free of compute-dtype noise).
        reference: name -> tensor, the true fine-tune (at least every tensor ``candidate`` names
            differently; loaded first).
        candidate: name -> tensor, e.g. the base plus a decoded lossy delta.
        batches: LongTensor token batches [batch, seq]; next-token predictions of positions
            0..seq-2 are compared, perplexity is on the tokens 1..seq-1.
        reference_lp: :func:`reference_log_probs` of the same reference and batches, when
            several candidates are compared (``reference`` is then not loaded).
    Returns:
        {"kl": mean KL in nats per token, "kl_max": largest per-token KL, "tokens": count,
         "ppl_reference", "ppl_candidate", "ppl_change": relative change of perplexity}.

    Example:
        >>> r = delta_kl(model, ft_weights, base_plus_delta, batches)   # doctest: +SKIP
        >>> r["kl"] >= 0
        True
    """
    ref = reference_lp if reference_lp is not None else reference_log_probs(model, reference, batches)
    load_weights(model, candidate)
    cand = _log_probs(model, batches)
    kl_sum, kl_max, tokens, nll_ref, nll_cand = 0.0, 0.0, 0, 0.0, 0.0
    for ids, lp, lq in zip(batches, ref, cand):
        kl = (lp.exp() * (lp - lq)).sum(-1)                              # [batch, seq-1]
        kl_sum += float(kl.double().sum())
        kl_max = max(kl_max, float(kl.max()))
        tokens += kl.numel()
        target = ids[:, 1:].unsqueeze(-1)
        nll_ref -= float(lp.gather(-1, target).double().sum())
        nll_cand -= float(lq.gather(-1, target).double().sum())
    ppl_ref, ppl_cand = math.exp(nll_ref / tokens), math.exp(nll_cand / tokens)
    return {"kl": kl_sum / tokens, "kl_max": kl_max, "tokens": tokens, "ppl_reference": ppl_ref,
            "ppl_candidate": ppl_cand, "ppl_change": ppl_cand / ppl_ref - 1.0}


def codec_report(codec, base: dict, target: dict, keep_reconstruction: bool = False) -> dict:
    """Encode every tensor of ``target`` against ``base`` with ``codec``, decode it, measure it.

    Errors are computed on what decoding returns (in fp64): per tensor the stored bytes, the
    raw bytes of the target, ‖Δ̂ − Δ‖ relative to ‖Δ‖ (``delta_rel``) and ‖Ŵ − W‖ relative to
    ‖W‖ (``weight_rel``); totals add squared errors over tensors.

    Args:
        codec: a delta codec instance (``get_codec(...)``).
        base, target: name -> tensor, same names, shapes and dtypes.
        keep_reconstruction: also return the decoded tensors (for :func:`delta_kl`).
    Returns:
        {"tensors": {name: {...}}, "bytes", "raw_bytes", "ratio", "delta_rel", "weight_rel",
         ["reconstruction": {name: tensor}]}.
    """
    rows, recon = {}, {}
    tot = {"bytes": 0, "raw_bytes": 0, "err2": 0.0, "delta2": 0.0, "weight2": 0.0}
    for name in sorted(target):
        if name not in base:
            raise TensorNotFound(f"codec_report: {name!r} is in the target but not in the base")
        b, t = base[name], target[name]
        data = codec.encode(b, t, tensor=name)
        r = codec.decode(b, data, tensor=name)
        err2 = float((r.double() - t.double()).pow(2).sum())
        delta2 = float((t.double() - b.double()).pow(2).sum())
        weight2 = float(t.double().pow(2).sum())
        raw = t.numel() * t.element_size()
        rows[name] = {"bytes": len(data), "raw_bytes": raw, "delta_rel": _ratio(err2, delta2),
                      "weight_rel": _ratio(err2, weight2)}
        for key, value in (("bytes", len(data)), ("raw_bytes", raw), ("err2", err2), ("delta2", delta2), ("weight2", weight2)):
            tot[key] += value
        if keep_reconstruction:
            recon[name] = r
    out = {"tensors": rows, "bytes": tot["bytes"], "raw_bytes": tot["raw_bytes"],
           "ratio": tot["raw_bytes"] / max(tot["bytes"], 1), "delta_rel": _ratio(tot["err2"], tot["delta2"]),
           "weight_rel": _ratio(tot["err2"], tot["weight2"])}
    if keep_reconstruction:
        out["reconstruction"] = recon
    return out


def _ratio(err2: float, norm2: float) -> float:
    if norm2 > 0:
        return math.sqrt(err2 / norm2)
    return 0.0 if err2 == 0 else math.inf


# -- streamed: lossy reconstruction as an engine plan, and its weight error -------------------------

def plan_lossy(base, target, codec: str, params: dict | None = None, names=None):
    """A validated Plan that writes ``base + Δ̂`` for every tensor of ``target`` with lossy codec
    ``codec`` (op ``delta_<codec>`` of :mod:`tensorstore_llm.ops.delta`; 1-D tensors exact).

    Args:
        base, target: opened TensorSources with the same tensor names, shapes and dtypes.
        codec: one of ``bf16``, ``low-rank``, ``top-k``, ``dare``, ``bitdelta``, ``mixed-svd``.
        params: the op's parameters (the codec's, except DARE's seed, which is the run seed).
    Returns:
        a Plan to run with ``Executor(plan, sink, RunOptions(max_memory=..., seed=...))``.

    Example:
        >>> plan = plan_lossy(base_src, ft_src, "low-rank", {"rank": 64})     # doctest: +SKIP
    """
    from ..engine.plan import plan_map
    from ..errors import CodecError
    from ..ops import delta as delta_ops

    if codec not in delta_ops.LOSSY_CODECS:
        raise CodecError(f"no streamed op for codec {codec!r}; lossy codecs: {', '.join(delta_ops.LOSSY_CODECS)}")
    return plan_map(delta_ops.op_name(codec), {"base": base, "target": target}, {"base": "base", "target": "target"},
                    params=params, names=names, where=f"lossy delta {codec}")


def reconstruction_error(base, target, recon, *, names=None, max_memory=DEFAULT_MAX_MEMORY, device="cpu", progress=False) -> dict:
    """Weight error of ``recon`` (e.g. a :func:`plan_lossy` result) against ``target``, streamed.

    One ``delta_error`` reduction job per tensor (fp64 sums, within ``max_memory``).

    Returns:
        {"tensors": {name: {"delta_rel": ‖Ŵ−W‖/‖Δ‖, "weight_rel": ‖Ŵ−W‖/‖W‖, "err2", "delta2",
         "weight2"}}, "delta_rel", "weight_rel" (totals pool the squared errors over tensors)}.
    """
    from ..engine.executor import Executor
    from ..engine.options import RunOptions
    from ..engine.plan import InputRef, Plan, TensorJob
    from ..ops import delta as _delta_ops  # noqa: F401  (registers delta_error)

    sources = {"base": base, "target": target, "recon": recon}
    jobs = [TensorJob(target.meta(name), "delta_error",
                      tuple((role, InputRef(role, name)) for role in ("base", "target", "recon")), reduce_only=True)
            for name in (names if names is not None else target.keys())]
    executor = Executor(Plan(jobs, sources), None, RunOptions(device=device, max_memory=max_memory, progress=progress),
                        desc="reconstruction error")
    executor.run()
    rows, tot = {}, {"err2": 0.0, "delta2": 0.0, "weight2": 0.0}
    for job in jobs:
        record = executor.records.get(job.output.name) or {"err2": 0.0, "delta2": 0.0, "weight2": 0.0}
        rows[job.output.name] = {**{k: record[k] for k in tot}, "delta_rel": _ratio(record["err2"], record["delta2"]),
                                 "weight_rel": _ratio(record["err2"], record["weight2"])}
        for key in tot:
            tot[key] += record[key]
    return {"tensors": rows, **tot, "delta_rel": _ratio(tot["err2"], tot["delta2"]),
            "weight_rel": _ratio(tot["err2"], tot["weight2"])}
