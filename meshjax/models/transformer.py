"""A GPT-style decoder over named dims, unrolled or scanned over ``layers``.

Dims: ``batch``, ``seq`` (and ``key_seq``, the keys' copy of it inside attention), ``embed``,
``heads``, ``head_dim``, ``mlp``, ``vocab``, ``layers`` (stacked block params when
``scan_layers``).

Params (pytree path = tensor name)::

    token_embed      vocab embed
    pos_embed        seq embed
    block_0/ln_1/scale, block_0/ln_1/bias          embed
    block_0/attn/w_q, w_k, w_v                      embed heads head_dim
    block_0/attn/w_o                                heads head_dim embed
    block_0/ln_2/scale, block_0/ln_2/bias          embed
    block_0/mlp/w_in                                embed mlp
    block_0/mlp/w_out                               mlp embed
    ... block_1, ...  (or blocks/... with a leading ``layers`` dim when scanned)
    ln_f/scale, ln_f/bias                           embed
    unembed          embed vocab

Activations: ``embed/tokens``, ``embed/out``, ``block_0/attn/{ln,q,k,v,keys,values,scores,
scaled,q_pos,k_pos,causal,mask,masked,probs,context,out,residual}``, ``block_0/mlp/{ln,hidden,act,out,
residual}``, ``head/{ln,logits,xent}``, ``loss``. Scanned blocks are named ``blocks/...``.

Example::

    >>> import jax
    >>> from meshjax.models import transformer as gpt
    >>> config = gpt.PRESETS["gpt-tiny"]
    >>> params = gpt.init(config, jax.random.key(0))
    >>> tokens, targets = gpt.example_batch(config, jax.random.key(1))
    >>> jax.jit(gpt.loss)(params, tokens, targets).dims
    ()
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import meshjax as mj
from meshjax.models.common import (
    Constant, DecoderConfig, Normal, abstract_tokens, declarer, decoder_sizes, host_rng, layer_decls, loss_with_form,
    param_functions,
)
from meshjax.named import NamedArray

MASK_VALUE = -1e9  # added to the scores of future keys
ATTENTION_FORMS = ("flash", "einsum")
"""``flash``: one :func:`meshjax.attention` op (no ``seq x key_seq`` tensor is kept); ``einsum``:
scores, mask, softmax and context as separate ops (every intermediate visible to the solver)."""


@dataclass(frozen=True)
class Config(DecoderConfig):
    """Sizes of a GPT-style decoder. ``heads * head_dim`` need not equal ``embed``."""


PRESETS: dict[str, Config] = {
    "gpt-tiny": Config(vocab=64, seq=16, embed=32, heads=4, head_dim=8, mlp=128, layers=2, batch=8),
    "gpt-small": Config(vocab=256, seq=32, embed=64, heads=4, head_dim=16, mlp=256, layers=4, batch=16),
    # `meshjax plan`'s default: wide enough for its weights that under cpu-sim splitting the
    # MLP and attention over `model` beats replicating them, small enough to compile in seconds.
    "gpt-demo": Config(vocab=512, seq=32, embed=256, heads=8, head_dim=32, mlp=1024, layers=2, batch=8),
    # Paper sizes (Brown et al. 2020, table 2.1), for abstract tracing and planning only. The
    # vocabulary 50257 is padded to 50304 (a multiple of 128) so it divides over mesh axes.
    "gpt3-125m": Config(vocab=50304, seq=2048, embed=768, heads=12, head_dim=64, mlp=3072, layers=12, batch=256),
    # The paper lists 24 heads of 128 for this size, which does not multiply to d_model=2048;
    # like common re-implementations we use 16 x 128, which gives the stated 1.3B params.
    "gpt3-1.3b": Config(vocab=50304, seq=2048, embed=2048, heads=16, head_dim=128, mlp=8192, layers=24, batch=512),
    "gpt3-175b": Config(
        vocab=50304, seq=2048, embed=12288, heads=96, head_dim=128, mlp=49152, layers=96, batch=1536
    ),
}


sizes = decoder_sizes  # dim name -> size (``key_seq`` is ``seq``)


# --- declarations ----------------------------------------------------------------------------


def block_decls(config: Config, *, stacked: bool = False) -> dict[str, Any]:
    """Declarations of one block's params; with ``stacked``, each gets a leading ``layers`` dim."""
    p = declarer(config, stacked)
    proj = Normal(0.02)
    out = Normal(0.02 / math.sqrt(2 * config.layers))  # GPT-2's scaled residual projections

    def norm() -> dict[str, mj.Param]:
        return {"scale": p("embed", Constant(1.0)), "bias": p("embed", Constant(0.0))}

    return {
        "ln_1": norm(),
        "attn": {
            "w_q": p("embed heads head_dim", proj),
            "w_k": p("embed heads head_dim", proj),
            "w_v": p("embed heads head_dim", proj),
            "w_o": p("heads head_dim embed", out),
        },
        "ln_2": norm(),
        "mlp": {"w_in": p("embed mlp", proj), "w_out": p("mlp embed", out)},
    }


def decls(config: Config, block_decls=block_decls) -> dict[str, Any]:
    """Declarations of the whole decoder (see the module docstring for the names), its blocks
    declared by ``block_decls`` (the MoE decoder passes its own)."""
    dt = config.dtype
    tree: dict[str, Any] = {
        "token_embed": mj.param("vocab embed", Normal(0.02), dt),
        "pos_embed": mj.param("seq embed", Normal(0.01), dt),
    }
    tree.update(layer_decls(config, block_decls))
    tree["ln_f"] = {
        "scale": mj.param("embed", Constant(1.0), dt),
        "bias": mj.param("embed", Constant(0.0), dt),
    }
    tree["unembed"] = mj.param("embed vocab", Normal(0.02), dt)
    return tree


init, abstract_params, param_count = param_functions(decls, sizes)


# --- the model -------------------------------------------------------------------------------


def check_form(form: str) -> str:
    """``form`` if it is one of :data:`ATTENTION_FORMS`; else a one-line error naming it."""
    if form not in ATTENTION_FORMS:
        raise mj.MeshjaxError(f"attention={form!r}: expected one of {', '.join(ATTENTION_FORMS)}")
    return form


def attention(p: dict[str, NamedArray], x: NamedArray, *, form: str = "flash") -> NamedArray:
    """Multi-head causal self-attention, "batch seq embed" -> "batch seq embed" (no residual).

    ``form="flash"`` computes it as one :func:`meshjax.attention` op, ``"einsum"`` as scores,
    mask, softmax and context ops."""
    seq = x.size("seq")
    head_dim = p["w_q"].size("head_dim")
    q = mj.einsum("batch seq embed, embed heads head_dim -> batch seq heads head_dim", x, p["w_q"], name="q")
    k = mj.einsum("batch seq embed, embed heads head_dim -> batch seq heads head_dim", x, p["w_k"], name="k")
    v = mj.einsum("batch seq embed, embed heads head_dim -> batch seq heads head_dim", x, p["w_v"], name="v")
    keys = mj.rename(k, {"seq": "key_seq"}, name="keys")
    values = mj.rename(v, {"seq": "key_seq"}, name="values")
    if check_form(form) == "flash":
        ctx = mj.attention(q, keys, values, causal=True, scale=1.0 / math.sqrt(head_dim), name="context")
        return mj.einsum("batch seq heads head_dim, heads head_dim embed -> batch seq embed", ctx, p["w_o"], name="out")
    scores = mj.einsum(
        "batch seq heads head_dim, batch key_seq heads head_dim -> batch heads seq key_seq", q, keys, name="scores"
    )
    scores = mj.elementwise("multiply", scores, 1.0 / math.sqrt(head_dim), name="scaled")
    causal = mj.greater_equal(mj.arange("seq", seq, name="q_pos"), mj.arange("key_seq", seq, name="k_pos"), name="causal")
    mask = mj.where(causal, 0.0, MASK_VALUE, name="mask")  # "seq key_seq": 0 or MASK_VALUE
    scores = mj.elementwise("add", scores, mask, name="masked")
    probs = mj.softmax(scores, "key_seq", name="probs")
    ctx = mj.einsum(
        "batch heads seq key_seq, batch key_seq heads head_dim -> batch seq heads head_dim", probs, values, name="context"
    )
    return mj.einsum("batch seq heads head_dim, heads head_dim embed -> batch seq embed", ctx, p["w_o"], name="out")


def block(p: dict[str, Any], x: NamedArray, *, eps: float = 1e-5, form: str = "flash") -> NamedArray:
    """One pre-norm decoder block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""
    with mj.scope("attn"):
        h = mj.layer_norm(x, "embed", p["ln_1"]["scale"], p["ln_1"]["bias"], eps=eps, name="ln")
        x = mj.elementwise("add", x, attention(p["attn"], h, form=form), name="residual")
    with mj.scope("mlp"):
        h = mj.layer_norm(x, "embed", p["ln_2"]["scale"], p["ln_2"]["bias"], eps=eps, name="ln")
        h = mj.einsum("batch seq embed, embed mlp -> batch seq mlp", h, p["mlp"]["w_in"], name="hidden")
        h = mj.gelu(h, name="act")
        h = mj.einsum("batch seq mlp, mlp embed -> batch seq embed", h, p["mlp"]["w_out"], name="out")
        x = mj.elementwise("add", x, h, name="residual")
    return x


_BLOCK_KEY = re.compile(r"^block_(\d+)$")


def block_keys(params: dict[str, Any]) -> list[str]:
    """``["block_0", "block_1", ...]`` in numeric order (unrolled params)."""
    keys = [k for k in params if _BLOCK_KEY.match(k)]
    return sorted(keys, key=lambda k: int(_BLOCK_KEY.match(k).group(1)))


def forward(params: dict[str, Any], tokens: NamedArray, *, form: str = "flash") -> NamedArray:
    """Logits "batch seq vocab" for integer ``tokens`` "batch seq"; ``form`` is the attention's.

    Scanned (``params["blocks"]``) or unrolled (``params["block_i"]``) is read off the params.
    """
    with mj.scope("embed"):
        x = mj.embed(tokens, params["token_embed"], name="tokens")
        x = mj.elementwise("add", x, params["pos_embed"], name="out")
    if "blocks" in params:

        def body(h, p):
            return block(p, h, form=form), None

        x, _ = mj.scan(body, x, params["blocks"], dim="layers", name="blocks")
    else:
        for key in block_keys(params):
            x = mj.repeated(key, lambda p, h: block(p, h, form=form), params[key], x)
    with mj.scope("head"):
        x = mj.layer_norm(x, "embed", params["ln_f"]["scale"], params["ln_f"]["bias"], name="ln")
        return mj.einsum("batch seq embed, embed vocab -> batch seq vocab", x, params["unembed"], name="logits")


def loss(params: dict[str, Any], tokens: NamedArray, targets: NamedArray, *, form: str = "flash") -> NamedArray:
    """Mean next-token cross-entropy; ``targets`` "batch seq" are the tokens shifted by one."""
    return next_token_loss(forward(params, tokens, form=form), targets)


def next_token_loss(logits: NamedArray, targets: NamedArray) -> NamedArray:
    """Mean cross-entropy of ``logits`` "batch seq vocab" against ``targets`` "batch seq"
    (tensors ``head/xent`` and ``loss``), the loss of every decoder here."""
    with mj.scope("head"):
        xent = mj.cross_entropy(logits, targets, name="xent")
    return mj.mean(xent, "batch seq", name="loss")


def make_loss(config: Config):
    """``loss(params, tokens, targets)`` with ``config``'s attention form."""
    return loss_with_form(loss, check_form(config.attention))


def example_batch(config: Config, key: jax.Array | int) -> tuple[NamedArray, NamedArray]:
    """``(tokens, targets)``, both int32 "batch seq": a random stream (numpy, seeded by ``key``)
    and its next tokens."""
    stream = host_rng(key, "batch/tokens").integers(0, config.vocab, (config.batch, config.seq + 1), dtype=np.int32)
    return mj.named(jnp.asarray(stream[:, :-1]), "batch seq"), mj.named(jnp.asarray(stream[:, 1:]), "batch seq")


abstract_batch = abstract_tokens  # example_batch as jax.ShapeDtypeStruct values


# --- one block on its own --------------------------------------------------------------------


def transformer_block_loss(params: dict[str, Any], x: NamedArray, *, form: str = "flash") -> NamedArray:
    """One decoder block on ``x`` "batch seq embed" under scope ``block``, then the mean square
    of its output: the smallest model with attention, norms and an MLP. Params: :func:`block_decls`.
    """
    with mj.scope("block"):
        y = block(params, x, form=form)
    return mj.mean(mj.square(y, name="sq"), "batch seq embed", name="loss")


def block_example_batch(config: Config, key: jax.Array | int) -> tuple[NamedArray]:
    """``(x,)`` with ``x`` "batch seq embed", standard normal."""
    x = host_rng(key, "batch/x").standard_normal((config.batch, config.seq, config.embed), dtype=np.float32)
    return (mj.named(jnp.asarray(x.astype(jnp.dtype(config.dtype))), "batch seq embed"),)


def block_abstract_batch(config: Config) -> tuple[NamedArray]:
    return (mj.abstract("batch seq embed", sizes(config), config.dtype),)


__all__ = [
    "Config", "PRESETS", "sizes", "decls", "block_decls", "init", "abstract_params", "param_count",
    "ATTENTION_FORMS", "check_form", "attention", "block", "forward", "loss", "make_loss", "example_batch", "abstract_batch",
    "transformer_block_loss", "block_example_batch", "block_abstract_batch",
]
