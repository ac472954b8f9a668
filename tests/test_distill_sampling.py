"""RS-KD statistics against direct formulas, top-k's bias, loss gradients, and the shard encoding."""
import math

import numpy as np
import pytest
import torch

from tensorstore_llm.distill import losses, sampling
from tensorstore_llm.distill.encoding import (
    SequenceTargets,
    decode_ids,
    decode_table,
    encode_ids,
    encode_rows,
    id_width,
)

V, N, M = 20, 50, 4000   # vocabulary, draws per position, positions (independent RS-KD targets)

# small tensors: one intra-op thread is several times faster than two on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def teacher() -> torch.Tensor:
    """A fixed head-heavy distribution with a long tail (Zipf-like), fp32, sums to 1."""
    t = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 1.2
    return (t / t.sum()).float()


def many_targets(tau=1.0, self_normalise=False, seed=0):
    t = teacher()
    probs = t.expand(M, V).contiguous()
    u = sampling.sequence_uniforms(seed, 7, M, N, 0, M)
    rows = sampling.rs_kd(probs, u, tau=tau, self_normalise=self_normalise)
    return t, rows, sampling.dense_targets(rows, V, N)


def test_rs_kd_is_unbiased_and_top_k_is_not():
    t, rows, dense = many_targets()
    assert np.all(np.add.reduceat(rows.counts.astype(int), rows.offsets[:-1]) == N)   # counts sum to N
    mean = dense.mean(0)
    sigma = torch.sqrt(t.double() * (1 - t.double()) / (N * M))          # std of the mean of c_i / N
    assert torch.all((mean - t.double()).abs() <= 5 * sigma + 1e-9), (mean - t.double()).abs().max()
    topk = sampling.top_k(t.unsqueeze(0), 5)
    topk_dense = sampling.dense_targets(topk, V)
    renormalised = topk_dense[0] / topk_dense[0].sum()                   # what "ignore tail" trains toward
    bias = (renormalised - t.double()).abs()
    assert bias[5:].max() > 20 * sigma.max()                            # the tail is never learned
    assert bias.sum() > 0.2


def test_expected_sparse_gradient_equals_full_kd_gradient():
    t, rows, _dense = many_targets(seed=1)
    z = torch.randn(V, generator=torch.Generator().manual_seed(0), requires_grad=True)
    lengths = np.diff(rows.offsets)
    K = int(lengths.max())
    ids = torch.zeros(1, M, K, dtype=torch.long)
    w = torch.zeros(1, M, K)
    mask = torch.zeros(1, M, K, dtype=torch.bool)
    pos = np.repeat(np.arange(M), lengths)
    slot = np.arange(len(rows.ids)) - np.repeat(rows.offsets[:-1], lengths)
    ids[0, pos, slot] = torch.from_numpy(rows.ids.astype(np.int64))
    w[0, pos, slot] = torch.from_numpy(rows.counts.astype(np.float32)) / N
    mask[0, pos, slot] = True
    for kind in ("kl", "ce"):
        (g_sparse,) = torch.autograd.grad(losses.sparse_kd_loss(z.expand(1, M, V), ids, w, mask, kind=kind), z)
        (g_full,) = torch.autograd.grad(losses.dense_kd_loss(z.view(1, 1, V), torch.log(t).view(1, 1, V)), z)
        # the gradient of either loss is softmax(z) - target, so the mean sparse gradient differs from the
        # full one by (t - mean t̂): tolerance 5 standard deviations of that mean
        tol = 5 * math.sqrt(float((t * (1 - t)).max()) / (N * M))
        assert (g_sparse - g_full).abs().max() <= tol
        assert torch.allclose(g_full, torch.softmax(z, 0) - t, atol=1e-6)


def test_tau_weights_match_direct_importance_sampling():
    t = teacher().double()
    tau = 0.5
    probs = t.float().expand(64, V).contiguous()
    u = sampling.sequence_uniforms(3, 0, 64, N, 0, 64)
    rows = sampling.rs_kd(probs, u, tau=tau)
    q = t ** tau / (t ** tau).sum()
    cdf = np.cumsum(q.numpy())
    for p in range(64):                                                    # direct formula, row by row
        draws = np.minimum(np.searchsorted(cdf, u[p].double().numpy() * cdf[-1], side="right"), V - 1)
        ids, counts = np.unique(draws, return_counts=True)
        want = counts / N * t.numpy()[ids] / q.numpy()[ids]
        sl = slice(rows.offsets[p], rows.offsets[p + 1])
        assert rows.ids[sl].tolist() == ids.tolist()
        np.testing.assert_allclose(rows.weights[sl], want, rtol=1e-5)
    normalised = sampling.rs_kd(probs, u, tau=tau, self_normalise=True)
    sums = np.add.reduceat(normalised.weights.astype(np.float64), normalised.offsets[:-1])
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)
    # unbiased (not self-normalised): the mean over many positions converges to t
    _, _, dense = many_targets(tau=tau, seed=4)
    assert (dense.mean(0) - t).abs().max() < 0.01


def test_draws_do_not_depend_on_position_chunks():
    t = torch.softmax(torch.randn(37, 300, generator=torch.Generator().manual_seed(1)), -1)
    whole = sampling.rs_kd(t, sampling.sequence_uniforms(5, 11, 37, N, 0, 37))
    a = sampling.rs_kd(t[:16], sampling.sequence_uniforms(5, 11, 37, N, 0, 16))
    b = sampling.rs_kd(t[16:], sampling.sequence_uniforms(5, 11, 37, N, 16, 37))
    assert whole.ids.tolist() == a.ids.tolist() + b.ids.tolist()
    assert whole.counts.tolist() == a.counts.tolist() + b.counts.tolist()
    other = sampling.rs_kd(t, sampling.sequence_uniforms(5, 12, 37, N, 0, 37))   # another sequence: other draws
    assert other.ids.tolist() != whole.ids.tolist()


def test_two_level_draws_match_the_float64_inverse_cdf():
    """The blocked CDF agrees with one float64 cumsum over the vocabulary except at rounding ties."""
    V = 49152 + 77                                                       # not a multiple of the block
    probs = torch.softmax(3 * torch.randn(64, V, generator=torch.Generator().manual_seed(3)), -1)
    u = sampling.sequence_uniforms(0, 0, 64, N, 0, 64)
    cdf = torch.cumsum(probs.double(), -1)
    direct = torch.searchsorted(cdf, u.double() * cdf[:, -1:], right=True).clamp(max=V - 1)
    ids = sampling.draw_ids(probs, u)
    assert (ids == direct).float().mean() > 0.999
    assert ids.max() < V and bool((probs.gather(1, ids) > 0).all())


def test_zero_probability_ids_are_never_drawn():
    t = torch.zeros(8, 1000)                                              # ids at block edges (256, 512)
    t[:, [3, 255, 256, 511, 999]] = torch.tensor([0.2, 0.1, 0.3, 0.1, 0.3])
    rows = sampling.rs_kd(t, sampling.sequence_uniforms(0, 0, 8, 200, 0, 8))
    assert set(rows.ids.tolist()) == {3, 255, 256, 511, 999}


@pytest.mark.parametrize("vocab", [49152, 131072, 200])
def test_gap_planes_roundtrip(vocab):
    rng = np.random.default_rng(vocab)
    lengths = rng.integers(0, 30, size=50)
    ids = np.concatenate([np.sort(rng.choice(vocab, size=n, replace=False)) for n in lengths]).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    width = id_width(vocab)
    assert width == {49152: 2, 131072: 3, 200: 1}[vocab]
    blob = encode_ids(ids, offsets, width)
    assert len(blob) == width * len(ids)
    assert np.array_equal(decode_ids(blob, offsets, width), ids)


def test_encode_rows_roundtrip_with_alignment_columns():
    t = torch.softmax(torch.randn(12, 1000, generator=torch.Generator().manual_seed(2)), -1)
    rows = sampling.rs_kd(t, sampling.sequence_uniforms(0, 4, 12, N, 0, 12))
    seq = SequenceTargets(4, np.arange(12, dtype=np.int32), rows, nll=np.linspace(0, 1, 12, dtype=np.float32),
                          text="abcdefghijkl",
                          char_offsets=np.stack([np.arange(12), np.arange(1, 13)], 1).astype(np.int32))
    (back,) = decode_table(encode_rows("rs-kd", [seq], 1000, N), 1000, N)
    assert back.sequence == 4 and back.text == "abcdefghijkl"
    assert np.array_equal(back.rows.ids, rows.ids) and np.array_equal(back.rows.counts, rows.counts)
    assert np.array_equal(back.rows.offsets, rows.offsets) and np.array_equal(back.nll, seq.nll)
    assert np.array_equal(back.char_offsets, seq.char_offsets)
    assert back.coverage == pytest.approx(float(rows.coverage.mean()))
