"""Gradient accumulation: a training step as ``k`` micro-batches of the global batch.

The step runs the loss and its gradient on one micro-batch at a time (a scan inside the jitted
step, :mod:`meshjax.train`) and sums the gradients, so activations of one micro-batch live at a
time. The solver prices such a step on the graph of one micro-batch (:func:`split_batch`): every
tensor with the batch dim has ``1/k`` of its rows, and the step runs it ``k`` times. Gradient
all-reduces stay inside each micro-step (XLA's partitioner reduces a gradient where its matmul
sums over the sharded batch, inside the loop body), so they run ``k`` times; the optimizer
update runs once.

Example::

    >>> import meshjax as mj
    >>> from meshjax import models
    >>> ex = models.example("gpt-tiny", abstract=True)
    >>> graph = mj.trace(ex.loss, ex.params, *ex.batch)
    >>> split_batch(graph, 4).tensors["tokens"].shape, graph.tensors["tokens"].shape
    ((2, 16), (8, 16))
"""

from __future__ import annotations

from dataclasses import replace

from meshjax.errors import MeshjaxError
from meshjax.cost.strategies import per_device_bytes
from meshjax.graph import Graph, Tensor
from meshjax.layout import Layout

BATCH_DIM = "batch"


def batch_size(graph: Graph, dim: str = BATCH_DIM) -> int:
    """The global batch: the size of ``dim`` in the graph's inputs."""
    sizes = {t.sizes[dim] for t in graph.inputs if dim in t.dims}
    if len(sizes) != 1:
        raise MeshjaxError(f"micro-batches: the inputs must share one {dim!r} dim; sizes found: {sorted(sizes) or 'none'}")
    return sizes.pop()


def candidates(graph: Graph, dim: str = BATCH_DIM) -> list[int]:
    """Every micro-batch count the global batch allows (its divisors), ascending."""
    n = batch_size(graph, dim)
    return [k for k in range(1, n + 1) if n % k == 0]


def split_batch(graph: Graph, k: int, dim: str = BATCH_DIM) -> Graph:
    """The graph of one of ``k`` micro-batches: ``dim`` has ``1/k`` of its size everywhere, and
    every op's flops scale with it."""
    if k == 1:
        return graph
    n = batch_size(graph, dim)
    if k < 1 or n % k:
        raise MeshjaxError(f"micro-batches {k}: must divide the global batch {n} (dim {dim!r})")
    micro = n // k
    tensors = {}
    for name, t in graph.tensors.items():
        if dim in t.dims:
            if t.role in ("param", "constant"):
                raise MeshjaxError(f"micro-batches: {t.role} {name!r} has the batch dim {dim!r}; only data can be split")
            shape = tuple(micro if d == dim else s for d, s in zip(t.dims, t.shape))
            t = replace(t, shape=shape)
        tensors[name] = t
    ops = []
    for op in graph.ops:
        index = op.index
        loop = dict(index.loop)
        if dim in loop:
            if loop[dim] != n:
                raise MeshjaxError(f"micro-batches: op {op.name!r} has {dim!r} of size {loop[dim]}, not the batch {n}")
            loop[dim] = micro
            index = replace(index, loop=tuple(loop.items()), flops=index.flops / k)
        ops.append(replace(op, index=index))
    return Graph(tensors, ops, dict(graph.blocks), graph.outputs, graph.signature, graph.out_tree)


def global_shape(tensor: Tensor, k: int, dim: str = BATCH_DIM) -> tuple[int, ...]:
    """The shape of an input of the micro-batch graph in the global batch."""
    return tuple(s * k if d == dim else s for d, s in zip(tensor.dims, tensor.shape))


def accumulator_bytes(param: Tensor, layout: Layout, mesh_shape) -> float:
    """Bytes per device of a param's gradient accumulator: float32, in the param's layout."""
    return per_device_bytes(param, layout, mesh_shape) * 4 / param.itemsize
