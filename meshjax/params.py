"""Parameters declared by named dims and an initializer, materialised or kept abstract.

Example::

    >>> import jax
    >>> decls = {"w_in": param("embed mlp"), "b": param("mlp", init=jax.nn.initializers.zeros)}
    >>> params = init_params(decls, {"embed": 4, "mlp": 16}, jax.random.key(0))
    >>> params["w_in"].sizes
    {'embed': 4, 'mlp': 16}
    >>> abstract_params(decls, {"embed": 12288, "mlp": 49152})["w_in"].shape   # no memory used
    (12288, 49152)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from meshjax.errors import ShapeError
from meshjax.named import DimsLike, NamedArray, parse_dims, shape_of

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@dataclass(frozen=True)
class Param:
    """A parameter declaration: its dims, initializer and dtype."""

    dims: tuple[str, ...]
    init: Initializer
    dtype: Any = jnp.float32


def param(dims: DimsLike, init: Initializer | None = None, dtype: Any = jnp.float32) -> Param:
    """Declare a parameter. ``init`` is any ``jax.nn.initializers`` initializer (default: normal(0.02))."""
    return Param(parse_dims(dims), init or jax.nn.initializers.normal(0.02), dtype)


def _is_decl(x: Any) -> bool:
    return isinstance(x, Param)


def _shape(decl: Param, sizes: Mapping[str, int], path: str) -> tuple[int, ...]:
    return shape_of(decl.dims, sizes, context=f"param {path!r}")


def init_params(decls: Any, sizes: Mapping[str, int], key: jax.Array) -> Any:
    """Materialise a pytree of :class:`Param` declarations; each leaf gets its own key."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(decls, is_leaf=_is_decl)
    keys = jax.random.split(key, max(1, len(leaves)))
    out = []
    for (path, decl), k in zip(leaves, keys):
        name = path_name(path)
        if not _is_decl(decl):
            raise ShapeError(f"param {name!r}: expected a meshjax.param(...) declaration, got {type(decl).__name__}")
        shape = _shape(decl, sizes, name)
        out.append(NamedArray(decl.init(k, shape, decl.dtype), decl.dims))
    return jax.tree_util.tree_unflatten(treedef, out)


def abstract_params(decls: Any, sizes: Mapping[str, int]) -> Any:
    """Like :func:`init_params` but with ``jax.ShapeDtypeStruct`` values: nothing is allocated."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(decls, is_leaf=_is_decl)
    out = [
        NamedArray(jax.ShapeDtypeStruct(_shape(d, sizes, path_name(p)), jnp.dtype(d.dtype)), d.dims)
        for p, d in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def abstract(dims: DimsLike, sizes: Mapping[str, int], dtype: Any = jnp.float32) -> NamedArray:
    """An abstract named input: ``abstract("batch seq", {"batch": 8, "seq": 128}, jnp.int32)``."""
    dims = parse_dims(dims)
    return NamedArray(jax.ShapeDtypeStruct(shape_of(dims, sizes), jnp.dtype(dtype)), dims)


def path_name(path) -> str:
    """A pytree key path as a readable tensor name: ``('block', 'mlp', 'w_in') -> 'block/mlp/w_in'``."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)
