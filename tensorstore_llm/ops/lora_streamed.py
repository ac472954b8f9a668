"""Whole-tensor LoRA ops the engine streams module by module: extract, combine, SVD init.

Each job reads one module's tensors (a base weight, a fine-tuned weight, or the factors of
several adapters), computes in fp32 and returns several outputs (``A``, ``B`` and a small
record such as the delta's energy), so a model of any size is processed one module at a time.

- ``lora_extract``: A, B of the rank-r truncated SVD of W_ft - W_base, plus
  ``[||W_ft - W_base||_F^2]``; the captured energy is sum(sigma_i^2) = sum_i ||A_i||^2 since
  A = sqrt(S) V^T. By default the exact truncation through the Gram matrix of the delta's
  smaller side (``ops.lora_extract.gram_svd``); ``method="randomized"`` is the randomised SVD
  (Halko et al. 2011; 3 power iterations and a sketch of 1.5 r).
- ``lora_combine_merge``: W + lambda * combine_i(w_i * s_i B_i A_i) with PEFT's ``ties`` /
  ``dare_linear`` / linear semantics on the full deltas (never on A and B separately). DARE's
  keep masks are drawn per (run seed, module, adapter), never from a global RNG.
- ``lora_combine_factors``: the same combination re-factored to rank r by randomised SVD (a
  TIES / DARE delta is sparse and full-rank, so there are no factors to stack).
- ``svd_init_factors``: PiSSA / GOAT factors of W0 (exact fp32 SVD); the residual base is a
  ``lora_merge`` of the same factors with scaling -s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..seeding import seed_for, uniform_rows
from .lora import goat_init, lora_delta, pissa_init
from .lora_extract import SVD_METHODS, truncated_svd
from .registry import op

COMBINE_METHODS = ("linear", "ties", "dare_linear")


@dataclass(frozen=True)
class LoraExtractParams:
    """Target rank, the module (names the outputs and seeds the projection) and the SVD method;
    ``power_iters`` and ``oversample`` are the randomised method's."""

    rank: int
    module: str
    method: str = "gram"     # exact truncation; "randomized": cheaper, ~1e-3 less energy on a flat noise tail
    power_iters: int = 3
    oversample: int = 0      # 0: max(10, rank // 2); on a flat noise tail a larger sketch finds its top directions

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.method not in SVD_METHODS:
            raise ValueError(f"method must be one of {SVD_METHODS}, got {self.method!r}")
        if self.power_iters < 2:
            raise ValueError(f"power_iters must be >= 2, got {self.power_iters}")


def factor_names(module: str) -> tuple[str, str, str]:
    """Output names of a factor job: (A, B, record) for ``module``."""
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight", f"{module}.lora_record"


@op("lora_extract", inputs=("base", "ft"), params=LoraExtractParams, rowwise=False, random=True, temps=4)
def lora_extract_op(ctx, params, base, ft):
    """A (r x in), B (out x r) with B @ A the rank-r truncated SVD of ft - base (``params.method``);
    record: [||D||^2]. The inputs come in their stored dtype and are never written to."""
    oversample = params.oversample or max(10, params.rank // 2)
    A, B, total = rank_factors(ft, base, params.rank, method=params.method, oversample=oversample,
                               power_iters=params.power_iters,
                               generator=seed_for(ctx.seed, "lora_extract", params.module),
                               name=f"lora extract: module {params.module}: ft - base")
    a, b, rec = factor_names(params.module)
    return {a: A, b: B, rec: torch.tensor([total], dtype=torch.float32)}


def rank_factors(ft: torch.Tensor, base: torch.Tensor | None, rank: int, *, method: str, oversample: int,
                 power_iters: int, generator: torch.Generator,
                 name: str = "the delta") -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, ||D||_F^2) of D = ft - base (``base=None``: D = ft): bit for bit the factors
    ``extract_lora(ft.float() - base.float(), rank=rank, method=method, ...)`` gives, without an
    fp64 copy of the whole delta (``"gram"``: without any whole fp32 copy either). Raises
    NonFiniteValues naming ``name`` when D has a NaN or infinite entry."""
    U, S, Vh, total = truncated_svd(ft, base, rank, method=method, oversample=oversample,
                                    power_iters=power_iters, generator=generator, name=name)
    root = S[:rank].sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :], total


@dataclass(frozen=True)
class LoraCombineParams:
    """Per adapter: weight w_i and LoRA scale s_i; the method and its density; the layout."""

    weights: tuple[float, ...]
    scalings: tuple[float, ...]
    method: str = "linear"
    density: float = 1.0
    lam: float = 1.0
    transpose: bool = False
    rank: int = 0            # lora_combine_factors: the rank of the re-factored delta
    module: str = ""

    def __post_init__(self):
        if self.method not in COMBINE_METHODS:
            raise ValueError(f"method must be one of {COMBINE_METHODS}, got {self.method!r}")
        if len(self.weights) != len(self.scalings) or not self.weights:
            raise ValueError(f"{len(self.weights)} weights but {len(self.scalings)} adapters")
        if not all(math.isfinite(v) for v in (*self.weights, *self.scalings, self.lam)):
            raise ValueError("weights, scalings and lambda must be finite")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's ``magnitude_based_pruning``: keep the int(density * numel) largest |entries|."""
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices] = 1
    return delta * mask.reshape(delta.shape)


def combine_deltas(ctx, params: LoraCombineParams, factors) -> torch.Tensor:
    """combine_i(w_i * D_i) over D_i = s_i B_i A_i in the stored layout (fp32), PEFT's rules:

    - linear: sum_i w_i D_i;
    - ties: prune each D_i to ``density`` by magnitude, elect the sign of sum_i D_i (unweighted,
      as PEFT), then the mean of the agreeing w_i D_i per entry (disjoint merge);
    - dare_linear: keep each entry with probability ``density`` (uniform draws seeded by run seed,
      module and adapter, identical on any device),
      rescale by 1 / density, sum_i w_i D_i.
    """
    factors = list(factors)
    deltas = [lora_delta(factors[2 * i], factors[2 * i + 1], s, transpose=params.transpose)
              for i, s in enumerate(params.scalings)]
    if params.method == "linear":
        return sum(w * d for w, d in zip(params.weights, deltas))
    if params.method == "dare_linear":
        out = None
        for i, (w, d) in enumerate(zip(params.weights, deltas)):
            u = uniform_rows(ctx.seed, f"lora_combine/adapter{i}", params.module, tuple(d.shape), 0, d.shape[0])
            keep = (u.to(d.device) < params.density).to(d.dtype)
            term = d * keep / params.density * w
            out = term if out is None else out + term
        return out
    pruned = torch.stack([magnitude_prune(d, params.density) for d in deltas])     # n x out x in
    agree = pruned.sign() == torch.where(pruned.sum(dim=0) >= 0, 1.0, -1.0)
    weights = torch.tensor(params.weights, dtype=pruned.dtype, device=pruned.device).view(-1, *[1] * (pruned.dim() - 1))
    mixed = (pruned * weights * agree).sum(dim=0)
    return mixed / agree.sum(dim=0).clamp(min=1)


@op("lora_combine_merge", inputs=("w", "factors*"), params=LoraCombineParams, rowwise=False, random=True,
    temps=lambda n: n + 4)
def lora_combine_merge_op(ctx, params, w, factors):
    """W + lambda * combine(deltas) (see :func:`combine_deltas`); factors = [A_0, B_0, A_1, B_1, ...]."""
    return w + params.lam * combine_deltas(ctx, params, factors)


@op("lora_combine_factors", inputs=("factors*",), params=LoraCombineParams, rowwise=False, random=True,
    temps=lambda n: n + 4)
def lora_combine_factors_op(ctx, params, factors):
    """Rank-``rank`` factors of lambda * combine(deltas) by randomised SVD; record: [||delta||^2]."""
    delta = params.lam * combine_deltas(ctx, params, factors)
    if params.transpose:
        delta = delta.T                                                   # factors live in out x in
    A, B, total = rank_factors(delta.float(), None, params.rank, method="randomized", oversample=10, power_iters=2,
                               generator=seed_for(ctx.seed, "lora_combine", params.module),
                               name=f"lora combine: module {params.module}: the combined delta")
    a, b, rec = factor_names(params.module)
    return {a: A, b: B, rec: torch.tensor([total], dtype=torch.float32)}


@dataclass(frozen=True)
class SvdInitParams:
    """PiSSA (one expert) or GOAT (``experts`` SVD segments), rank per expert and scale s."""

    rank: int
    module: str
    scaling: float = 1.0
    experts: int = 1
    method: str = "pissa"

    def __post_init__(self):
        if self.method not in ("pissa", "goat"):
            raise ValueError(f"method must be pissa or goat, got {self.method!r}")
        if self.rank < 1 or self.experts < 1 or not math.isfinite(self.scaling) or self.scaling == 0:
            raise ValueError(f"need rank >= 1, experts >= 1 and a finite non-zero scaling, got {self}")


def expert_names(module: str, expert: int) -> tuple[str, str]:
    """Output names (A, B) of expert ``expert``'s factors of ``module``."""
    return f"{module}.expert{expert}.lora_A.weight", f"{module}.expert{expert}.lora_B.weight"


@op("svd_init_factors", inputs=("w",), params=SvdInitParams, rowwise=False, temps=4)
def svd_init_factors_op(ctx, params, w):
    """PiSSA / GOAT factors of W0 (``ops.lora.pissa_init`` / ``goat_init``): expert e's A, B."""
    init = pissa_init(w, params.rank, params.scaling) if params.method == "pissa" else \
        goat_init(w, params.rank, params.experts, params.scaling)
    out = {}
    for e, (A, B) in enumerate(init.adapters):
        a, b = expert_names(params.module, e)
        out[a], out[b] = A, B
    return out
