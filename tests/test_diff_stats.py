"""diff-stats: every figure against a direct formula, streamed at two budgets, the CLI and its plot."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from tensorstore_llm.diff.stats import diff_stats, format_table
from tensorstore_llm.io.hf_dir import HFCheckpointSource


def _write(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """fp32 base and two fine-tunes: low-rank (8) + small noise deltas, sign-correlated in layer 0."""
    root = tmp_path_factory.mktemp("diffstats")
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (300, 48), "model.layers.0.mlp.up_proj.weight": (96, 48),
              "model.layers.0.input_layernorm.weight": (48,), "model.layers.1.self_attn.q_proj.weight": (48, 48),
              "model.norm.weight": (48,)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}

    def delta(shape, scale):
        if len(shape) == 1:
            d = torch.randn(shape, generator=gen) * scale
            d[: shape[0] // 3] = 0                                          # some weights unchanged
            return d
        low = torch.randn(shape[0], 8, generator=gen) @ torch.randn(8, shape[1], generator=gen)
        return scale * (low / 8 + 0.05 * torch.randn(shape, generator=gen))
    d1 = {k: delta(s, 1e-2) for k, s in shapes.items()}
    d2 = {k: (0.5 * d1[k] + delta(s, 1e-2)) if "layers.0" in k else delta(s, 2e-2) for k, s in shapes.items()}
    paths = [_write(str(root / "base.safetensors"), base),
             _write(str(root / "ft1.safetensors"), {k: base[k] + d1[k] for k in base}),
             _write(str(root / "ft2.safetensors"), {k: base[k] + d2[k] for k in base})]
    return paths


def _read(path):
    src = HFCheckpointSource(path)
    return {k: src.read(k).double() for k in src.keys()}


def test_figures_equal_direct_formulas(family):
    base, ft1, ft2 = (_read(p) for p in family)
    sources = [HFCheckpointSource(p) for p in family]
    stats = diff_stats([sources[0]], sources[1:], rank=8, max_memory="64M")
    assert {r["name"] for r in stats.tensors} == set(base)
    for row in stats.tensors:
        name = row["name"]
        d1, d2 = ft1[name] - base[name], ft2[name] - base[name]
        for i, d in enumerate((d1, d2)):
            assert row["rel_norm"][i] == pytest.approx(float(d.norm() / base[name].norm()), rel=1e-12)
            ft = (ft1, ft2)[i][name]
            assert row["changed"][i] == int((ft.float() != base[name].float()).sum())
            assert row["changed_bf16"][i] == int((ft.float().bfloat16() != base[name].float().bfloat16()).sum())
            if d.dim() == 2:
                s = torch.linalg.svdvals(d)
                exact_share = float(s[:8].pow(2).sum() / s.pow(2).sum())
                assert row["energy_share"][i] <= exact_share + 1e-6                 # a sketch never overshoots
                assert row["energy_share"][i] == pytest.approx(exact_share, abs=2e-3)
                assert row["stable_rank"][i] == pytest.approx(float(s.pow(2).sum() / s[0] ** 2), rel=1e-3)
                cum = torch.cumsum(s.pow(2), 0) / s.pow(2).sum()
                assert row["rank90"][i] == int((cum < 0.9).sum()) + 1
            else:
                assert "energy_share" not in row
        assert row["conflict_ratio"][0] == int(((d1.sign() * d2.sign()) < 0).sum()) / d1.numel()
        assert row["cosine"][0] == pytest.approx(float((d1 * d2).sum() / (d1.norm() * d2.norm())), rel=1e-9)
    # pooled per layer: norms of the layer's whole delta
    layer0 = [n for n in base if ".layers.0." in n]
    row = next(r for r in stats.layers if r["layer"] == "0")
    num = sum(float((ft1[n] - base[n]).pow(2).sum()) for n in layer0)
    den = sum(float(base[n].pow(2).sum()) for n in layer0)
    assert row["rel_norm"][0] == pytest.approx(math.sqrt(num / den), rel=1e-12)
    dot = sum(float(((ft1[n] - base[n]) * (ft2[n] - base[n])).sum()) for n in layer0)
    n2 = sum(float((ft2[n] - base[n]).pow(2).sum()) for n in layer0)
    assert row["cosine"][0] == pytest.approx(dot / math.sqrt(num * n2), rel=1e-9)
    assert row["cosine"][0] > 0.3                                             # correlated by construction
    assert [r["layer"] for r in stats.layers] == ["embed", "0", "1", "final"]


def test_budget_does_not_change_the_figures(family):
    sources = [HFCheckpointSource(p) for p in family]
    big = diff_stats([sources[0]], sources[1:], rank=4, max_memory="64M")
    small = diff_stats([sources[0]], sources[1:], rank=4, max_memory="40K")     # several blocks per tensor
    for a, b in zip(big.tensors, small.tensors):
        for key in ("changed", "changed_bf16", "conflicts"):
            assert a[key] == b[key]
        for key in ("delta2", "base2", "dot"):
            assert a[key] == pytest.approx(b[key], rel=1e-12)
        for key in ("energy_share", "stable_rank"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_single_diff_table(family):
    sources = [HFCheckpointSource(p) for p in family[:2]]
    stats = diff_stats([sources[0]], [sources[1]], labels=["ft1"], rank=4)
    lines = format_table(stats)
    assert lines[0] == "diff 1: ft1"
    assert any(line.strip().startswith("total") for line in lines)
    assert not any("conf" in line for line in lines)


def _cli(args, tmp_path):
    from tensorstore_llm_cli import cli

    return CliRunner().invoke(cli, ["--store", str(tmp_path / "store"), *args])


def test_cli_table_json_and_plot(family, tmp_path):
    pytest.importorskip("matplotlib")
    base, ft1, ft2 = family
    png, out = str(tmp_path / "layers.png"), str(tmp_path / "stats.json")
    result = _cli(["diff-stats", ft1, ft2, "--base", base, "--rank", "4", "--plot", png, "--json", out,
                   "--max-memory", "1M"], tmp_path)
    assert result.exit_code == 0, result.output
    assert "conf 1-2" in result.output and "model.layers.0.mlp.up_proj.weight" in result.output
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000
    with open(out) as f:
        body = json.load(f)
    assert body["labels"] == [ft1, ft2] and len(body["layers"]) == 4


def test_cli_errors(family, tmp_path):
    base, ft1, _ = family
    result = _cli(["diff-stats", ft1], tmp_path)
    assert result.exit_code != 0 and "--base" in str(result.exception or result.output)
    result = _cli(["diff-stats", ft1, "--base", base, "--plot", str(tmp_path / "x.jpg")], tmp_path)
    assert result.exit_code != 0 and ".png" in str(result.exception or result.output)
    result = _cli(["diff-stats", ft1, "--base", str(tmp_path / "nowhere")], tmp_path)
    assert result.exit_code != 0


def test_shape_mismatch_names_the_tensor(tmp_path):
    from tensorstore_llm.errors import ShapeMismatch

    a = _write(str(tmp_path / "a.safetensors"), {"w.weight": torch.zeros(4, 4)})
    b = _write(str(tmp_path / "b.safetensors"), {"w.weight": torch.zeros(5, 4)})
    with pytest.raises(ShapeMismatch, match="w.weight"):
        diff_stats([HFCheckpointSource(a)], [HFCheckpointSource(b)])


def test_cli_delta_artifact_is_read_against_its_parent(tmp_path):
    """A delta-stored artifact needs no --base: its parent is the base, and the figures equal the pair's."""
    from tensorstore_llm.testing.synth import write_model_family

    base, ft1 = write_model_family(str(tmp_path / "fam"), "tiny", finetunes=1)
    assert _cli(["-q", "import", base, "--name", "base"], tmp_path).exit_code == 0
    made = _cli(["-q", "diff", ft1, "--base", "base", "--name", "ft1d"], tmp_path)
    assert made.exit_code == 0, made.output
    as_delta, as_pair = str(tmp_path / "delta.json"), str(tmp_path / "pair.json")
    assert _cli(["diff-stats", "ft1d", "--json", as_delta], tmp_path).exit_code == 0
    assert _cli(["diff-stats", ft1, "--base", base, "--json", as_pair], tmp_path).exit_code == 0
    with open(as_delta) as a, open(as_pair) as b:
        rows_delta, rows_pair = json.load(a)["tensors"], json.load(b)["tensors"]
    assert len(rows_delta) == len(rows_pair) > 0
    for x, y in zip(rows_delta, rows_pair):
        assert x["name"] == y["name"] and x["changed"] == y["changed"] and x["delta2"] == y["delta2"]


def test_plot_without_matplotlib_is_a_clear_error(family, tmp_path, monkeypatch):
    import sys

    from tensorstore_llm.diff.stats import plot
    from tensorstore_llm.errors import MissingDependency

    sources = [HFCheckpointSource(p) for p in family[:2]]
    stats = diff_stats([sources[0]], [sources[1]], rank=2, power_iters=0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # as if the plot extra were not installed
    with pytest.raises(MissingDependency, match=r"tensorstore-llm\[plot\]"):
        plot(stats, str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
