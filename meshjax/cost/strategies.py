"""How an op can run on a mesh, and what each way costs.

A *strategy* assigns each mesh axis to at most one loop dim of the op's
:class:`~meshjax.graph.IndexForm` (or to none). It fixes the layout each operand must arrive in,
the layout of the result, the collectives the op itself needs (partial sums over split reduced
dims, statistics of softmax/norms, and with ``train=True`` the partial gradients of the
backward pass) and the compute time per device. Moving a tensor between the layout its producer
made and the layout a consumer needs is a :func:`reshard`.

Example::

    >>> import meshjax as mj
    >>> from meshjax.cost.hardware import PROFILES
    >>> sizes = {"batch": 32, "embed": 16, "mlp": 16}
    >>> def f(params, x):
    ...     return mj.einsum("batch embed, embed mlp -> batch mlp", x, params["w"], name="h")
    >>> graph = mj.trace(f, mj.abstract_params({"w": mj.param("embed mlp")}, sizes), mj.abstract("batch embed", sizes))
    >>> strategies = op_strategies(graph.producer["h"], graph, {"model": 8}, PROFILES["h100-node"])
    >>> sorted({s.label for s in strategies})      # model on one loop dim, or on none
    ['batch:model', 'embed:model', 'mlp:model', 'replicated']
    >>> [str(s.result_layout) for s in strategies if s.label == "embed:model"]   # all-reduce or reduce-scatter
    ['[batch, mlp]', '[batch:model, mlp]', '[batch, mlp:model]']
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass


from meshjax.cost.collectives import Collective, time_of
from meshjax.cost.hardware import Hardware
from meshjax.graph import Graph, Op, Tensor
from meshjax.layout import Layout, MeshShape

@dataclass(frozen=True)
class Strategy:
    """One way to run an op."""

    assign: tuple[tuple[str, tuple[str, ...]], ...]  # loop dim -> mesh axes (split dims only)
    operand_layouts: tuple[Layout, ...]
    result_layout: Layout
    collectives: tuple[Collective, ...]
    comm_time: float
    compute_time: float
    # The layout the op computes its result in, before a reduce-scatter or gather moves it to
    # ``result_layout`` (a split contraction makes whole partial sums first). Where the two
    # differ, lowering pins it first, so XLA sums or gathers the result where the plan does
    # (rather than, say, gathering an operand).
    computed_layout: Layout | None = None

    @property
    def time(self) -> float:
        return self.comm_time + self.compute_time

    @property
    def label(self) -> str:
        return ", ".join(f"{d}:{'+'.join(a)}" for d, a in self.assign) or "replicated"


def _layout_for(tensor_dims: tuple[str, ...], loop_dims: tuple[str, ...], assign: Mapping[str, tuple[str, ...]]) -> Layout:
    return Layout(tuple(tensor_dims), tuple(assign.get(ld, ()) for ld in loop_dims))


def per_device_bytes(tensor: Tensor, layout: Layout, mesh_shape: MeshShape) -> float:
    return tensor.nbytes / math.prod(mesh_shape[a] for a in layout.used_axes)


def enumerate_assignments(
    loop: Mapping[str, int], mesh_shape: MeshShape, whole: tuple[str, ...] = ()
) -> list[dict[str, tuple[str, ...]]]:
    """Every way to give each mesh axis to at most one splittable loop dim, with divisibility.
    Axes on one dim keep mesh order."""
    axes = [a for a, n in mesh_shape.items() if n > 1]
    targets = [None, *(d for d in loop if d not in whole)]
    out = []
    for choice in itertools.product(targets, repeat=len(axes)):
        assign: dict[str, tuple[str, ...]] = {}
        for axis, dim in zip(axes, choice):
            if dim is not None:
                assign[dim] = (*assign.get(dim, ()), axis)
        if all(loop[d] % math.prod(mesh_shape[a] for a in ax) == 0 for d, ax in assign.items()):
            out.append(assign)
    return out


def enumerate_layouts(tensor: Tensor, mesh_shape: MeshShape) -> list[Layout]:
    """Every valid layout of a tensor (each axis at most once, divisibility)."""
    loop = dict(zip(tensor.dims, tensor.shape))
    return [_layout_for(tensor.dims, tensor.dims, a) for a in enumerate_assignments(loop, mesh_shape)]


@dataclass(frozen=True)
class ParamOption:
    """Where a param lives (``layout``) and where its optimizer state lives (``state``).
    ``state`` extends ``layout`` with more mesh axes for ZeRO-1 style sharding: the gradient is
    reduce-scattered into it, the update runs there, and the new param is all-gathered back to
    ``layout``."""

    layout: Layout
    state: Layout

    def __str__(self) -> str:
        return str(self.layout) if self.state == self.layout else f"{self.layout} state {self.state}"


def state_layouts(tensor: Tensor, layout: Layout, mesh_shape: MeshShape) -> list[Layout]:
    """``layout`` itself, then each valid layout that keeps ``layout``'s axes as the leading axes
    of every dim and adds mesh axes it does not use."""
    out = [layout]
    for candidate in enumerate_layouts(tensor, mesh_shape):
        if candidate == layout:
            continue
        if all(c[: len(a)] == a for c, a in zip(candidate.axes, layout.axes)):
            out.append(candidate)
    return out


def zero_sync_time(tensor: Tensor, option: ParamOption, mesh_shape: MeshShape, hw: Hardware) -> float:
    """Extra time of a sharded state over a state laid out like its param: a reduce-scatter of
    the gradient plus an all-gather of the new param, instead of one all-reduce, plus the launch
    of one more collective."""
    extra = tuple(a for a in mesh_shape if a in option.state.used_axes and a not in option.layout.used_axes)
    if not extra:
        return 0.0
    full = per_device_bytes(tensor, option.layout, mesh_shape)
    shard = per_device_bytes(tensor, option.state, mesh_shape)
    gather = time_of(Collective("all-gather", extra, full), mesh_shape, hw)
    scatter = time_of(Collective("reduce-scatter", extra, shard), mesh_shape, hw)
    reduce = time_of(Collective("all-reduce", extra, full), mesh_shape, hw)
    return max(0.0, gather + scatter - reduce) + max(hw.link(mesh_shape, a).latency for a in extra)


def _axis_groups(dims, assign: Mapping[str, tuple[str, ...]], mesh_shape: MeshShape) -> list[tuple[str, ...]]:
    """The mesh axes of each of ``dims`` that carries any, one group per dim. XLA's SPMD
    partitioner sums a partial result over each split contracting dim in turn: one all-reduce
    per dim, each of the whole result, not one all-reduce over all their axes."""
    return [tuple(a for a in mesh_shape if a in assign[d]) for d in dims if assign.get(d)]


def op_strategies(op: Op, graph: Graph, mesh_shape: MeshShape, hw: Hardware, *, train: bool = False) -> list[Strategy]:
    """Every strategy of ``op`` with its own (not resharding) costs, per single execution.

    Parameter-gradient all-reduces pay a share of the latency only: XLA's all-reduce combiner
    merges a step's gradient syncs into a few large collectives (a scanned layer's, summed over
    its trips, as much as an unrolled one's).
    """
    grad_latency_share = 1.0 / max(1, len(graph.params))
    index = op.index
    loop = index.loop_sizes
    result_tensor = graph.tensors[op.output]
    operand_tensors = [graph.tensors[n] for n in op.inputs]
    peak = hw.peak_flops(result_tensor.dtype if result_tensor.dtype != "bool" else "float32")
    # XLA reshards on the cheaper side of an op: when the result is smaller than an operand it
    # computes in the operand's layout and gathers the result. Offer those strategies too.
    shrinks = 2 * result_tensor.nbytes <= max((t.nbytes for t in operand_tensors), default=0)
    strategies = []
    for assign in enumerate_assignments(loop, mesh_shape, index.whole):
        partial_groups = _axis_groups(index.reduced, assign, mesh_shape)
        partial = tuple(a for a in mesh_shape if any(a in g for g in partial_groups))  # mesh order
        kept = {d: ax for d, ax in assign.items() if d not in index.reduced}
        operand_layouts = tuple(
            _layout_for(t.dims, dims, assign) for t, dims in zip(operand_tensors, index.operands)
        )
        n_split = math.prod(mesh_shape[a] for ax in assign.values() for a in ax)
        compute = index.flops / n_split / peak * (3 if train else 1)
        base = _layout_for(result_tensor.dims, index.result, kept)
        result_bytes = per_device_bytes(result_tensor, base, mesh_shape)
        fixed: list[Collective] = []
        for dim, count in index.stats:
            axes = assign.get(dim, ())
            if axes:
                stat_bytes = result_bytes / (loop[dim] / math.prod(mesh_shape[a] for a in axes))
                stat_bytes *= 4 / result_tensor.itemsize  # statistics are kept in float32
                fixed += [Collective("all-reduce", axes, stat_bytes)] * (count * (2 if train else 1))
        if train:
            for t, dims, layout in zip(operand_tensors, index.operands, operand_layouts):
                grad_groups = _axis_groups([d for d in loop if d not in dims], assign, mesh_shape)
                if grad_groups and graph.needs_grad(t.name):
                    share = 1.0
                    if t.role == "param":
                        share = grad_latency_share
                    elif t.name in graph.sliced_from:
                        # A scanned layer's weight gradient: XLA combines the per-trip syncs
                        # into the stacked gradient's, so the trips share one latency.
                        share = grad_latency_share / graph.trip_count(t.block)
                    nbytes = per_device_bytes(t, layout, mesh_shape)
                    fixed += [Collective("all-reduce", axes, nbytes, latency_share=share) for axes in grad_groups]
        options: list[tuple[Layout, list[Collective]]] = []
        if not partial:
            options.append((base, []))
        else:
            sums = [Collective("all-reduce", axes, result_bytes) for axes in partial_groups]
            options.append((base, sums * index.partial_results))
            factor = math.prod(mesh_shape[a] for a in partial)
            if index.reduction == "sum":
                for k, ld in enumerate(index.result):
                    have = kept.get(ld, ())
                    if ld in index.whole or result_tensor.shape[k] % (math.prod(mesh_shape[a] for a in have) * factor):
                        continue
                    scattered = dict(kept)
                    scattered[ld] = (*have, *partial)
                    layout = _layout_for(result_tensor.dims, index.result, scattered)
                    if hw.fuses_reduce_scatter:
                        colls = [Collective("reduce-scatter", partial, result_bytes / factor)]
                    else:
                        colls = list(sums)
                    if train:  # the backward pass needs the whole cotangent back: all-gather it
                        colls.append(Collective("all-gather", partial, result_bytes))
                    # Lowering pins the summed result before slicing it (a compiler that fuses
                    # reduce-scatters makes one of the pair), so XLA sums where the plan does
                    # rather than, say, gathering a vocab-split table for a lookup.
                    options.append((layout, colls))
        if shrinks:
            options += _gathered_after(options, result_tensor, mesh_shape)
        for layout, colls in options:
            all_colls = tuple(colls + fixed)
            comm = sum(time_of(c, mesh_shape, hw) for c in all_colls)
            strategies.append(
                Strategy(
                    assign=tuple((d, assign[d]) for d in loop if d in assign),
                    operand_layouts=operand_layouts,
                    result_layout=layout,
                    collectives=all_colls,
                    comm_time=comm,
                    compute_time=compute,
                    computed_layout=base,
                )
            )
    return strategies


def _kept_axes(src: Layout, dst: Layout) -> set[str]:
    """Axes that stay put: on the same dim, within the common leading run of that dim's axes
    (``batch:data+model`` and ``batch:model+data`` hold different shards on each device)."""
    kept: set[str] = set()
    for a_src, a_dst in zip(src.axes, dst.axes):
        for x, y in zip(a_src, a_dst):
            if x != y:
                break
            kept.add(x)
    return kept


def _moves(tensor: Tensor, src: Layout, dst: Layout, mesh_shape: MeshShape) -> list[Collective]:
    kept = _kept_axes(src, dst)
    src_axes = {a for ax in src.axes for a in ax} - kept
    dst_axes = {a for ax in dst.axes for a in ax} - kept
    moved = tuple(a for a in mesh_shape if a in src_axes and a in dst_axes)
    gathered = tuple(a for a in mesh_shape if a in src_axes and a not in dst_axes)
    src_bytes = per_device_bytes(tensor, src, mesh_shape)
    colls = []
    if moved:
        # Same axes, new places: one all-to-all when an axis changes dim, else a permutation.
        dim_of = lambda layout, a: next(d for d, ax in zip(layout.dims, layout.axes) if a in ax)  # noqa: E731
        kind = "all-to-all" if any(dim_of(src, a) != dim_of(dst, a) for a in moved) else "collective-permute"
        colls.append(Collective(kind, moved, src_bytes))
    if gathered:
        colls += _all_gathers(src, set(gathered), src_bytes, mesh_shape)
    return colls


def _all_gathers(src: Layout, gathered: set[str], src_bytes: float, mesh_shape: MeshShape) -> list[Collective]:
    """All-gathers of ``gathered`` axes out of layout ``src`` (``src_bytes`` per device). XLA
    gathers one tensor dim at a time, the last dim first, each gather's result the product of
    the ones before: ``[mlp:model, embed:data] -> []`` is a gather over ``data`` then one over
    ``model``, ``[mlp:data+model, embed] -> []`` a single gather over both."""
    colls = []
    nbytes = src_bytes
    for axes in reversed(src.axes):
        group = tuple(a for a in mesh_shape if a in axes and a in gathered)
        if group:
            nbytes *= math.prod(mesh_shape[a] for a in group)
            colls.append(Collective("all-gather", group, nbytes))
    return colls


def _gathered_after(
    options: list[tuple[Layout, list[Collective]]], result: Tensor, mesh_shape: MeshShape
) -> list[tuple[Layout, list[Collective]]]:
    """Each option followed by an all-gather of some of its result's axes."""
    out = []
    for layout, colls in options:
        used = [a for a in mesh_shape if a in layout.used_axes]
        for k in range(1, len(used) + 1):
            for gathered in itertools.combinations(used, k):
                kept = Layout(layout.dims, tuple(tuple(a for a in ax if a not in gathered) for ax in layout.axes))
                if any(full[: len(ax)] != ax for ax, full in zip(kept.axes, layout.axes)):
                    continue  # only trailing axes of a dim gather into contiguous blocks
                gathers = _all_gathers(layout, set(gathered), per_device_bytes(result, layout, mesh_shape), mesh_shape)
                out.append((kept, [*colls, *gathers]))
    return out


def reshard(
    tensor: Tensor,
    src: Layout,
    dst: Layout,
    mesh_shape: MeshShape,
    hw: Hardware,
    *,
    train: bool = False,
    needs_grad: bool = True,
    recompute: bool = False,
) -> tuple[float, tuple[Collective, ...]]:
    """Time and collectives to move ``tensor`` from layout ``src`` to ``dst``.

    An axis that splits the same dim in both costs nothing; one that moves to another dim is an
    all-to-all; one that ``dst`` drops is an all-gather; one only ``dst`` has is a local slice.
    With ``train=True`` (and ``needs_grad``) the cotangent makes the trip back, ``dst -> src``:
    the backward of a free slice is an all-gather. With ``train=True`` and ``recompute`` (the
    consumer's backward reads the operand) the backward pass makes the move again: tensors are
    kept in the layout they were made in, never as resharded copies (FSDP re-gathers weights).
    """
    if src == dst:
        return 0.0, ()
    colls = _moves(tensor, src, dst, mesh_shape)
    if train and recompute:
        colls += colls
    if train and needs_grad:
        colls += _moves(tensor, Layout(src.dims, dst.axes), Layout(dst.dims, src.axes), mesh_shape)
    time = sum(time_of(c, mesh_shape, hw) for c in colls)
    return time, tuple(colls)
