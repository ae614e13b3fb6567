"""Training steps from a plan: params, gradients and optimizer state all laid out as planned.

:func:`make_train_step` turns a plan, the loss it was traced from, a mesh and an optax optimizer
into one ``jax.jit`` step: the loss runs with every tensor pinned (as in
:class:`~meshjax.lower.Program`), gradients are pinned to their param's layout
(``plan.state_specs``), and the optimizer update runs where each param lives. Params and
optimizer state are donated, so a step updates them in place.

Example::

    >>> import optax
    >>> from meshjax import models
    >>> from meshjax.devices import make_mesh
    >>> from meshjax.solve import solve
    >>> ex = models.example("mlp-tiny", key=0)
    >>> plan = solve(mj.trace(ex.loss, ex.params, *ex.batch), {"data": 4, "model": 2}, train=True,
    ...              hardware="cpu-sim", rules="batch:data;mlp:model")
    >>> trainer = make_train_step(plan, ex.loss, make_mesh({"data": 4, "model": 2}), optax.adam(1e-2))
    >>> state = trainer.init(ex.params)
    >>> first = None
    >>> for _ in range(3):
    ...     state, loss = trainer.step(state, *ex.batch)
    ...     first = first or float(loss)
    >>> int(state.step), float(loss) < first
    (3, True)
    >>> state.params["mlp"]["w_in"].value.sharding.spec     # params stay where the plan put them
    P(None, 'model')

Optimizer state is laid out from the plan: every subtree of the optimizer state with the same
structure as the params (Adam's ``mu`` and ``nu``) takes each param's spec, scalar leaves (step
counts) are replicated, and any other leaf is an error naming it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshjax.devices import auto_axes
from meshjax.lower import named_sharding, sharding_tree
from meshjax import validate
from meshjax.errors import MeshjaxError, TraceError
from meshjax.microbatch import BATCH_DIM, global_shape
from meshjax.named import NamedArray, is_named
from meshjax.optimizer import ADAM, Optimizer
from meshjax.params import path_name



@dataclass(frozen=True)
class TrainState:
    """Params (the user's pytree of :class:`NamedArray`), optimizer state and steps taken."""

    params: Any
    opt_state: Any
    step: int = 0

    def replace(self, **changes: Any) -> TrainState:
        return TrainState(**{"params": self.params, "opt_state": self.opt_state, "step": self.step, **changes})


# --- shardings ---------------------------------------------------------------------------------


def _signature(plan) -> Any:
    sig = plan.graph.signature
    if sig is None:
        raise TraceError("the plan's graph has no signature: make it with meshjax.trace")
    return sig


def _sharding_trees(plan, mesh: Mesh) -> tuple[Any, tuple]:
    """``(params, args)`` shaped like the traced arguments, with a NamedSharding at each leaf."""
    params, args = sharding_tree(_signature(plan), mesh, plan.specs)
    return params, tuple(args)


def _state_sharding_tree(plan, mesh: Mesh) -> Any:
    """The params pytree with each param's gradient / optimizer-state sharding at its leaf."""
    return sharding_tree(_signature(plan), mesh, plan.state_specs)[0]


def param_shardings(plan, mesh: Mesh) -> Any:
    """The params pytree with each param's planned ``NamedSharding`` in place of its array."""
    return _sharding_trees(plan, auto_axes(mesh))[0]


def input_names(plan) -> list[str]:
    sig = _signature(plan)
    return [n for n, r in zip(sig.names, sig.roles) if r == "input"]


def opt_state_shardings(plan, mesh: Mesh, abstract_params: Any, abstract_opt_state: Any, *, replicate_factored: bool = False) -> Any:
    """The optimizer state's shardings from the plan.

    A subtree with the params' exact structure (names and dims) mirrors them: each leaf takes its
    param's ``plan.state_specs`` spec (its shape must be the param's). A scalar leaf is replicated.
    With ``replicate_factored`` (adafactor, whose row and column statistics the memory model
    counts replicated), a mirrored leaf of another shape is replicated too. Anything else raises
    :class:`MeshjaxError` naming the leaf.
    """
    mesh = auto_axes(mesh)
    sig = _signature(plan)
    state_specs = plan.state_specs
    param_names = [n for n, r in zip(sig.names, sig.roles) if r == "param"]
    param_leaves, params_def = jax.tree_util.tree_flatten(abstract_params, is_leaf=is_named)
    full_def = jax.tree_util.tree_structure(abstract_params)

    def mirrors(x: Any) -> bool:
        return x is not None and jax.tree_util.tree_structure(x) == full_def

    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_opt_state, is_leaf=lambda x: is_named(x) or mirrors(x))
    out = []
    for path, leaf in flat:
        where = path_name(path) or "(root)"
        if mirrors(leaf):
            mirror_leaves = jax.tree_util.tree_flatten(leaf, is_leaf=is_named)[0]
            shardings = []
            for name, param, state_leaf in zip(param_names, param_leaves, mirror_leaves):
                shape = tuple(np.shape(state_leaf.value if is_named(state_leaf) else state_leaf))
                if shape == () or (replicate_factored and shape != tuple(param.shape)):
                    # A placeholder (no master copy of this param), or factored statistics.
                    sharding = named_sharding(mesh, PartitionSpec())
                    shardings.append(NamedArray.tree_unflatten(state_leaf.dims, (sharding,)) if is_named(state_leaf) else sharding)
                    continue
                if shape != tuple(param.shape):
                    raise MeshjaxError(
                        f"optimizer state leaf '{where}/{name}' has shape {shape} but its param {name!r} has "
                        f"shape {tuple(param.shape)}: it has no layout in the plan"
                    )
                sharding = named_sharding(mesh, state_specs.get(name))
                shardings.append(NamedArray.tree_unflatten(state_leaf.dims, (sharding,)) if is_named(state_leaf) else sharding)
            out.append(jax.tree_util.tree_unflatten(params_def, shardings))
            continue
        value = leaf.value if is_named(leaf) else leaf
        if np.shape(value) == ():
            sharding = named_sharding(mesh, PartitionSpec())
            out.append(NamedArray.tree_unflatten(leaf.dims, (sharding,)) if is_named(leaf) else sharding)
            continue
        raise MeshjaxError(
            f"optimizer state leaf '{where}' (shape {tuple(np.shape(value))}) has no layout in the plan: "
            "only state that mirrors the params (like Adam's moments) or scalars can be placed"
        )
    return jax.tree_util.tree_unflatten(treedef, out)


# --- inputs ------------------------------------------------------------------------------------


def shard_batch(plan, mesh: Mesh, batch_leaves: Sequence[Any]) -> tuple[NamedArray, ...]:
    """Global arrays for the plan's inputs, built per shard from host arrays.

    ``batch_leaves`` are host arrays (numpy, or NamedArrays around them) in the order of the
    traced inputs. Each device receives only its own slice (``jax.make_array_from_callback``), so
    no device holds the whole batch unless the plan replicates it. A leaf may also be a
    :class:`meshjax.data.BlockFetch`: then each process builds only the block of the
    input its own devices hold (with several processes, none builds the global batch).
    """
    mesh = auto_axes(mesh)
    sig = _signature(plan)
    names = input_names(plan)
    if len(batch_leaves) != len(names):
        raise MeshjaxError(f"the plan takes {len(names)} inputs ({', '.join(names)}), got {len(batch_leaves)}")
    specs = plan.specs
    dims_of = dict(zip(sig.names, sig.dims))
    out = []
    for name, leaf in zip(names, batch_leaves):
        host = leaf.value if is_named(leaf) else leaf
        tensor = plan.graph.tensors[name]
        if callable(host) and hasattr(host, "shape"):
            # A meshjax.data.BlockFetch: this process builds only its devices' block.
            out.append(NamedArray.tree_unflatten(dims_of[name], (_from_block(name, host, tensor, named_sharding(mesh, specs.get(name)), plan.microbatches),)))
            continue
        host = np.asarray(host)
        shape = global_shape(tensor, plan.microbatches)
        if tuple(host.shape) != shape:
            raise MeshjaxError(f"input {name!r} has shape {tuple(host.shape)}; the plan expects {shape}")
        if host.dtype != np.dtype(tensor.dtype):
            host = host.astype(tensor.dtype)
        sharding = named_sharding(mesh, specs.get(name))
        array = jax.make_array_from_callback(host.shape, sharding, lambda index, h=host: h[index])
        out.append(NamedArray.tree_unflatten(dims_of[name], (array,)))
    return tuple(out)


def _from_block(name: str, fetch: Any, tensor, sharding: NamedSharding, microbatches: int) -> jax.Array:
    """The global array of input ``name`` from the one block of it this process's devices hold."""
    from meshjax.data import local_index, process_block

    shape = global_shape(tensor, microbatches)
    if tuple(fetch.shape) != shape:
        raise MeshjaxError(f"input {name!r} has shape {tuple(fetch.shape)}; the plan expects {shape}")
    block = process_block(sharding, shape)
    local = np.asarray(fetch(block))
    want = tuple(b.stop - b.start for b in block)
    if tuple(local.shape) != want:
        raise MeshjaxError(f"input {name!r}: the block {block} came back with shape {tuple(local.shape)}, not {want}")
    if local.dtype != np.dtype(tensor.dtype):
        local = local.astype(tensor.dtype)
    return jax.make_array_from_callback(shape, sharding, lambda index: local[local_index(index, block, shape)])


# --- the step ----------------------------------------------------------------------------------


def pinned_loss(program) -> Any:
    """``loss(params, *args) -> scalar array``: the program's function with every tensor pinned to
    its planned layout (for use inside ``jax.jit``/``jax.grad``)."""
    graph = program.graph
    sig = _signature(program)
    if len(graph.outputs) != 1 or graph.tensors[graph.outputs[0]].dims != ():
        raise TraceError("training needs a function that returns one scalar NamedArray (a loss)")
    pinned = program.pinned_fn()

    def loss(params: Any, *args: Any) -> jax.Array:
        sig.flatten(params, *args)  # checks the structure (at trace time)
        return jax.tree_util.tree_leaves(pinned(params, *args), is_leaf=is_named)[0].value

    return loss


def with_master_weights(inner: optax.GradientTransformation, spec: Optimizer, dtypes: Any) -> optax.GradientTransformation:
    """``inner`` run as mixed-precision training runs it. Params stored in a narrow float type
    keep a float32 master copy in the optimizer state (laid out like the param; other params
    hold a scalar placeholder), gradients are cast to ``spec.state_dtype`` so the moments are
    kept in it, the update is applied to the master copy, and the new params are the master cast
    down. ``dtypes``: the params' tree with each leaf's dtype name. The updates returned are
    float32 differences, so ``optax.apply_updates`` lands each param on its rounded master."""
    import jax.numpy as jnp

    tree_map = jax.tree_util.tree_map

    def base_of(params, master):
        return tree_map(lambda p, m, d: m if spec.keeps_master(d) else p, params, master, dtypes)

    def init(params):
        master = tree_map(
            lambda p, d: p.astype(jnp.float32) if spec.keeps_master(d) else jnp.zeros((), jnp.float32), params, dtypes
        )
        return (master, inner.init(base_of(params, master)))

    def update(grads, state, params=None):
        master, inner_state = state
        base = base_of(params, master)
        grads = tree_map(lambda g: g.astype(spec.state_dtype), grads)
        updates, inner_state = inner.update(grads, inner_state, base)
        new_base = optax.apply_updates(base, updates)
        new_master = tree_map(lambda b, m, d: b if spec.keeps_master(d) else m, new_base, master, dtypes)
        deltas = tree_map(lambda b, p: b.astype(jnp.float32) - p.astype(jnp.float32), new_base, params)
        return deltas, (new_master, inner_state)

    return optax.GradientTransformation(init, update)


class TrainStep:
    """A plan's training step: :meth:`init` places params and optimizer state, :meth:`step` runs
    one update. Built by :func:`make_train_step`.

    ``optimizer``: ``None`` (the plan's :class:`~meshjax.optimizer.Optimizer`, with the fp32
    master weights and state dtype its memory counts), an :class:`Optimizer`, or any optax
    transformation (run as given, on the params in their own dtype). ``program``: the loss laid
    out otherwise than every tensor as planned (a baseline that pins only its params and inputs
    and leaves the rest to XLA's propagation).

    One step is what one would write by hand as ``jax.jit`` of the loss (every tensor pinned with
    ``with_sharding_constraint``, see :class:`~meshjax.lower.Program`), its gradients pinned to
    their params' shardings, and the optimizer update, with params and state donated::

        @functools.partial(jax.jit, donate_argnums=(0, 1),
                           in_shardings=(param_shardings, state_shardings, *input_shardings),
                           out_shardings=(param_shardings, state_shardings, loss_sharding))
        def step(params, opt_state, *batch):
            loss, grads = jax.value_and_grad(pinned_loss)(params, *batch)
            grads = jax.lax.with_sharding_constraint(grads, param_shardings)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss
    """

    def __init__(
        self,
        plan,
        loss_fn,
        mesh: Mesh,
        optimizer: optax.GradientTransformation | Optimizer | None = None,
        *,
        donate: bool = True,
        program=None,
    ):
        if not plan.train:
            raise MeshjaxError("this plan was made for inference (train=False); solve with train=True to train")
        self.plan = plan
        self.program = program if program is not None else plan.program(loss_fn, mesh)
        self.mesh = self.program.mesh
        self.spec: Optimizer | None = None
        if optimizer is None or isinstance(optimizer, Optimizer):
            self.spec = optimizer or plan.optimizer or ADAM
            optimizer = self.spec.transform()
            if any(self.spec.keeps_master(t.dtype) or t.dtype != self.spec.state_dtype for t in plan.graph.params):
                optimizer = with_master_weights(optimizer, self.spec, self._param_dtypes())
        self.optimizer = optimizer
        self.donate = donate
        self.param_shardings, self.input_shardings = _sharding_trees(plan, self.mesh)
        self.state_shardings = _state_sharding_tree(plan, self.mesh)
        self.loss_sharding = self.program.sharding(plan.graph.outputs[0])
        self._loss = pinned_loss(self.program)
        self._opt_shardings: Any = None
        self._opt_def: Any = None
        self._step_fn: Any = None
        self._init_fn: Any = None
        self._copy_fn: Any = None

    def _param_dtypes(self) -> Any:
        """The params' pytree with each leaf's dtype name (a NamedArray around it)."""
        graph = self.plan.graph
        sig = _signature(self.plan)
        leaves = [NamedArray.tree_unflatten(d, (graph.tensors[n].dtype,)) for n, d in zip(sig.names, sig.dims)]
        return jax.tree_util.tree_unflatten(sig.treedef, leaves)[0]

    # --- layout ---------------------------------------------------------------------------
    def abstract_params(self) -> Any:
        """The params as ``ShapeDtypeStruct`` with their planned shardings."""
        graph = self.plan.graph
        sig = _signature(self.plan)
        specs = self.plan.specs
        leaves = []
        for name, dims in zip(sig.names, sig.dims):
            t = graph.tensors[name]
            sds = jax.ShapeDtypeStruct(t.shape, np.dtype(t.dtype), sharding=named_sharding(self.mesh, specs.get(name)))
            leaves.append(NamedArray.tree_unflatten(dims, (sds,)))
        return jax.tree_util.tree_unflatten(sig.treedef, leaves)[0]

    def opt_state_shardings(self, params: Any | None = None) -> Any:
        """The optimizer state's planned shardings (see :func:`opt_state_shardings`)."""
        if self._opt_shardings is None:
            abstract = self.abstract_params() if params is None else params
            abstract_opt = jax.eval_shape(self.optimizer.init, abstract)
            factored = self.spec is not None and self.spec.name == "adafactor"
            self._opt_shardings = opt_state_shardings(self.plan, self.mesh, abstract, abstract_opt, replicate_factored=factored)
        return self._opt_shardings

    def abstract_state(self) -> TrainState:
        """The state as ``ShapeDtypeStruct`` leaves carrying their planned shardings: the target to
        restore a checkpoint into (:func:`meshjax.checkpoint.restore`)."""
        params = self.abstract_params()
        opt = jax.eval_shape(self.optimizer.init, params)
        shardings = self.opt_state_shardings()
        opt = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt, shardings
        )
        return TrainState(params, opt, 0)

    # --- running --------------------------------------------------------------------------
    def check_structure(self, params: Any) -> None:
        """Raise :class:`TraceError` unless ``params`` (concrete or abstract) have the pytree
        structure the plan was traced with."""
        if jax.tree_util.tree_structure(params, is_leaf=is_named) != jax.tree_util.tree_structure(
            self.param_shardings, is_leaf=is_named
        ):
            raise TraceError("params do not have the structure the plan was made for")
        sig = _signature(self.plan)
        names = [n for n, r in zip(sig.names, sig.roles) if r == "param"]
        validate.arrays_match(self.plan.graph, names, jax.tree_util.tree_leaves(params, is_leaf=is_named))

    def place_params(self, params: Any) -> Any:
        """Copies of ``params`` with their planned shardings (the originals stay valid even when
        steps donate the copies)."""
        self.check_structure(params)
        # device_put may hand back (part of) the caller's buffers; a jitted copy never does, so
        # donating the placed params cannot delete the caller's arrays.
        placed = jax.device_put(params, self.param_shardings)
        if self._copy_fn is None:
            self._copy_fn = jax.jit(
                lambda p: jax.tree_util.tree_map(lambda x: x.copy(), p),
                in_shardings=(self.param_shardings,),
                out_shardings=self.param_shardings,
            )
        return self._copy_fn(placed)

    def init(self, params: Any) -> TrainState:
        """Params placed with the plan's shardings and optimizer state created already sharded."""
        placed = self.place_params(params)
        opt_shardings = self.opt_state_shardings()
        if self._init_fn is None:
            self._init_fn = jax.jit(self.optimizer.init, in_shardings=(self.param_shardings,), out_shardings=opt_shardings)
        return TrainState(placed, self._init_fn(placed), 0)

    def _build_step(self) -> Any:
        loss_fn = self._loss
        optimizer = self.optimizer
        grad_shardings = self.state_shardings  # ZeRO-1/2: gradients reduce-scatter into the state layout
        k = self.plan.microbatches
        value_and_grad = jax.value_and_grad(loss_fn) if k == 1 else _accumulated(loss_fn, k, self.param_shardings)
        scheduled = getattr(self.program, "value_and_grad", None)  # a pipeline's own backward (1F1B)
        if scheduled is not None and scheduled() is not None:
            value_and_grad = scheduled()

        def step(params, opt_state, args):
            loss, grads = value_and_grad(params, *args)
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return params, opt_state, loss

        return jax.jit(
            step,
            in_shardings=(self.param_shardings, self.opt_state_shardings(), self.input_shardings),
            out_shardings=(self.param_shardings, self.opt_state_shardings(), self.loss_sharding),
            donate_argnums=(0, 1) if self.donate else (),
        )

    def prepare_batch(self, batch: Sequence[Any]) -> tuple:
        """Batch leaves as global arrays: host (numpy) leaves are sharded with :func:`shard_batch`;
        NamedArrays around jax arrays pass through."""
        if all(is_named(b) and isinstance(b.value, jax.Array) for b in batch):
            names = input_names(self.plan)
            if len(batch) != len(names):
                raise MeshjaxError(f"the plan takes {len(names)} inputs ({', '.join(names)}), got {len(batch)}")
            validate.arrays_match(self.plan.graph, names, batch, self.plan.microbatches)
            # Already on devices: move to the planned layout (a no-op when it is already there).
            return jax.device_put(tuple(batch), self.input_shardings)
        return shard_batch(self.plan, self.mesh, batch)

    def step(self, state: TrainState, *batch: Any) -> tuple[TrainState, jax.Array]:
        """One update: ``(new_state, loss)``. With ``donate``, ``state``'s arrays are consumed."""
        if self._step_fn is None:
            self._step_fn = self._build_step()
        args = self.prepare_batch(batch)
        params, opt_state, loss = self._step_fn(state.params, state.opt_state, args)
        return TrainState(params, opt_state, state.step + 1), loss

    def lower(self, state: TrainState, *batch: Any) -> jax.stages.Lowered:
        """The step lowered for ``state`` and ``batch``, either of which may be abstract
        (``ShapeDtypeStruct`` leaves, as :meth:`abstract_state` gives): nothing is allocated.
        ``trainer.lower(trainer.abstract_state(), *ex.batch).compile().memory_analysis()`` is
        what the step will hold, before any array exists.
        """
        if self._step_fn is None:
            self._step_fn = self._build_step()
        if all(is_named(b) and isinstance(b.value, jax.ShapeDtypeStruct) for b in batch):
            args = tuple(batch)  # the step's in_shardings place them
        else:
            args = self.prepare_batch(batch)
        return self._step_fn.lower(state.params, state.opt_state, args)


def _accumulated(loss_fn: Any, k: int, param_shardings: Any) -> Any:
    """``value_and_grad`` of ``loss_fn`` over ``k`` micro-batches of the batch, one at a time
    (a scan): the mean loss and the mean gradient, summed in float32 in the params' layout.

    Micro-batch ``i`` takes rows ``i, i + k, i + 2k, ...`` of the batch dim, so each device's
    rows stay on it when the batch is split over devices."""
    import jax.numpy as jnp

    def split(leaf: NamedArray) -> NamedArray:
        if BATCH_DIM not in leaf.dims:
            raise MeshjaxError(f"micro-batches: input with dims {leaf.dims} has no {BATCH_DIM!r} dim to split")
        axis = leaf.dims.index(BATCH_DIM)
        shape = leaf.value.shape
        value = leaf.value.reshape(*shape[:axis], shape[axis] // k, k, *shape[axis + 1:])
        return NamedArray.tree_unflatten(leaf.dims, (jnp.moveaxis(value, axis + 1, 0),))

    def pinned(tree: Any) -> Any:
        return jax.lax.with_sharding_constraint(tree, param_shardings)

    def run(params: Any, *args: Any) -> tuple[jax.Array, Any]:
        micro = jax.tree_util.tree_map(split, args, is_leaf=is_named)
        zeros = pinned(jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

        def body(carry, batch):
            total, acc = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
            acc = pinned(jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32), acc, grads))
            return (total + loss.astype(jnp.float32), acc), None

        (total, acc), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
        grads = jax.tree_util.tree_map(lambda g, p: (g / k).astype(p.dtype), acc, params)
        return total / k, grads

    return run


def make_train_step(plan, loss_fn, mesh: Mesh, *args: Any, **kwargs: Any) -> TrainStep:
    """A :class:`TrainStep` for ``plan`` (solved with ``train=True``) of ``loss_fn`` on ``mesh``;
    the other arguments are :class:`TrainStep`'s (``optimizer`` defaults to the plan's,
    ``program`` to the plan's fully pinned one)."""
    return TrainStep(plan, loss_fn, mesh, *args, **kwargs)


__all__ = [
    "TrainState", "TrainStep", "make_train_step", "shard_batch", "param_shardings", "opt_state_shardings",
    "pinned_loss", "input_names", "with_master_weights",
]


def __getattr__(name: str) -> Any:
    # Checkpoint leaf naming moved to meshjax.checkpoint, which imports this module.
    if name in ("state_leaves", "replace_leaves"):
        from meshjax import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'meshjax.train' has no attribute {name!r}")
