"""meshjax: named-dimension layers, layouts and plans for JAX device meshes.

Example::

    >>> import jax.numpy as jnp
    >>> import meshjax as mj
    >>> x = mj.named(jnp.ones((8, 16)), "batch embed")
    >>> w = mj.named(jnp.ones((16, 64)), "embed mlp")
    >>> h = mj.einsum("batch embed, embed mlp -> batch mlp", x, w)
    >>> h.dims, h.shape
    (('batch', 'mlp'), (8, 64))
"""

import sys as _sys

from meshjax import hlo as _hlo
from meshjax.context import scope
from meshjax.errors import (
    EinsumError,
    InfeasibleError,
    LayoutError,
    MeshjaxError,
    ShapeError,
    TraceError,
)
from meshjax.graph import Graph, IndexForm, Op, Tensor
from meshjax.named import NamedArray, named, parse_dims
from meshjax.ops import (
    attention,
    arange,
    cast,
    cross_entropy,
    einsum,
    elementwise,
    embed,
    exp,
    gelu,
    greater_equal,
    layer_norm,
    log,
    logsumexp,
    mask,
    max,
    maximum,
    mean,
    merge_dims,
    minimum,
    relu,
    rename,
    rms_norm,
    rsqrt,
    sigmoid,
    silu,
    softmax,
    split_dim,
    sqrt,
    square,
    sum,
    tanh,
    where,
)
from meshjax.params import Param, abstract, abstract_params, init_params, param
from meshjax.repeat import repeated
from meshjax.scan import scan
from meshjax.trace import trace
from meshjax.vmap import vmap

# ``meshjax.inspect`` is the former name of ``meshjax.hlo``; imports of it keep working.
_sys.modules.setdefault("meshjax.inspect", _hlo)

__version__ = "0.1.0"

__all__ = [
    "EinsumError",
    "Graph",
    "IndexForm",
    "InfeasibleError",
    "LayoutError",
    "MeshjaxError",
    "NamedArray",
    "Op",
    "Param",
    "ShapeError",
    "Tensor",
    "TraceError",
    "abstract",
    "abstract_params",
    "arange",
    "attention",
    "cast",
    "cross_entropy",
    "einsum",
    "elementwise",
    "embed",
    "exp",
    "gelu",
    "greater_equal",
    "init_params",
    "layer_norm",
    "log",
    "logsumexp",
    "mask",
    "max",
    "maximum",
    "mean",
    "merge_dims",
    "minimum",
    "named",
    "param",
    "parse_dims",
    "relu",
    "rename",
    "rms_norm",
    "rsqrt",
    "repeated",
    "scan",
    "scope",
    "sigmoid",
    "silu",
    "softmax",
    "split_dim",
    "sqrt",
    "square",
    "sum",
    "tanh",
    "trace",
    "vmap",
    "where",
]
