"""Hardware profiles: per-mesh-axis bandwidth and latency, peak flops per dtype, device memory.

A mesh laid out row-major over devices keeps its last axes inside a node: an axis stays on the
fast intra-node link when it and every later axis fit in ``devices_per_node``; otherwise it
crosses nodes and runs at the inter-node link's speed. Sources for the numbers are in
``docs/cost_model.md``.

Example::

    >>> hw = PROFILES["h100-2node"]
    >>> hw.link({"data": 2, "model": 8}, "model").bandwidth > hw.link({"data": 2, "model": 8}, "data").bandwidth
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from meshjax.errors import MeshjaxError

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class Link:
    """One direction of a ring over a mesh axis: bytes per second per device, and latency per step."""

    bandwidth: float
    latency: float


@dataclass(frozen=True)
class Hardware:
    """A device type and how devices connect.

    ``axis_links`` overrides the node rule for named mesh axes (e.g. a TPU torus where every
    axis has its own ICI links).
    """

    name: str
    flops: Mapping[str, float]  # dtype name -> peak flops per second per device
    memory_bytes: float
    intra_node: Link
    inter_node: Link
    devices_per_node: int
    axis_links: Mapping[str, Link] = field(default_factory=dict)
    description: str = ""
    # XLA's GPU and TPU pipelines turn all-reduce + slice into reduce-scatter; its CPU
    # pipeline keeps the all-reduce, so a reduce-scatter costs (and moves) an all-reduce there.
    fuses_reduce_scatter: bool = True
    # Each step's inputs reach the devices from the host (PCIe 5 x16: ~50 GB/s per direction).
    host_bandwidth: float = 50 * GB
    # The share of device memory a plan may not use by default (docs/cost_model.md, "Default
    # budget"): the runtime's own buffers, and the memory model's +10% band.
    memory_reserve: float = 0.10

    @property
    def usable_memory_bytes(self) -> float:
        """The default per-device memory budget: device memory less the reserve.

        >>> PROFILES["h100-node"].usable_memory_bytes / 1e9
        72.0
        """
        return self.memory_bytes * (1 - self.memory_reserve)

    def link(self, mesh_shape: Mapping[str, int], axis: str) -> Link:
        """The link a collective over ``axis`` runs on."""
        if axis in self.axis_links:
            return self.axis_links[axis]
        names = list(mesh_shape)
        span = math.prod(mesh_shape[a] for a in names[names.index(axis):])
        return self.intra_node if span <= self.devices_per_node else self.inter_node

    def peak_flops(self, dtype: str) -> float:
        return self.flops.get(dtype, self.flops.get("float32", min(self.flops.values())))


H100_NVLINK = Link(bandwidth=450 * GB, latency=5e-6)  # NVLink 4: 900 GB/s bidirectional per GPU
H100_IB = Link(bandwidth=50 * GB, latency=15e-6)  # one 400 Gb/s NDR InfiniBand NIC per GPU
H100_FLOPS = {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12, "float8_e4m3fn": 1979e12}  # dense; f32 as TF32

PROFILES: dict[str, Hardware] = {
    "h100-node": Hardware(
        name="h100-node",
        flops=H100_FLOPS,
        memory_bytes=80 * GB,
        intra_node=H100_NVLINK,
        inter_node=H100_NVLINK,
        devices_per_node=8,
        description="one 8x H100 SXM node, NVLink 4 / NVSwitch",
    ),
    "h100-2node": Hardware(
        name="h100-2node",
        flops=H100_FLOPS,
        memory_bytes=80 * GB,
        intra_node=H100_NVLINK,
        inter_node=H100_IB,
        devices_per_node=8,
        description="8x H100 nodes joined by 400 Gb/s InfiniBand per GPU (any number of nodes)",
    ),
    "tpu-v5p": Hardware(
        name="tpu-v5p",
        flops={"bfloat16": 459e12, "float32": 459e12 / 2},
        memory_bytes=95 * GB,
        # 4,800 Gb/s of ICI per chip over 6 links of a 3D torus: ~100 GB/s per link and
        # direction; a ring on one torus axis uses both directions of its two links.
        intra_node=Link(bandwidth=200 * GB, latency=2e-6),
        inter_node=Link(bandwidth=200 * GB, latency=2e-6),
        devices_per_node=4096,
        description="TPU v5p pod slice, 3D torus ICI",
    ),
    # NVIDIA Selene (DGX A100 80GB), where Narayanan et al. 2021 trained GPT-3 175B: NVLink 3
    # (600 GB/s bidirectional per GPU) in a node, eight 200 Gb/s HDR InfiniBand NICs per node.
    "a100-selene": Hardware(
        name="a100-selene",
        flops={"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},  # dense; f32 as TF32
        memory_bytes=80 * GB,
        intra_node=Link(bandwidth=300 * GB, latency=5e-6),
        inter_node=Link(bandwidth=25 * GB, latency=15e-6),
        devices_per_node=8,
        description="DGX A100 80GB nodes joined by 200 Gb/s HDR InfiniBand per GPU (Selene)",
    ),
    "cpu-sim": Hardware(
        name="cpu-sim",
        flops={"float32": 20e9, "bfloat16": 5e9},
        memory_bytes=24 * GiB / 8,
        intra_node=Link(bandwidth=5 * GB, latency=20e-6),
        inter_node=Link(bandwidth=5 * GB, latency=20e-6),
        devices_per_node=1024,
        description="simulated CPU devices sharing one 2-core host",
        fuses_reduce_scatter=False,
    ),
}


def get_hardware(name: str | Hardware) -> Hardware:
    """A profile by name; the error lists the known ones."""
    if isinstance(name, Hardware):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise MeshjaxError(f"unknown hardware profile {name!r}; known: {', '.join(PROFILES)}") from None


def _gloo_link():
    # CPU collectives between processes go through gloo over TCP: on one host about a GB/s, and
    # each step a round trip through the kernel (measured ~0.1-1 ms per collective on loopback).
    return Link(bandwidth=1 * GB, latency=300e-6)


def hardware_for(name, mesh=None, *, inter_process=None):
    """The hardware profile ``name`` with the process boundary where it really is.

    On CPU with several processes, ``devices_per_node`` becomes the local device count, so the
    solver prices a collective that leaves a process on the inter-node link, and that link is
    ``inter_process`` (default: the profile's inter-node link when it is slower than its
    intra-node one, else gloo over TCP, ~1 GB/s and 0.3 ms per step). Given ``mesh``, every
    axis also gets the link it really uses (``axis_links``): inter-node when it spans processes,
    intra-node when not, which holds for any ``host_axes``. Other backends and single processes
    get the profile unchanged.
    """
    import jax

    from meshjax.devices import process_axes

    hw = get_hardware(name)
    if jax.process_count() == 1 or jax.default_backend() != "cpu":
        return hw
    link = inter_process or (hw.inter_node if hw.inter_node != hw.intra_node else _gloo_link())
    links = dict(hw.axis_links)
    if mesh is not None:
        crossing = set(process_axes(mesh))
        for axis in mesh.axis_names:
            links.setdefault(axis, link if axis in crossing else hw.intra_node)
    return dataclasses.replace(
        hw, name=f"{hw.name}/{jax.process_count()}proc", devices_per_node=jax.local_device_count(),
        inter_node=link, axis_links=links,
    )
