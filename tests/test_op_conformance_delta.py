"""The lossy delta ops (ops/delta.py) through the op conformance base: each reconstruction
``base + Δ̂`` against a direct torch formula of its codec (bf16, top-k, DARE, BitDelta per matrix
with its statistics pass and per row, low-rank and Delta-CoMe mixed SVD), plus block size, job
order, resume and CUDA parity from the base."""
import torch

from tensorstore_llm.testing.conformance import OpConformance

SHAPE = (96, 160)


def _bf16(x):
    return x.to(torch.bfloat16).float()


class _DeltaOp(OpConformance):
    """base ~ N(0, 1), target = base + 0.02 N(0, 1): a fine-tune's small delta."""

    def make_inputs(self, gen):
        base = torch.randn(SHAPE, generator=gen)
        return {"base": base, "target": base + 0.02 * torch.randn(SHAPE, generator=gen)}


class TestDeltaBf16(_DeltaOp):
    op = "delta_bf16"

    def golden(self, inputs, params):
        base, target = inputs["base"], inputs["target"]
        return base + _bf16(target - base)


class TestDeltaBf16Vector(TestDeltaBf16):
    """Tensors with fewer than two dimensions (norms, biases) come back exact, by row blocks."""

    small_budget = "2K"

    def make_inputs(self, gen):
        base = torch.randn(4000, generator=gen)
        return {"base": base, "target": base + 0.02 * torch.randn(4000, generator=gen)}

    def golden(self, inputs, params):
        return inputs["target"]


class TestDeltaTopK(_DeltaOp):
    op = "delta_top_k"
    params = {"density": 0.1}
    small_budget = "1M"      # a whole-tensor op (one threshold per tensor): other order, resume

    def golden(self, inputs, params):
        base, target = inputs["base"], inputs["target"]
        delta = target - base
        k = max(1, round(params["density"] * delta.numel()))
        threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
        kept = delta.abs() >= threshold                      # continuous values: no ties at the cut
        assert int(kept.sum()) == k
        return base + torch.where(kept, _bf16(delta), torch.zeros_like(delta))


class TestDeltaDare(_DeltaOp):
    op = "delta_dare"
    params = {"keep": 0.3}

    def golden(self, inputs, params):
        return None   # random masks: the determinism checks, and the check below

    def test_kept_entries_are_rescaled_and_the_rest_is_the_base(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        got, _ = self._run(tmp_path, store, per_name, sources, budget="256M")
        keep = self.params["keep"]
        for name, inputs in per_name.items():
            base, target = inputs["base"], inputs["target"]
            rescaled = base + _bf16((target - base) / keep)
            dropped, kept = got[name] == base, got[name] == rescaled
            assert bool((dropped | kept).all()), name
            share = float((~dropped).float().mean())
            assert abs(share - keep) < 0.03, (name, share)


class TestDeltaBitDelta(_DeltaOp):
    """Per matrix: scale = mean |Δ| over the whole matrix, found by a statistics pass first, so
    the matrix still streams by rows; stored (and applied) in bf16."""

    op = "delta_bitdelta"

    def golden(self, inputs, params):
        base, target = inputs["base"], inputs["target"]
        delta = target - base
        scale = float(torch.tensor(float(delta.abs().double().sum() / delta.numel())).to(torch.bfloat16))
        return base + torch.where(delta >= 0, scale, -scale)


class TestDeltaBitDeltaPerRow(_DeltaOp):
    op = "delta_bitdelta"
    params = {"per_row": True}

    def golden(self, inputs, params):
        base, target = inputs["base"], inputs["target"]
        delta = target - base
        scale = _bf16(delta.abs().mean(dim=1, keepdim=True))              # [rows, 1]
        return base + torch.where(delta >= 0, scale, -scale)


class _LowRankDelta(OpConformance):
    """Δ of exact rank RANK plus the base: the randomised SVD finds the exact subspace, so the
    result is the exact SVD's factors rounded as the codec stores them."""

    rank = 4
    small_budget = "1M"      # whole-tensor ops (one SVD per tensor): other order, resume

    def make_inputs(self, gen):
        base = torch.randn(SHAPE, generator=gen)
        left = torch.randn(SHAPE[0], self.rank, generator=gen)
        right = torch.randn(self.rank, SHAPE[1], generator=gen)
        scales = torch.tensor([4.0, 2.0, 1.0, 0.5])[: self.rank, None]   # distinct singular values
        return {"base": base, "target": base + 0.01 * left @ (scales * right)}

    @staticmethod
    def _svd(inputs, rank):
        delta = (inputs["target"] - inputs["base"]).double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]


class TestDeltaLowRank(_LowRankDelta):
    op = "delta_low_rank"
    params = {"rank": 4}
    atol = 2e-4          # a factor entry near a bf16 rounding boundary may round the other way

    def golden(self, inputs, params):
        u, s, vh = self._svd(inputs, params["rank"])
        left, right = _bf16((u * s).float()), _bf16(vh.float())          # [rows, r], [r, cols]
        return inputs["base"] + left @ right


class TestDeltaMixedSvd(_LowRankDelta):
    """Delta-CoMe: U·sqrt(S) and (sqrt(S)·Vh)ᵀ quantised per column (absmax scale in bf16), 8 bits
    for the top two directions and 4 bits for the next two."""

    op = "delta_mixed_svd"
    params = {"groups": [[2, 8], [2, 4]]}
    atol = 2e-4

    def golden(self, inputs, params):
        u, s, vh = self._svd(inputs, sum(c for c, _ in params["groups"]))
        left, right = (u * s.sqrt()).float(), (vh * s.sqrt()[:, None]).T.float()   # [rows, r], [cols, r]

        def quantise(x, bits):
            levels = (1 << (bits - 1)) - 1
            scale = _bf16(x.abs().amax(dim=0, keepdim=True) / levels)
            return torch.clamp(torch.round(x / scale), -levels - 1, levels) * scale

        approx, start = torch.zeros(SHAPE), 0
        for count, bits in params["groups"]:
            cols = slice(start, start + count)
            approx += quantise(left[:, cols], bits) @ quantise(right[:, cols], bits).T
            start += count
        return inputs["base"] + approx
