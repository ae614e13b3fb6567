"""Byte sizes as people write them, and as meshjax prints them: decimal units (``80 GB`` is
80e9 bytes, as hardware datasheets and ``--memory-limit 80GB`` mean it).

Example::

    >>> parse_bytes("16GiB")
    17179869184.0
    >>> format_bytes(80e9)
    '80.00 GB'
"""

from __future__ import annotations

import re

from meshjax.errors import MeshjaxError

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

UNITS_HELP = "bytes, or a size with a unit: kB MB GB TB (decimal) or KiB MiB GiB TiB (binary)"


def parse_bytes(text: str, what: str = "memory limit") -> float:
    """``"16GiB"`` -> 17179869184.0, ``"80GB"`` / ``"80e9"`` -> 8e10."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e\+?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise MeshjaxError(f"{what} {text!r}: expected a size like 16GiB, 80GB or 8e10")
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


def format_bytes(n: float) -> str:
    """``format_bytes(1500) -> '1.50 kB'``: the largest decimal unit that keeps the number >= 1."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
