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
import numpy as np

from meshjax.errors import ShapeError
from meshjax.named import DimsLike, NamedArray, parse_dims, shape_of

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@dataclass(frozen=True)
class Normal:
    """``std * N(0, 1)``."""

    std: float

    def __call__(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return (self.std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    def host(self, rng: np.random.Generator, shape, dtype) -> np.ndarray:
        return (self.std * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


@dataclass(frozen=True)
class Constant:
    """Every element ``value`` (``Constant(1.0)`` for norm scales, ``Constant(0.0)`` for biases)."""

    value: float

    def __call__(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return jnp.full(shape, self.value, dtype)

    def host(self, rng: np.random.Generator, shape, dtype) -> np.ndarray:
        return np.full(shape, self.value, dtype)


def seed_words(key: Any) -> list[int]:
    """The integers a numpy generator is seeded with: an int seed, or a JAX key's data."""
    if isinstance(key, int):
        return [key]
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return [int(w) for w in np.asarray(data).ravel()]


def draw_on_host(decl: "Param", shape: tuple[int, ...], seed: list[int], name: str) -> jax.Array:
    """A :class:`Normal` / :class:`Constant` param drawn with numpy: its own stream from the
    seed and its path, so adding a param does not change the others."""
    rng = np.random.default_rng([*seed, *name.encode()])
    return jnp.asarray(decl.init.host(rng, shape, jnp.dtype(decl.dtype)))


@dataclass(frozen=True)
class Param:
    """A parameter declaration: its dims, initializer and dtype."""

    dims: tuple[str, ...]
    init: Initializer
    dtype: Any = jnp.float32


def param(dims: DimsLike, init: Initializer | None = None, dtype: Any = jnp.float32) -> Param:
    """Declare a parameter. ``init`` is any ``jax.nn.initializers`` initializer or a
    :class:`Normal` / :class:`Constant` (default: ``Normal(0.02)``)."""
    return Param(parse_dims(dims), init or Normal(0.02), dtype)


def _is_decl(x: Any) -> bool:
    return isinstance(x, Param)


def _shape(decl: Param, sizes: Mapping[str, int], path: str) -> tuple[int, ...]:
    return shape_of(decl.dims, sizes, context=f"param {path!r}")


def init_params(decls: Any, sizes: Mapping[str, int], key: jax.Array) -> Any:
    """Materialise a pytree of :class:`Param` declarations; each leaf gets its own key.

    :class:`Normal` and :class:`Constant` params (the default) are drawn with numpy, seeded by
    ``key`` and the param's path; other initializers run JAX's sampler, which compiles once per
    param shape (about a second each on a small CPU: the reason the default is drawn on the host).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(decls, is_leaf=_is_decl)
    on_device = any(not hasattr(getattr(d, "init", None), "host") for _, d in leaves)
    seed = seed_words(key)
    if isinstance(key, int):
        key = jax.random.key(key)
    keys = jax.random.split(key, max(1, len(leaves))) if on_device else None
    out = []
    for i, (path, decl) in enumerate(leaves):
        name = path_name(path)
        if not _is_decl(decl):
            raise ShapeError(f"param {name!r}: expected a meshjax.param(...) declaration, got {type(decl).__name__}")
        shape = _shape(decl, sizes, name)
        if hasattr(decl.init, "host"):
            value = draw_on_host(decl, shape, seed, name)
        else:
            value = decl.init(keys[i], shape, decl.dtype)
        out.append(NamedArray(value, decl.dims))
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
