"""Dtype facts the cost model needs, from JAX's own dtype predicates.

NumPy does not know JAX's extra floating types: ``np.issubdtype(np.dtype("bfloat16"),
np.floating)`` is False. ``jax.numpy.issubdtype`` knows bfloat16 and the float8 formats, so every
question of the form "is this a floating dtype" goes through :func:`is_floating`.

Example::

    >>> is_floating("bfloat16"), is_floating("float8_e4m3fn"), is_floating("int32")
    (True, True, False)
    >>> itemsize("bfloat16")
    2
"""

from __future__ import annotations

import jax.numpy as jnp


def is_floating(dtype) -> bool:
    """Whether ``dtype`` is a real floating type (float64 ... float8): what gradients flow through."""
    return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.floating))


def itemsize(dtype) -> int:
    """Bytes per element of ``dtype``."""
    return jnp.dtype(dtype).itemsize
