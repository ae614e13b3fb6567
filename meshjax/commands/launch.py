"""``meshjax launch``: run one command as N local processes that form one JAX job.

Example::

    $ meshjax launch --processes 2 --devices-per-process 4 -- meshjax train gpt-tiny --mesh 4x2 --steps 20
    [p0] gpt-tiny: batch 8, seq 16, vocab 256, mesh {'data': 4, 'model': 2}, 2 processes x 4 devices; ...

Each process gets the coordinator's address, the process count, its index and its CPU device
count in ``MESHJAX_*`` variables (see :mod:`meshjax.distributed`); ``meshjax train`` and
:func:`meshjax.distributed.initialize` read them. Output is streamed line by line with a
``[pN]`` prefix. When a process fails, the others are stopped and the launcher exits non-zero
naming it, with its last lines; ``--timeout`` bounds the whole run. A command starting with
``meshjax`` or ``python`` runs under this interpreter.
"""

from __future__ import annotations

import argparse
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque

# Seconds between asking a process to stop (SIGTERM) and killing it (SIGKILL).
STOP_GRACE_S = 3.0
TAIL_LINES = 15
# Not streamed, nor kept among a failed process's last lines: gloo reports every connection it makes.
_NOISE = ("[Gloo] Rank ",)


def add_parser(commands) -> None:
    p = commands.add_parser(
        "launch", help="run a command as N local processes of one JAX job (multi-process development)",
        description="Run COMMAND as N local processes joined by jax.distributed, e.g. "
                    "meshjax launch --processes 2 --devices-per-process 4 -- meshjax train gpt-tiny --mesh 4x2",
    )
    p.add_argument("--processes", "-n", type=int, default=2, help="number of processes (default: 2)")
    p.add_argument("--devices-per-process", dest="devices_per_process", type=int, default=None, metavar="N",
                   help="simulated CPU devices in each process (default: JAX's own count)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="coordinator address, hosted by process 0 (default: a free port on 127.0.0.1)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="stop everything after S seconds")
    p.add_argument("--init-timeout", dest="init_timeout", type=float, default=None, metavar="S",
                   help="seconds each process waits for the others to join (default: 60)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the command every process runs")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_command(cmd: list[str]) -> list[str]:
    """``meshjax ...`` and ``python ...`` run under this interpreter (the launcher's environment)."""
    if not cmd:
        return cmd
    if os.path.basename(cmd[0]) == "meshjax":
        return [sys.executable, "-m", "meshjax", *cmd[1:]]
    if os.path.basename(cmd[0]) in ("python", "python3"):
        return [sys.executable, *cmd[1:]]
    return cmd


def process_env(base: dict[str, str], *, coordinator: str, processes: int, index: int,
                devices: int | None, init_timeout: float | None) -> dict[str, str]:
    from meshjax import distributed as d
    from meshjax.devices import xla_flags_with_device_count

    env = dict(base)
    env.update({
        d.ENV_COORDINATOR: coordinator,
        d.ENV_NUM_PROCESSES: str(processes),
        d.ENV_PROCESS_ID: str(index),
        "PYTHONUNBUFFERED": "1",
    })
    if "COLUMNS" not in env:  # rich wraps a pipe at 80 columns; the lines come back prefixed
        env["COLUMNS"] = str(max(80, shutil.get_terminal_size((160, 24)).columns - 6))
    if init_timeout is not None:
        env[d.ENV_TIMEOUT] = f"{init_timeout:g}"
    if devices is not None:
        env[d.ENV_LOCAL_DEVICES] = str(devices)
        env["XLA_FLAGS"] = xla_flags_with_device_count(env.get("XLA_FLAGS", ""), devices)
    else:
        env.pop(d.ENV_LOCAL_DEVICES, None)
    return env


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _Job:
    """The processes, their output readers and the last lines of each."""

    def __init__(self, cmd: list[str], envs: list[dict[str, str]], out=None):
        self.out = out or sys.stdout
        self.lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
        self.tails = [deque(maxlen=TAIL_LINES) for _ in envs]
        self.procs: list[subprocess.Popen] = []
        self.readers: list[threading.Thread] = []
        for i, env in enumerate(envs):
            proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopping it stops what it started
            )
            self.procs.append(proc)
            reader = threading.Thread(target=self._read, args=(i, proc), daemon=True, name=f"meshjax-launch-p{i}")
            reader.start()
            self.readers.append(reader)

    def _read(self, i: int, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            self.lines.put((i, raw.decode("utf-8", errors="replace").rstrip("\r\n")))
        self.lines.put((i, None))

    def pump(self, wait: float) -> None:
        """Print whatever lines have arrived (waiting up to ``wait`` seconds for the first)."""
        try:
            item = self.lines.get(timeout=wait)
        except queue.Empty:
            return
        while True:
            i, line = item
            if line is not None and not line.startswith(_NOISE):
                self.tails[i].append(line)
                print(f"[p{i}] {line}", file=self.out, flush=True)
            try:
                item = self.lines.get_nowait()
            except queue.Empty:
                return

    def _signal(self, proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group this launcher created for the process
        except (ProcessLookupError, PermissionError):
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """SIGTERM every running process, SIGKILL what is left after the grace period."""
        running = [p for p in self.procs if p.poll() is None]
        for p in running:
            self._signal(p, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            self.pump(0.05)
        for p in running:
            if p.poll() is None:
                self._signal(p, signal.SIGKILL)
        for p in running:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def drain(self, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        for r in self.readers:
            r.join(max(0.0, deadline - time.monotonic()))
        self.pump(0.0)


def launch(cmd: list[str], processes: int, *, devices_per_process: int | None = None, coordinator: str | None = None,
           timeout: float | None = None, init_timeout: float | None = None, out=None, err=None) -> int:
    """Run ``cmd`` as ``processes`` local processes; 0 when all succeed. The API behind the command."""
    from meshjax.errors import MeshjaxError

    err = err or sys.stderr
    if processes < 1:
        raise MeshjaxError(f"--processes must be positive, got {processes}")
    if devices_per_process is not None and devices_per_process < 1:
        raise MeshjaxError(f"--devices-per-process must be positive, got {devices_per_process}")
    if timeout is not None and timeout <= 0:
        raise MeshjaxError(f"--timeout must be positive, got {timeout:g}")
    if not cmd:
        raise MeshjaxError("no command: put it after --, e.g. meshjax launch -n 2 -- meshjax train gpt-tiny")
    coordinator = coordinator or f"127.0.0.1:{free_port()}"
    full = resolve_command(cmd)
    envs = [
        process_env(dict(os.environ), coordinator=coordinator, processes=processes, index=i,
                    devices=devices_per_process, init_timeout=init_timeout)
        for i in range(processes)
    ]
    start = time.monotonic()
    try:
        job = _Job(full, envs, out)
    except OSError as e:
        raise MeshjaxError(f"cannot start {shlex.join(cmd)}: {e}") from None
    failed: int | None = None
    timed_out = False
    try:
        while True:
            job.pump(0.1)
            codes = [p.poll() for p in job.procs]
            bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                break
            if all(c == 0 for c in codes):
                break
            if timeout is not None and time.monotonic() - start > timeout:
                timed_out = True
                break
    except KeyboardInterrupt:
        job.stop()
        job.drain()
        print("meshjax: error: interrupted; stopped every process", file=err, flush=True)
        return 130
    finally:
        if failed is not None or timed_out:
            job.stop()
    job.drain()
    if timed_out:
        print(f"meshjax: error: timed out after {timeout:g} s; stopped all {processes} processes", file=err, flush=True)
        return 124
    if failed is not None:
        code = job.procs[failed].returncode
        others = [i for i, p in enumerate(job.procs) if i != failed]
        tail = "\n".join(f"  {line}" for line in job.tails[failed]) or "  (no output)"
        print(
            f"meshjax: error: process {failed} (p{failed}, pid {job.procs[failed].pid}) {_describe(code)}; "
            f"stopped the others ({', '.join(f'p{i}' for i in others) or 'none'}). Its last lines:\n{tail}",
            file=err, flush=True,
        )
        return code if 0 < code < 126 else 1
    return 0


def run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return launch(cmd, args.processes, devices_per_process=args.devices_per_process, coordinator=args.coordinator,
                  timeout=args.timeout, init_timeout=args.init_timeout)
