"""`--engine ray`: the precompute on Ray Data (a local Ray with 2 CPUs started by the test) gives
the local engine's dataset byte for byte, and resumes a run the local engine left unfinished.

Ray is the optional extra `ray` (pip install 'tensorstore-llm[ray]'); without it these tests skip.
"""
import os

import pytest
import torch

ray = pytest.importorskip("ray",
                          reason="Ray is not installed: pip install 'tensorstore-llm[ray]' to run the Ray engine tests")

from tensorstore_llm.distill.precompute import SamplingConfig, precompute  # noqa: E402
from tensorstore_llm.distill.ray_engine import precompute_ray  # noqa: E402
from tensorstore_llm.distill.shards import open_dataset  # noqa: E402
from tensorstore_llm.hf.packing import PackingRule  # noqa: E402

CORPUS = os.path.join(os.path.dirname(__file__), "..", "data", "corpus", "docstrings.jsonl")
SLICE = dict(rule=PackingRule(seq_len=32, shuffle_seed=0), max_sequences=3, shard_sequences=2, batch_size=2,
             position_chunk=32)
CONFIG = SamplingConfig(draws=50, alignment=True)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs, for this module only; actors use one torch thread, like the local run."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory):
    from tensorstore_llm.testing.real_models import smollm2_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = str(tmp_path_factory.mktemp("local") / "kd")
        return smollm2_checkpoint(), precompute(smollm2_checkpoint(), CORPUS, out, config=CONFIG, **SLICE)
    finally:
        torch.set_num_threads(threads)


def hashes(path, store=None):
    ds = open_dataset(path, store)
    return {n: ds.files[n]["sha256"] for n in ds.shard_names()}


def test_ray_engine_resumes_a_local_run_to_the_same_bytes(local_ray, local_dataset, tmp_path):
    """An unfinished local run (stopped in its second shard) is finished by two Ray actors."""
    teacher, local = local_dataset

    class Stop(Exception):
        pass

    def stop(done, total):
        if done > 2:
            raise Stop
    resumed = str(tmp_path / "resumed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(Stop):
            precompute(teacher, CORPUS, resumed, config=CONFIG, progress=stop, **SLICE)
    finally:
        torch.set_num_threads(threads)
    seen = []
    out = precompute_ray([teacher], CORPUS, resumed, config=CONFIG, actors=2, progress=lambda d, t: seen.append((d, t)),
                         **SLICE)
    assert seen[0] == (2, 3) and seen[-1] == (3, 3)      # shard 0 kept from the local run, shard 1 computed
    assert open_dataset(out).info == open_dataset(local).info
    assert hashes(out) == hashes(local) and len(hashes(out)) == 2


def test_cli_engine_ray_into_the_store(cli, local_ray, local_dataset, tmp_path):
    from tensorstore_llm.store import Store

    teacher, local = local_dataset
    store = str(tmp_path / "store")
    code, out, err = cli("--store", store, "logits", "precompute", "--teacher", teacher, "--data", CORPUS,
                         "--engine", "ray", "--ray-actors", "1", "--name", "kd", "--seq-len", "32",
                         "--max-sequences", "3", "--shard-sequences", "2", "--batch-size", "2", "--alignment")
    assert code == 0, err
    assert "(kd): 3 sequences, 96 tokens" in out       # every shard computed by the Ray actor
    stored = open_dataset("kd", Store(store))
    assert stored.info == open_dataset(local).info
    for name in stored.shard_names():
        assert stored.read_shard(name).equals(open_dataset(local).read_shard(name))
