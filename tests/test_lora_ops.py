"""LoRA kernels and adapter transforms against direct torch formulas: streamed rows, combine,
re-factoring (Eckart-Young), resize, rank budgets, extraction, PiSSA / GOAT, AdapterDrop."""
from __future__ import annotations

import itertools

import pytest
import torch

from tensorstore_llm.errors import RecipeError, TensorNotFound
from tensorstore_llm.lora import adapters as T
from tensorstore_llm.lora.merge import merge_module, merge_state_dict
from tensorstore_llm.lora.peft_format import (
    LoraAdapter,
    LoraConfig,
    ModuleLora,
    build_adapter,
    read_adapter,
    write_adapter,
)
from tensorstore_llm.ops import lora as K


def g(seed=0):
    return torch.Generator().manual_seed(seed)


def low_rank(m, n, r, seed=0, decay=None):
    gen = g(seed)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    S = torch.tensor([decay ** i for i in range(r)] if decay else [float(r - i) for i in range(r)], dtype=torch.float64)
    return (U * S) @ V.T


def module(name, out, inp, r, seed, kind="linear", fif=False, scaling=2.0, magnitude=False):
    gen = g(seed)
    A = torch.randn(r, inp, generator=gen)   # embeddings too: PEFT's lora_embedding_A is (r, num_embeddings)
    B = torch.randn(out, r, generator=gen)
    mag = torch.rand(out, generator=gen) + 0.5 if magnitude else None
    return ModuleLora(module=name, kind=kind, A=A, B=B, scaling=scaling, alpha=scaling * r, fan_in_fan_out=fif,
                      magnitude=mag)


# ------------------------------------------------------------------ streamed rows == whole tensor

@pytest.mark.parametrize("transpose", [False, True])
def test_row_blocks_equal_whole_merge_bit_for_bit(transpose):
    gen = g(1)
    A, B = torch.randn(8, 70, generator=gen), torch.randn(50, 8, generator=gen)
    W = torch.randn(70, 50, generator=gen) if transpose else torch.randn(50, 70, generator=gen)
    W16 = W.to(torch.bfloat16)
    whole = K.merge_rows(W16, K.lora_delta(A, B, 0.37, transpose=transpose))
    direct = (W16.float() + ((B @ A).T if transpose else B @ A) * 0.37).to(torch.bfloat16)
    assert torch.equal(whole, direct)
    for step in (1, 7, 33):
        rows = [K.merge_rows(W16[r0:r0 + step], K.lora_delta(A, B, 0.37, transpose=transpose, rows=(r0, r0 + step)))
                for r0 in range(0, W.shape[0], step)]
        assert torch.equal(torch.cat(rows), whole), step


def test_dora_row_blocks_equal_whole_and_direct_formula():
    m = module("fc", 40, 24, 4, seed=2, magnitude=True)
    W = torch.randn(40, 24, generator=g(3))
    whole = merge_module(W, m)
    V = W + m.scaling * (m.B @ m.A)
    direct = m.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)
    torch.testing.assert_close(whole, direct, rtol=1e-6, atol=1e-6)
    delta = K.lora_delta(m.A, m.B, m.scaling)
    parts = []
    for r0 in range(0, 40, 9):
        d = K.lora_delta(m.A, m.B, m.scaling, rows=(r0, r0 + 9))
        parts.append(K.dora_merge_rows(W[r0:r0 + 9], d, m.magnitude[r0:r0 + 9], K.dora_norm(W[r0:r0 + 9], d)))
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(K.dora_norm(W, delta), torch.linalg.norm(W + delta, dim=1))


def test_dora_transposed_norm_is_per_output_column():
    m = module("c_attn", 30, 20, 3, seed=4, fif=True, magnitude=True)
    W = torch.randn(20, 30, generator=g(5))                      # Conv1D: in x out
    V = W + m.scaling * (m.B @ m.A).T
    direct = V * (m.magnitude / V.norm(dim=0))[None, :]
    torch.testing.assert_close(merge_module(W, m), direct, rtol=1e-6, atol=1e-6)


def test_scaling_values():
    assert K.lora_scaling(16, 4) == 4.0 and K.lora_scaling(16, 4, use_rslora=True) == 8.0
    with pytest.raises(ValueError):
        K.lora_scaling(8, 0)


# ------------------------------------------------------------------ combine / refactor / resize

def _adapter(mods, **cfg):
    return LoraAdapter(config=LoraConfig(**cfg), modules={m.module: m for m in mods})


def test_combine_linear_is_exact_weighted_sum_of_full_deltas():
    a1 = _adapter([module("l.0.q", 24, 16, 4, 10, scaling=2.0), module("l.0.v", 24, 16, 2, 11, scaling=0.5)])
    a2 = _adapter([module("l.0.q", 24, 16, 3, 12, scaling=1.5), module("l.1.q", 24, 16, 5, 13, scaling=1.0)])
    combined, _report = T.combine_adapters([a1, a2], [0.7, -0.4])
    def full(ad, k):
        m = ad.modules.get(k)
        return m.scaling * (m.B @ m.A) if m is not None else torch.zeros(24, 16)
    for k in ("l.0.q", "l.0.v", "l.1.q"):
        want = 0.7 * full(a1, k) - 0.4 * full(a2, k)
        got = combined.modules[k].scaling * (combined.modules[k].B.double() @ combined.modules[k].A.double())
        torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)
    assert combined.ranks() == {"l.0.q": 7, "l.0.v": 2, "l.1.q": 5}
    # averaging A and B separately would create cross terms B1 A2; the concatenation does not
    m1, m2 = a1.modules["l.0.q"], a2.modules["l.0.q"]
    naive = ((0.7 * m1.B * 2.0)[:, :3] @ m2.A)            # a cross term's size, for scale
    assert naive.abs().max() > 1e-2


def test_combine_truncation_error_is_eckart_young_tail():
    a1 = _adapter([module("q", 40, 30, 6, 20)])
    a2 = _adapter([module("q", 40, 30, 6, 21)])
    combined, report = T.combine_adapters([a1, a2], [1.0, 1.0], rank=5)
    D = sum(ad.modules["q"].scaling * (ad.modules["q"].B.double() @ ad.modules["q"].A.double()) for ad in (a1, a2))
    S = torch.linalg.svdvals(D)
    m = combined.modules["q"]
    err = (D - m.scaling * (m.B.double() @ m.A.double())).square().sum()
    tail = (S[5:] ** 2).sum()
    r = report.modules["q"]
    assert r["rank"] == 5 and r["stacked_rank"] == 12
    assert abs(r["tail_energy"] - float(tail)) <= 1e-4 * float(tail)
    assert abs(float(err) - float(tail)) <= 1e-3 * float(tail)
    assert abs(r["relative_error"] - float((tail / S.square().sum()).sqrt())) < 1e-5


def test_combine_refuses_dora_and_modules_to_save():
    dora = _adapter([module("q", 8, 8, 2, 1, magnitude=True)])
    with pytest.raises(RecipeError, match="DoRA"):
        T.combine_adapters([dora, dora], [0.5, 0.5])
    plain = _adapter([module("q", 8, 8, 2, 1)])
    plain.saved_modules = {"lm_head.weight": torch.zeros(3, 8)}
    with pytest.raises(RecipeError, match="modules_to_save"):
        T.combine_adapters([plain], [1.0])


def test_refactor_never_worse_than_and_equal_to_dense_truncated_svd():
    gen = g(30)
    A, B = torch.randn(16, 300, generator=gen), torch.randn(200, 16, generator=gen)
    out = K.refactor(A, B, rank=6)
    U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    best = (U[:, :6] * S[:6]) @ Vh[:6]
    torch.testing.assert_close((out.B.double() @ out.A.double()), best, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out.singular_values.double(), S[:16], rtol=1e-5, atol=1e-4)
    assert K.refactor(A, B, energy=1.0).rank == 16
    e90 = K.refactor(A, B, energy=0.9)
    cum = torch.cumsum(S[:16] ** 2, 0) / (S ** 2).sum()
    assert e90.rank == int((cum < 0.9).sum()) + 1


def test_resize_equals_truncated_svd_of_BA_and_auto_budget():
    mods = [module(f"layers.{i}.q", 64, 48, 16, 40 + i, scaling=0.5) for i in range(3)]
    # module 0 has a steep spectrum (low-rank-ish), module 2 a flat one
    mods[0].B = mods[0].B * torch.tensor([0.3 ** i for i in range(16)])
    ad = _adapter(mods)
    small, report = T.resize_adapter(ad, rank=4)
    for m in mods:
        D = m.scaling * (m.B.double() @ m.A.double())
        U, S, Vh = torch.linalg.svd(D, full_matrices=False)
        got = small.modules[m.module]
        torch.testing.assert_close(got.scaling * (got.B.double() @ got.A.double()), (U[:, :4] * S[:4]) @ Vh[:4],
                                   rtol=1e-4, atol=1e-4)
        assert abs(report.modules[m.module]["tail_energy"] - float((S[4:] ** 2).sum())) < 1e-3 * float((S ** 2).sum())
    auto, rep = T.resize_adapter(ad, rank=4, auto_budget=True)
    ranks = auto.ranks()
    assert sum(r * (64 + 48) for r in ranks.values()) <= 3 * 4 * (64 + 48)
    assert ranks["layers.0.q"] < 4 < ranks["layers.2.q"] or ranks["layers.0.q"] < ranks["layers.2.q"]
    tail_auto = sum(v["tail_energy"] for v in rep.modules.values())
    tail_uniform = sum(v["tail_energy"] for v in report.modules.values())
    assert tail_auto < tail_uniform


def test_rank_budget_matches_exhaustive_search_on_small_case():
    spectra = {"a": (torch.tensor([5.0, 3.0, 1.0]), 10), "b": (torch.tensor([4.0, 3.5, 0.5]), 10),
               "c": (torch.tensor([6.0, 0.1, 0.05]), 10)}
    budget = 60
    got = K.rank_budget(spectra, budget)
    best = max((ranks for ranks in itertools.product(range(1, 4), repeat=3) if sum(ranks) * 10 <= budget),
               key=lambda rs: sum(float((s[:r] ** 2).sum()) for (s, _), r in zip(spectra.values(), rs)))
    assert tuple(got[k] for k in "abc") == best
    with pytest.raises(ValueError, match="budget"):
        K.rank_budget(spectra, 20)


# ------------------------------------------------------------------ extract

def test_extract_exact_rank_r_delta_comes_back_to_fp32_precision():
    D = low_rank(120, 90, 6, seed=50).float()
    ex = K.extract_lora(D, rank=6, generator=g(0))
    assert ex.rank == 6 and abs(ex.captured - 1.0) < 1e-5
    torch.testing.assert_close(ex.B @ ex.A, D, rtol=0, atol=1e-5 * float(D.abs().max()))
    ex_e = K.extract_lora(D, energy=0.999, generator=g(0))
    assert ex_e.rank == 6


def test_extract_captured_energy_matches_exact_svd_with_power_iterations():
    D = (low_rank(200, 150, 150, seed=51, decay=0.93)).float()
    S = torch.linalg.svdvals(D.double())
    want = float((S[:10] ** 2).sum() / (S ** 2).sum())
    ex = K.extract_lora(D, rank=10, generator=g(1), power_iters=2)
    assert want - 1e-4 <= ex.captured <= want + 1e-6
    with pytest.raises(ValueError, match="power_iters"):
        K.extract_lora(D, rank=4, power_iters=1)


def test_extract_adapter_from_state_dicts_and_merge_back():
    gen = g(60)
    base = {"l.0.q.weight": torch.randn(40, 32, generator=gen), "l.0.v.weight": torch.randn(40, 32, generator=gen),
            "embed_tokens.weight": torch.randn(10, 32, generator=gen), "norm.weight": torch.ones(32)}
    ft = {k: v.clone() for k, v in base.items()}
    ft["l.0.q.weight"] += low_rank(40, 32, 3, seed=61).float()
    ft["l.0.v.weight"] += low_rank(40, 32, 5, seed=62).float()
    ad, report = T.extract_adapter(base, ft, rank=5, seed=7)
    assert sorted(ad.modules) == ["l.0.q", "l.0.v"]                 # embeddings and 1-D tensors skipped
    assert report.totals["captured"] > 1 - 1e-6
    merged = merge_state_dict(base, ad)
    for k in ("l.0.q.weight", "l.0.v.weight"):
        torch.testing.assert_close(merged[k], ft[k], rtol=0, atol=1e-5)
    again, _ = T.extract_adapter(base, ft, rank=5, seed=7)
    assert torch.equal(again.modules["l.0.q"].A, ad.modules["l.0.q"].A)   # seeded per module
    with pytest.raises(TensorNotFound, match="k_proj"):
        T.extract_adapter(base, ft, rank=2, targets=["k_proj"])


# ------------------------------------------------------------------ PiSSA / GOAT / AdapterDrop

def test_pissa_residual_plus_adapter_is_w0_and_adapter_is_top_r():
    W = torch.randn(48, 40, generator=g(70))
    adapters, residual = T.svd_init({"fc.weight": W}, rank=6, alpha=12.0)
    m = adapters[0].modules["fc"]
    assert m.scaling == 2.0
    back = merge_module(residual["fc.weight"], m)
    torch.testing.assert_close(back, W, rtol=0, atol=4 * torch.finfo(torch.float32).eps * float(W.abs().max()))
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    torch.testing.assert_close(m.scaling * (m.B.double() @ m.A.double()), (U[:, :6] * S[:6]) @ Vh[:6], rtol=1e-4,
                               atol=1e-4)


def test_goat_experts_take_disjoint_segments_and_reproduce_w0():
    W = torch.randn(32, 24, generator=g(71))
    adapters, residual = T.svd_init({"fc.weight": W}, rank=2, method="goat", n_experts=3)
    S = torch.linalg.svdvals(W.double())
    total = residual["fc.weight"].clone()
    for e, ad in enumerate(adapters):
        m = ad.modules["fc"]
        total = total + K.lora_delta(m.A, m.B, m.scaling)
        sv = torch.linalg.svdvals(m.scaling * (m.B.double() @ m.A.double()))[:2]
        torch.testing.assert_close(sv, S[e * 8:e * 8 + 2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, W, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="rank 9 x 3 experts"):
        K.goat_init(W, 9, 3)


def test_adapter_drop_lowest_layers_and_named_modules(tmp_path):
    mods = [module(f"model.layers.{i}.self_attn.{p}", 16, 16, 2, i * 2 + j)
            for i in range(4) for j, p in enumerate(("q_proj", "v_proj"))]
    ad = _adapter(mods, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    kept, report = T.drop_layers(ad, lowest=2)
    assert sorted(kept.modules) == [f"model.layers.{i}.self_attn.{p}" for i in (2, 3) for p in ("q_proj", "v_proj")]
    assert report.totals["params_removed"] == 4 * (2 * 16 + 16 * 2)
    assert report.totals["params_left"] == kept.num_params() == ad.num_params() - report.totals["params_removed"]
    named, rep2 = T.drop_layers(ad, modules=["v_proj", "model.layers.0.self_attn.q_proj"])
    assert sorted(named.modules) == [f"model.layers.{i}.self_attn.q_proj" for i in (1, 2, 3)]
    assert rep2.totals["modules_removed"] == 5
    write_adapter(kept, str(tmp_path / "dropped"))
    assert sorted(read_adapter(str(tmp_path / "dropped")).modules) == sorted(kept.modules)
    with pytest.raises(TensorNotFound):
        T.drop_layers(ad, modules=["k_proj"])


def test_build_adapter_rank_pattern_and_scaling_round_trip(tmp_path):
    gen = g(80)
    f = {"a.q": (torch.randn(4, 8, generator=gen), torch.randn(8, 4, generator=gen)),
         "a.v": (torch.randn(4, 8, generator=gen), torch.randn(8, 4, generator=gen)),
         "b.q": (torch.randn(2, 8, generator=gen), torch.randn(8, 2, generator=gen))}
    write_adapter(build_adapter(f, alpha=8.0), str(tmp_path / "x"))
    ad = read_adapter(str(tmp_path / "x"))
    assert ad.config.r == 4 and ad.ranks()["b.q"] == 2
    for k, (A, B) in f.items():
        m = ad.modules[k]
        torch.testing.assert_close(m.scaling * (m.B @ m.A), B @ A, rtol=1e-5, atol=1e-5)


def test_extract_from_real_fine_tune_logits_approach_fine_tune_as_rank_grows():
    transformers = pytest.importorskip("transformers",
                                       reason="transformers is not installed; fine-tune extraction test skipped")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    trained = [p for n, p in model.named_parameters() if "layers" in n and p.ndim == 2]   # the projections
    opt = torch.optim.AdamW(trained, lr=3e-2)
    ids = torch.randint(0, 64, (4, 12), generator=g(90))
    for _ in range(5):                                       # a real (if short) fine-tune of every projection
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ft = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()

    def logits(state):
        model.load_state_dict(state)
        with torch.no_grad():
            return model(input_ids=ids).logits
    want = logits(ft)
    errors, captured = [], []
    for r in (1, 4, 16, 32):
        ad, report = T.extract_adapter(base, ft, rank=r, seed=1)
        merged = {**base, **merge_state_dict(base, ad)}
        errors.append(float((logits(merged) - want).norm()))
        captured.append(report.totals["captured"])
    assert captured == sorted(captured) and captured[-1] > 1 - 1e-5
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-3 * errors[0]


@pytest.mark.parametrize("case", ["linear", "linear_dora", "fif", "fif_dora", "embedding", "embedding_dora"])
def test_merge_module_rows_blocks_equal_whole_module_merge(case):
    """What a streamed job computes per row block concatenates to merge_module's result, bit for bit."""
    kind = "embedding" if case.startswith("embedding") else "linear"
    m = module("x", 24, 40, 4, seed=90, kind=kind, fif=case.startswith("fif"), magnitude=case.endswith("dora"))
    W = torch.randn(m.base_shape, generator=g(91)).to(torch.bfloat16)
    whole = merge_module(W, m, peft_compat=True)
    norm = None
    if m.transpose and m.magnitude is not None:
        norm = K.dora_norm(W, K.lora_delta(m.A, m.B, m.scaling, transpose=True), transpose=True)
    from tensorstore_llm.lora.merge import merge_module_rows

    blocks = [merge_module_rows(W[r0:r0 + 7], m, r0, min(r0 + 7, W.shape[0]), peft_compat=True, dora_column_norm=norm)
              for r0 in range(0, W.shape[0], 7)]
    assert torch.equal(torch.cat(blocks), whole)
    if m.transpose and m.magnitude is not None:
        with pytest.raises(RecipeError, match="column norm"):
            merge_module_rows(W[:7], m, 0, 7)
