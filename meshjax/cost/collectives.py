"""Alpha-beta (latency + bytes / bandwidth) costs of collectives over mesh axes.

Bandwidth terms are those of ring algorithms (each byte crosses ``(n-1)/n`` of the ring);
latency terms are those of tree / recursive-doubling algorithms (``ceil(log2 n)`` steps), which
is what NCCL and XLA switch to for the small messages where latency matters. An all-to-all
exchanges with every peer (``n-1`` steps); a collective-permute is one step.

``nbytes`` is always the collective's *result* bytes per device, the same quantity
:mod:`meshjax.inspect` reads from compiled HLO, so predicted and compiled comm bytes compare
directly. A collective over several axes runs as one ring over their product at the slowest
axis's speed.

Example::

    >>> hw = PROFILES["h100-node"]
    >>> t = collective_time("all-reduce", 2**20, ("model",), {"model": 8}, hw)
    >>> 0 < t < 1e-3
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshjax.cost.hardware import PROFILES, Hardware  # noqa: F401  (PROFILES for the doctest)


@dataclass(frozen=True)
class Collective:
    """A predicted collective: its kind, mesh axes, result bytes per device, and runs per step."""

    kind: str
    axes: tuple[str, ...]
    nbytes: float
    count: int = 1
    latency_share: float = 1.0  # < 1 where XLA combines it with its siblings (gradient sync)

    @property
    def comm_bytes(self) -> float:
        return self.nbytes * self.count


def collective_time(
    kind: str,
    nbytes: float,
    axes: Sequence[str],
    mesh_shape: Mapping[str, int],
    hw: Hardware,
    latency_share: float = 1.0,
) -> float:
    """Seconds for one ``kind`` collective over ``axes`` with ``nbytes`` of result per device.
    ``latency_share`` scales the latency term for collectives XLA merges with others."""
    n = math.prod(mesh_shape[a] for a in axes)
    if n <= 1 or nbytes <= 0:
        return 0.0
    links = [hw.link(mesh_shape, a) for a in axes]
    bandwidth = min(link.bandwidth for link in links)
    latency = max(link.latency for link in links) * latency_share
    steps = n - 1
    rounds = math.ceil(math.log2(n))
    if kind == "all-reduce":  # reduce-scatter then all-gather of the result
        return 2 * steps / n * nbytes / bandwidth + 2 * rounds * latency
    if kind == "all-gather":  # result is the gathered array
        return steps / n * nbytes / bandwidth + rounds * latency
    if kind == "reduce-scatter":  # result is one shard of an n times larger input
        return steps * nbytes / bandwidth + rounds * latency
    if kind == "all-to-all":
        return steps / n * nbytes / bandwidth + steps * latency
    if kind == "collective-permute":  # every device sends its whole buffer to another
        return nbytes / bandwidth + latency
    raise ValueError(f"unknown collective kind {kind!r}")


def as_lowered(collective: Collective, mesh_shape: Mapping[str, int], *, fuses_reduce_scatter: bool) -> Collective:
    """``collective`` as a compiler that does or does not fuse reduce-scatters emits it: without
    the fusion (XLA:CPU) a reduce-scatter is an all-reduce of the whole input, then a local slice.

    >>> rs = Collective("reduce-scatter", ("model",), 1024)
    >>> as_lowered(rs, {"model": 4}, fuses_reduce_scatter=False)
    Collective(kind='all-reduce', axes=('model',), nbytes=4096, count=1, latency_share=1.0)
    """
    if fuses_reduce_scatter or collective.kind != "reduce-scatter":
        return collective
    n = math.prod(mesh_shape[a] for a in collective.axes)
    return Collective("all-reduce", collective.axes, collective.nbytes * n, collective.count, collective.latency_share)


def time_of(collective: Collective, mesh_shape: Mapping[str, int], hw: Hardware) -> float:
    """:func:`collective_time` of one run of ``collective``."""
    return collective_time(collective.kind, collective.nbytes, collective.axes, mesh_shape, hw, collective.latency_share)
