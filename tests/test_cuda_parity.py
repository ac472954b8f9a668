"""Every merge method on CUDA against the same merge on the CPU (skipped without a CUDA device).

Methods made of elementwise arithmetic and exact thresholds must agree bit for bit, DARE / DELLA
included (their uniforms are drawn on the CPU per tensor and block, then moved; the L1 rescale
factor is an fp64 ratio rounded to fp32). SLERP, NuSLERP and Model Stock reduce (norms, dot
products), adding in a different order on the GPU, so they agree to fp32 rounding only.
"""
import pytest
import torch

from tensorstore_llm import api
from tensorstore_llm.store import Store

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

TWO = "models:\n  - model: {ft1}\n    parameters: {{weight: 0.7{extra}}}\n  - model: {ft2}\n    parameters: {{weight: 0.5{extra}}}\n"
PLAIN = "models:\n  - model: {ft1}\n  - model: {ft2}\n"
RECIPES = {
    "linear": ("linear", "", ""),
    "task_arithmetic": ("task_arithmetic", "base_model: {base}\n", ""),
    "ties": ("ties", "base_model: {base}\n", ", density: 0.4"),
    "dare_linear": ("dare_linear", "base_model: {base}\n", ", density: 0.5"),
    "dare_ties": ("dare_ties", "base_model: {base}\n", ", density: 0.5"),
    "breadcrumbs": ("breadcrumbs", "base_model: {base}\n", ", density: 0.5, gamma: 0.05"),
    "breadcrumbs_ties": ("breadcrumbs_ties", "base_model: {base}\n", ", density: 0.5, gamma: 0.05"),
    "della": ("della", "base_model: {base}\n", ", density: 0.5, epsilon: 0.1"),
    "della_linear": ("della_linear", "base_model: {base}\n", ", density: 0.5, epsilon: 0.1"),
    "dare_ties_l1": ("dare_ties", "base_model: {base}\nparameters: {{rescale_method: l1}}\n", ", density: 0.5"),
    "slerp": ("slerp", "base_model: {ft1}\nparameters: {{t: 0.3}}\n", None),
    "nuslerp": ("nuslerp", "", ""),
    "model_stock": ("model_stock", "base_model: {base}\n", None),
}
REDUCING = {"slerp", "nuslerp", "model_stock"}


def _recipe(method, family):
    name, head, extra = RECIPES[method]
    text = f"merge_method: {name}\n" + head + (PLAIN if extra is None else TWO.replace("{extra}", extra))
    return text.format(**family) + "dtype: float32\nout_dtype: float32\n"


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_cuda_merge_matches_cpu(tmp_path, tiny_family, method):
    text = _recipe(method, tiny_family)
    results = {}
    for device, budget in (("cpu", "1G"), ("cuda", "32K")):    # different blocking too
        store = Store(str(tmp_path / device))
        art = api.merge(store, text, device=device, max_memory=budget, seed=3, progress=False).artifact
        with store.open(art.id) as out:
            results[device] = {name: out.read(name) for name in out.keys()}
    for name, cpu in results["cpu"].items():
        gpu = results["cuda"][name]
        if method in REDUCING:
            assert torch.allclose(cpu, gpu, atol=1e-6, rtol=1e-5), (name, (cpu - gpu).abs().max())
        else:
            assert torch.equal(cpu.view(torch.int32), gpu.view(torch.int32)), (name, (cpu - gpu).abs().max())
