"""Which activations a training step keeps for its backward pass.

Backprop keeps an op's operands only when its derivative needs them: an einsum needs both
operands, a nonlinearity its input, softmax its output, a norm its input; sums, reshapes,
renames, additions and scalings need nothing. What no op keeps is freed during the forward pass.

Example::

    >>> sorted(saved_for_backward(graph))            # doctest: +SKIP
    ['block_0/attn/ln', 'block_0/attn/probs', 'block_0/mlp/hidden', ...]
"""

from __future__ import annotations

from meshjax.graph import Graph, Op

# Ops whose backward pass needs none of their operands.
LINEAR = frozenset(
    {
        "add", "subtract", "negative", "cast", "rename", "split_dim", "merge_dims", "slice", "stack",
        "loop_carry", "scan_carry", "arange", "greater_equal", "sum", "mean", "where",
    }
)
# Ops whose derivative is written in terms of their own result.
KEEP_RESULT = frozenset({"softmax", "exp", "tanh", "sigmoid", "sqrt", "rsqrt"})


def kept_by(op: Op, graph: Graph) -> set[str]:
    """Tensors ``op``'s backward pass reads."""
    if op.kind in LINEAR:
        return set()
    if op.kind in KEEP_RESULT:
        return {op.output}
    if op.kind in ("multiply", "divide") and len(op.inputs) == 1:
        return set()  # scaled by a Python number
    return set(op.inputs)


def saved_for_backward(graph: Graph) -> frozenset[str]:
    """Activations (not params or inputs) a training step keeps until the backward pass."""
    saved: set[str] = set()
    for op in graph.ops:
        saved |= kept_by(op, graph)
    return frozenset(
        name for name in saved
        if graph.tensors[name].role in ("activation", "output") and name in graph.requires_grad
    )
