"""What the model modules share: initializers that JAX and numpy can both run, the decoders'
common config fields, and the param functions every model derives from its declarations.

The model params are declared with :class:`meshjax.params.Normal` and
:class:`~meshjax.params.Constant` (re-exported here), which draw on the host with numpy: on CPU,
compiling JAX's threefry sampler once per param shape costs seconds even for a tiny model, while
numpy is instant (:func:`meshjax.init_params` does so for them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from meshjax.named import NamedArray, is_named
from meshjax.params import Constant, Normal, Param, abstract, abstract_params, init_params, param, seed_words  # noqa: F401  (Constant, Normal: for the models)


def host_rng(key: Any, salt: str = "") -> np.random.Generator:
    """A numpy generator seeded by a JAX key (typed or raw) or an int, and a ``salt`` string."""
    return np.random.default_rng([*seed_words(key), *salt.encode()])



def count_params(params: Any) -> int:
    """Number of parameters in a pytree of NamedArrays (abstract ones too: nothing is read)."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=is_named)
    return int(sum(math.prod(leaf.shape) for leaf in leaves))


def layer_decls(config: Any, block_decls: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """A decoder's block declarations: ``{"blocks": stacked}`` when ``config.scan_layers``,
    else ``{"block_0": ..., "block_1": ...}`` (``config.layers`` of them).

    >>> from meshjax.models import transformer
    >>> list(layer_decls(transformer.Config(layers=2), transformer.block_decls))
    ['block_0', 'block_1']
    """
    if config.scan_layers:
        return {"blocks": block_decls(config, stacked=True)}
    return {f"block_{i}": block_decls(config) for i in range(config.layers)}


@dataclass(frozen=True)
class DecoderConfig:
    """The fields every decoder's ``Config`` has (GPT, Llama, MoE); each adds its own."""

    vocab: int = 64
    seq: int = 16
    embed: int = 32
    heads: int = 4
    head_dim: int = 8
    mlp: int = 128
    layers: int = 2
    batch: int = 8
    scan_layers: bool = False
    dtype: str = "float32"
    attention: str = "flash"  # "flash": the meshjax.attention op; "einsum": scores, softmax, context


def decoder_sizes(config: DecoderConfig) -> dict[str, int]:
    """A decoder's dim name -> size (``key_seq``, the attended positions, is ``seq``)."""
    return {
        "batch": config.batch,
        "seq": config.seq,
        "key_seq": config.seq,
        "embed": config.embed,
        "heads": config.heads,
        "head_dim": config.head_dim,
        "mlp": config.mlp,
        "vocab": config.vocab,
        "layers": config.layers,
    }


def declarer(config: DecoderConfig, stacked: bool = False) -> Callable[[str, Any], Param]:
    """``p(dims, init)``: a param of ``config.dtype``, with a leading ``layers`` dim when
    ``stacked`` (a scanned decoder's blocks)."""
    lead = "layers " if stacked else ""
    return lambda dims, init: param(lead + dims, init, config.dtype)


def param_functions(decls: Callable[[Any], Any], sizes: Callable[[Any], dict[str, int]]):
    """A model's ``init(config, key)``, ``abstract_params(config)`` and ``param_count(config)``,
    from its ``decls(config)`` and ``sizes(config)``.

    >>> from meshjax.models import mlp
    >>> init, abstract_params, param_count = param_functions(mlp.decls, mlp.sizes)
    >>> param_count(mlp.PRESETS["mlp-tiny"])     # embed 16 x mlp 64, twice
    2048
    """

    def init(config: Any, key: jax.Array | int) -> Any:
        """Concrete params, drawn on the host with numpy (deterministic in ``key``; fast)."""
        return init_params(decls(config), sizes(config), key)

    def abstract(config: Any) -> Any:
        """Params as ``jax.ShapeDtypeStruct`` (nothing allocated): for paper-size presets."""
        return abstract_params(decls(config), sizes(config))

    def param_count(config: Any) -> int:
        """Number of parameters (computed from the declarations, nothing allocated)."""
        return count_params(abstract(config))

    abstract.__name__ = "abstract_params"
    return init, abstract, param_count


def abstract_tokens(config: Any) -> tuple[NamedArray, NamedArray]:
    """``(tokens, targets)`` of a decoder as ``jax.ShapeDtypeStruct`` values (int32 "batch seq")."""
    sizes = {"batch": config.batch, "seq": config.seq}
    return abstract("batch seq", sizes, jnp.int32), abstract("batch seq", sizes, jnp.int32)


def loss_with_form(loss: Callable, form: str, **settings: Any) -> Callable:
    """``loss`` with the attention ``form`` (and any other keyword ``settings``) bound, taking
    the model's batch leaves positionally: ``loss_with_form(gpt.loss, "flash")(params, tokens, targets)``."""

    @functools.wraps(loss)  # its signature names the batch leaves (tokens, targets) when traced
    def config_loss(params: Any, *batch: Any) -> Any:
        return loss(params, *batch, form=form, **settings)

    return config_loss
