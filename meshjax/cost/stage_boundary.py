"""Where a pipeline's stages meet the rest of the model.

A pipelined plan is solved on the whole mesh, stage axis included. The tensors of the layer
scan (each stage's, computed inside the ``vmap`` over the stage axis) and the stacked layer
params (whose ``layers`` dim the stage axis splits) stay off the stage axis
(:func:`off_stage`); everything outside the scan (a decoder's embedding, final norm, head and
loss) may use it like any other axis, so each stage does ``1/p`` of that work and holds ``1/p``
of those weights and their optimizer state wherever the solver finds it pays.

The scan's carry crosses between the two once per step each way (1F1B: the output once per
micro-batch). The initial carry stays off the stage axis: it enters every stage as it is (only
stage 0 reads it) and its gradient is summed over the stages by one all-reduce. The final carry
leaves the last stage by one all-reduce, the other stages adding zeros
(:func:`meshjax.cost.pipeline.pipeline_cost` prices both); its layout is the in-stage carry's,
to which it may add the stage axis (each stage then keeps its slice of the all-reduced result,
and the backward pass all-gathers the cotangent over the stage axis: the ordinary reshard
edge). Other layouts of the final carry are excluded: XLA moves the carry over the stage and
the other axes together there, in ways the reshard edge does not price. The ops reading the
final carry, or making the initial carry's inputs, may split over the stage axis like any
other; the crossings themselves are priced once per crossing (:func:`price_crossings`: the
stage graph's edges would charge the entering carry every time slot, and the leaving carry at
a micro-batch's size).

Example::

    >>> from meshjax.layout import Layout
    >>> in_stage(Layout(("batch", "embed"), (("data", "stage"), ("model",))), "stage")
    Layout(dims=('batch', 'embed'), axes=(('data',), ('model',)))
"""

from __future__ import annotations

import numpy as np

from meshjax.cost.strategies import reshard
from meshjax.graph import Graph, Op
from meshjax.layout import Layout


def in_stage(layout: Layout, axis: str) -> Layout:
    """``layout`` without the stage ``axis``: how one stage holds the tensor."""
    return Layout(layout.dims, tuple(tuple(a for a in axes if a != axis) for axes in layout.axes))


def off_stage(graph: Graph, block: str, axis: str, dim: str) -> dict[str, frozenset[str]]:
    """:attr:`Constraints.avoid <meshjax.solver.problem.Constraints.avoid>` of a pipelined stage
    graph: every tensor made in the scan ``block`` (and so the operands of its ops), every
    stacked param (with ``dim``) and the scan's initial carries stay off ``axis``."""
    off = frozenset({axis})
    out = {op.output: off for op in graph.ops if op.block == block}
    out.update({t.name: off for t in graph.params if dim in t.dims})
    out.update({op.inputs[0]: off for op in graph.ops if op.kind == "loop_carry" and op.block == block})
    return out


def off_stage_after(graph: Graph, axis: str) -> dict[str, frozenset[str]]:
    """What keeps a 1F1B stage graph's head (its :data:`~meshjax.pipeline.stage_graph.AFTER`
    block, run once per micro-batch) off ``axis``: every tensor it makes and every operand of
    its ops, the head's weights among them."""
    from meshjax.pipeline.stage_graph import AFTER

    off = frozenset({axis})
    ops = [op for op in graph.ops if op.block == AFTER]
    return {name: off for op in ops for name in (op.output, *op.inputs)}


def is_crossing(graph: Graph, consumer: Op, operand: int, block: str) -> bool:
    """Whether ``consumer``'s ``operand`` carries the scan ``block``'s carry in (the loop's
    initial carry) or out (its final carry)."""
    if consumer.kind == "loop_carry" and consumer.block == block:
        return operand == 0
    if consumer.kind == "scan_carry":
        producer = graph.producer.get(consumer.inputs[0])
        return producer is not None and producer.block == block
    return False


def price_crossings(problem, block: str, axis: str, cache: dict | None = None) -> None:
    """Re-price the edges of ``problem`` (a stage graph's, in place) where the scan's carry
    crosses: once per step (per micro-batch where the consumer runs per micro-batch), at the
    size of the tensor outside the scan; a final carry whose layout is not the in-stage
    carry's, less the stage ``axis``, is excluded. ``cache``: shared by problems on the same
    mesh and hardware."""
    graph = problem.graph
    cache = {} if cache is None else cache
    for e in problem.edges:
        consumer = problem.nodes[e.dst].op
        if consumer is None or not is_crossing(graph, consumer, e.operand, block):
            continue
        entering = consumer.kind == "loop_carry"
        tensor = e.tensor if entering else graph.tensors[consumer.output]
        e.multiplicity = 1 if entering else graph.trip_count(consumer.block)
        e.tensor = tensor
        e.src_layouts = [Layout(tensor.dims, l.axes) for l in e.src_layouts]
        e.dst_layouts = [Layout(tensor.dims, l.axes) for l in e.dst_layouts]
        key = ("crossing", entering, axis, tensor.dims, tensor.shape, tensor.dtype, tuple(l.axes for l in e.src_layouts),
               tuple(l.axes for l in e.dst_layouts), problem.train, e.needs_grad, e.recompute)
        if key not in cache:
            cache[key] = np.array([
                [np.inf if not entering and in_stage(b, axis) != a else
                 reshard(tensor, a, b, problem.mesh_shape, problem.hardware, train=problem.train, needs_grad=e.needs_grad,
                         recompute=e.recompute)[0] for b in e.dst_layouts]
                for a in e.src_layouts
            ])
        e.cost = cache[key] * e.multiplicity


__all__ = ["in_stage", "is_crossing", "off_stage", "off_stage_after", "price_crossings"]
