"""Several processes, one global mesh: ``jax.distributed`` set up from a launcher or a cluster.

Each process runs the same program. :func:`initialize` connects the processes (before JAX starts
a backend). The rest lives with its kind and is re-exported here:
:func:`meshjax.devices.global_mesh` builds one mesh over every process's devices with the
processes on its outer axes, :func:`meshjax.cost.hardware.hardware_for` tells the solver where the
process boundary is, and :func:`meshjax.data.process_block` gives the slice of a global array a
process must hold, so each process builds only its own part of a batch.

Three ways to say who the processes are:

* explicitly: ``initialize("10.0.0.1:1234", num_processes=2, process_id=0)``;
* from the environment set by ``meshjax launch`` (:data:`ENV_COORDINATOR`, :data:`ENV_NUM_PROCESSES`,
  :data:`ENV_PROCESS_ID`, :data:`ENV_LOCAL_DEVICES`, :data:`ENV_TIMEOUT`);
* with no arguments and none of those variables, JAX's own cluster detection (SLURM, Open MPI,
  Cloud TPU pods, Kubernetes/GKE, or mpi4py with ``cluster_detection_method="mpi4py"``).

Example (in each of two processes)::

    info = initialize("127.0.0.1:8476", 2, process_id, local_devices=4)
    mesh = global_mesh({"data": 4, "model": 2})     # data spans the 2 processes, model stays local
    hw = hardware_for("cpu-sim", mesh)              # the process boundary is the slow link
    plan = solve(graph, mesh, hardware=hw, train=True)

In one process the same calls give the usual mesh and the profile unchanged:

>>> mesh = global_mesh({"data": 4, "model": 2})
>>> dict(mesh.shape), process_axes(mesh), hardware_for("cpu-sim", mesh).name
({'data': 4, 'model': 2}, (), 'cpu-sim')
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


from meshjax.cost.hardware import hardware_for
from meshjax.data import BlockFetch, batch_rows, lm_batch, local_index, process_block
from meshjax.devices import crosses_processes, device_grid, global_mesh, process_axes, xla_flags_with_device_count
from meshjax.errors import MeshjaxError

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
    os.environ["XLA_FLAGS"] = xla_flags_with_device_count(os.environ.get("XLA_FLAGS", ""), count)


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
