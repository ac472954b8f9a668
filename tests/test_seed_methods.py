"""The seeds' merge methods: LoRE-Merging, AIM and Twin-Merging (ops/seed_merges.py,
merge/methods/{lore,aim,twin}.py, merge/activations.py).

Golden formulas through the op conformance base; recipes through api.merge and ``tsllm merge``;
and a real pair of SmolLM2-135M fine-tunes on two different texts (opt out with
TSLLM_SKIP_REAL=1): AIM's and LoRE's held-out losses lie between the inputs', and Twin-Merging's
shared model plus one expert adapter (loaded by PEFT) is closer to that task's model than the
shared model alone.
"""
import os

import pytest
import torch

from tensorstore_llm import api
from tensorstore_llm.errors import OutputExists, RecipeError
from tensorstore_llm.io.hf_dir import HFCheckpointSource
from tensorstore_llm.ops import seed_merges  # noqa: F401  (registers the ops)
from tensorstore_llm.testing.conformance import OpConformance

SHAPE = (48, 40)


def _randn(gen, shape=SHAPE):
    return torch.randn(shape, generator=gen)


def _low_rank(gen, rank=3, shape=SHAPE):
    return _randn(gen, (shape[0], rank)) @ _randn(gen, (rank, shape[1])) / rank


# -- golden formulas -----------------------------------------------------------------------------

class TestProtectedTaskArithmetic(OpConformance):
    """AIM: θ0 + (1 − ω·â[col]) ⊙ λ Σ wi τi with â the min-max normalised column statistic."""

    op = "protected_task_arithmetic"
    importance = [float(v) for v in torch.linspace(0.5, 3.0, SHAPE[1]).roll(7)]
    params = {"weights": [0.6, 0.4], "lam": 0.9, "omega": 0.7, "importance": importance}
    atol = 1e-6

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + 0.05 * _randn(gen) for _ in range(2)]}

    def golden(self, inputs, params):
        a = torch.tensor(params["importance"], dtype=torch.float64)
        keep = 1 - params["omega"] * (a - a.min()) / (a.max() - a.min())
        base = inputs["base"].double()
        update = params["lam"] * sum(w * (m.double() - base) for w, m in zip(params["weights"], inputs["models"]))
        return (base + keep[None, :] * update).float()


class TestPlainTaskArithmetic(TestProtectedTaskArithmetic):
    """Without a statistic the op is task arithmetic (Twin-Merging's shared model)."""

    params = {"weights": [0.5, 0.5], "lam": 1.0}

    def golden(self, inputs, params):
        base = inputs["base"].double()
        return (base + sum(w * (m.double() - base) for w, m in zip(params["weights"], inputs["models"]))).float()


def direct_lore(models, base, mu, iterations, weights, lam):
    """LoRE's coordinate descent with full float64 SVDs (the reference)."""
    xs = [m.double().reshape(m.shape[0] if m.dim() >= 2 else 1, -1) for m in models]
    theta0 = base.double().reshape(xs[0].shape) if base is not None else sum(xs) / len(xs)
    threshold = mu * max(torch.linalg.svdvals(x - theta0)[0] for x in xs)

    def svt(m):
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        return U @ torch.diag((S - threshold).clamp_min(0)) @ Vh

    for _ in range(iterations):
        deltas = [svt(x - theta0) for x in xs]
        theta0 = sum(x - d for x, d in zip(xs, deltas)) / len(xs)
    return (theta0 + lam * sum(w * d for w, d in zip(weights, deltas))).reshape(models[0].shape).float()


class TestLoreMerge(OpConformance):
    """No base: θ0 starts at the mean; task vectors of rank 3 keep the randomised SVD exact."""

    op = "lore_merge"
    params = {"weights": [1.0, 0.8, 1.2], "lam": 0.7, "mu": 0.15, "iterations": 3, "rank": 12}
    atol = 2e-4
    small_budget = "512K"   # a whole-tensor op: the budget only reorders the jobs

    def make_inputs(self, gen):
        shared = _randn(gen)
        return {"models": [shared + 0.3 * _low_rank(gen) for _ in range(3)]}

    def golden(self, inputs, params):
        return direct_lore(inputs["models"], None, params["mu"], params["iterations"], params["weights"], params["lam"])


class TestLoreMergeFromBase(TestLoreMerge):
    op = "lore_merge_from_base"
    params = {"weights": [1.0, 1.0], "lam": 1.0, "mu": 0.05, "iterations": 2, "rank": 8}

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + 0.2 * _low_rank(gen) for _ in range(2)]}

    def golden(self, inputs, params):
        return direct_lore(inputs["models"], inputs["base"], params["mu"], params["iterations"], params["weights"],
                           params["lam"])


class TestLoreMergeVector(TestLoreMerge):
    """A 1-D tensor is a 1 x n matrix: SVT shrinks its norm."""

    params = {"weights": [1.0, 1.0], "lam": 1.0, "mu": 0.3, "iterations": 2, "rank": 4}

    def make_inputs(self, gen):
        shared = _randn(gen, (600,))
        return {"models": [shared + 0.5 * _randn(gen, (600,)) for _ in range(2)]}


class TestTwinExpert(OpConformance):
    """A, B of the rank-r SVD of θk − θs (θs rounded to bf16 as stored): B @ A is the exact
    truncated SVD (the exclusive part has rank 3 + a tiny tail), the record its energies."""

    op = "twin_expert"
    params = {"weights": [0.5, 0.5], "lam": 1.0, "index": 1, "rank": 3, "module": "m", "shared_dtype": "bfloat16"}
    whole = ("base", "models")
    small_budget = "512K"

    def make_inputs(self, gen):
        base = _randn(gen)
        return {"base": base, "models": [base + 0.1 * _low_rank(gen) + 1e-4 * _randn(gen) for _ in range(2)]}

    def golden(self, inputs, params):
        return None

    def _plan(self, per_name, sources, order):   # each tensor its own module, so outputs do not collide
        from tensorstore_llm.engine.plan import WHOLE, InputRef, Plan, TensorJob
        from tensorstore_llm.io.base import TensorMeta
        from tensorstore_llm.ops.registry import get_op

        spec = get_op(self.op)
        jobs = []
        for name in order:
            params = spec.make_params({**self.params, "module": name}, "test")
            refs = (("base", InputRef("base0", name, WHOLE)), ("models", tuple(InputRef(f"models{i}", name, WHOLE) for i in range(2))))
            jobs.append(TensorJob(TensorMeta(f"expert1.{name}.lora_A.weight", (3, SHAPE[1]), "float32"), self.op, refs,
                                  params, extra_outputs=(TensorMeta(f"expert1.{name}.lora_B.weight", (SHAPE[0], 3), "float32"),
                                                         TensorMeta(f"expert1.{name}.record", (2,), "float32"))))
        return Plan(jobs, sources), None

    def test_golden_formula(self, tmp_path):
        store, per_name, sources = self._store(tmp_path)
        got, _ = self._run(tmp_path, store, per_name, sources, budget="256M")
        for name, inputs in per_name.items():
            base, models = inputs["base"], inputs["models"]
            shared = (base + 0.5 * (models[0] - base) + 0.5 * (models[1] - base)).to(torch.bfloat16).double()
            exclusive = models[1].double() - shared
            U, S, Vh = torch.linalg.svd(exclusive, full_matrices=False)
            truncated = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
            product = got[f"expert1.{name}.lora_B.weight"].double() @ got[f"expert1.{name}.lora_A.weight"].double()
            assert torch.allclose(product, truncated, atol=1e-5), name
            record = got[f"expert1.{name}.record"].double()
            assert record[0] == pytest.approx(float(exclusive.square().sum()), rel=1e-5)
            assert record[1] == pytest.approx(float(S[:3].square().sum()), rel=1e-4)

    def finished_output(self, name, inputs):
        return f"expert1.{name}.lora_A.weight"


# -- recipes on generated models -----------------------------------------------------------------

def _recipe(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_lore_recipe_through_the_cli_without_a_base(cli, store, tiny_family, tmp_path):
    """``merge_method: lore`` with no base_model: each tensor equals the direct coordinate descent
    (models stored in bf16, computed in fp32, rounded once)."""
    refs = [tiny_family[k] for k in ("base", "ft1", "ft2")]   # three models (two would give their mean)
    recipe = _recipe(tmp_path, "merge_method: lore\nmodels:\n" + "".join(f"  - model: {r}\n" for r in refs)
                     + "parameters: {mu: 0.05, iterations: 2, rank: 512, lambda: 1.5}\nout_dtype: float32\n")
    code, _out, err = cli("--store", store.root, "merge", recipe, "--name", "lore-merged")
    assert code == 0, err
    sources, moved = [HFCheckpointSource(r) for r in refs], 0.0
    with store.open("lore-merged") as merged:
        for name in merged.keys():
            models = [s.read(name).float() for s in sources]
            expected = direct_lore(models, None, 0.05, 2, [1.0] * 3, 1.5)
            assert torch.allclose(merged.read(name), expected, atol=2e-4), name
            moved = max(moved, float((merged.read(name) - sum(models) / 3).abs().max()))
    assert moved > 1e-4   # not the plain mean
    for source in sources:
        source.close()


def test_twin_recipe_writes_one_expert_adapter_per_model(store, tiny_family, tmp_path):
    from tensorstore_llm.lora.peft_format import read_adapter

    base, ft1, ft2 = tiny_family["base"], tiny_family["ft1"], tiny_family["ft2"]
    experts = tmp_path / "experts"
    text = (f"merge_method: twin\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n"
            f"parameters: {{rank: 4, experts_dir: {experts}}}\n")
    result = api.merge(store, text, progress=False)
    record = result.artifact.manifest.recipe["experts"]
    assert sorted(os.listdir(experts)) == ["expert-0-ft1", "expert-1-ft2"]
    with store.open(result.artifact.id) as shared, HFCheckpointSource(base) as b, HFCheckpointSource(ft1) as x, \
            HFCheckpointSource(ft2) as y:
        for name in shared.keys():   # the shared model is the mean of the models, rounded once to bf16
            theta0 = b.read(name).float()
            mean = theta0 + 0.5 * (x.read(name).float() - theta0) + 0.5 * (y.read(name).float() - theta0)
            assert torch.equal(shared.read(name), mean.to(torch.bfloat16)), name
        adapter = read_adapter(str(experts / "expert-0-ft1"))
        assert record[ft1]["adapter"] == str(experts / "expert-0-ft1") and 0 < record[ft1]["captured"] <= 1
        for module, lora in adapter.modules.items():
            exclusive = x.read(module + ".weight").float() - shared.read(module + ".weight").float()
            _U, S, _Vh = torch.linalg.svd(exclusive.double(), full_matrices=False)
            optimal = float((exclusive.double().square().sum() - S[:4].square().sum()).sqrt())   # Eckart-Young
            got = lora.scaling * (lora.B.double() @ lora.A.double())
            assert lora.A.shape[0] == 4 and float((exclusive.double() - got).norm()) <= 1.01 * optimal, module
    with pytest.raises(OutputExists, match="expert-0-ft1"):   # refused before any work
        api.merge(store, text, progress=False)


def test_bad_seed_recipes_are_refused_before_any_work(store, tiny_family, tmp_path):
    base, ft1, ft2 = tiny_family["base"], tiny_family["ft1"], tiny_family["ft2"]
    cases = [
        (f"merge_method: lore\nmodels: [{ft1}]\n", "at least two models"),
        (f"merge_method: lore\nmodels: [{ft1}, {ft2}]\nparameters: {{mu: 1.5}}\n", "mu must be a number in"),
        (f"merge_method: twin\nbase_model: {base}\nmodels: [{ft1}]\n", "experts_dir"),
        (f"merge_method: aim\nbase_model: {base}\nmodels: [{ft1}]\n", "calibration"),
        (f"merge_method: aim\nbase_model: {base}\nmodels: [{ft1}]\nparameters: {{activations: {tmp_path / 'a.bin'}}}\n",
         "safetensors"),
        (f"merge_method: aim\nbase_model: {base}\nmodels: [{ft1}]\nparameters: {{calibration: c.txt, omega: -1}}\n",
         "omega must be"),
    ]
    for text, message in cases:
        with pytest.raises(RecipeError, match=message):
            api.merge(store, text, progress=False)
    assert not store.list()


# -- a real pair of SmolLM2-135M fine-tunes on two different texts --------------------------------

TASK_MODULES = {"a": ("json", "re", "string", "textwrap", "heapq"), "b": ("argparse", "logging", "subprocess", "threading")}
STEPS, LR, SEQ, BATCH = 8, 1e-4, 64, 4


def _task_texts(task):
    from tensorstore_llm.testing.finetune import corpus_text

    text = corpus_text(TASK_MODULES[task])
    cut = int(len(text) * 0.8)
    return text[:cut], text[cut:]


def _task_finetune(task):
    """A cached fp32 SmolLM2 fine-tune on task ``task``'s training text (STEPS AdamW steps)."""
    from tensorstore_llm.testing.finetune import finetune, token_batches
    from tensorstore_llm.testing.real_models import cache_root, cached_build, load_smollm2_fp32, save_cached

    def build(target):
        model, tokenizer = load_smollm2_fp32()
        finetune(model, token_batches(tokenizer, _task_texts(task)[0], SEQ, BATCH, STEPS, seed=1), lr=LR)
        save_cached(model, tokenizer, target)

    return cached_build(os.path.join(cache_root(), f"smollm2-135m-seed-merge-task-{task}-ft{STEPS}-lr{LR:g}-seq{SEQ}x{BATCH}"
                                                   "-float32"), build)


@pytest.fixture(scope="module")
def real_pair():
    if os.environ.get("TSLLM_SKIP_REAL"):
        pytest.skip("TSLLM_SKIP_REAL is set")
    pytest.importorskip("transformers")
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    try:
        base = smollm2_checkpoint("float32")
    except Exception as e:   # SmolLM2 is not installed here
        pytest.skip(f"SmolLM2-135M is not available: {e}")
    return {"base": base, "a": _task_finetune("a"), "b": _task_finetune("b")}


def _heldout_ids(tokenizer, task):
    ids = torch.tensor(tokenizer(_task_texts(task)[1])["input_ids"][: 4 * 128])
    return ids.reshape(4, 128)


def _model(source, files):
    from tensorstore_llm.hf.from_source import causal_lm_from_source

    return causal_lm_from_source(source, files)


def _losses(store, ref, tasks=("a", "b")):
    source, _, files = api.resolve_input(store, ref)
    with source:
        model, tokenizer = _model(source, files)
    with torch.no_grad():
        return {t: float(model(input_ids=_heldout_ids(tokenizer, t), labels=_heldout_ids(tokenizer, t)).loss) for t in tasks}


@pytest.fixture(scope="module")
def input_losses(real_pair):
    return {k: _losses(None, real_pair[k]) for k in ("a", "b")}


def _between(merged, inputs):
    """Not degenerate: on each task's held-out text the merge is better than the input that was not
    trained on it and within 0.05 nats of the one that was. (The two texts are related Python
    docstrings, so a merge may beat both inputs on one of them: measured AIM 2.633 and LoRE 2.646
    on text b against 2.658 / 2.701, and 3.084 / 3.085 between 3.073 and 3.179 on text a.)"""
    for task in ("a", "b"):
        low, high = sorted((inputs["a"][task], inputs["b"][task]))
        assert low - 0.05 < merged[task] < high, (task, merged, inputs)


def test_real_aim_lies_between_its_inputs_and_keeps_its_statistics(store, real_pair, input_losses, tmp_path):
    from tensorstore_llm.merge.activations import load_statistics, store_activations

    corpus = os.path.join(os.path.dirname(__file__), "..", "data", "corpus", "literature.txt")
    stats_file = tmp_path / "base-activations.safetensors"
    text = (f"merge_method: aim\nbase_model: {real_pair['base']}\nmodels:\n  - model: {real_pair['a']}\n"
            f"  - model: {real_pair['b']}\nparameters: {{calibration: {corpus}, calibration_samples: 8, "
            f"calibration_tokens: 128, activations: {stats_file}, omega: 0.4}}\n")
    first = api.merge(store, text, progress=False)
    assert first.artifact.manifest.recipe["activations"]["reused"] is False
    with HFCheckpointSource(real_pair["base"]) as base:
        stats = load_statistics(str(stats_file), base_identity=base.identity, where="test")
        assert stats["model.layers.0.mlp.down_proj.weight"].shape == (1536,)
        assert base.meta("model.layers.0.mlp.down_proj.weight").shape[1] == 1536
    kept = store_activations(store, real_pair["base"], corpus, samples=8, tokens=128, name="base-aim")
    assert kept.kind == "dataset" and kept.manifest.parents[0]["role"] == "base"
    with store.open("base-aim") as artifact:   # the store artifact holds the same statistics
        assert set(artifact.keys()) == set(stats) - {"__tokens__"} and kept.manifest.info["tokens"] > 0
        assert all(torch.equal(artifact.read(k), stats[k]) for k in artifact.keys())
    again = api.merge(store, text.replace(f"calibration: {corpus}, ", ""), progress=False)   # reads the file
    assert again.artifact.manifest.recipe["activations"]["reused"] is True
    assert again.artifact.manifest.checksums() == first.artifact.manifest.checksums()   # the same tensors
    _between(_losses(store, first.artifact.id), input_losses)


def test_real_lore_lies_between_its_inputs(store, real_pair, input_losses):
    # with the base as the starting θ0 (without one, two models' LoRE is their mean: δ2 = −δ1)
    text = (f"merge_method: lore\nbase_model: {real_pair['base']}\nmodels:\n  - model: {real_pair['a']}\n"
            f"  - model: {real_pair['b']}\nparameters: {{mu: 0.1, iterations: 1, rank: 16, lambda: 0.75}}\n")
    result = api.merge(store, text, progress=False, max_memory="4G")   # whole tensors: the embedding's SVD
    _between(_losses(store, result.artifact.id), input_losses)


def test_real_twin_expert_adapter_brings_the_shared_model_back_to_its_task(store, real_pair, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    experts = tmp_path / "experts"
    text = (f"merge_method: twin\nbase_model: {real_pair['base']}\nmodels:\n  - model: {real_pair['a']}\n"
            f"  - model: {real_pair['b']}\nparameters: {{rank: 16, experts_dir: {experts}}}\n")
    result = api.merge(store, text, progress=False)
    shared_dir = str(tmp_path / "shared")
    api.export(store, result.artifact.id, shared_dir, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(real_pair["a"])
    ids = _heldout_ids(tokenizer, "a")
    with torch.no_grad():
        target = AutoModelForCausalLM.from_pretrained(real_pair["a"], dtype=torch.float32)(input_ids=ids).logits
        shared = AutoModelForCausalLM.from_pretrained(shared_dir, dtype=torch.float32)
        alone = shared(input_ids=ids).logits
        (adapter_dir,) = [experts / d for d in os.listdir(experts) if d.startswith("expert-0-")]
        with_expert = peft.PeftModel.from_pretrained(shared, str(adapter_dir))(input_ids=ids).logits
    gap_alone = float((alone - target).abs().mean())
    gap_expert = float((with_expert - target).abs().mean())
    assert gap_expert < 0.8 * gap_alone, (gap_expert, gap_alone)
