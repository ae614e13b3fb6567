"""Helpers shared by the model modules: host initialisation, param counts, block declarations.

The model params are declared with :class:`meshjax.params.Normal` and
:class:`~meshjax.params.Constant` (re-exported here), which draw on the host with numpy: on CPU,
compiling JAX's threefry sampler once per param shape costs seconds even for a tiny model, while
numpy is instant. :func:`host_init` and :func:`meshjax.init_params` give the same values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from meshjax.named import NamedArray, shape_of
from meshjax.params import Constant, Normal, Param, _seed_words, draw_on_host, path_name  # noqa: F401


def host_rng(key: Any, salt: str = "") -> np.random.Generator:
    """A numpy generator seeded by a JAX key (typed or raw) or an int, and a ``salt`` string."""
    return np.random.default_rng([*_seed_words(key), *salt.encode()])


def host_init(decls: Any, sizes: dict[str, int], key: Any) -> Any:
    """Materialise declarations made with :class:`Normal` / :class:`Constant` using numpy.

    ``key`` is a JAX key (typed or raw) or an int seed; each param gets its own stream, derived
    from the key and its path, so adding a param does not change the others.
    """
    seed = _seed_words(key)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(decls, is_leaf=lambda x: isinstance(x, Param))
    out = []
    for path, decl in leaves:
        name = path_name(path)
        shape = shape_of(decl.dims, sizes, context=f"param {name!r}")
        if not hasattr(decl.init, "host"):
            raise TypeError(f"param {name!r}: its initializer {decl.init!r} cannot run on the host")
        out.append(NamedArray(draw_on_host(decl, shape, seed, name), decl.dims))
    return jax.tree_util.tree_unflatten(treedef, out)


def count_params(params: Any) -> int:
    """Number of parameters in a pytree of NamedArrays (abstract ones too: nothing is read)."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, NamedArray))
    return int(sum(math.prod(leaf.shape) for leaf in leaves))


def layer_decls(config: Any, block_decls: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """A decoder's block declarations: ``{"blocks": stacked}`` when ``config.scan_layers``,
    else ``{"block_0": ..., "block_1": ...}`` (``config.layers`` of them).

    >>> list(layer_decls(gpt.Config(layers=2), gpt.block_decls))     # doctest: +SKIP
    ['block_0', 'block_1']
    """
    if config.scan_layers:
        return {"blocks": block_decls(config, stacked=True)}
    return {f"block_{i}": block_decls(config) for i in range(config.layers)}
