"""Several processes, one mesh: ``meshjax launch`` starts real processes joined by
jax.distributed (each with its own CPU devices, gloo collectives), which train the tiny GPT under
the solver's plan with the same losses as one process, run their cross-process collectives over
the axes the plan priced on the slow link, build only their own rows of each batch, and save
checkpoints that restore bitwise under other process counts. A killed process or a wrong
coordinator address ends the run non-zero in bounded time, naming the culprit.

The pytest process already has 8 devices, so all multi-process work runs in children: this file
is also their script (``python tests/test_multiprocess.py MODE ...``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from meshjax import cli, data, distributed
from meshjax.commands import launch as launch_cmd
from meshjax.cost.hardware import get_hardware
from meshjax.errors import MeshjaxError

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
LR = 3e-3  # meshjax train's default
STEPS = 3


# --- the parent's side: helpers ------------------------------------------------------------------

RULES = "batch:data;heads:model;mlp:model"


def _env() -> dict[str, str]:
    """This environment without any launcher variables (the pytest process is one process)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHJAX_")}


def _run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout, check=False)
    proc.elapsed = time.monotonic() - start
    return proc


def _launch(n: int, devices: int, cmd: list[str], timeout: float = 150, extra: list[str] = ()) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "meshjax", "launch", "--processes", str(n), "--devices-per-process", str(devices),
            "--timeout", str(timeout - 20), *extra, "--", *cmd]
    return _run(argv, timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


# --- fixtures: the runs the tests share -----------------------------------------------------------


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """``meshjax launch`` 2 x 4 devices of ``meshjax train gpt-tiny --mesh 4x2``, saving at 2 and 3."""
    d = tmp_path_factory.mktemp("mp_train")
    proc = _launch(2, 4, ["meshjax", "train", "gpt-tiny", "--mesh", "4x2", "--steps", str(STEPS), "--save-every", "2",
                          "--checkpoint", str(d / "ckpt"), "--losses-json", str(d / "losses.json")])
    _ok(proc)
    return d, proc, json.loads((d / "losses.json").read_text())


@pytest.fixture(scope="module")
def hang_run(tmp_path_factory):
    """2 processes compile the plan's step (writing their reports), then run until p1 is killed."""
    d = tmp_path_factory.mktemp("mp_hang")
    argv = [sys.executable, "-m", "meshjax", "launch", "-n", "2", "--devices-per-process", "4", "--timeout", "120", "--",
            "python", HERE, "hang", "4x2", RULES, str(d / "report")]
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, killed_at = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[p1] ready pid="):
                os.kill(int(line.split("=", 1)[1]), signal.SIGKILL)  # the child the launcher started
                killed_at = time.monotonic()
                break
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed_at is not None, "".join(lines)[-3000:] + (proc.stderr.read() if proc.stderr else "")
    reports = [json.loads((d / f"report.p{i}.json").read_text()) for i in range(2)]
    return proc.returncode, time.monotonic() - killed_at, "".join(lines) + out, err, reports


# --- multi-process runs ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_like_one(two_process_run, tmp_path):
    """2 processes x 4 devices give the losses of 1 process x 8 devices; only process 0 speaks."""
    _, proc, two = two_process_run
    one_path = tmp_path / "one.json"
    assert cli.main(["train", "gpt-tiny", "--mesh", "4x2", "--steps", str(STEPS), "--losses-json", str(one_path)]) == 0
    one = json.loads(one_path.read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["steps"] == one["steps"] == list(range(1, STEPS + 1))
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5, atol=1e-6)
    assert two["losses"][-1] < two["losses"][0]
    assert "[p0] gpt-tiny: batch 8" in proc.stdout and "2 processes" in proc.stdout
    assert "[p1] gpt-tiny" not in proc.stdout and "[p1] train" not in proc.stdout


@pytest.mark.slow
def test_cross_process_collectives_run_over_the_predicted_axes(hang_run):
    """With batch on data and heads/mlp on model over 2 processes x 4: data spans the processes
    (the solver prices it on the slow link), model stays inside each; the compiled program's
    collectives that leave a process are exactly the plan's collectives over data."""
    for i, report in enumerate(hang_run[4]):
        assert report["process_axes"] == ["data"], report
        assert report["slow_axes"] == ["data"] and report["devices_per_node"] == 4, report
        assert report["compiled_cross"] == report["predicted_cross"] == ["data"], report
        assert report["compiled_local"] == report["predicted_local"] == ["model"], report


@pytest.mark.slow
def test_each_process_builds_only_its_rows(hang_run):
    """Batch on data across 2 processes: process 0 builds rows 0-3, process 1 rows 4-7."""
    assert [r["rows"] for r in hang_run[4]] == [[0, 4], [4, 8]]


@pytest.mark.slow
def test_killed_process_stops_the_run(hang_run):
    code, after_kill, _, err, _ = hang_run
    assert code != 0
    assert after_kill < 20, after_kill
    assert "process 1 (p1, pid" in err and "killed by SIGKILL" in err and "stopped the others (p0)" in err, err
    assert "ready pid=" in err  # its last lines


@pytest.mark.slow
def test_checkpoint_across_process_counts(two_process_run, tmp_path):
    """Saved by 2 processes as 4x2; restored by 1 process as 8 (this one) and by 4 processes as
    2x4: every leaf bitwise equal, and the next step's loss is the uninterrupted run's (so what
    the 2 processes wrote is the state they trained)."""
    d, _, two = two_process_run
    ckpt = d / "ckpt"
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [2, 3]
    child_restore(str(ckpt), 2, "8", str(tmp_path / "one"))  # 1 process: this one, with its 8 devices
    four = _launch(4, 2, ["python", HERE, "restore", str(ckpt), "2", "2x4", str(tmp_path / "four")], timeout=120)
    _ok(four)
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "four.npz")
    assert sorted(a.files) == sorted(b.files) and any(k.startswith("params|") for k in a.files)
    for name in a.files:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name
    info_one = json.loads((tmp_path / "one.json").read_text())
    info_four = json.loads((tmp_path / "four.json").read_text())
    assert info_four["processes"] == 4 and info_one["processes"] == 1
    assert info_one["step"] == info_four["step"] == 3
    np.testing.assert_allclose([info_one["next_loss"], info_four["next_loss"]], two["losses"][2], rtol=1e-5)


@pytest.mark.slow
def test_wrong_coordinator_is_a_clear_error():
    """Nothing listening at the address: process 1 gives up after its timeout naming it. An
    address that is not this machine's: process 0 says so at once and the launcher stops p1."""
    env = {**_env(), "MESHJAX_COORDINATOR": f"127.0.0.1:{launch_cmd.free_port()}", "MESHJAX_NUM_PROCESSES": "2",
           "MESHJAX_PROCESS_ID": "1", "MESHJAX_INIT_TIMEOUT": "2"}
    proc = _run([sys.executable, "-m", "meshjax", "train", "gpt-tiny", "--steps", "1"], timeout=60, env=env)
    assert proc.returncode == 2 and proc.elapsed < 30, (proc.elapsed, proc.stderr[-2000:])
    assert f"cannot reach the coordinator at {env['MESHJAX_COORDINATOR']} within 2 s" in proc.stderr

    proc = _launch(2, 4, ["meshjax", "train", "gpt-tiny", "--steps", "1"], timeout=60,
                   extra=["--coordinator", "192.0.2.1:4567", "--init-timeout", "5"])
    assert proc.returncode != 0 and proc.elapsed < 40, (proc.elapsed, proc.stderr[-2000:])
    assert "process 0 (p0, pid" in proc.stderr and "cannot host the coordinator at 192.0.2.1:4567" in proc.stderr


# --- the pieces, in this process ------------------------------------------------------------------


class _Dev:
    def __init__(self, process_index: int, id: int):
        self.process_index, self.id = process_index, id


def _procs(grid) -> list:
    return np.vectorize(lambda d: d.process_index)(grid).tolist()


def test_device_grid_puts_processes_on_outer_axes():
    two = [_Dev(p, 10 * p + i) for p in range(2) for i in range(4)]
    assert _procs(distributed.device_grid({"data": 4, "model": 2}, two)) == [[0, 0], [0, 0], [1, 1], [1, 1]]
    assert _procs(distributed.device_grid({"data": 4, "model": 2}, two, ["model"])) == [[0, 1]] * 4
    four = [_Dev(p, 10 * p + i) for p in range(4) for i in range(2)]
    assert _procs(distributed.device_grid({"data": 2, "model": 4}, four)) == [[0, 0, 1, 1], [2, 2, 3, 3]]
    assert _procs(distributed.device_grid({"data": 8}, four)) == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(MeshjaxError, match="cannot be spread"):
        distributed.device_grid({"data": 4, "model": 2}, four, ["model"])
    with pytest.raises(MeshjaxError, match="not a mesh axis"):
        distributed.device_grid({"data": 4, "model": 2}, two, ["pipe"])
    mesh = distributed.global_mesh({"data": 4, "model": 2})  # one process: the usual mesh
    assert dict(mesh.shape) == {"data": 4, "model": 2} and distributed.process_axes(mesh) == ()
    assert distributed.hardware_for("cpu-sim", mesh) is get_hardware("cpu-sim")


def test_process_block_and_rows():
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = distributed.global_mesh({"data": 4, "model": 2})
    assert distributed.process_block(NamedSharding(mesh, PartitionSpec("data")), (8, 16)) == (slice(0, 8), slice(0, 16))
    tokens, targets = data.batch_at(5, 8, 16, seed=3)
    part_tokens, part_targets = distributed.batch_rows(5, 8, 16, slice(2, 6), seed=3)
    np.testing.assert_array_equal(part_tokens, tokens[2:6])
    np.testing.assert_array_equal(part_targets, targets[2:6])
    fetch_tokens, _ = distributed.lm_batch(5, 8, 16, seed=3)
    np.testing.assert_array_equal(fetch_tokens((slice(4, 8), slice(0, 8))), tokens[4:8, :8])


def test_env_config_and_launcher_arguments():
    assert distributed.env_config({}) is None
    env = {"MESHJAX_NUM_PROCESSES": "2", "MESHJAX_PROCESS_ID": "1", "MESHJAX_COORDINATOR": "h:1", "MESHJAX_LOCAL_DEVICES": "4"}
    assert distributed.env_config(env) == {"coordinator": "h:1", "num_processes": 2, "process_id": 1, "local_devices": 4,
                                           "timeout": distributed.DEFAULT_TIMEOUT}
    assert distributed.local_cpu_devices(8, env) == 4 and distributed.local_cpu_devices(8, {}) == 8
    with pytest.raises(MeshjaxError, match="MESHJAX_COORDINATOR"):
        distributed.env_config({"MESHJAX_NUM_PROCESSES": "2"})
    child = launch_cmd.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, coordinator="127.0.0.1:5",
                                   processes=2, index=1, devices=4, init_timeout=None)
    assert child["MESHJAX_PROCESS_ID"] == "1" and child["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
    assert launch_cmd.resolve_command(["meshjax", "train"]) == [sys.executable, "-m", "meshjax", "train"]
    with pytest.raises(MeshjaxError, match="no command"):
        launch_cmd.launch([], 2)


@pytest.mark.slow
def test_launcher_streams_and_reports_a_failing_process(capsys):
    """Plain commands (no JAX): prefixed output; a failing process is named with its last lines."""
    code = launch_cmd.launch([sys.executable, "-c", "import os; print('hi from', os.environ['MESHJAX_PROCESS_ID'])"], 2)
    out = capsys.readouterr().out
    assert code == 0 and "[p0] hi from 0" in out and "[p1] hi from 1" in out
    script = "import os, sys, time\nif os.environ['MESHJAX_PROCESS_ID'] == '1':\n    print('boom'); sys.exit(7)\ntime.sleep(60)"
    start = time.monotonic()
    code = launch_cmd.launch([sys.executable, "-c", script], 2, timeout=50)
    err = capsys.readouterr().err
    assert code == 7 and time.monotonic() - start < 15
    assert "process 1 (p1, pid" in err and "exited with code 7" in err and "  boom" in err
    start = time.monotonic()
    assert launch_cmd.launch([sys.executable, "-c", "import time; time.sleep(60)"], 2, timeout=1) == 124
    assert time.monotonic() - start < 15 and "timed out after 1 s" in capsys.readouterr().err


# --- the child's side ----------------------------------------------------------------------------


def _child_setup(shape_text: str, rules: str | None = None):
    """Join the launcher's processes (or simulate all devices in one), then the tiny GPT traced,
    its plan on the global mesh, and a train step."""
    from meshjax import distributed
    from meshjax.devices import parse_mesh_shape, use_cpu_devices

    shape = parse_mesh_shape(shape_text)
    if distributed.initialize_from_env() is None:
        use_cpu_devices(math.prod(shape.values()))
    import jax
    import optax

    import meshjax as mj
    from meshjax import data, models
    from meshjax.devices import make_mesh
    from meshjax.plan import solve
    from meshjax.train import make_train_step

    multi = jax.process_count() > 1
    ex = models.example("gpt-tiny", key=0, vocab=data.VOCAB)  # as `meshjax train gpt-tiny --seed 0`
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    mesh = distributed.global_mesh(shape) if multi else make_mesh(shape)
    hw = distributed.hardware_for("cpu-sim", mesh)
    plan = solve(graph, shape, hardware=hw, train=True, rules=rules)
    trainer = make_train_step(plan, ex.loss, mesh, optax.adam(LR))
    return ex, plan, mesh, hw, trainer


def _batch(step: int, ex):
    import jax

    from meshjax import data, distributed

    cfg = ex.config
    if jax.process_count() > 1:
        return distributed.lm_batch(step, cfg.batch, cfg.seq, seed=0)
    return data.batch_at(step, cfg.batch, cfg.seq, seed=0)


def _cross_process_report(plan, mesh, hw, trainer, state, batch) -> dict:
    """Axes of the compiled step's collectives that leave a process, and of the plan's
    collectives on axes that span processes (the ones it priced on the inter-node link)."""
    from meshjax import distributed
    from meshjax.hlo import inspect_compiled

    report = inspect_compiled(trainer.lower(state, *batch).compile(), mesh)
    spanning = set(distributed.process_axes(mesh))
    compiled_cross = sorted({"+".join(c.axes) for c in report.collectives if distributed.crosses_processes(c.groups, mesh)})
    compiled_local = sorted({"+".join(c.axes) for c in report.collectives if not distributed.crosses_processes(c.groups, mesh)})
    predicted_cross = sorted({"+".join(c.axes) for c in plan.collectives if spanning & set(c.axes)})
    predicted_local = sorted({"+".join(c.axes) for c in plan.collectives if c.axes and not spanning & set(c.axes)})
    names = list(plan.mesh_shape)
    slow = [a for a in names if hw.link(plan.mesh_shape, a) == hw.inter_node]
    return {
        "process_axes": sorted(spanning),
        "slow_axes": slow,
        "devices_per_node": hw.devices_per_node,
        "compiled_cross": compiled_cross,
        "compiled_local": compiled_local,
        "predicted_cross": predicted_cross,
        "predicted_local": predicted_local,
    }


def child_restore(path: str, step: int, shape_text: str, out: str) -> None:
    """Restore ``step`` onto ``shape``; process 0 writes every leaf (gathered), the next step's
    loss, and the cross-process collectives report."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from meshjax import checkpoint, distributed
    from meshjax.checkpoint import state_leaves

    ex, plan, mesh, hw, trainer = _child_setup(shape_text)
    state = checkpoint.restore(path, plan, mesh, trainer.abstract_state(), step=step)
    leaves = state_leaves(state)
    values = {name: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for name, v in leaves.items()}
    batch = _batch(step, ex)
    info = _cross_process_report(plan, mesh, hw, trainer, state, batch)
    tokens_block = distributed.process_block(trainer.input_shardings[0].value, (ex.config.batch, ex.config.seq))
    state, loss = trainer.step(state, *batch)
    info.update(step=state.step, next_loss=float(loss), processes=jax.process_count(), rows=[tokens_block[0].start, tokens_block[0].stop])
    rows = multihost_utils.process_allgather(np.array(info["rows"]))
    info["rows_by_process"] = np.asarray(rows).reshape(-1, 2).tolist()
    if jax.process_index() == 0:
        np.savez(out + ".npz", **{k.replace("/", "|"): v for k, v in values.items()})
        with open(out + ".json", "w") as f:
            json.dump(info, f)
    print(f"restored step {step} as {shape_text}", flush=True)


def child_hang(shape_text: str, rules: str, out: str) -> None:
    """Compile the plan's train step (writing the cross-process report), say ready, then run
    small cross-process steps until killed."""
    import jax
    import numpy as np

    from meshjax import distributed

    ex, plan, mesh, hw, trainer = _child_setup(shape_text, rules)
    state = trainer.init(ex.params)
    batch = _batch(0, ex)
    info = _cross_process_report(plan, mesh, hw, trainer, state, batch)
    block = distributed.process_block(trainer.input_shardings[0].value, (ex.config.batch, ex.config.seq))
    info["rows"] = [block[0].start, block[0].stop]
    with open(f"{out}.p{jax.process_index()}.json", "w") as f:
        json.dump(info, f)
    state, loss = trainer.step(state, *batch)
    float(loss)
    print(f"ready pid={os.getpid()}", flush=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state, loss = trainer.step(state, *batch)
        float(loss)
        time.sleep(0.05)
    np.asarray(0)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "restore":
        child_restore(rest[0], int(rest[1]), rest[2], rest[3])
    elif mode == "hang":
        child_hang(rest[0], rest[1], rest[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    raise SystemExit(0)
