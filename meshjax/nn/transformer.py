"""A decoder-only language model built from :mod:`meshjax.nn.layers`: GPT-style (layer norm,
GELU, learned positions), LLaMA-style (RMS norm, SwiGLU, grouped-query attention, rotary) or
mixture-of-experts, unrolled (``blocks`` is an ``nnx.List``: params ``blocks/0/attn/w_q``) or
stacked and scanned (``blocks`` is a :class:`~meshjax.nn.layers.Stack`: params
``blocks/layer/attn/w_q`` with a leading ``layers`` dim).

Example::

    >>> from flax import nnx
    >>> model = Transformer.gpt(vocab=64, seq=16, embed=32, heads=4, head_dim=8, mlp=64, layers=2, rngs=nnx.Rngs(0))
    >>> tokens = mj.named(jnp.zeros((2, 16), jnp.int32), "batch seq")
    >>> nnx.jit(lambda m, t: m(t))(model, tokens).dims
    ('batch', 'seq', 'vocab')
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

import meshjax as mj
from meshjax.named import NamedArray
from meshjax.nn.layers import Block, Dense, Embed, LayerNorm, RMSNorm, Stack, init_param, value_of


class Transformer(nnx.Module):
    """Token embedding (plus learned positions with ``pos_embed``), ``layers`` :class:`Block` s,
    a final norm and an untied unembedding "embed vocab". ``__call__(tokens)`` returns the
    logits, or ``(logits, aux_loss)`` when the blocks are mixture-of-experts."""

    def __init__(
        self, *, vocab: int, seq: int, embed: int, heads: int, head_dim: int, mlp: int, layers: int,
        rngs: nnx.Rngs, kv_heads: int | None = None, norm: str = "layer", ffn: str = "gelu",
        rotary: bool = False, pos_embed: bool = True, experts: int = 4, scan_layers: bool = False,
        dtype: Any = jnp.float32, **block_kwargs: Any,
    ):
        sizes = {"vocab": vocab, "seq": seq, "embed": embed}
        self.moe = ffn == "moe"
        self.token_embed = Embed(vocab, embed, rngs=rngs, dtype=dtype)
        self.pos_embed = init_param(rngs, "seq embed", sizes, None, dtype) if pos_embed else None

        def make(r: nnx.Rngs) -> Block:
            return Block(
                embed, heads, head_dim, mlp, kv_heads=kv_heads, norm=norm, ffn=ffn, rotary=rotary, experts=experts,
                layers=layers, rngs=r, dtype=dtype, **block_kwargs,
            )

        self.scan_layers = scan_layers
        self.blocks = Stack(make, layers, rngs=rngs) if scan_layers else nnx.List([make(rngs) for _ in range(layers)])
        self.final_norm = (LayerNorm if norm == "layer" else RMSNorm)(embed, dtype=dtype)
        self.unembed = Dense("embed", "vocab", sizes, rngs=rngs, dtype=dtype, name="logits")

    @classmethod
    def gpt(cls, **kwargs: Any) -> Transformer:
        """GPT-2 style: layer norm, GELU MLP, learned positions, multi-head attention."""
        return cls(**{"norm": "layer", "ffn": "gelu", "pos_embed": True, "rotary": False, **kwargs})

    @classmethod
    def llama(cls, **kwargs: Any) -> Transformer:
        """LLaMA style: RMS norm, SwiGLU, rotary, grouped-query attention with ``kv_heads``."""
        return cls(**{"norm": "rms", "ffn": "swiglu", "pos_embed": False, "rotary": True, **kwargs})

    @classmethod
    def moe_gpt(cls, **kwargs: Any) -> Transformer:
        """A GPT whose FFNs are mixtures of ``experts``."""
        return cls(**{"norm": "layer", "ffn": "moe", "pos_embed": True, "rotary": False, **kwargs})

    def __call__(self, tokens: NamedArray):
        with mj.scope("embed"):
            x = self.token_embed(tokens, name="tokens")
            if self.pos_embed is not None:
                x = mj.elementwise("add", x, value_of(self.pos_embed), name="out")
        aux = None
        if self.scan_layers:
            out = self.blocks(x)
            if self.moe:
                x, auxes = out
                aux = mj.sum(auxes, "layers", name="aux_total")
            else:
                x = out
        else:
            with mj.scope("blocks"):
                for i, blk in enumerate(self.blocks):
                    with mj.scope(str(i)):
                        out = blk(x)
                    if self.moe:
                        x, layer_aux = out
                        aux = layer_aux if aux is None else mj.elementwise("add", aux, layer_aux, name="aux_total")
                    else:
                        x = out
        with mj.scope("head"):
            x = self.final_norm(x, name="norm")
            logits = self.unembed(x)
        return (logits, aux) if self.moe else logits


def lm_loss(model: nnx.Module, tokens: NamedArray, targets: NamedArray, *, aux_weight: float = 0.01) -> NamedArray:
    """Mean next-token cross-entropy of ``model(tokens)`` (plus ``aux_weight`` times the
    load-balancing loss when the model returns one)."""
    out = model(tokens)
    logits, aux = out if isinstance(out, tuple) else (out, None)
    with mj.scope("head"):
        xent = mj.cross_entropy(logits, targets, name="xent")
    if aux is None:
        return mj.mean(xent, "batch seq", name="loss")
    with mj.scope("head"):
        lm = mj.mean(xent, "batch seq", name="lm_loss")
        weighted = mj.elementwise("multiply", aux, aux_weight, name="aux_weighted")
    return mj.elementwise("add", lm, weighted, name="loss")
