"""Every source and sink passes the shared conformance tests."""
import os

from safetensors.torch import save_file

from tensorstore_llm.io.hf_dir import HFCheckpointSink, HFCheckpointSource
from tensorstore_llm.store import Store
from tensorstore_llm.testing.conformance import SinkConformance, SourceConformance


def _save_sharded(directory, tensors):
    """Two shards + index, written by the reference safetensors library."""
    import json

    os.makedirs(directory, exist_ok=True)
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n].contiguous() for n in part}, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


class TestHFDirSource(SourceConformance):
    def make_source(self, tmp_path, tensors):
        _save_sharded(str(tmp_path / "hf"), tensors)
        return HFCheckpointSource(str(tmp_path / "hf"))


class TestSingleFileSource(SourceConformance):
    def make_source(self, tmp_path, tensors):
        os.makedirs(tmp_path, exist_ok=True)
        path = str(tmp_path / "one.safetensors")
        save_file({n: t.contiguous() for n, t in tensors.items()}, path)
        return HFCheckpointSource(path)


class TestArtifactSource(SourceConformance):
    def make_source(self, tmp_path, tensors):
        store = Store(str(tmp_path / "store"))
        writer = store.create("job-test")
        SinkConformance.write_all(None, writer, tensors)
        artifact = writer.commit(kind="checkpoint")
        return store.open(artifact.id)


class TestHFDirSink(SinkConformance):
    def make_sink(self, tmp_path):
        return HFCheckpointSink(str(tmp_path / "out"), max_shard_bytes=300, job_key="k")

    def finish_and_open(self, sink):
        return HFCheckpointSource(sink.commit())


class TestArtifactSink(SinkConformance):
    def make_sink(self, tmp_path):
        return Store(str(tmp_path / "store")).create("job-k")

    def finish_and_open(self, sink):
        artifact = sink.commit(kind="checkpoint")
        return sink.store.open(artifact.id)
