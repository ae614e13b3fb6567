"""Device meshes: simulated CPU devices (the one place that sets XLA's device flags), meshes whose
axes meshjax can pin layouts on, and global meshes over several processes.

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
from typing import Any

import numpy as np

import jax
from jax.sharding import AxisType, Mesh

from meshjax import validate
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
        flags = xla_flags_with_device_count(flags, count)
    if memory_optimized_schedule and "xla_cpu_scheduler_type" not in flags:
        flags = f"{flags} {MEMORY_OPTIMIZED_CPU_SCHEDULER}"
    os.environ["XLA_FLAGS"] = flags.strip()


def xla_flags_with_device_count(flags: str, count: int) -> str:
    """``XLA_FLAGS`` text with the host platform's device count set to ``count`` (any earlier
    count removed), so processes started with it simulate ``count`` CPU devices.

    >>> xla_flags_with_device_count("--xla_dump_to=/tmp --xla_force_host_platform_device_count=2", 4)
    '--xla_dump_to=/tmp --xla_force_host_platform_device_count=4'
    """
    kept = [f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={int(count)}"])


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
    validate.axis_names(",".join(names), "--axes")
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


def mesh_shape(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    """Axis name -> size of a mesh (a ``{name: size}`` mapping is copied as it is).

    >>> mesh_shape({"data": 4, "model": 2})
    {'data': 4, 'model': 2}
    """
    if isinstance(mesh, Mapping):
        return dict(mesh)
    return dict(zip(mesh.axis_names, np.shape(mesh.devices)))


# --- meshes over several processes --------------------------------------------------------------


def _host_factors(shape: Mapping[str, int], processes: int, host_axes: Sequence[str] | None) -> dict[str, int]:
    """How many processes each axis spans: ``processes`` factored over ``host_axes`` (default:
    every axis, outermost first), each axis taking as many as divide its size."""
    names = list(shape)
    order = list(host_axes) if host_axes is not None else names
    for a in order:
        if a not in shape:
            raise LayoutError(f"host axis {a!r} is not a mesh axis ({', '.join(names)})")
    factors = {a: 1 for a in names}
    rest = processes
    for a in order:
        f = math.gcd(rest, shape[a])
        factors[a] = f
        rest //= f
    if rest != 1:
        raise LayoutError(
            f"{processes} processes cannot be spread over axes {order} of mesh {dict(shape)}: "
            "the product of the host axes' sizes must be a multiple of the process count"
        )
    return factors


def device_grid(shape: Mapping[str, int], devices: Sequence[Any], host_axes: Sequence[str] | None = None) -> np.ndarray:
    """``devices`` arranged in ``shape`` with the processes on the outer part of the host axes:
    along each axis the index is ``host * local_size + local``."""
    shape = dict(shape)
    devices = list(devices)
    count = math.prod(shape.values())
    if len(devices) != count:
        raise LayoutError(f"mesh {shape} needs {count} devices but the processes have {len(devices)} in all")
    by_process: dict[int, list[Any]] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    sizes = sorted({len(v) for v in by_process.values()})
    if len(sizes) != 1:
        raise LayoutError(f"processes have different device counts: {[len(by_process[p]) for p in sorted(by_process)]}")
    processes = len(by_process)
    hosts = _host_factors(shape, processes, host_axes)
    grid = np.empty((processes, sizes[0]), dtype=object)
    for i, p in enumerate(sorted(by_process)):
        for j, d in enumerate(sorted(by_process[p], key=lambda d: d.id)):
            grid[i, j] = d
    k = len(shape)
    grid = grid.reshape([hosts[a] for a in shape] + [shape[a] // hosts[a] for a in shape])
    grid = grid.transpose([i for pair in zip(range(k), range(k, 2 * k)) for i in pair])
    return grid.reshape(tuple(shape.values()))


def global_mesh(shape: Mapping[str, int], *, host_axes: Sequence[str] | None = None, devices: Sequence[Any] | None = None):
    """A mesh over every process's devices (Auto axes, like :func:`meshjax.devices.make_mesh`).

    The processes go on the outer axes: each axis's index is ``host * local_size + local``, so
    the first axes (or ``host_axes``, in order) span processes and the later ones stay inside a
    process, where devices are connected fastest. E.g. 2 processes x 4 devices as
    ``{"data": 4, "model": 2}``: ``data`` spans the processes (2 per process), ``model`` stays
    in each; ``host_axes=["model"]`` puts the processes on ``model`` instead. With one process
    it is the usual mesh.
    """
    grid = device_grid(shape, devices if devices is not None else jax.devices(), host_axes)
    return Mesh(grid, tuple(shape), axis_types=(AxisType.Auto,) * len(shape))


def process_axes(mesh) -> tuple[str, ...]:
    """The mesh axes along which devices of different processes meet (collectives over them
    cross the process boundary)."""
    devices = np.asarray(mesh.devices)
    procs = np.vectorize(lambda d: d.process_index)(devices)
    out = []
    for i, name in enumerate(mesh.axis_names):
        if not (procs == np.take(procs, [0], axis=i)).all():
            out.append(name)
    return tuple(out)


def crosses_processes(groups: Sequence[Sequence[int]], mesh) -> bool:
    """Whether any group of flat mesh indices (as in :mod:`meshjax.inspect`) holds devices of
    more than one process."""
    flat = [d.process_index for d in np.asarray(mesh.devices).flat]
    return any(len({flat[i] for i in g if 0 <= i < len(flat)}) > 1 for g in groups)
