"""One GPT decoder block with a mean-square loss, as a model of its own (the foundation tests'
smallest model with attention, norms and an MLP). Same :class:`~meshjax.models.transformer.Config`
as the decoder; ``vocab`` and ``layers`` are unused.

Params: ``ln_1/{scale,bias}``, ``attn/{w_q,w_k,w_v,w_o}``, ``ln_2/{scale,bias}``,
``mlp/{w_in,w_out}``; input ``x`` "batch seq embed"; activations under ``block/``.
"""

from __future__ import annotations

from typing import Any

import meshjax as mj
from meshjax.models import transformer
from meshjax.models.common import loss_with_form, param_functions
from meshjax.models.transformer import Config
from meshjax.named import NamedArray

PRESETS: dict[str, Config] = {
    "block-tiny": transformer.PRESETS["gpt-tiny"],
    "block-small": transformer.PRESETS["gpt-small"],
    "block-gpt3-175b": transformer.PRESETS["gpt3-175b"],
}


def sizes(config: Config) -> dict[str, int]:
    s = transformer.sizes(config)
    return {d: s[d] for d in ("batch", "seq", "key_seq", "embed", "heads", "head_dim", "mlp")}


def decls(config: Config) -> dict[str, Any]:
    return transformer.block_decls(config)


init, abstract_params, param_count = param_functions(decls, sizes)


def forward(params: dict[str, Any], x: NamedArray) -> NamedArray:
    with mj.scope("block"):
        return transformer.block(params, x)


loss = transformer.transformer_block_loss


def make_loss(config: Config):
    """The block's loss with ``config``'s attention form."""
    return loss_with_form(loss, transformer.check_form(config.attention))

example_batch = transformer.block_example_batch
abstract_batch = transformer.block_abstract_batch
