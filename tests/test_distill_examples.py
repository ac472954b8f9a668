"""The README's distillation examples (plain PyTorch loop, then the Hugging Face Trainer) run as
written: each ```python block after a ``<!-- distill-example -->`` marker, in order, in one
namespace, from a directory holding the repository's ``data/``."""
import math
import os
import re

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
MARKER = "<!-- distill-example -->"


def readme_examples() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return re.findall(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, flags=re.S)


@pytest.fixture
def in_scratch_dir(tmp_path, monkeypatch):
    os.symlink(os.path.abspath(os.path.join(ROOT, "data")), tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def test_readme_distill_examples_run(in_scratch_dir):
    loop, trainer = readme_examples()
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(loop, "README.md (plain PyTorch loop)", "exec"), namespace)
    assert os.path.isfile(in_scratch_dir / "kd-cache" / "dataset.json")
    assert math.isfinite(namespace["loss"].item()) and namespace["epoch"] == 1
    exec(compile(trainer, "README.md (Hugging Face Trainer)", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 4
    assert math.isfinite(namespace["trainer"].state.log_history[-1]["train_loss"])
