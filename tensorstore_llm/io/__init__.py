"""Formats: TensorSource / TensorSink and their implementations (HF dirs, zarr artifacts, hub)."""
from .base import TensorMeta, TensorSink, TensorSource, check_tensor_name
from .hf_dir import HFCheckpointSink, HFCheckpointSource

__all__ = ["HFCheckpointSink", "HFCheckpointSource", "TensorMeta", "TensorSink", "TensorSource", "check_tensor_name"]
