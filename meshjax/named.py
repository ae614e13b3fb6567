"""Named dimensions and named arrays.

A :class:`NamedArray` is a JAX array whose axes carry names (``batch``, ``seq``, ``embed``...).
It is a pytree with the array as its only leaf and the names as static data, so it passes through
``jax.jit``, ``jax.grad``, ``jax.lax.scan`` and ``jax.eval_shape`` unchanged.

Example::

    >>> import jax.numpy as jnp
    >>> x = NamedArray(jnp.zeros((2, 3)), "batch embed")
    >>> x.sizes
    {'batch': 2, 'embed': 3}
    >>> x.align_to("embed batch").shape
    (3, 2)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from meshjax.errors import ShapeError

DimsLike = str | Sequence[str]

_DIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_dims(dims: DimsLike, *, what: str = "dims") -> tuple[str, ...]:
    """Parse ``"batch seq embed"`` (or a sequence of names) into a tuple of dim names.

    >>> parse_dims("batch  seq embed")
    ('batch', 'seq', 'embed')

    Raises :class:`ShapeError` on a repeated or malformed name, naming it.
    """
    names = tuple(dims.split()) if isinstance(dims, str) else tuple(dims)
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not _DIM_NAME.match(name):
            raise ShapeError(f"{what} {dims!r}: {name!r} is not a valid dim name (letters, digits, _)")
        if name in seen:
            raise ShapeError(f"{what} {dims!r}: dim {name!r} appears twice")
        seen.add(name)
    return names


def format_dims(dims: Iterable[str]) -> str:
    """``('batch', 'embed') -> 'batch embed'``."""
    return " ".join(dims)


@jax.tree_util.register_pytree_node_class
class NamedArray:
    """An array whose axes are named.

    ``value`` may be a concrete array, a tracer, or a ``jax.ShapeDtypeStruct`` (abstract).
    """

    __slots__ = ("value", "dims")
    __array_priority__ = 1000  # so numpy scalars on the left defer to our operators

    def __init__(self, value: Any, dims: DimsLike):
        self.value = value
        self.dims = parse_dims(dims)
        shape = getattr(value, "shape", None)
        if shape is not None and len(shape) != len(self.dims):
            raise ShapeError(
                f"array of shape {tuple(shape)} has {len(shape)} axes but dims "
                f"{format_dims(self.dims)!r} name {len(self.dims)}"
            )

    # --- pytree -----------------------------------------------------------------------------
    def tree_flatten(self):
        return (self.value,), self.dims

    @classmethod
    def tree_unflatten(cls, dims, children):
        # No validation: JAX may rebuild the node around sentinels or shardings.
        obj = object.__new__(cls)
        obj.value = children[0]
        obj.dims = dims
        return obj

    # --- shape by name ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self):
        return self.value.dtype

    @property
    def sizes(self) -> dict[str, int]:
        """Dim name -> size, in axis order."""
        return dict(zip(self.dims, self.shape))

    def size(self, dim: str) -> int:
        """Size of ``dim``; :class:`ShapeError` names the dim when it is absent."""
        try:
            return self.sizes[dim]
        except KeyError:
            raise ShapeError(f"dim {dim!r} is not among {format_dims(self.dims)!r}") from None

    def axis(self, dim: str) -> int:
        """Position of ``dim``."""
        if dim not in self.dims:
            raise ShapeError(f"dim {dim!r} is not among {format_dims(self.dims)!r}")
        return self.dims.index(dim)

    def align_to(self, dims: DimsLike) -> jax.Array:
        """The raw array with axes permuted to ``dims`` (which must be a permutation)."""
        target = parse_dims(dims)
        if sorted(target) != sorted(self.dims):
            raise ShapeError(
                f"cannot align dims {format_dims(self.dims)!r} to {format_dims(target)!r}"
            )
        perm = tuple(self.dims.index(d) for d in target)
        return self.value if perm == tuple(range(len(perm))) else jnp.transpose(self.value, perm)

    def __repr__(self) -> str:
        if not self.dims:
            try:
                return f"NamedArray(scalar {float(self.value)!r}, dtype={self.dtype})"
            except Exception:  # traced or abstract: no value to show
                return f"NamedArray(scalar, dtype={self.dtype})"
        dims = ", ".join(f"{d}={s}" for d, s in zip(self.dims, self.shape))
        return f"NamedArray({dims}, dtype={self.dtype})"

    def __jax_array__(self):
        raise TypeError(
            "a NamedArray is not a plain array: use meshjax ops, or `.value` / `.align_to(...)`"
        )

    # --- operators route to the recorded elementwise ops ------------------------------------
    def _binary(self, other, fn_name: str, swap: bool = False):
        from meshjax import ops

        a, b = (other, self) if swap else (self, other)
        return ops.elementwise(fn_name, a, b)

    def __add__(self, o):
        return self._binary(o, "add")

    def __radd__(self, o):
        return self._binary(o, "add", swap=True)

    def __sub__(self, o):
        return self._binary(o, "subtract")

    def __rsub__(self, o):
        return self._binary(o, "subtract", swap=True)

    def __mul__(self, o):
        return self._binary(o, "multiply")

    def __rmul__(self, o):
        return self._binary(o, "multiply", swap=True)

    def __truediv__(self, o):
        return self._binary(o, "divide")

    def __rtruediv__(self, o):
        return self._binary(o, "divide", swap=True)

    def __pow__(self, o):
        return self._binary(o, "power")

    def __neg__(self):
        from meshjax import ops

        return ops.elementwise("negative", self)


def named(value: Any, dims: DimsLike) -> NamedArray:
    """Wrap ``value`` (array-like) with dim names.

    >>> named(np.ones((2, 4)), "batch embed").sizes
    {'batch': 2, 'embed': 4}
    """
    if not hasattr(value, "shape") or isinstance(value, np.ndarray):
        value = jnp.asarray(value)
    return NamedArray(value, dims)


def check_sizes(arrays: Iterable[NamedArray], *, context: str) -> dict[str, int]:
    """Merge the dim sizes of ``arrays``; :class:`ShapeError` names a dim whose sizes disagree."""
    sizes: dict[str, int] = {}
    for array in arrays:
        for dim, size in array.sizes.items():
            if sizes.setdefault(dim, size) != size:
                raise ShapeError(f"{context}: dim {dim!r} has size {sizes[dim]} and {size}")
    return sizes


def shape_of(dims: DimsLike, sizes: Mapping[str, int], *, context: str = "shape") -> tuple[int, ...]:
    """Shape of ``dims`` given a size table; names a dim whose size is unknown.

    >>> shape_of("batch embed", {"batch": 2, "embed": 8})
    (2, 8)
    """
    out = []
    for dim in parse_dims(dims):
        if dim not in sizes:
            raise ShapeError(f"{context}: no size given for dim {dim!r}")
        out.append(int(sizes[dim]))
    return tuple(out)
