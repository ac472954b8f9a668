"""Greedy soup: best-first, keeps a model only if the averaged soup scores at least as well."""
import sys

import pytest
from safetensors.torch import load_file

from tensorstore_llm.api import greedy_soup
from tensorstore_llm.errors import TsllmError
from tensorstore_llm.io.hf_dir import HFCheckpointSource
from tensorstore_llm.merge.soup import command_score
from tensorstore_llm.testing.synth import write_checkpoint

NAME = "model.layers.0.mlp.up_proj.weight"


def test_greedy_soup_keeps_helpful_models_only(store, tiny_family, tmp_path):
    bad = write_checkpoint(str(tmp_path / "bad"), "tiny", seed=0, finetune=3, delta_scale=0.05)
    with HFCheckpointSource(tiny_family["ft1"]) as a, HFCheckpointSource(tiny_family["ft2"]) as b:
        target = (a.read(NAME).float() + b.read(NAME).float()) / 2

    def score(path):
        return -(load_file(f"{path}/model.safetensors")[NAME].float() - target).norm().item()

    result = greedy_soup(store, [bad, tiny_family["ft1"], tiny_family["ft2"]], score, name="soup", progress=False)
    assert sorted(result.kept) == sorted([tiny_family["ft1"], tiny_family["ft2"]])
    assert result.history[-1]["candidate"].endswith(bad) and result.history[-1]["score"] < result.history[-2]["score"]
    assert store.get("soup").id == result.artifact.id
    assert [p["ref"] for p in result.artifact.manifest.parents] == result.kept


def test_command_score(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import sys\nprint('evaluating', sys.argv[1])\nprint('accuracy 0.75')\n")
    assert command_score(f"{sys.executable} {script} {{path}}")(str(tmp_path)) == 0.75
    script.write_text("print('nothing useful')\n")
    with pytest.raises(TsllmError, match="no number"):
        command_score(f"{sys.executable} {script}")(str(tmp_path))
    script.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(TsllmError, match="exit 3"):
        command_score(f"{sys.executable} {script}")(str(tmp_path))
