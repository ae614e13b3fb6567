"""Which activations a training step keeps for its backward pass.

Backprop keeps an op's operands only when its derivative needs them: an einsum needs both
operands, a nonlinearity its input, softmax its output, a norm its input, an embedding lookup
its ids; sums, reshapes, renames, additions and scalings need nothing. Each op declares this when
it is emitted (:class:`~meshjax.graph.OpFacts`). What no op keeps is freed during the forward pass.

A kept tensor is kept in the layout it was made in. When an op computes on an operand in another
layout (a weight gathered under FSDP, a gathered activation) and its backward reads that operand
(:func:`keeps_operand`), the lowering recomputes the reshard in the backward pass instead of
keeping the copy (see :mod:`meshjax.lower`), and the cost model charges the second reshard.

Example::

    >>> import meshjax as mj
    >>> from meshjax import models
    >>> ex = models.example("mlp-tiny", abstract=True)
    >>> graph = mj.trace(ex.loss, ex.params, *ex.batch)
    >>> sorted(saved_for_backward(graph))   # gelu's input, the second matmul's input, square's input
    ['error', 'mlp/act', 'mlp/hidden']
    >>> kept_copies(graph)["mlp/act"]       # itself and the tanh of gelu's approximation
    2
    >>> keeps_operand(graph.producer["mlp/out"], 0), keeps_operand(graph.producer["mlp/residual"], 0)
    (True, False)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from meshjax.cost.strategies import Strategy, per_device_bytes
from meshjax.graph import Graph, Op
from meshjax.layout import Layout


def extra_residuals(op: Op, graph: Graph | None = None) -> float:
    """How many tensors of its result's size ``op``'s backward keeps besides its operands (in a
    scan, every residual JAX saves is stacked: ``OpFacts.scan_residuals``)."""
    return op.facts.residuals_in(graph is not None and in_loop(op, graph))


def kept_operands(op: Op) -> tuple[int, ...]:
    """Positions of the operands ``op``'s backward pass reads (declared by the op)."""
    return () if op.facts.saves_result else op.facts.saves


def keeps_operand(op: Op, position: int) -> bool:
    """Whether ``op``'s backward pass reads its operand at ``position``.
    """
    return position in kept_operands(op)


# Ops linear in each operand: the backward reads an operand only for the other operands' gradients.
_MULTILINEAR = {"einsum"}


def backward_reads(op: Op, position: int, graph: Graph) -> bool:
    """Whether a training step's backward pass reads ``op``'s operand at ``position``: the op
    keeps it and a gradient that needs it is computed. An einsum reads each operand only for
    the others' gradients (``x @ w`` with ``x`` an input never reads ``w`` again)."""
    if not keeps_operand(op, position) or op.output not in graph.requires_grad:
        return False
    if op.kind in _MULTILINEAR:
        return any(name in graph.requires_grad for j, name in enumerate(op.inputs) if j != position)
    return True


def kept_by(op: Op, graph: Graph) -> set[str]:
    """Tensors ``op``'s backward pass reads."""
    if op.facts.saves_result:
        return {op.output}
    kept = {op.inputs[i] for i in kept_operands(op)}
    return kept | {op.output} if op.facts.also_saves_result else kept


def saved_for_backward(graph: Graph) -> frozenset[str]:
    """Activations (not params or inputs) a training step keeps until the backward pass."""
    saved: set[str] = set()
    for op in graph.ops:
        saved |= kept_by(op, graph)
    # A scan's slice of a stacked param or input is read back from the stacked array (JAX
    # forwards such residuals instead of stacking a copy): not kept a second time.
    return frozenset(
        name for name in saved
        if graph.tensors[name].role in ("activation", "output") and name in graph.requires_grad
        and name not in graph.sliced_from
    )


def kept_copies(graph: Graph) -> dict[str, float]:
    """Activation name -> how many tensors of its size a training step keeps for the backward
    pass: itself when some op's backward reads it, plus its producer's extra residuals.
    """
    saved = saved_for_backward(graph)
    out = {}
    for op in graph.ops:
        count = (op.output in saved) + (extra_residuals(op, graph) if op.output in graph.requires_grad else 0)
        if count:
            out[op.output] = count
    return out


def _nbytes(graph: Graph, name: str, layout: Layout, mesh_shape: Mapping[str, int]) -> float:
    return per_device_bytes(graph.tensors[name], layout, mesh_shape)


def _result_bytes(graph: Graph, op: Op, result: Layout, computed: Layout | None, mesh_shape: Mapping[str, int]) -> float:
    out = _nbytes(graph, op.output, result, mesh_shape)
    if computed is not None:  # whole partial sums before a reduce-scatter
        out = max(out, _nbytes(graph, op.output, computed, mesh_shape))
    return out


def working_set(
    op: Op, graph: Graph, result: Layout, operands: Sequence[Layout], mesh_shape: Mapping[str, int],
    computed: Layout | None = None,
) -> float:
    """Bytes per device an op needs beyond what stays resident: its result (as computed, before
    a reduce-scatter shrinks it) and its activation operands in the layouts it computes in
    (params and inputs are resident already), plus the scratch the op declares
    (``OpFacts.forward_scratch``).

    In inference, the peak is the largest working set of any op.
    """
    total = _result_bytes(graph, op, result, computed, mesh_shape) * (1 + op.facts.forward_scratch)
    for name, layout in zip(op.inputs, operands):
        if graph.tensors[name].role in ("activation", "output"):
            total += _nbytes(graph, name, layout, mesh_shape)
    return total


def updated_gradients(op: Op, graph: Graph, strategy: Strategy, mesh_shape: Mapping[str, int]) -> float:
    """Bytes per device (one instance) of the gradients ``op``'s backward makes for the params it
    reads directly (not a scan's slices) that no split loop dim sums, in the layouts it computes
    on them.

    Such a gradient goes straight into its optimizer update, which XLA fuses after the
    gradient's dot: it lives only while this op's backward runs (measured on XLA:CPU: a
    replicated ``mlp-tiny`` held one weight gradient at a time). One summed over a loop dim the
    strategy splits (data parallelism, a split sequence) waits for the step's combined
    all-reduce instead: the end-of-step sync counts it (:func:`gradient_sync`), beside every
    other weight's, when the backward pass has freed the activations behind it.
    """
    if op.facts.slices:  # a scan's slice of a stacked param: the stacked gradient is the param's own
        return 0.0
    assign = dict(strategy.assign)
    return sum(
        per_device_bytes(graph.tensors[name], layout, mesh_shape)
        for name, dims, layout in zip(op.inputs, op.index.operands, strategy.operand_layouts)
        if graph.tensors[name].role == "param" and graph.needs_grad(name) and not _summed(op, dims, assign)
    )


def _summed(op: Op, dims: Sequence[str], assign: Mapping[str, tuple[str, ...]]) -> bool:
    """Whether the gradient of an operand walking loop ``dims`` sums over a split loop dim."""
    return any(assign.get(d) for d in op.index.loop_sizes if d not in dims)


def gradient_sync(op: Op, graph: Graph, strategy: Strategy, mesh_shape: Mapping[str, int]) -> tuple[float, float]:
    """Bytes per device (one instance, one trip) of the weight gradients ``op``'s backward makes,
    while they are summed: ``(in the loop, at the end of the step)``.

    A weight (a param, or a scan's slice of one) whose gradient sums over a loop dim the
    strategy splits (data parallelism, a split sequence) gets it as whole partial sums in the
    layout the op computes on it (an FSDP weight's gathered one). XLA's all-reduce combiner
    merges the syncs of a scan body into one all-reduce per trip, and every other weight's
    into one at the end of the backward pass; each holds its operands (the partial sums) and
    its results (XLA:CPU all-reduces whole, then slices: the results are as large) at once. A
    weight not summed is counted in the end-of-step sync too (its gradient as computed),
    where it is alive beside the others.
    """
    assign = dict(strategy.assign)
    in_loop = at_end = 0.0
    for name, dims, layout in zip(op.inputs, op.index.operands, strategy.operand_layouts):
        tensor = graph.tensors[name]
        if not graph.needs_grad(name) or (tensor.role != "param" and name not in graph.sliced_from):
            continue
        nbytes = per_device_bytes(tensor, layout, mesh_shape)
        summed = _summed(op, dims, assign)
        if tensor.role == "param":
            at_end += 2 * nbytes if summed else nbytes
        elif summed:
            in_loop += 2 * nbytes
    return in_loop, at_end


def backward_working_set(
    op: Op, graph: Graph, result: Layout, operands: Sequence[Layout], mesh_shape: Mapping[str, int],
    computed: Layout | None = None,
) -> float:
    """Bytes per device an op's backward pass holds beyond what stays resident: the cotangent of
    its result (gathered back to the layout it was computed in, after a reduce-scatter), one
    temporary of that size, and what the op declares: its scratch
    (``OpFacts.backward_scratch``) and, for a fused kernel, its operands' gradients.

    Outside a loop, the operands it reads are resident already: kept activations and the params
    and inputs themselves, or, read in another layout than they are kept in, a copy the step
    holds to its end (an FSDP weight gathered again: XLA:CPU keeps it until the optimizer
    update; :func:`resident_copy`). Inside a scan a trip's copy lives only through that trip,
    so the operands it reads are counted here, in the layouts it computes in. A weight
    gradient that goes straight into its update (:func:`updated_gradients`) is the caller's to
    add.

    In training, the peak on top of what is resident is the largest of these over the ops.
    """
    total = _result_bytes(graph, op, result, computed, mesh_shape) * (2 + op.facts.backward_scratch)
    if in_loop(op, graph):
        for i in kept_operands(op):
            if graph.tensors[op.inputs[i]].role != "constant":
                total += _nbytes(graph, op.inputs[i], operands[i], mesh_shape)
    if op.facts.holds_operand_gradients:
        total += sum(_nbytes(graph, name, layout, mesh_shape) for name, layout in zip(op.inputs, operands))
    return total


def held_cotangent(
    op: Op, graph: Graph, result: Layout, mesh_shape: Mapping[str, int], computed: Layout | None = None,
) -> float:
    """Bytes per device of the cotangent of ``op``'s result that the backward pass holds for the
    op's weight gradient, in a model of unrolled layers.

    XLA:CPU's scheduler computes such a model's weight gradients (dots, layer-norm reductions)
    after the rest of its backward pass, holding the cotangents they are made from, and frees
    meanwhile the activations of the layers done that only activation gradients read. At the
    backward pass's peak (the first layer's backward) the two leave about one layer's
    cotangents on top of all kept activations (live ranges of ``gpt-tiny`` and ``gpt-small``:
    per layer done, the MLP-hidden, q, k, v and norm cotangents), so the caller counts one
    instance per layer, not every layer's. With one block the schedule makes its weight
    gradients at once (``block-tiny``); inside a scan, each trip's with the trip. Not measured
    on an accelerator's scheduler.
    """
    if in_loop(op, graph) or op.facts.slices or not unrolled_layers(graph):
        return 0.0
    if not any(graph.tensors[name].role == "param" and graph.needs_grad(name) for name in op.inputs):
        return 0.0
    return _result_bytes(graph, op, result, computed, mesh_shape)


def unrolled_layers(graph: Graph) -> bool:
    """Whether ``graph`` repeats a block unrolled (two or more layers)."""
    return any(block.kind == "unrolled" and block.trip_count >= 2 for block in graph.blocks.values())


def in_loop(op: Op, graph: Graph) -> bool:
    """Whether ``op`` runs in a scan's body."""
    return op.block is not None and graph.blocks[op.block].kind == "scan"


def resident_copy(op: Op, position: int, graph: Graph) -> bool:
    """Whether the step holds a copy of ``op``'s operand at ``position`` to its end when the op
    reads it in another layout than it is kept in: its backward reads it, outside a loop
    (:func:`backward_working_set`)."""
    return backward_reads(op, position, graph) and not in_loop(op, graph)
