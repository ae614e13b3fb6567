"""Device meshes: simulated CPU devices and meshes whose axes meshjax can pin layouts on.

Example::

    >>> use_cpu_devices(8)        # before JAX initialises its backends
    >>> mesh = make_mesh({"data": 4, "model": 2})
    >>> dict(mesh.shape)
    {'data': 4, 'model': 2}
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from meshjax.errors import LayoutError


# XLA:CPU's default scheduler orders for concurrency: it hoists work that depends only on
# params (layout copies of weights) to the start and keeps the results alive until the backward
# pass. Accelerator schedulers work under a memory limit; this one makes a simulated mesh's
# compiled memory reflect theirs (2-layer GPT training step on 4x2: 192 MB -> 180 MB).
MEMORY_OPTIMIZED_CPU_SCHEDULER = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def use_cpu_devices(count: int, *, memory_optimized_schedule: bool = True) -> None:
    """Simulate ``count`` CPU devices, scheduled by XLA:CPU's memory-optimising scheduler unless
    ``memory_optimized_schedule=False``. Must run before JAX initialises a backend; afterwards it
    only checks that enough devices exist.

    Both settings also go to ``XLA_FLAGS``, so child processes (launchers, notebook kernels
    started from here) simulate the same devices.
    """
    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError:
        if jax.device_count() < count:
            raise LayoutError(
                f"JAX already started with {jax.device_count()} devices; {count} are needed. "
                "Call meshjax.use_cpu_devices() before any JAX computation."
            ) from None
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags = f"{flags} --xla_force_host_platform_device_count={int(count)}"
    if memory_optimized_schedule and "xla_cpu_scheduler_type" not in flags:
        flags = f"{flags} {MEMORY_OPTIMIZED_CPU_SCHEDULER}"
    os.environ["XLA_FLAGS"] = flags.strip()


def parse_mesh_shape(text: str, axis_names: Sequence[str] | None = None) -> dict[str, int]:
    """``"4x2"`` -> ``{"data": 4, "model": 2}`` (names default to data, model, then axis2...)."""
    try:
        sizes = [int(s) for s in text.lower().split("x")]
    except ValueError:
        raise LayoutError(f"mesh {text!r}: expected sizes like 8, 4x2 or 2x2x2") from None
    if any(s < 1 for s in sizes):
        raise LayoutError(f"mesh {text!r}: sizes must be positive")
    names = list(axis_names) if axis_names else (["data", "model"] if len(sizes) == 2 else ["data"] if len(sizes) == 1 else [f"axis{i}" for i in range(len(sizes))])
    if len(names) != len(sizes):
        raise LayoutError(f"mesh {text!r} has {len(sizes)} axes but {len(names)} names were given: {names}")
    return dict(zip(names, sizes))


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with Auto axis types over the first ``prod(shape)`` devices.

    meshjax pins every tensor's layout with ``with_sharding_constraint`` and lets XLA's SPMD
    partitioner insert the collectives between pinned layouts. Explicit axes would instead make
    each op carry its own output sharding and reject the implicit reshards a plan relies on.
    """
    count = math.prod(shape.values())
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < count:
        raise LayoutError(
            f"mesh {dict(shape)} needs {count} devices but {len(devices)} exist "
            "(on CPU, call meshjax.use_cpu_devices(N) first)"
        )
    return jax.make_mesh(
        tuple(shape.values()), tuple(shape.keys()), axis_types=(AxisType.Auto,) * len(shape), devices=devices[:count]
    )


def auto_axes(mesh: Mesh) -> Mesh:
    """The same mesh with every axis Auto (see :func:`make_mesh` for why)."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))
