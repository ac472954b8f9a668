"""LoRAM recovery: zeros exactly at pruned positions, the rest equal to the pruned product, merge
into the full model with ``tsllm lora merge``, and adapters that fit neither model refused."""
from __future__ import annotations

import os

import pytest
import torch

from tensorstore_llm import api
from tensorstore_llm.errors import ShapeMismatch
from tensorstore_llm.lora.peft_format import build_adapter, read_adapter, write_adapter
from tensorstore_llm.loram import recover_adapter
from tensorstore_llm.prune import prune
from tensorstore_llm.testing.synth import write_checkpoint

ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("loram") / "base"), "small", dtype="float32")


def _pruned_adapter(pruned_dir: str, path: str, rank: int = 4) -> str:
    """Random factors on every linear module of the pruned model (shapes read from its files)."""
    from tensorstore_llm.io.hf_dir import HFCheckpointSource

    gen = torch.Generator().manual_seed(3)
    factors = {}
    with HFCheckpointSource(pruned_dir) as src:
        for layer in range(4):
            for _role, module in ROLES.items():
                out, inp = src.meta(f"model.layers.{layer}.{module}.weight").shape
                factors[f"model.layers.{layer}.{module}"] = (torch.randn(rank, inp, generator=gen),
                                                             torch.randn(out, rank, generator=gen))
    return write_adapter(build_adapter(factors, alpha=8), path)


def test_recovered_product_is_zero_exactly_where_pruned(small_base, store, tmp_path, cli):
    api.import_checkpoint(small_base, store, name="base", progress=False)
    pruned_dir = str(tmp_path / "pruned")
    result = prune(store, "base", ratio=0.4, head_ratio=0.5, name="small", out_dir=pruned_dir, progress=False)
    plan = result.plan
    adapter_dir = _pruned_adapter(pruned_dir, str(tmp_path / "pruned-lora"))
    rec = recover_adapter(store, adapter_dir, "small-plan", out_dir=str(tmp_path / "full-lora"), name="full-lora",
                          pruned="small")
    small, full = read_adapter(adapter_dir), read_adapter(str(tmp_path / "full-lora"))
    for layer in range(4):
        for role, module in ROLES.items():
            name = f"model.layers.{layer}.{module}"
            p, f = small.modules[name], full.modules[name]
            product_small, product_full = p.B @ p.A, f.B @ f.A
            kept, pruned = plan.rows(role, layer), plan.pruned(role, layer)
            assert pruned, (role, layer)
            if role in ("o", "down"):       # A gets zero columns, B unchanged
                assert torch.equal(f.B, p.B)
                assert torch.count_nonzero(product_full[:, pruned]) == 0
                assert torch.equal(product_full[:, kept], product_small)
            else:                           # B gets zero rows, A unchanged
                assert torch.equal(f.A, p.A)
                assert torch.count_nonzero(product_full[pruned]) == 0
                assert torch.equal(product_full[kept], product_small)
    info = rec.artifact.manifest.info
    assert info["base"]["id"] == store.get("base").id and info["pruning_plan"] == result.plan_artifact.id
    # merged into the full model with the ordinary LoRA merge: pruned rows / columns stay the base's
    code, _out, err = cli("--store", store.root, "lora", "merge", "base", "full-lora", "--name", "merged")
    assert code == 0, err
    with store.open("base") as b, store.open("merged") as m:
        w, merged = b.read("model.layers.2.mlp.down_proj.weight"), m.read("model.layers.2.mlp.down_proj.weight")
        pruned = plan.pruned("down", 2)
        assert torch.equal(merged[:, pruned], w[:, pruned])
        f = full.modules["model.layers.2.mlp.down_proj"]
        assert torch.allclose(merged, w + f.scaling * (f.B @ f.A), atol=1e-6)
        wq, mq = b.read("model.layers.1.self_attn.q_proj.weight"), m.read("model.layers.1.self_attn.q_proj.weight")
        assert torch.equal(mq[plan.pruned("q", 1)], wq[plan.pruned("q", 1)])


def test_adapter_fitting_neither_model_is_refused(small_base, store, tmp_path, cli):
    api.import_checkpoint(small_base, store, name="base", progress=False)
    prune(store, "base", ratio=0.5, name="small", progress=False)
    before = len(store.list())
    bad = {"model.layers.0.mlp.up_proj": (torch.randn(2, 256), torch.randn(500, 2))}   # neither 344 nor 688 rows
    adapter_dir = write_adapter(build_adapter(bad), str(tmp_path / "bad"))
    with pytest.raises(ShapeMismatch, match="fit neither"):
        recover_adapter(store, adapter_dir, "small-plan", out_dir=str(tmp_path / "out"))
    code, _, err = cli("--store", store.root, "loram", "recover", adapter_dir, "--plan", "small-plan", "-o",
                       tmp_path / "o2")
    assert code == 6 and "fit neither" in err
    assert len(store.list()) == before and not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "o2")
    code, _, err = cli("--store", store.root, "loram", "recover", adapter_dir, "--plan", "base")
    assert code == 4 and "not a pruning_plan" in err


def test_mask_plans_need_no_reshaping(small_base, store, tmp_path):
    api.import_checkpoint(small_base, store, name="base", progress=False)
    prune(store, "base", pattern="2:4", name="m24", progress=False)
    factors = {"model.layers.0.mlp.up_proj": (torch.randn(2, 256), torch.randn(688, 2))}
    adapter_dir = write_adapter(build_adapter(factors), str(tmp_path / "a"))
    rec = recover_adapter(store, adapter_dir, "m24-plan")
    assert rec.recovery.actions["model.layers.0.mlp.up_proj"].startswith("unchanged")
