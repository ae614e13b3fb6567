"""A pipelined scan as one SPMD program: stages vmapped over the stage mesh axis, rotated by one
stage per time slot (the form MaxText's pipeline uses).

The layer stack ``L`` of every scanned param is split into ``p`` contiguous stages, ``(p, L/p,
...)`` with the stage axis on the first dim, so each stage's devices hold only their layers. The
scan's carry (``batch ...``) is split into ``m`` micro-batches: micro-batch ``i`` is rows ``i, i+m,
i+2m, ...``, so a batch already split over a data axis splits into micro-batches without moving.
One loop of ``m + p - 1`` iterations then runs, in every iteration, all stages at once as one
``jax.vmap`` over the stage dim with ``spmd_axis_name`` set to the stage axis (each stage a plain
scan over its ``L/p`` layers, every tensor pinned to its planned in-stage layout with the stage
axis in front), after stage 0 has taken micro-batch ``t`` in; then the states move one stage on
(``jnp.roll`` over the stage dim, which XLA lowers to one collective-permute), and the last
stage's result is written into its slot of an output buffer. Stage ``s`` works on micro-batch
``t - s``; its first ``s`` and last ``p - 1 - s`` iterations are the bubble.

``jax.grad`` of the loop is the backward pipeline in reverse (GPipe: all forwards, then all
backwards; every stage keeps its activations for all ``m`` micro-batches until then).

Data parallelism inside a stage (:func:`replicated_stages`): a stage shared by the data
replicas would have its weight gradients summed over the data axes in every time slot (the
partitioner reduces each slot's partial gradient where it is made). Instead the stages are also
vmapped over the replicas, ``spmd_axis_name`` the data axes
(:func:`meshjax.cost.pipeline.replica_axes`), each replica of each stage working on its rows of
every micro-batch with its own copy of the stage's weights, broadcast before the loop (no
communication: they are replicated over those axes). Each replica's weight gradients then
accumulate locally over the slots, and the broadcast's transpose sums them over the data axes
once, after the loop: one all-reduce per step, as Megatron does.

What stays outside the pipeline: everything before and after the scan (a decoder's embedding
and head) runs on every stage group with its planned layout over the other mesh axes, i.e.
replicated over the stage axis. The scan's input reaches stage 0 without communication (every
stage holds it); its output leaves the last stage by one all-reduce over the stage axis (the
other stages contribute zeros), and the backward pass does the same for the gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from meshjax import context
from meshjax.devices import mesh_shape
from meshjax.errors import LayoutError, ShapeError
from meshjax.graph import LINEAR, Graph, IndexForm
from meshjax.layout import Layout, validate
from meshjax.lower import Program
from meshjax.named import NamedArray, is_named
from meshjax.cost.pipeline import replica_axes
from meshjax.pipeline.schedule import Pipeline
from meshjax.pipeline.stage_graph import scan_block

_FREE = PartitionSpec.UNCONSTRAINED


class PipelinePinner(context.Pinner):
    """A :class:`~meshjax.context.Pinner` whose scans over ``pipeline.dim`` run pipelined."""

    def __init__(self, mesh, specs, operand_specs=None, recomputed=None, computed_specs=None, *, pipeline: Pipeline,
                 replicas: tuple[str, ...] = ()):
        super().__init__(mesh, specs, operand_specs, recomputed, computed_specs)
        self.pipeline = pipeline
        self.replicas = replicas  # meshjax.cost.pipeline.replica_axes of the plan
        # "run": the scan runs as the GPipe loop; "capture": it records what it was given and
        # hands its carry back unchanged; "replay": it hands back ``replay`` (1F1B's split of
        # the function into what runs before the scan and after it, :mod:`.one_f_one_b`).
        self.mode = "run"
        self.captured: dict[str, Any] | None = None
        self.replay: list[jax.Array] | None = None


def _stage_major(ctx: PipelinePinner, value: jax.Array) -> jax.Array:
    """Constrain dim 0 of ``value`` to the stage axis, leaving the other dims to the partitioner."""
    spec = PartitionSpec(ctx.pipeline.axis, *([_FREE] * (value.ndim - 1)))
    return jax.lax.with_sharding_constraint(value, NamedSharding(ctx.mesh, spec))


def _drop_axes(spec: PartitionSpec | None, axes: tuple[str, ...]) -> PartitionSpec | None:
    """``spec`` without the mesh axes ``axes`` (a dim left with none is unsplit)."""
    if spec is None:
        return None
    out = []
    for entry in spec:
        kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a not in axes)
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*out)


@contextlib.contextmanager
def _in_replica(ctx: PipelinePinner) -> Iterator[None]:
    """Inside one data-parallel replica of a stage (vmapped over ``ctx.replicas``), the planned
    in-stage layouts less those axes: the vmap puts them on the replica dim."""
    axes = ctx.replicas
    saved = ctx.specs, ctx.operand_specs, ctx.computed_specs
    if axes:
        ctx.specs = {k: _drop_axes(v, axes) for k, v in saved[0].items()}
        ctx.operand_specs = {k: tuple(_drop_axes(v, axes) for v in vs) for k, vs in saved[1].items()}
        ctx.computed_specs = {k: _drop_axes(v, axes) for k, v in saved[2].items()}
    try:
        yield
    finally:
        ctx.specs, ctx.operand_specs, ctx.computed_specs = saved


def replicated_stages(ctx: PipelinePinner, stage: Callable) -> tuple[Callable, int]:
    """``stage(stage_id, params, state, fresh)`` run by every data-parallel replica of every
    stage: ``(run, d)`` where ``run`` takes params ``(p, d, ...)`` and states ``(p, d, ...)``
    and ``d`` is the number of replicas (the size of ``ctx.replicas``).

    The params reach the loop broadcast over the replica dim (free: they are replicated over
    those axes), so each replica's weight gradient is its own, accumulated over the time slots
    in the loop; the broadcast's transpose sums the replicas' gradients once, after the loop,
    where a stage shared by the replicas would have its gradient summed over them in every
    slot."""
    axes = ctx.replicas
    sizes = mesh_shape(ctx.mesh)
    d = 1
    for a in axes:
        d *= sizes[a]

    def in_replica(stage_id, params, state, fresh):
        with _in_replica(ctx):
            return stage(stage_id, params, state, fresh)

    inner = jax.vmap(in_replica, in_axes=(None, 0, 0, 0), spmd_axis_name=axes or None)
    return jax.vmap(inner, in_axes=(0, 0, 0, 0), spmd_axis_name=ctx.pipeline.axis), d


def _stage_replica_major(ctx: PipelinePinner, value: jax.Array) -> jax.Array:
    """Constrain dim 0 of ``value`` to the stage axis and dim 1 to the replica axes."""
    replica = ctx.replicas or None
    spec = PartitionSpec(ctx.pipeline.axis, replica, *([_FREE] * (value.ndim - 2)))
    return jax.lax.with_sharding_constraint(value, NamedSharding(ctx.mesh, spec))


@jax.custom_vjp
def _rotate(x: jax.Array) -> jax.Array:
    """``x[s]`` moves to ``s + 1`` along dim 0 (the last wraps round to 0).

    Both directions are written as a concatenation, which XLA's partitioner lowers to one
    collective-permute over a sharded dim; ``jnp.roll``'s own transpose (split and pad) lowers
    to two.
    """
    return jnp.concatenate([x[-1:], x[:-1]], axis=0)


def _rotate_fwd(x):
    return _rotate(x), None


def _rotate_bwd(_, cotangent):
    return (jnp.concatenate([cotangent[1:], cotangent[:1]], axis=0),)


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


def check_carries(pipe: Pipeline, carry_leaves: list, length: int, name: str) -> None:
    """Every carry of the pipelined scan ``name`` has the batch dim, and the layers and the batch
    split into ``pipe``'s stages and micro-batches (one-line errors otherwise)."""
    for leaf in carry_leaves:
        if pipe.batch_dim not in leaf.dims:
            raise ShapeError(
                f"pipelined scan {name!r}: a carry with dims {' '.join(leaf.dims)!r} has no {pipe.batch_dim!r} "
                "dim to split into micro-batches"
            )
        pipe.check(length, leaf.size(pipe.batch_dim))


def split_microbatches(ctx: PipelinePinner, carries: list[jax.Array], name: str) -> tuple[list[jax.Array], int]:
    """Carries ``(B, ...)`` as ``(r, B/(m r), m, ...)``: micro-batch ``i`` is rows ``i, i + m, ...``,
    its ``B/m`` rows split over the ``r`` data-parallel replicas (``ctx.replicas``). Returns
    them and ``r`` (a one-line error when a micro-batch's rows do not split)."""
    m = ctx.pipeline.microbatches
    sizes = mesh_shape(ctx.mesh)
    r = 1
    for a in ctx.replicas:
        r *= sizes[a]
    for v in carries:
        if (v.shape[0] // m) % r:
            raise ShapeError(
                f"pipelined scan {name!r}: micro-batches of {v.shape[0] // m} rows do not split over the "
                f"{r} data-parallel replicas (mesh axes {', '.join(ctx.replicas)})"
            )
    return [v.reshape(r, v.shape[0] // (m * r), m, *v.shape[1:]) for v in carries], r


def pipelined_scan(body: Callable, carry: Any, xs: Any, *, dim: str, name: str) -> tuple[Any, Any]:
    """:func:`meshjax.scan.scan` run as the active context's pipeline (see the module doc)."""
    from meshjax.scan import scan_leaves, scan_unpipelined

    ctx = context.current()
    pipe: Pipeline = ctx.pipeline
    p, m = pipe.stages, pipe.microbatches
    carry_leaves, carry_def, x_leaves, x_def, length = scan_leaves(carry, xs, dim)
    if ctx.mode != "run":
        from meshjax.pipeline.one_f_one_b import capture_or_replay

        return capture_or_replay(ctx, body, carry_leaves, carry_def, x_leaves, x_def, length, dim=dim, name=name)
    check_carries(pipe, carry_leaves, length, name)
    block_name = "/".join([*ctx.scopes, name])

    # Stage params: (L, ...) -> (p, L/p, ...), the stage axis on the new leading dim.
    x_rest = [tuple(d for d in leaf.dims if d != dim) for leaf in x_leaves]
    stacked = [leaf.align_to((dim, *rest)) for leaf, rest in zip(x_leaves, x_rest)]
    stage_xs = [_stage_major(ctx, v.reshape(p, length // p, *v.shape[1:])) for v in stacked]

    # Micro-batches: (B, ...) -> (B/m, m, ...) with micro-batch i = rows i, i+m, ..., and the
    # B/m rows of each split over the data-parallel replicas: (r, B/(m r), m, ...).
    c_dims = [(pipe.batch_dim, *(d for d in leaf.dims if d != pipe.batch_dim)) for leaf in carry_leaves]
    c_full = [leaf.align_to(d) for leaf, d in zip(carry_leaves, c_dims)]
    c_micro, r = split_microbatches(ctx, c_full, name)

    def stage(stage_id, params, state, fresh):
        """One stage on its state; stage 0 first takes the fresh micro-batch."""
        state = [jnp.where(stage_id == 0, f, s) for f, s in zip(fresh, state)]
        xs_stage = jax.tree_util.tree_unflatten(
            x_def, [NamedArray(v, (dim, *rest)) for v, rest in zip(params, x_rest)]
        )
        c_in = jax.tree_util.tree_unflatten(carry_def, [NamedArray(v, d) for v, d in zip(state, c_dims)])
        out, ys = scan_unpipelined(body, c_in, xs_stage, dim=dim, name=name)
        if ys is not None and jax.tree_util.tree_leaves(ys):
            raise ShapeError(f"pipelined scan {name!r}: the body may not return stacked values (y)")
        return [leaf.align_to(d) for leaf, d in zip(jax.tree_util.tree_leaves(out, is_leaf=is_named), c_dims)]

    if pipe.remat:  # keep each slot's input only; the backward pass recomputes the stage
        stage = jax.checkpoint(stage, policy=jax.checkpoint_policies.nothing_saveable)
    run_stages, _ = replicated_stages(ctx, stage)
    stage_ids = _stage_major(ctx, jnp.arange(p))
    # Every replica of a stage gets its own copy of the stage's params (see replicated_stages).
    stage_xs = [_stage_replica_major(ctx, jnp.broadcast_to(v[:, None], (p, r, *v.shape[1:]))) for v in stage_xs]

    def iteration(loop, t):
        state, buffers = loop
        ctx.forget_names_under(block_name)  # every trace of the stage names its tensors afresh
        fresh = [jax.lax.dynamic_index_in_dim(v, jnp.minimum(t, m - 1), axis=3, keepdims=False) for v in inputs]
        state = [_stage_replica_major(ctx, s) for s in run_stages(stage_ids, stage_xs, state, fresh)]
        slot = jnp.clip(t - (p - 1), 0, m - 1)  # the last stage finished micro-batch t - (p - 1)
        buffers = [
            _stage_replica_major(ctx, jax.lax.dynamic_update_index_in_dim(b, s, slot, axis=3))
            for b, s in zip(buffers, state)
        ]
        state = [_stage_replica_major(ctx, _rotate(s)) for s in state]  # stage s -> s + 1
        return (state, buffers), None

    # Every stage holds the micro-batches (no copy: they are replicated over the stage axis);
    # only stage 0 reads them, and the backward pass sums their gradient over the stages once.
    inputs = [_stage_replica_major(ctx, jnp.broadcast_to(v, (p, *v.shape))) for v in c_micro]
    init_state = [_stage_replica_major(ctx, jnp.zeros((p, *v.shape[:2], *v.shape[3:]), v.dtype)) for v in c_micro]
    init_buffers = [_stage_replica_major(ctx, jnp.zeros((p, *v.shape), v.dtype)) for v in c_micro]
    (_, buffers), _ = jax.lax.scan(iteration, (init_state, init_buffers), jnp.arange(pipe.iterations))

    last = (stage_ids == p - 1).reshape(p, *([1] * (buffers[0].ndim - 1))) if buffers else None
    outputs = [jnp.sum(jnp.where(last, b, jnp.zeros_like(b)), axis=0) for b in buffers]  # leaves the last stage
    ctx.forget_names_under(block_name)
    final = []
    with context.scope(name):
        for leaf, d, v in zip(carry_leaves, c_dims, outputs):
            result = NamedArray(v.reshape(v.shape[0] * v.shape[1] * m, *v.shape[3:]), d)
            result = NamedArray(result.align_to(leaf.dims), leaf.dims)
            index = IndexForm(loop=tuple(leaf.sizes.items()), operands=(leaf.dims,), result=leaf.dims)
            final.append(context.emit("scan_carry", [leaf], result, index, name="final_carry", facts=LINEAR))
    return jax.tree_util.tree_unflatten(carry_def, final), None


def staged_layouts(graph: Graph, layouts: Mapping[str, Layout], pipeline: Pipeline) -> dict[str, Layout]:
    """``layouts`` with the stage axis in front on the ``pipeline.dim`` of every param that has it
    (the stacked layer params: each stage's devices hold their contiguous run of layers)."""
    out = dict(layouts)
    for tensor in graph.params:
        if pipeline.dim in tensor.dims and tensor.name in out:
            layout = out[tensor.name]
            out[tensor.name] = Layout(
                layout.dims,
                tuple((pipeline.axis, *a) if d == pipeline.dim else a for d, a in zip(layout.dims, layout.axes)),
            )
    return out


class PipelinedProgram(Program):
    """A :class:`~meshjax.lower.Program` whose scans over ``pipeline.dim`` run pipelined over
    ``pipeline.axis``; ``layouts`` are the in-stage layouts (no tensor uses the stage axis)."""

    def __init__(self, fn, graph, mesh, layouts, operand_layouts, computed_layouts, pipeline: Pipeline):
        if pipeline.axis not in mesh.axis_names:
            raise LayoutError(f"pipeline: mesh axis {pipeline.axis!r} is not in the mesh (axes: {', '.join(mesh.axis_names)})")
        size = dict(zip(mesh.axis_names, mesh.devices.shape))[pipeline.axis]
        if size != pipeline.stages:
            raise LayoutError(f"pipeline: {pipeline.stages} stages need mesh axis {pipeline.axis!r} of size {pipeline.stages}, got {size}")
        super().__init__(fn, graph, mesh, layouts, operand_layouts, computed_layouts)
        self.pipeline = pipeline
        self.replicas = replica_axes(graph, self.layouts, scan_block(graph, pipeline), pipeline)
        self.layouts = staged_layouts(graph, self.layouts, pipeline)
        shape = mesh_shape(self.mesh)
        for name, layout in self.layouts.items():
            validate(graph.tensor(name), layout, shape)

    def pinner(self, mode: str = "run") -> PipelinePinner:
        """A fresh pinner for one run of the function (names start afresh)."""
        pinner = PipelinePinner(
            self.mesh, self.specs, self.operand_specs, self.recomputed, self.computed_specs, pipeline=self.pipeline,
            replicas=self.replicas,
        )
        pinner.reserve(self.graph.signature.names)
        pinner.mode = mode
        return pinner

    def pinned_fn(self) -> Callable:
        """The function with every tensor pinned; its scan runs the forward of the pipeline
        (GPipe's loop: a 1F1B plan's forward alone is the same)."""

        def pinned(params: Any, *args: Any) -> Any:
            with context.active(self.pinner()):
                return self.fn(params, *args)

        return pinned

    def value_and_grad(self) -> Callable | None:
        """``(params, *args) -> (loss, grads)`` for schedules whose backward pass is not JAX's
        transpose of the forward loop (1F1B, :mod:`.one_f_one_b`); None for GPipe."""
        if self.pipeline.schedule != "1f1b":
            return None
        from meshjax.pipeline.one_f_one_b import one_f_one_b

        return one_f_one_b(self)


__all__ = ["PipelinePinner", "PipelinedProgram", "pipelined_scan", "staged_layouts"]
