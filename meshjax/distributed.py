"""Several processes, one global mesh: ``jax.distributed`` set up from a launcher or a cluster.

Each process runs the same program. :func:`initialize` connects the processes (before JAX starts
a backend), :func:`global_mesh` builds one mesh over every process's devices with the processes
on its outer axes, :func:`hardware_for` tells the solver where the process boundary is, and
:func:`process_block` gives the slice of a global array a process must hold, so each process
builds only its own part of a batch.

Three ways to say who the processes are:

* explicitly: ``initialize("10.0.0.1:1234", num_processes=2, process_id=0)``;
* from the environment set by ``meshjax launch`` (:data:`ENV_COORDINATOR`, :data:`ENV_NUM_PROCESSES`,
  :data:`ENV_PROCESS_ID`, :data:`ENV_LOCAL_DEVICES`, :data:`ENV_TIMEOUT`);
* with no arguments and none of those variables, JAX's own cluster detection (SLURM, Open MPI,
  Cloud TPU pods, Kubernetes/GKE, or mpi4py with ``cluster_detection_method="mpi4py"``).

Example (in each of two processes)::

    >>> info = initialize("127.0.0.1:8476", 2, process_id, local_devices=4)   # doctest: +SKIP
    >>> mesh = global_mesh({"data": 4, "model": 2})     # data spans the 2 processes, model stays local
    >>> hw = hardware_for("cpu-sim", mesh)              # the process boundary is the slow link
    >>> plan = solve(graph, mesh, hardware=hw, train=True)
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from meshjax.errors import LayoutError, MeshjaxError

ENV_COORDINATOR = "MESHJAX_COORDINATOR"
"""``host:port`` of process 0's coordinator service."""
ENV_NUM_PROCESSES = "MESHJAX_NUM_PROCESSES"
"""How many processes take part."""
ENV_PROCESS_ID = "MESHJAX_PROCESS_ID"
"""This process's index, ``0 .. num_processes - 1``."""
ENV_LOCAL_DEVICES = "MESHJAX_LOCAL_DEVICES"
"""Simulated CPU devices in each process (unset on GPU/TPU: every local accelerator is used)."""
ENV_TIMEOUT = "MESHJAX_INIT_TIMEOUT"
"""Seconds to wait for every process to join (default :data:`DEFAULT_TIMEOUT`)."""
DEFAULT_TIMEOUT = 60.0

_coordinator: str | None = None  # the address this process connected to


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands after :func:`initialize`."""

    process_id: int
    num_processes: int
    coordinator: str | None
    local_devices: int

    @property
    def is_main(self) -> bool:
        return self.process_id == 0


# --- initialising --------------------------------------------------------------------------------


def env_config(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The launcher's settings from the environment, or ``None`` when they are not set."""
    env = os.environ if environ is None else environ
    if ENV_NUM_PROCESSES not in env:
        return None

    def number(name: str, kind=int, default=None):
        text = env.get(name)
        if text is None or text == "":
            return default
        try:
            return kind(text)
        except ValueError:
            raise MeshjaxError(f"environment variable {name}={text!r} is not a number") from None

    config = {
        "coordinator": env.get(ENV_COORDINATOR) or None,
        "num_processes": number(ENV_NUM_PROCESSES),
        "process_id": number(ENV_PROCESS_ID),
        "local_devices": number(ENV_LOCAL_DEVICES),
        "timeout": number(ENV_TIMEOUT, float, DEFAULT_TIMEOUT),
    }
    if config["coordinator"] is None or config["process_id"] is None:
        raise MeshjaxError(f"{ENV_NUM_PROCESSES} is set, so {ENV_COORDINATOR} and {ENV_PROCESS_ID} must be too")
    return config


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise MeshjaxError(f"coordinator address {address!r}: expected HOST:PORT, e.g. 10.0.0.1:8476")
    return host.strip("[]"), int(port)


def _check_can_host(address: str) -> None:
    """Process 0 runs the coordinator service: its host must be this machine and its port free."""
    host, port = _split_address(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise MeshjaxError(f"coordinator address {address!r}: cannot resolve {host!r} ({err.strerror})") from None
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(sockaddr)
                return
            except OSError as err:
                last = err
    reason = "its port is in use" if last is not None and last.errno == 98 else "it is not an address of this machine"
    raise MeshjaxError(
        f"process 0 cannot host the coordinator at {address}: {reason} "
        f"({last.strerror if last else 'no address'}); process 0 must run on the coordinator's host"
    )


def _wait_reachable(address: str, timeout: float, process_id: int) -> None:
    """Retry a TCP connection to the coordinator until it answers or ``timeout`` passes."""
    host, port = _split_address(address)
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, left))):
                return
        except OSError as err:
            last = err.strerror or type(err).__name__
        if time.monotonic() + 0.25 >= deadline:
            raise MeshjaxError(
                f"process {process_id} cannot reach the coordinator at {address} within {timeout:g} s ({last}); "
                "check the address and that process 0 is running"
            )
        time.sleep(0.25)


def _watchdog(address: str, wait: float, timeout: float, process_id: int, num_processes: int) -> threading.Event:
    """JAX aborts the process (after roughly twice its timeout) when the processes never all join;
    print a clear error and exit first."""
    done = threading.Event()

    def watch() -> None:
        if not done.wait(wait + 2.0):
            print(
                f"meshjax: error: process {process_id} of {num_processes}: not every process joined the coordinator "
                f"at {address} within {timeout:g} s; check that all {num_processes} processes started with the same "
                "coordinator address and process count",
                file=sys.stderr, flush=True,
            )
            os._exit(3)

    threading.Thread(target=watch, name="meshjax-init-watchdog", daemon=True).start()
    return done


def _set_cpu_devices(count: int) -> None:
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError:
        raise MeshjaxError(
            f"cannot set {count} CPU devices per process: JAX already started a backend. "
            "Call meshjax.distributed.initialize() before any JAX computation."
        ) from None
    # Processes this one starts see the same per-process count.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={int(count)}"])


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_devices: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    timeout: float | None = None,
    **jax_kwargs: Any,
) -> ProcessInfo:
    """Connect this process to the others; must run before JAX starts a backend.

    With ``coordinator``, ``num_processes`` and ``process_id`` given they are used. Otherwise the
    launcher's variables (``MESHJAX_*``, see :func:`env_config`) are, and without those JAX
    detects the cluster itself (SLURM, Open MPI, Cloud TPU, Kubernetes). ``local_devices`` sets
    the simulated CPU devices per process (and CPU collectives go over gloo);
    ``local_device_ids`` restricts the accelerators a process uses. ``timeout`` (seconds,
    default 60) bounds the wait for the coordinator and the other processes: a coordinator that
    cannot be reached raises :class:`MeshjaxError` naming its address. Other keyword arguments go
    to ``jax.distributed.initialize``. A second call returns the current state.
    """
    import jax

    if jax.distributed.is_initialized():
        return process_info()
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if not explicit:
        env = env_config()
        if env is not None:
            coordinator, num_processes, process_id = env["coordinator"], env["num_processes"], env["process_id"]
            local_devices = local_devices if local_devices is not None else env["local_devices"]
            timeout = timeout if timeout is not None else env["timeout"]
    timeout = float(DEFAULT_TIMEOUT if timeout is None else timeout)
    if timeout <= 0:
        raise MeshjaxError(f"timeout must be positive, got {timeout:g}")
    if local_devices is not None:
        if int(local_devices) < 1:
            raise MeshjaxError(f"local_devices must be positive, got {local_devices}")
        _set_cpu_devices(int(local_devices))
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    kwargs = dict(jax_kwargs)
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    auto = coordinator is None and num_processes is None and process_id is None
    if auto:
        kwargs.setdefault("initialization_timeout", max(1, math.ceil(timeout)))
        try:
            jax.distributed.initialize(**kwargs)
        except ValueError as err:
            raise MeshjaxError(
                f"no cluster detected ({err}): pass coordinator, num_processes and process_id, set "
                f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}, or start the processes with `meshjax launch`"
            ) from None
        except RuntimeError as err:
            raise MeshjaxError(f"cannot initialise jax.distributed: {err}") from None
        return process_info()

    if coordinator is None or num_processes is None or process_id is None:
        raise MeshjaxError("give all of coordinator, num_processes and process_id (or none, to auto-detect)")
    num_processes, process_id = int(num_processes), int(process_id)
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise MeshjaxError(f"process_id must be in 0..{num_processes - 1} and num_processes >= 1, got {process_id} of {num_processes}")
    _split_address(coordinator)
    start = time.monotonic()
    if process_id == 0:
        _check_can_host(coordinator)
    else:
        _wait_reachable(coordinator, timeout, process_id)
    left = max(1.0, timeout - (time.monotonic() - start))
    kwargs.setdefault("initialization_timeout", max(1, math.ceil(left)))
    done = _watchdog(coordinator, left, timeout, process_id, num_processes)
    global _coordinator
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
        _coordinator = coordinator
    except RuntimeError as err:
        raise MeshjaxError(f"cannot initialise jax.distributed with the coordinator at {coordinator}: {err}") from None
    finally:
        done.set()
    return process_info()


def initialize_from_env() -> ProcessInfo | None:
    """:func:`initialize` from the launcher's variables; ``None`` (nothing done) when unset."""
    if env_config() is None:
        return None
    return initialize()


def process_info() -> ProcessInfo:
    import jax

    return ProcessInfo(jax.process_index(), jax.process_count(), _coordinator, jax.local_device_count())


def is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def local_cpu_devices(total: int, environ: Mapping[str, str] | None = None) -> int:
    """Devices each process simulates for a mesh of ``total`` devices: ``total`` in one
    process, else the launcher's per-process count (or ``total / num_processes``)."""
    env = env_config(environ)
    if env is None:
        return total
    if env["local_devices"] is not None:
        return env["local_devices"]
    n = env["num_processes"]
    if total % n:
        raise MeshjaxError(f"a mesh of {total} devices does not split over {n} processes")
    return total // n


# --- meshes --------------------------------------------------------------------------------------


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
    import jax
    from jax.sharding import AxisType, Mesh

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


def _gloo_link():
    from meshjax.cost.hardware import GB, Link

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

    from meshjax.cost.hardware import get_hardware

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


# --- per-process data ----------------------------------------------------------------------------


def process_block(sharding, shape: Sequence[int]) -> tuple[slice, ...]:
    """The smallest box of a global array of ``shape`` that holds every shard this process's
    devices need under ``sharding``: the only part of the array the process has to build."""
    shape = tuple(int(s) for s in shape)
    lo, hi = list(shape), [0] * len(shape)
    for index in sharding.addressable_devices_indices_map(shape).values():
        for i, (s, n) in enumerate(zip(index, shape)):
            start, stop, _ = s.indices(n) if isinstance(s, slice) else (s, s + 1, 1)
            lo[i], hi[i] = min(lo[i], start), max(hi[i], stop)
    return tuple(slice(a, max(a, b)) for a, b in zip(lo, hi))


def local_index(index: Sequence[slice], block: Sequence[slice], shape: Sequence[int]) -> tuple[slice, ...]:
    """``index`` (a device's slice of the global array) relative to ``block``."""
    out = []
    for s, b, n in zip(index, block, shape):
        start, stop, _ = s.indices(n)
        out.append(slice(start - b.start, stop - b.start))
    return tuple(out)


def batch_rows(step: int, batch: int, seq: int, rows: slice, *, seed: int = 0, data: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of :func:`meshjax.data.batch_at` ``(step, batch, seq, seed)``, building only
    those windows (the same random offsets, drawn for the whole batch)."""
    from meshjax import data as data_mod

    stream = data_mod.tokens() if data is None else np.asarray(data)
    if batch < 1 or seq < 1:
        raise MeshjaxError(f"batch and seq must be positive, got batch={batch}, seq={seq}")
    if len(stream) < seq + 1:
        raise MeshjaxError(f"the text has {len(stream)} tokens; a window of seq={seq} needs {seq + 1}")
    rng = np.random.default_rng([int(seed), int(step)])  # as data.batch_at
    starts = rng.integers(0, len(stream) - seq, size=batch)[rows]
    windows = np.stack([stream[s : s + seq + 1] for s in starts]).astype(np.int32).reshape(len(starts), seq + 1)
    return windows[:, :-1], windows[:, 1:]


class BlockFetch:
    """A batch leaf for :func:`meshjax.train.shard_batch` that builds only part of the global
    array: ``fetch(block)`` returns ``global[block]`` for a tuple of slices."""

    def __init__(self, fetch, shape: Sequence[int]):
        self.fetch = fetch
        self.shape = tuple(int(s) for s in shape)

    def __call__(self, block: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self.fetch(block))


def lm_batch(step: int, batch: int, seq: int, *, seed: int = 0) -> tuple[BlockFetch, BlockFetch]:
    """``(tokens, targets)`` of :func:`meshjax.data.batch_at` as :class:`BlockFetch` leaves: each
    process builds only the windows of the rows its devices hold."""
    cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def part(which: int):
        def fetch(block: tuple[slice, ...]) -> np.ndarray:
            rows = block[0].indices(batch)[:2]
            if rows not in cache:
                cache[rows] = batch_rows(step, batch, seq, slice(*rows), seed=seed)
            return cache[rows][which][(slice(None), *block[1:])]

        return BlockFetch(fetch, (batch, seq))

    return part(0), part(1)


__all__ = [
    "DEFAULT_TIMEOUT",
    "ENV_COORDINATOR",
    "ENV_LOCAL_DEVICES",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "ENV_TIMEOUT",
    "BlockFetch",
    "ProcessInfo",
    "batch_rows",
    "crosses_processes",
    "device_grid",
    "env_config",
    "global_mesh",
    "hardware_for",
    "initialize",
    "initialize_from_env",
    "is_main_process",
    "lm_batch",
    "local_cpu_devices",
    "local_index",
    "process_axes",
    "process_block",
    "process_info",
]
