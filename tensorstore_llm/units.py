"""Human byte sizes: parse ``512M`` / ``4G`` / ``1.5GiB`` and print ``1.2 GiB``. Torch-free."""
from __future__ import annotations

import re

from .errors import InvalidParameter

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``512M``, ``4G``, ``1.5GiB`` or ``1000000`` (binary units).

    Returns:
        The size in bytes.
    Raises:
        InvalidParameter: ``text`` does not read as a size.

    Example:
        >>> parse_size("512M")
        536870912
    """
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise InvalidParameter(f"cannot read {text!r} as a size; expected e.g. 512M, 4G, 1.5GiB or a byte count")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * _UNITS[unit])


def format_size(n: float) -> str:
    """Print a byte count with a binary unit, e.g. ``format_size(3 * 2**30) == '3.0 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
