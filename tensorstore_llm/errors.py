"""The one exception hierarchy users of tensorstore_llm see.

Every error names what it is about (artifact, file, tensor) and what was expected, so that the
CLI can print it as one line and exit non-zero. Library code raises these instead of asserting.
"""
from __future__ import annotations


class TsllmError(Exception):
    """Base of every error tensorstore_llm raises on purpose.

    ``exit_code`` is what the CLI exits with when this error reaches it.
    """

    exit_code = 1


class ArtifactNotFound(TsllmError):
    """A ref (tag, id or id prefix) names no artifact in the store."""

    exit_code = 3


class RefError(TsllmError):
    """A tag name or ref is malformed or ambiguous."""

    exit_code = 3


class FormatError(TsllmError):
    """A file is not what its format promises (bad header, truncated data, malformed index)."""

    exit_code = 4


class CodecError(TsllmError):
    """Encoded bytes or codec parameters are invalid: corrupt payload, wrong base, unknown codec."""

    exit_code = 4


class UnsafeFormat(FormatError):
    """A checkpoint format we refuse to read because loading it can run code (pickle)."""


class IntegrityError(TsllmError):
    """Stored bytes do not match the checksum recorded when they were written."""

    exit_code = 5


class TensorNotFound(TsllmError):
    """A tensor a job needs is missing from its source."""

    exit_code = 6


class ShapeMismatch(TsllmError):
    """Tensors that must agree in shape do not."""

    exit_code = 6


class OpError(ShapeMismatch):
    """An op (kernel) returned something other than the outputs its job declares."""


class BaseMismatch(TsllmError):
    """A diff, adapter or pruning plan is applied to a base other than the one it was made from."""

    exit_code = 6


class DTypeError(TsllmError):
    """A dtype is unknown or not allowed where it was used."""

    exit_code = 6


class InvalidTensorName(TsllmError):
    """A tensor name would escape its artifact (path separators, '..', NUL, reserved names)."""

    exit_code = 6


class NonFiniteValues(TsllmError):
    """A tensor holds NaN or infinite values where the op needs finite ones (e.g. the weight
    delta a LoRA is extracted from)."""

    exit_code = 6


class RecipeError(TsllmError):
    """A recipe or its parameters cannot succeed; raised while planning, before any work."""

    exit_code = 7


class TokenizerError(RecipeError):
    """The tokenizers of a merge cannot be combined as the recipe asks: a tokenizer source without
    tokenizer files, a union over tokenizers that disagree on special tokens, a ``tokens:`` entry
    naming a model that is not in the recipe or a token that model lacks."""


class DatasetMismatch(TsllmError):
    """A dataset (teacher logits, corpus packing) does not match what its reader expects:
    other tokenizer, chat template, packing rule or sampling settings; or a corpus that cannot
    produce what was asked (empty, too short, no chat template)."""

    exit_code = 7


class InvalidParameter(RecipeError):
    """A parameter (a recipe key or a command option such as ``--weights``) is outside its
    documented domain: NaN or infinite, out of range, of the wrong type, or the wrong count."""


class StorageError(TsllmError):
    """The store or output location cannot be written (disk full, read-only, permissions)."""

    exit_code = 8


class OutputExists(StorageError):
    """The output location already holds something we will not overwrite."""


class MissingDependency(TsllmError):
    """An optional dependency (a pip extra) that this operation needs is not installed."""

    exit_code = 1


class ExternalCommandError(TsllmError):
    """A command the user gave us to run (e.g. a soup's --score-cmd) failed or printed no result."""

    exit_code = 1


class HubUnavailable(ArtifactNotFound):
    """A hub repository (or its revision) cannot be had: unknown, not in the local cache while
    ``HF_HUB_OFFLINE`` is set, or the download failed."""


class DeviceUnavailable(TsllmError):
    """The device asked for (``--device cuda``, ``cuda:N``) is not present on this machine."""

    exit_code = 1


class PipelineStopped(TsllmError):
    """A streaming stage stopped because another stage failed or the run was interrupted."""

    exit_code = 1


class IncompleteRun(TsllmError):
    """A run ended without every result it owed (e.g. a remote worker returned nothing for some
    shards); what finished is kept, so re-running resumes."""

    exit_code = 1


class RecipeWarning(UserWarning):
    """A recipe setting that the chosen method ignores (mergekit ignores it too): the recipe
    runs, and the setting is named in a warning instead of refused."""
