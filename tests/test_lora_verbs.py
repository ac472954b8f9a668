"""The `tsllm lora` verbs on small synthetic models, each against a direct formula:
extract (an exactly rank-r delta comes back), resize (= truncated SVD of s·B·A), combine
(= weighted sum of full deltas; Eckart-Young error; TIES = PEFT's ``ties``; DARE = its masks),
drop, init (residual + adapter == W0), and their bad input."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from tensorstore_llm.lora.artifacts import read_adapter_artifact
from tensorstore_llm.lora.peft_format import build_adapter, write_adapter
from tensorstore_llm.store import Store

SHAPES = {"layers.0.attn.q_proj": (48, 32), "layers.0.mlp.down_proj": (32, 64), "layers.1.attn.q_proj": (48, 32),
          "layers.1.mlp.down_proj": (32, 64)}


def _base(gen):
    tensors = {f"{m}.weight": torch.randn(*s, generator=gen) for m, s in SHAPES.items()}
    tensors["embed_tokens.weight"] = torch.randn(40, 32, generator=gen)
    tensors["norm.weight"] = torch.ones(32)
    return tensors


def _save(tensors, path):
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return str(path)


def _factors(gen, r, scale=0.1):
    return {m: (torch.randn(r, s[1], generator=gen) * scale, torch.randn(s[0], r, generator=gen) * scale)
            for m, s in SHAPES.items()}


@pytest.fixture()
def env(tmp_path, cli):
    """A store with a base (tag b0) and two LoRA adapters of it (a1: rank 4, a2: rank 6, alpha 8)."""
    gen = torch.Generator().manual_seed(0)
    base = _base(gen)
    _save(base, tmp_path / "base")
    s = str(tmp_path / "store")
    assert cli("-q", "--store", s, "import", tmp_path / "base", "--name", "b0")[0] == 0
    adapters = {}
    for name, r in (("a1", 4), ("a2", 6)):
        ad = build_adapter(_factors(gen, r), alpha=8.0, fold_scaling=False)
        write_adapter(ad, str(tmp_path / name))
        code, _, err = cli("-q", "--store", s, "lora", "import", tmp_path / name, "--base", "b0", "--name", name)
        assert code == 0, err
        adapters[name] = ad
    return tmp_path, s, base, adapters


def _delta(ad, module):
    m = ad.modules[module]
    return m.scaling * (m.B.double() @ m.A.double())


def _adapter(store_root, ref):
    return read_adapter_artifact(Store(store_root), ref)[0]


def test_extract_recovers_an_exactly_low_rank_delta(env, cli):
    tmp, s, base, _ = env
    gen = torch.Generator().manual_seed(5)
    exact = {m: torch.randn(s_[0], 3, generator=gen) @ torch.randn(3, s_[1], generator=gen) * 0.01
             for m, s_ in SHAPES.items()}
    ft = {k: (v + exact[k[: -len(".weight")]] if k[: -len(".weight")] in exact else v) for k, v in base.items()}
    _save(ft, tmp / "ft")
    code, out, err = cli("--store", s, "lora", "extract", tmp / "ft", "--base", "b0", "--rank", "3", "--name", "ex",
                         "--max-memory", "64K")
    assert code == 0, err
    assert "captured energy: 1.0000" in out
    ad = _adapter(s, "ex")
    assert set(ad.modules) == set(SHAPES)             # embeddings are not targets by default
    for m, d in exact.items():
        assert ad.ranks()[m] == 3
        assert torch.allclose(_delta(ad, m).float(), d, atol=2e-6, rtol=0), m
    art = Store(s).get("ex")
    assert art.manifest.info["base"]["id"] == Store(s).get("b0").id
    assert [p["role"] for p in art.manifest.parents] == ["base", "finetuned"]
    # --energy: the smallest rank whose singular values keep the fraction
    code, out, err = cli("--store", s, "lora", "extract", tmp / "ft", "--base", "b0", "--energy", "0.8", "--name",
                         "ex8")
    assert code == 0, err
    for m, d in exact.items():
        S = torch.linalg.svdvals(d.double())
        cum = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
        assert _adapter(s, "ex8").ranks()[m] == int((cum < 0.8 - 1e-12).sum()) + 1
    # the same seed gives the same adapter
    assert cli("-q", "--store", s, "lora", "extract", tmp / "ft", "--base", "b0", "--rank", "3", "--name",
               "ex-again")[0] == 0
    assert Store(s).get("ex-again").id == Store(s).get("ex").id


def test_resize_equals_truncated_svd_of_the_product(env, cli):
    _tmp, s, _, adapters = env
    code, _out, err = cli("--store", s, "lora", "resize", "a2", "--rank", "2", "--name", "r2")
    assert code == 0, err
    new = _adapter(s, "r2")
    for m in SHAPES:
        U, S, Vh = torch.linalg.svd(_delta(adapters["a2"], m))
        assert new.ranks()[m] == 2
        assert torch.allclose(_delta(new, m), (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-6), m
    assert Store(s).get("r2").manifest.info["base"] == Store(s).get("a2").manifest.info["base"]
    # auto rank pattern under a parameter budget
    code, _out, err = cli("--store", s, "lora", "resize", "a2", "--rank-pattern", "auto", "--budget", "1000",
                          "--name", "ra")
    assert code == 0, err
    auto = _adapter(s, "ra")
    assert auto.num_params() <= 1000 and len(set(auto.ranks().values())) > 1


def test_combine_linear_is_exact_and_refactoring_error_is_eckart_young(env, cli):
    _tmp, s, base, adapters = env
    code, _, err = cli("--store", s, "lora", "combine", "a1", "a2", "--weights", "0.7,-0.3", "--name", "c")
    assert code == 0, err
    c = _adapter(s, "c")
    for m in SHAPES:
        want = 0.7 * _delta(adapters["a1"], m) - 0.3 * _delta(adapters["a2"], m)
        assert c.ranks()[m] == 10 and torch.allclose(_delta(c, m), want, atol=1e-6)
    code, out, err = cli("--store", s, "lora", "combine", "a1", "a2", "--weights", "0.7,-0.3", "--rank", "3",
                         "--name", "c3")
    assert code == 0, err
    c3 = _adapter(s, "c3")
    for m in SHAPES:
        want = 0.7 * _delta(adapters["a1"], m) - 0.3 * _delta(adapters["a2"], m)
        S = torch.linalg.svdvals(want)
        err_rel = ((_delta(c3, m) - want).norm() / want.norm()).item()
        assert abs(err_rel - ((S[3:] ** 2).sum() / (S ** 2).sum()).sqrt().item()) < 1e-5
        assert f"{err_rel:.6g}"[:5] in out or len(SHAPES) > 12
    # merged into the base: W + the weighted sum of full deltas
    code, _, err = cli("-q", "--store", s, "lora", "combine", "a1", "a2", "--weights", "0.5,0.5", "--merge-into", "b0",
                       "--name", "cm")
    assert code == 0, err
    with Store(s).open("cm") as src:
        for m in SHAPES:
            want = base[m + ".weight"].double() + 0.5 * _delta(adapters["a1"], m) + 0.5 * _delta(adapters["a2"], m)
            assert torch.allclose(src.read(m + ".weight").double(), want, atol=1e-6)
        assert torch.equal(src.read("embed_tokens.weight"), base["embed_tokens.weight"])


def test_combine_ties_equals_peft_and_dare_its_seeded_masks(env, cli):
    peft_merge = pytest.importorskip("peft.utils.merge_utils", reason="PEFT is not installed; TIES reference skipped")
    _tmp, s, base, adapters = env
    code, _, err = cli("-q", "--store", s, "lora", "combine", "a1", "a2", "--weights", "0.6,0.4", "--method", "ties",
                       "--density", "0.3", "--merge-into", "b0", "--name", "ties")
    assert code == 0, err
    code, _, err = cli("-q", "--store", s, "lora", "combine", "a1", "a2", "--weights", "0.6,0.4", "--method",
                       "dare_linear", "--density", "0.5", "--merge-into", "b0", "--name", "dare", "--seed", "3")
    assert code == 0, err
    from tensorstore_llm.seeding import uniform_rows

    with Store(s).open("ties") as t, Store(s).open("dare") as d:
        for m in SHAPES:
            deltas = [_delta(adapters[a], m).float() for a in ("a1", "a2")]
            ties = peft_merge.ties(deltas, torch.tensor([0.6, 0.4]), density=0.3)
            assert torch.allclose(t.read(m + ".weight"), base[m + ".weight"] + ties, atol=1e-6), m
            kept = [dl * (uniform_rows(3, f"lora_combine/adapter{i}", m, dl.shape, 0, dl.shape[0]) < 0.5) / 0.5
                    for i, dl in enumerate(deltas)]
            want = base[m + ".weight"] + 0.6 * kept[0] + 0.4 * kept[1]
            assert torch.allclose(d.read(m + ".weight"), want, atol=1e-6), m
    # as an adapter: a TIES delta re-factored to rank r keeps its top-r energy
    code, _out, err = cli("--store", s, "lora", "combine", "a1", "a2", "--weights", "0.6,0.4", "--method", "ties",
                         "--density", "0.3", "--rank", "8", "--name", "ties-r8")
    assert code == 0, err
    r8 = _adapter(s, "ties-r8")
    m = "layers.0.mlp.down_proj"
    full = peft_merge.ties([_delta(adapters[a], m).float() for a in ("a1", "a2")], torch.tensor([0.6, 0.4]),
                           density=0.3)
    U, S, Vh = torch.linalg.svd(full.double(), full_matrices=False)
    best = (U[:, :8] * S[:8]) @ Vh[:8]
    assert (_delta(r8, m) - full.double()).norm() <= (best - full.double()).norm() * 1.01


def test_drop_and_svd_init(env, cli):
    tmp, s, base, adapters = env
    code, out, err = cli("--store", s, "lora", "drop", "a1", "--layers", "1", "--name", "d")
    assert code == 0, err
    d = _adapter(s, "d")
    removed = sum(adapters["a1"].modules[m].num_params for m in SHAPES if m.startswith("layers.0."))
    assert set(d.modules) == {m for m in SHAPES if m.startswith("layers.1.")} and f"{removed} parameters" in out
    assert set(Store(s).get("d").manifest.info["base"]["checksums"]) == {m + ".weight" for m in d.modules}
    code, out, err = cli("-q", "--store", s, "lora", "init", "b0", "--rank", "4", "--alpha", "8", "--name", "pi",
                         "-o", tmp / "pissa")
    assert code == 0, err
    ad = _adapter(s, "pi")
    with Store(s).open("pi-residual") as res:
        for m in SHAPES:
            W = base[m + ".weight"]
            assert res.meta(m + ".weight").dtype == "float32"
            assert torch.allclose(res.read(m + ".weight") + _delta(ad, m).float(), W, atol=1e-5), m
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)     # fp32, as PiSSA computes it
            assert torch.allclose(_delta(ad, m).float(), (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5)
        assert torch.equal(res.read("embed_tokens.weight"), base["embed_tokens.weight"])
    assert Store(s).get("pi").manifest.info["base"]["id"] == Store(s).get("pi-residual").id
    assert os.path.isfile(tmp / "pissa" / "adapter_config.json")
    code, _, err = cli("-q", "--store", s, "lora", "init", "b0", "--method", "goat", "--experts", "2", "--rank", "3",
                       "--name", "goat")
    assert code == 0, err
    experts = [_adapter(s, f"goat-expert{e}") for e in range(2)]
    with Store(s).open("goat-residual") as res:
        for m in SHAPES:
            total = res.read(m + ".weight").double() + sum(_delta(e, m) for e in experts)
            assert torch.allclose(total, base[m + ".weight"].double(), atol=1e-5)


def test_bad_input_is_refused_with_nothing_written(env, cli):
    tmp, s, base, _ = env
    count = len(Store(s).list())
    for args, code, words in [
        (("resize", "a1", "--rank", "0"), 7, "--rank must be >= 1"),
        (("resize", "a1", "--rank", "40"), 7, "above min(out, in) = 32"),
        (("extract", tmp / "base", "--base", "b0", "--rank", "33"), 7, "min(out, in) = 32"),
        (("extract", tmp / "base", "--base", "b0", "--rank", "2", "--targets", "nope"), 6, "'nope'"),
        (("combine", "a1", "a2", "--weights", "1"), 7, "2 adapters but 1 weights"),
        (("combine", "a1", "a2", "--weights", "1,1", "--method", "ties"), 7, "--rank"),
        (("drop", "a1", "--layers", "nope_proj"), 6, "nope_proj"),
        (("init", "b0", "--rank", "0"), 7, "--rank must be >= 1"),
        (("init", "b0", "--rank", "33"), 7, "min(out, in) = 32"),
        (("resize", tmp / "a1", "--rank", "2"), 7, "--base"),
    ]:
        got, _, err = cli("--store", s, "lora", *args)
        assert got == code and words in err and err.count("\n") == 1, (args, got, err)
    # adapters of different bases cannot be combined
    other = {k: v + 1 for k, v in base.items()}
    _save(other, tmp / "other")
    assert cli("-q", "--store", s, "lora", "import", tmp / "a1", "--base", tmp / "other", "--name", "a1-other")[0] == 0
    count += 1
    got, _, err = cli("--store", s, "lora", "combine", "a1", "a1-other", "--weights", "1,1")
    assert got == 6 and "another base" in err
    assert len(Store(s).list()) == count


def test_extract_svd_choice_picks_the_method_per_module(env, cli):
    """--svd exact is the truncation of the exact SVD; --svd randomized runs the randomised SVD
    (the op's bit-for-bit match with extract_lora is test_lora_extract_gram's); auto is exact at
    these widths (<= 4096) and randomised above; the report and the recipe say which."""
    from tensorstore_llm.ops.lora_extract import GRAM_MAX_SIDE, svd_method_for

    tmp, s, base, _ = env
    gen = torch.Generator().manual_seed(9)
    ft = {k: (v + 0.01 * torch.randn(v.shape, generator=gen) if k[: -len(".weight")] in SHAPES else v)
          for k, v in base.items()}
    _save(ft, tmp / "ft")
    for svd in ("exact", "randomized", "auto"):
        code, out, err = cli("--store", s, "lora", "extract", tmp / "ft", "--base", "b0", "--rank", "3",
                             "--svd", svd, "--seed", "7", "--name", f"ex-{svd}")
        assert code == 0, err
        assert ("randomized" if svd == "randomized" else "exact") in out
        assert Store(s).get(f"ex-{svd}").manifest.recipe["svd"] == svd
    exact, randomized, auto = (_adapter(s, f"ex-{v}") for v in ("exact", "randomized", "auto"))
    for m in SHAPES:
        d = ft[m + ".weight"].float() - base[m + ".weight"].float()
        want = torch.linalg.svdvals(d.double())[:3].square().sum() / d.double().square().sum()
        got = 1 - (d.double() - _delta(exact, m).double()).square().sum() / d.double().square().sum()
        assert abs(float(got - want)) <= 1e-6 * float(want), m
        rnd = 1 - (d.double() - _delta(randomized, m).double()).square().sum() / d.double().square().sum()
        assert not torch.equal(_delta(randomized, m), _delta(exact, m)), m     # another method ran
        assert float(want - rnd) <= 2e-2 * float(want), m                      # and is a rank-3 SVD
        assert torch.equal(_delta(auto, m), _delta(exact, m)), m
    assert svd_method_for("auto", (GRAM_MAX_SIDE, 11008)) == "gram"
    assert svd_method_for("auto", (8192, 28672)) == "randomized"
    assert svd_method_for("exact", (8192, 28672)) == "gram"
    code, _, err = cli("--store", s, "lora", "extract", tmp / "ft", "--base", "b0", "--rank", "3", "--svd", "full")
    assert code != 0 and "--svd" in err
