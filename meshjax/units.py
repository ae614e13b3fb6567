"""Byte sizes as people write them.

Example::

    >>> parse_bytes("16GiB")
    17179869184.0
"""

from __future__ import annotations

import re

from meshjax.errors import MeshjaxError

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> float:
    """``"16GiB"`` -> 17179869184.0, ``"80GB"`` / ``"80e9"`` -> 8e10."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise MeshjaxError(f"memory limit {text!r}: expected a size like 16GiB, 80GB or 8e10")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def format_bytes(n: float) -> str:
    """``format_bytes(1536) -> '1.50 KiB'``: the largest binary unit that keeps the number >= 1."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
