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


def _binary_method(fn_name: str, swap: bool = False):
    """``NamedArray.__add__`` and kin: the recorded elementwise op ``fn_name`` (operands swapped
    for the reflected ``__radd__`` ...)."""

    def method(self, other):
        from meshjax import ops

        return ops.elementwise(fn_name, *((other, self) if swap else (self, other)))

    method.__name__ = f"__{'r' if swap else ''}{fn_name}__"
    return method


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
    __add__ = _binary_method("add")
    __radd__ = _binary_method("add", swap=True)
    __sub__ = _binary_method("subtract")
    __rsub__ = _binary_method("subtract", swap=True)
    __mul__ = _binary_method("multiply")
    __rmul__ = _binary_method("multiply", swap=True)
    __truediv__ = _binary_method("divide")
    __rtruediv__ = _binary_method("divide", swap=True)
    __pow__ = _binary_method("power")

    def __neg__(self):
        from meshjax import ops

        return ops.elementwise("negative", self)


def is_named(x: Any) -> bool:
    """Whether ``x`` is a :class:`NamedArray`: the ``is_leaf`` of every pytree walk over named
    arrays (a NamedArray is itself a pytree node).

    >>> is_named(named(np.ones(2), "batch")), is_named(np.ones(2))
    (True, False)
    """
    return isinstance(x, NamedArray)


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
