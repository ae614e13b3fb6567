"""Checkpoints of a :class:`~meshjax.train.TrainState` with orbax, restorable onto another mesh.

A checkpoint directory holds one numbered subdirectory per saved step (an orbax
``CheckpointManager``). Every array is stored under its readable name (``params/block_0/mlp/w_in``,
``opt_state/0/mu/block_0/mlp/w_in``, see :func:`state_leaves`), so a checkpoint
saved under one plan restores under any other: each process reads only the shards its target
shardings ask for.

Example (``state`` from a :class:`~meshjax.train.TrainStep` of a plan on one mesh, restored
under a plan of the same model on another)::

    save("ckpt", state, state.step)
    trainer = make_train_step(plan_2x4, ex.loss, mesh_2x4, optax.adam(1e-3))
    state = restore("ckpt", plan_2x4, mesh_2x4, trainer.abstract_state())
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from typing import Any

import jax
import numpy as np

from meshjax.errors import MeshjaxError
from meshjax.named import NamedArray, is_named
from meshjax.params import path_name
from meshjax.train import TrainState, opt_state_shardings, param_shardings


class CheckpointError(MeshjaxError):
    """A checkpoint that is missing or does not match the model it is restored into."""


def state_leaves(state: TrainState) -> dict[str, Any]:
    """Every array of ``state`` by a readable name: ``params/<tensor>`` and ``opt_state/<path>``
    (values may be arrays or ``ShapeDtypeStruct``). The names checkpoints are stored under."""
    out: dict[str, Any] = {}
    for group, tree in (("params", state.params), ("opt_state", state.opt_state)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_named)[0]:
            name = path_name(path)
            out[f"{group}/{name}" if name else group] = leaf.value if isinstance(leaf, NamedArray) else leaf
    return out


def replace_leaves(state: TrainState, values: dict[str, Any], step: int | None = None) -> TrainState:
    """``state`` with every array replaced by ``values[name]`` (names from :func:`state_leaves`)."""
    trees = {}
    for group, tree in (("params", state.params), ("opt_state", state.opt_state)):
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_named)
        new = []
        for path, leaf in flat:
            name = path_name(path)
            value = values[f"{group}/{name}" if name else group]
            new.append(NamedArray.tree_unflatten(leaf.dims, (value,)) if isinstance(leaf, NamedArray) else value)
        trees[group] = jax.tree_util.tree_unflatten(treedef, new)
    return TrainState(trees["params"], trees["opt_state"], state.step if step is None else step)



def _ocp():
    import orbax.checkpoint as ocp

    # orbax logs every save and restore (and warns about read-only managers) through absl.
    logging.getLogger("absl").setLevel(logging.ERROR)
    return ocp


def _handler(ocp):
    """A pytree handler whose jax.Array writer skips replica-parallel saving on CPU: there it
    slices every replicated array on device first, compiling one slice per shape (seconds per
    save on simulated devices) for no gain."""
    from orbax.checkpoint import type_handlers as th

    parallel = None if jax.default_backend() != "cpu" else False
    registry = th.create_type_handler_registry(
        (int, th.ScalarHandler()),
        (float, th.ScalarHandler()),
        (np.number, th.ScalarHandler()),
        (np.ndarray, th.NumpyHandler()),
        (jax.Array, th.ArrayHandler(use_replica_parallel=parallel)),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _manager(path: str | os.PathLike, *, read_only: bool = False):
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, read_only=read_only, create=not read_only)
    return ocp.CheckpointManager(os.path.abspath(os.fspath(path)), item_handlers=_handler(ocp), options=options)


def save(path: str | os.PathLike, state: TrainState, step: int | None = None) -> str:
    """Write ``state`` as step ``step`` (default ``state.step``) under directory ``path``;
    returns the step's directory. Blocks until written."""
    step = state.step if step is None else int(step)
    ocp = _ocp()
    mgr = _manager(path)
    try:
        if step in mgr.all_steps():
            mgr.delete(step)  # saving a step again overwrites it
        mgr.save(step, args=ocp.args.PyTreeSave(state_leaves(state)), force=True)
        mgr.wait_until_finished()
    finally:
        mgr.close()
    return os.path.join(os.path.abspath(os.fspath(path)), str(step))


def steps(path: str | os.PathLike) -> list[int]:
    """The steps saved under ``path`` (empty when there is none)."""
    if not os.path.isdir(path):
        return []
    mgr = _manager(path, read_only=True)
    try:
        return sorted(mgr.all_steps())
    finally:
        mgr.close()


def latest_step(path: str | os.PathLike) -> int | None:
    saved = steps(path)
    return saved[-1] if saved else None


def _target(plan, mesh, abstract_state: TrainState) -> TrainState:
    """``abstract_state`` with every leaf a ``ShapeDtypeStruct`` carrying the plan's sharding."""
    p_sh = param_shardings(plan, mesh)
    o_sh = opt_state_shardings(plan, mesh, abstract_state.params, abstract_state.opt_state)

    def sds(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    try:
        params = jax.tree_util.tree_map(sds, abstract_state.params, p_sh)
    except ValueError as err:
        raise CheckpointError(f"the params do not have the structure the plan was made for: {err}") from None
    opt = jax.tree_util.tree_map(sds, abstract_state.opt_state, o_sh)
    return TrainState(params, opt, abstract_state.step)


def check(stored: dict[str, Any], target: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming the first leaf that is missing from the checkpoint,
    extra in it, or has another shape or dtype."""
    missing = sorted(set(target) - set(stored))
    extra = sorted(set(stored) - set(target))
    if missing:
        raise CheckpointError(f"checkpoint has no leaf {missing[0]!r} that the model needs" + _more(missing))
    if extra:
        raise CheckpointError(f"checkpoint has leaf {extra[0]!r} that the model does not have" + _more(extra))
    for name, want in target.items():
        got = stored[name]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"checkpoint leaf {name!r} has shape {tuple(got.shape)}; the model expects {tuple(want.shape)}")
        if np.dtype(got.dtype) != np.dtype(want.dtype):
            raise CheckpointError(f"checkpoint leaf {name!r} has dtype {np.dtype(got.dtype)}; the model expects {np.dtype(want.dtype)}")


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


COMMIT_MARKER = "commit_success.txt"


def damage(path: str | os.PathLike, step: int) -> str | None:
    """What is wrong with step ``step`` under ``path`` as files on disk (``None``: nothing
    found): an empty folder, a missing commit marker (the save never finished), a missing or
    truncated ``_METADATA``, or an empty data file. Data that is present but garbled shows only
    when it is read (:func:`restore` reports it the same way)."""
    folder = os.path.join(os.fspath(path), str(step))
    if not os.path.isdir(folder) or not os.listdir(folder):
        return f"step {step}: folder {folder!r} is empty"
    for marker in (os.path.join(folder, COMMIT_MARKER), os.path.join(folder, "default", COMMIT_MARKER)):
        if not os.path.isfile(marker):
            return f"step {step}: commit marker {marker!r} is missing (the save did not finish)"
    metadata = os.path.join(folder, "default", "_METADATA")
    if not os.path.isfile(metadata):
        return f"step {step}: file {metadata!r} is missing"
    try:
        with open(metadata) as f:
            json.load(f)
    except ValueError as err:
        return f"step {step}: file {metadata!r} is not valid JSON ({err.msg} at byte {err.pos}; truncated?)"
    for root, _, files in os.walk(os.path.join(folder, "default")):
        for name in sorted(files):
            file = os.path.join(root, name)
            if os.path.getsize(file) == 0:
                return f"step {step}: data file {file!r} is empty"
    return None


def _read_error(path: str | os.PathLike, step: int, err: Exception) -> CheckpointError:
    """One line for an exception orbax or tensorstore raised reading step ``step``: the leaf
    whose data failed when the message names one, else the file or folder."""
    folder = os.path.join(os.fspath(path), str(step))
    text = " ".join(str(err).split())
    leaf = re.search(r'Error reading "([^"]+?)(?:/\.zarray)?"', text)
    file = re.search(re.escape(os.path.abspath(folder)) + r"[^\s\"']*", text)
    where = (f"the data of {leaf.group(1)!r} in {os.path.join(folder, 'default')!r}" if leaf
             else f"file {file.group(0).rstrip(':,.')!r}" if file else f"the data under {folder!r}")
    return CheckpointError(f"step {step}: {where} cannot be read, corrupt or truncated ({type(err).__name__}: {text[:120]})")


class CheckpointWarning(UserWarning):
    """A damaged step that :func:`restore` skipped with ``fallback=True``."""


def restore(
    path: str | os.PathLike,
    plan,
    mesh,
    abstract_state: TrainState,
    step: int | None = None,
    *,
    fallback: bool = False,
) -> TrainState:
    """The state saved under ``path`` (the latest step, or ``step``) laid out by ``plan`` on
    ``mesh``, which may differ from the plan and mesh it was saved under.

    ``abstract_state`` gives the structure, shapes and dtypes (its leaves may be arrays or
    ``ShapeDtypeStruct``; ``TrainStep.abstract_state()`` makes one). The restored state's step is
    the checkpoint's step. A damaged step raises :class:`CheckpointError` naming the step, the
    file and what is wrong; with ``fallback=True`` damaged steps are skipped (each with a
    :class:`CheckpointWarning`) and the newest intact one is restored.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint directory {os.fspath(path)!r}")
    saved = steps(path)
    if not saved:
        raise CheckpointError(f"no checkpoint steps under {os.fspath(path)!r}")
    if step is not None and step not in saved:
        raise CheckpointError(f"no step {step} under {os.fspath(path)!r} (saved: {', '.join(map(str, saved))})")
    candidates = [step] if step is not None else saved[::-1]
    if not fallback:
        candidates = candidates[:1]
    errors = []
    for s in candidates:
        try:
            return _restore_step(path, plan, mesh, abstract_state, s)
        except CheckpointError as err:
            if not fallback or _is_mismatch(err):
                raise
            errors.append(err)
            warnings.warn(f"{err}; skipped", CheckpointWarning, stacklevel=2)
    raise CheckpointError(f"no intact step under {os.fspath(path)!r}: {errors[0]}")


class _DamagedStep(CheckpointError):
    pass


def _is_mismatch(err: CheckpointError) -> bool:
    """A checkpoint of another model: older steps will not match either."""
    return not isinstance(err, _DamagedStep)


def _restore_step(path, plan, mesh, abstract_state: TrainState, step: int) -> TrainState:
    problem = damage(path, step)
    if problem is not None:
        raise _DamagedStep(problem)
    target = _target(plan, mesh, abstract_state)
    target_leaves = state_leaves(target)
    ocp = _ocp()
    mgr = _manager(path, read_only=True)
    try:
        try:
            metadata = mgr.item_metadata(step)
        except Exception as err:
            raise _DamagedStep(str(_read_error(path, step, err))) from None
        stored = dict(getattr(metadata, "tree", metadata) or {})
        check(stored, target_leaves)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target_leaves)
        try:
            values = mgr.restore(step, args=ocp.args.PyTreeRestore(item=target_leaves, restore_args=restore_args))
        except Exception as err:
            raise _DamagedStep(str(_read_error(path, step, err))) from None
    finally:
        mgr.close()
    return replace_leaves(target, dict(values), step=step)


__all__ = ["CheckpointError", "CheckpointWarning", "save", "restore", "steps", "latest_step", "check", "damage"]
