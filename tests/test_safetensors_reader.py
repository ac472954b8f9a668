"""The safetensors / index reader: every malformation is a FormatError naming the file."""
import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tensorstore_llm.errors import FormatError, InvalidTensorName, TsllmError, UnsafeFormat
from tensorstore_llm.io.hf_dir import HFCheckpointSource


def _write(path, header: dict | bytes, data: bytes = b""):
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + data)
    return str(path)


def _open(path):
    with HFCheckpointSource(str(path)) as src:
        return {k: src.read(k) for k in src.keys()}


def test_reads_reference_writer_output(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64)}
    save_file(t, str(tmp_path / "m.safetensors"))
    got = _open(tmp_path / "m.safetensors")
    assert torch.equal(got["a"], t["a"]) and torch.equal(got["b"], t["b"])


@pytest.mark.parametrize("header,data,message", [
    (b"\xff\xfe", b"", "not valid UTF-8 JSON"),
    (b"[1, 2]", b"", "must be a JSON object"),
    ({"a": {"dtype": "X99", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "not supported"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "truncated"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9, "trailing bytes"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}, b"\0" * 8, "data_offsets"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ({"a": "nope"}, b"", "entry must be an object"),
])
def test_malformed_headers(tmp_path, header, data, message):
    path = _write(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(FormatError, match=message) as e:
        _open(path)
    assert "bad.safetensors" in str(e.value)


def test_huge_header_length_is_refused_without_reading(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(FormatError, match="header length"):
        _open(path)


def test_tiny_file(tmp_path):
    (tmp_path / "t.safetensors").write_bytes(b"abc")
    with pytest.raises(FormatError, match="not a safetensors file"):
        _open(tmp_path / "t.safetensors")


def test_truncated_real_file(tmp_path):
    save_file({"a": torch.randn(100, 100)}, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-1000])
    with pytest.raises(FormatError, match="truncated"):
        _open(tmp_path / "m.safetensors")


@pytest.mark.parametrize("name", ["../evil", "/abs/path", "a\x00b", "..", "__zarr", ".hidden", "a\\b"])
def test_path_trick_tensor_names(tmp_path, name):
    path = _write(tmp_path / "n.safetensors", {name: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    with pytest.raises(InvalidTensorName):
        _open(path)


def test_index_errors(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        _open(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "../../etc/x.safetensors"}}))
    with pytest.raises(FormatError, match="same directory"):
        _open(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(FormatError, match="missing"):
        _open(tmp_path)
    index.write_text(json.dumps({"weight_map": {"b": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(FormatError, match="does not hold it"):
        _open(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}}))
    assert torch.equal(_open(tmp_path)["a"], torch.zeros(2))


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeFormat, match="never unpickles"):
        _open(tmp_path)
    with pytest.raises(UnsafeFormat):
        _open(tmp_path / "pytorch_model.bin")


def test_empty_directory(tmp_path):
    with pytest.raises(FormatError, match="no .safetensors"):
        _open(tmp_path)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
_entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "I8", "BOOL", "F16", "zz", 3]),
    "shape": st.lists(st.integers(-3, 2**40), max_size=4) | _json_values,
    "data_offsets": st.lists(st.integers(-5, 2**62), min_size=0, max_size=3) | _json_values,
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(min_size=1, max_size=12), _entries | _json_values, max_size=4),
       data=st.binary(max_size=64))
def test_fuzz_structured_headers(tmp_path, header, data):
    path = _write(tmp_path / "f.safetensors", header, data)
    try:
        _open(path)
    except TsllmError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=256), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_fuzz_raw_bytes(tmp_path, blob, length):
    path = tmp_path / "r.safetensors"
    prefix = struct.pack("<Q", length) if length is not None else b""
    path.write_bytes(prefix + blob)
    try:
        _open(path)
    except TsllmError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=_json_values | st.dictionaries(st.just("weight_map"), _json_values))
def test_fuzz_index(tmp_path, index):
    d = tmp_path / "idx"
    os.makedirs(d, exist_ok=True)
    save_file({"a": torch.zeros(1)}, str(d / "model.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        _open(d)
    except TsllmError:
        pass


def test_large_reads_are_mapped_copy_on_write(tmp_path):
    """Blocks of >= 1 MiB come from a private mapping: same values, and writing to them never
    reaches the file (kernels may work in place on fp32 inputs)."""
    t = {"big": torch.randn(1024, 512), "small": torch.randn(3, 5)}
    path = str(tmp_path / "m.safetensors")
    save_file(t, path)
    before = open(path, "rb").read()
    with HFCheckpointSource(path) as src:
        big = src.read_rows("big", 100, 1024)   # 3.6 MiB at an offset that is not page aligned
        assert torch.equal(big, t["big"][100:])
        big.fill_(7.0)
        assert torch.equal(src.read_rows("big", 0, 1024), t["big"])
        assert torch.equal(src.read("small"), t["small"])
    assert open(path, "rb").read() == before


def test_file_truncated_after_opening_is_a_clear_error_not_a_crash(tmp_path):
    t = {"big": torch.randn(1024, 512)}
    path = str(tmp_path / "m.safetensors")
    save_file(t, path)
    with HFCheckpointSource(path) as src:
        os.truncate(path, os.path.getsize(path) - 4096)
        with pytest.raises(FormatError, match="truncated"):
            src.read_rows("big", 0, 1024)
