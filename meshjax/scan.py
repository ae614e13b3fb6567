"""A scan over a stacked dim (``layers``): the repeated block is traced, costed and laid out once.

Example::

    >>> import jax.numpy as jnp
    >>> import meshjax as mj
    >>> def block(h, w):
    ...     h = mj.relu(mj.einsum("batch embed, embed hidden -> batch hidden", h, w))
    ...     return mj.rename(h, {"hidden": "embed"}), None
    >>> x = mj.named(jnp.ones((2, 4)), "batch embed")
    >>> stacked_w = mj.named(jnp.full((3, 4, 4), 0.5), "layers embed hidden")
    >>> h, _ = scan(block, x, stacked_w, dim="layers")   # three layers, one traced body
    >>> h.dims, h.value[0, 0].item()                      # each layer doubles: 1 -> 2 -> 4 -> 8
    (('batch', 'embed'), 8.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from meshjax import context
from meshjax.errors import ShapeError
from meshjax.graph import LINEAR, Block, IndexForm, OpFacts
from meshjax.named import NamedArray, is_named


def _leaves(tree: Any, what: str) -> tuple[list[NamedArray], Any]:
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_named)
    for leaf in leaves:
        if not isinstance(leaf, NamedArray):
            raise ShapeError(f"scan: every leaf of {what} must be a NamedArray, got {type(leaf).__name__}")
    return leaves, treedef


def scan_leaves(carry: Any, xs: Any, dim: str) -> tuple[list[NamedArray], Any, list[NamedArray], Any, int]:
    """The leaves and tree definitions of a scan's ``carry`` and ``xs``, and the length of
    ``dim``, which every leaf of ``xs`` must share."""
    carry_leaves, carry_def = _leaves(carry, "the carry")
    x_leaves, x_def = _leaves(xs, "xs")
    lengths = {leaf.size(dim) for leaf in x_leaves}
    if len(lengths) != 1:
        raise ShapeError(f"scan: the leaves of xs disagree on the size of {dim!r}: {sorted(lengths)}")
    return carry_leaves, carry_def, x_leaves, x_def, lengths.pop()


def _identity_index(dims: tuple[str, ...], sizes: dict[str, int], n_operands: int = 1) -> IndexForm:
    return IndexForm(loop=tuple((d, sizes[d]) for d in dims), operands=(dims,) * n_operands, result=dims)


def scan(
    body: Callable[[Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any,
    *,
    dim: str = "layers",
    name: str = "layers",
) -> tuple[Any, Any]:
    """``jax.lax.scan`` over the ``dim`` axis of every leaf of ``xs``.

    ``body(carry, x) -> (carry, y)`` sees ``x`` without ``dim``; the stacked ``y`` gets ``dim``
    in front. Tensors made inside are named under the scope ``name``. When the program being
    lowered pipelines ``dim`` over a stage mesh axis, the scan runs as that pipeline
    (:mod:`meshjax.pipeline.lower`); its graph is the same.
    """
    pipeline = getattr(context.current(), "pipeline", None)
    if pipeline is not None and pipeline.dim == dim:
        from meshjax.pipeline.lower import pipelined_scan

        return pipelined_scan(body, carry, xs, dim=dim, name=name)
    return scan_unpipelined(body, carry, xs, dim=dim, name=name)


def scan_unpipelined(body: Callable[[Any, Any], tuple[Any, Any]], carry: Any, xs: Any, *, dim: str, name: str) -> tuple[Any, Any]:
    """:func:`scan` as one ``jax.lax.scan`` (a pipeline stage runs its layers this way)."""
    carry_leaves, carry_def, x_leaves, x_def, length = scan_leaves(carry, xs, dim)
    ctx = context.current()
    block = Block(name="/".join([*(ctx.scopes if ctx else []), name]), kind="scan", trip_count=length)
    inner_carry_out: list[NamedArray] = []
    inner_carry_names: list[str | None] = []
    inner_ys: list[NamedArray] = []
    y_def_box: list[Any] = [None]

    def step(carry_values, x_values):
        ctx = context.current()
        if ctx is not None:
            ctx.forget_names_under(block.name)
            ctx.enter_block(block)
        try:
            with context.scope(name):
                c_in, c_names = [], []
                for outer, value in zip(carry_leaves, carry_values):
                    index = _identity_index(outer.dims, outer.sizes)
                    inner, inner_name = NamedArray(value, outer.dims), None
                    if ctx is not None:  # the carry's name inside the loop, for its back edge
                        inner, inner_name = ctx.emit("loop_carry", [outer], inner, index, {}, "carry", LINEAR)
                    c_in.append(inner)
                    c_names.append(inner_name)
                x_in = []
                for outer, value in zip(x_leaves, x_values):
                    rest = tuple(d for d in outer.dims if d != dim)
                    index = IndexForm(
                        loop=tuple(outer.sizes.items()), operands=(outer.dims,), result=rest, whole=(dim,)
                    )
                    x_in.append(context.emit("slice", [outer], NamedArray(value, rest), index, name="slice", facts=OpFacts(slices=True)))
                new_carry, y = body(
                    jax.tree_util.tree_unflatten(carry_def, c_in), jax.tree_util.tree_unflatten(x_def, x_in)
                )
                out_leaves, out_def = _leaves(new_carry, "the new carry")
                if out_def != carry_def or sorted(map(sorted, (c.dims for c in out_leaves))) != sorted(
                    map(sorted, (c.dims for c in carry_leaves))
                ):
                    raise ShapeError("scan: the body must return a carry with the same structure and dims as it got")
                c_out = []
                for leaf, outer, c_name in zip(out_leaves, carry_leaves, c_names):
                    if leaf.dims != outer.dims:
                        leaf = NamedArray(leaf.align_to(outer.dims), outer.dims)
                    if ctx is not None:
                        ctx.add_input(c_name, leaf)  # the loop's back edge
                        leaf = ctx.pin_as(leaf, c_name)  # a loop carry keeps one layout
                    c_out.append(leaf)
                y_leaves, y_def = _leaves(y, "y") if y is not None else ([], None)
                inner_carry_out[:] = c_out
                inner_carry_names[:] = c_names
                inner_ys[:] = y_leaves
                y_def_box[0] = y_def
        finally:
            if ctx is not None:
                ctx.leave_block()
        return [c.value for c in c_out], [leaf.value for leaf in y_leaves]

    stacked_x = [leaf.align_to((dim, *(d for d in leaf.dims if d != dim))) for leaf in x_leaves]
    policy = ctx.remat_policy(block.name + "/") if hasattr(ctx, "remat_policy") else None
    # A rematerialised body keeps only what its policy saves; the backward pass recomputes the rest.
    body_fn = step if policy is None else jax.checkpoint(step, policy=policy, prevent_cse=False)
    final_values, stacked_y = jax.lax.scan(body_fn, [c.value for c in carry_leaves], stacked_x, length=length)

    ctx = context.current()
    with context.scope(name):
        final = []
        for inner, carry_name, outer, value in zip(inner_carry_out, inner_carry_names, carry_leaves, final_values):
            result = NamedArray(value, outer.dims)
            if ctx is not None and carry_name is not None:
                # Leave the loop in the carry's own layout, so XLA keeps that layout for the
                # while loop's state rather than the one the next op wants.
                result = ctx.pin_as(result, carry_name)
            index = _identity_index(outer.dims, outer.sizes)
            final.append(context.emit("scan_carry", [inner], result, index, name="final_carry", facts=LINEAR))
        ys = []
        for inner, value in zip(inner_ys, stacked_y):
            out_dims = (dim, *inner.dims)
            sizes = {dim: length, **inner.sizes}
            index = IndexForm(loop=tuple((d, sizes[d]) for d in out_dims), operands=(inner.dims,), result=out_dims, whole=(dim,))
            ys.append(context.emit("stack", [inner], NamedArray(value, out_dims), index, name="stacked", facts=LINEAR))
    y_tree = jax.tree_util.tree_unflatten(y_def_box[0], ys) if y_def_box[0] is not None else None
    return jax.tree_util.tree_unflatten(carry_def, final), y_tree
