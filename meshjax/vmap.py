"""``vmap`` over a named dim.

``jax.vmap`` maps over a positional axis; a :class:`NamedArray` maps over a *name*. ``vmap(fn,
"batch")`` hands ``fn`` every NamedArray argument without its ``batch`` dim (arguments without it
are broadcast) and puts ``batch`` back in front of every NamedArray it returns. It is
``jax.vmap`` underneath, so it composes with ``jax.jit``, ``jax.grad`` and ``jax.lax.scan``.

Example::

    >>> import jax.numpy as jnp
    >>> x = named(jnp.ones((4, 3)), "batch embed")
    >>> per_row = vmap(lambda row: mj_sum(row, "embed"), "batch")
    >>> per_row(x).dims, per_row(x).shape
    (('batch',), (4,))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from meshjax.errors import ShapeError
from meshjax.named import NamedArray, is_named, named  # noqa: F401  (named for the doctest)
from meshjax.ops import sum as mj_sum  # noqa: F401  (for the doctest)



def vmap(fn: Callable, dim: str) -> Callable:
    """Map ``fn`` over the named dim ``dim`` of its NamedArray arguments."""

    def mapped(*args: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(args, is_leaf=is_named)
        sizes = {leaf.size(dim) for leaf in leaves if is_named(leaf) and dim in leaf.dims}
        if not sizes:
            raise ShapeError(f"vmap over {dim!r}: no argument has that dim")
        if len(sizes) > 1:
            raise ShapeError(f"vmap over {dim!r}: arguments disagree on its size: {sorted(sizes)}")
        in_axes, values, inner_dims = [], [], []
        for leaf in leaves:
            if is_named(leaf) and dim in leaf.dims:
                rest = tuple(d for d in leaf.dims if d != dim)
                values.append(leaf.align_to((dim, *rest)))
                inner_dims.append(rest)
                in_axes.append(0)
            elif is_named(leaf):
                values.append(leaf.value)
                inner_dims.append(leaf.dims)
                in_axes.append(None)
            else:
                values.append(leaf)
                inner_dims.append(None)
                in_axes.append(None)
        out_box: list[Any] = []

        def inner(*vals: Any) -> list[Any]:
            rebuilt = [v if d is None else NamedArray(v, d) for v, d in zip(vals, inner_dims)]
            out = fn(*jax.tree_util.tree_unflatten(treedef, rebuilt))
            out_leaves, out_def = jax.tree_util.tree_flatten(out, is_leaf=is_named)
            for leaf in out_leaves:
                if is_named(leaf) and dim in leaf.dims:
                    raise ShapeError(f"vmap over {dim!r}: the function returned a result that already has {dim!r}")
            out_box[:] = [out_def, [leaf.dims if is_named(leaf) else None for leaf in out_leaves]]
            return [leaf.value if is_named(leaf) else leaf for leaf in out_leaves]

        out_values = jax.vmap(inner, in_axes=tuple(in_axes))(*values)
        out_def, out_dims = out_box
        out = [v if d is None else NamedArray(v, (dim, *d)) for v, d in zip(out_values, out_dims)]
        return jax.tree_util.tree_unflatten(out_def, out)

    return mapped
