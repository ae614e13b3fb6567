"""A two-layer MLP block with a residual connection and a mean-square regression loss.

Dims: ``batch``, ``embed``, ``mlp``. Params: ``mlp/w_in`` ("embed mlp") and ``mlp/w_out``
("mlp embed"). Activations are named under the ``mlp`` scope (``mlp/hidden``, ``mlp/act``,
``mlp/out``, ``mlp/residual``); the loss is ``loss``.

Example::

    >>> import jax
    >>> from meshjax.models import mlp
    >>> config = mlp.PRESETS["mlp-tiny"]
    >>> params = mlp.init(config, jax.random.key(0))
    >>> x, target = mlp.example_batch(config, jax.random.key(1))
    >>> mlp.loss(params, x, target).dims
    ()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import meshjax as mj
from meshjax.models.common import Normal, host_rng, param_functions
from meshjax.named import NamedArray


@dataclass(frozen=True)
class Config:
    """Sizes of the MLP. ``dtype`` is the dtype of params and inputs."""

    batch: int = 8
    embed: int = 16
    mlp: int = 64
    dtype: str = "float32"


PRESETS: dict[str, Config] = {
    "mlp-tiny": Config(batch=8, embed=16, mlp=64),
    "mlp-small": Config(batch=32, embed=64, mlp=256),
    # Abstract use only (tracing, planning): about 0.8 GB of float32 weights.
    "mlp-large": Config(batch=1024, embed=4096, mlp=16384),
}


def sizes(config: Config) -> dict[str, int]:
    """Dim name -> size."""
    return {"batch": config.batch, "embed": config.embed, "mlp": config.mlp}


def decls(config: Config) -> dict[str, Any]:
    """Parameter declarations: ``{"mlp": {"w_in": ..., "w_out": ...}}``."""
    return {
        "mlp": {
            "w_in": mj.param("embed mlp", Normal(config.embed**-0.5), config.dtype),
            "w_out": mj.param("mlp embed", Normal(config.mlp**-0.5), config.dtype),
        }
    }


init, abstract_params, param_count = param_functions(decls, sizes)


def forward(params: dict[str, Any], x: NamedArray) -> NamedArray:
    """``x + gelu(x @ w_in) @ w_out`` ("batch embed" -> "batch embed")."""
    p = params["mlp"]
    with mj.scope("mlp"):
        h = mj.einsum("batch embed, embed mlp -> batch mlp", x, p["w_in"], name="hidden")
        h = mj.gelu(h, name="act")
        y = mj.einsum("batch mlp, mlp embed -> batch embed", h, p["w_out"], name="out")
        return mj.elementwise("add", x, y, name="residual")


def loss(params: dict[str, Any], x: NamedArray, target: NamedArray) -> NamedArray:
    """Mean-square error of :func:`forward` against ``target`` (both "batch embed")."""
    y = forward(params, x)
    err = mj.elementwise("subtract", y, target, name="error")
    return mj.mean(mj.square(err, name="sq_error"), "batch embed", name="loss")


def example_batch(config: Config, key: jax.Array | int) -> tuple[NamedArray, NamedArray]:
    """``(x, target)``, both "batch embed", standard normal (numpy, seeded by ``key``)."""
    shape, dtype = (config.batch, config.embed), jnp.dtype(config.dtype)
    x = host_rng(key, "batch/x").standard_normal(shape, dtype=np.float32).astype(dtype)
    target = host_rng(key, "batch/target").standard_normal(shape, dtype=np.float32).astype(dtype)
    return mj.named(jnp.asarray(x), "batch embed"), mj.named(jnp.asarray(target), "batch embed")


def abstract_batch(config: Config) -> tuple[NamedArray, NamedArray]:
    """:func:`example_batch` as ``jax.ShapeDtypeStruct`` values."""
    s = sizes(config)
    return mj.abstract("batch embed", s, config.dtype), mj.abstract("batch embed", s, config.dtype)


__all__ = [
    "Config", "PRESETS", "sizes", "decls", "init", "abstract_params", "forward", "loss",
    "example_batch", "abstract_batch",
]
