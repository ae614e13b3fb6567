"""A LLaMA-style decoder over named dims: RMSNorm, SwiGLU MLP, grouped-query causal attention
with rotary position embeddings, untied unembedding; unrolled or scanned over ``layers``.

Dims: ``batch``, ``seq`` (``key_seq`` inside attention), ``embed``, ``heads`` (query heads),
``kv_heads`` (key/value heads), ``group`` (query heads per kv head, ``heads // kv_heads``),
``head_dim``, ``half`` and ``pair`` (``head_dim`` seen as ``half x 2`` rotary pairs), ``mlp``,
``vocab``, ``layers`` (stacked block params when ``scan_layers``).

Grouped-query formulation: the query weights keep the ``heads`` dim (``embed heads head_dim``,
so Megatron rules ``heads:model`` apply to them and to ``w_o`` unchanged) and the key/value
weights have ``kv_heads`` (``embed kv_heads head_dim``). Inside attention the queries' ``heads``
dim is split row-major into ``kv_heads group`` (:func:`meshjax.split_dim`; query head ``h`` uses
kv head ``h // group``, as ``repeat_kv`` in common implementations), so the scores einsum
shares ``kv_heads`` between queries and keys and never copies keys. Splitting ``heads`` over a
mesh axis maps to splitting ``kv_heads``; ``group`` stays whole.

Rotary embeddings (interleaved pairs, as in the original LLaMA code): ``head_dim`` is split into
``half pair`` (pair = 2); pair ``i`` is rotated by ``pos * theta ** (-2i / head_dim)``. The
angles come from :func:`meshjax.arange`, the sin/cos from :func:`meshjax.elementwise`, the
90-degree rotation of each pair is an einsum with a constant 2x2 matrix.

Params (pytree path = tensor name)::

    token_embed                          vocab embed
    block_0/attn_norm/scale              embed
    block_0/attn/w_q                     embed heads head_dim
    block_0/attn/w_k, w_v                embed kv_heads head_dim
    block_0/attn/w_o                     heads head_dim embed
    block_0/mlp_norm/scale               embed
    block_0/mlp/w_gate, w_up             embed mlp
    block_0/mlp/w_down                   mlp embed
    ... (or blocks/... with a leading ``layers`` dim when scanned)
    norm_f/scale                         embed
    unembed                              embed vocab

Example::

    >>> import jax
    >>> from meshjax.models import llama
    >>> config = llama.PRESETS["llama-tiny"]
    >>> params = llama.init(config, 0)
    >>> tokens, targets = llama.example_batch(config, 1)
    >>> jax.jit(llama.loss)(params, tokens, targets).dims     # one compile, not op by op
    ()
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import meshjax as mj
from meshjax.models.common import (
    Constant, DecoderConfig, Normal, abstract_tokens, declarer, decoder_sizes, layer_decls, loss_with_form,
    param_functions,
)
from meshjax.models.transformer import MASK_VALUE, block_keys, check_form, next_token_loss
from meshjax.models.transformer import example_batch as _gpt_example_batch
from meshjax.named import NamedArray

ROPE_THETA = 10000.0  # rotary base (LLaMA 1/2)
NORM_EPS = 1e-5  # RMSNorm epsilon


@dataclass(frozen=True)
class Config(DecoderConfig):
    """Sizes of a LLaMA-style decoder. ``heads`` must be a multiple of ``kv_heads``."""

    kv_heads: int = 2
    mlp: int = 64


PRESETS: dict[str, Config] = {
    "llama-tiny": Config(),
    # Paper sizes (Touvron et al. 2023), for abstract tracing and planning only.
    "llama-7b": Config(
        vocab=32000, seq=4096, embed=4096, heads=32, kv_heads=32, head_dim=128, mlp=11008, layers=32, batch=512
    ),
    # Llama 3 8B (Grattafiori et al. 2024): 8 key/value heads, a 128K vocabulary, rope theta
    # 500000 in the paper (this model's rotary base is fixed; it does not change costs).
    "llama3-8b": Config(
        vocab=128256, seq=8192, embed=4096, heads=32, kv_heads=8, head_dim=128, mlp=14336, layers=32, batch=8
    ),
    "llama-70b": Config(
        vocab=32000, seq=4096, embed=8192, heads=64, kv_heads=8, head_dim=128, mlp=28672, layers=80, batch=512
    ),
}


def _check(config: Config) -> None:
    if config.heads % config.kv_heads:
        raise mj.ShapeError(f"llama: heads={config.heads} is not a multiple of kv_heads={config.kv_heads}")
    if config.head_dim % 2:
        raise mj.ShapeError(f"llama: head_dim={config.head_dim} must be even for rotary embeddings")


def sizes(config: Config) -> dict[str, int]:
    """Dim name -> size."""
    _check(config)
    return {
        **decoder_sizes(config),
        "kv_heads": config.kv_heads,
        "group": config.heads // config.kv_heads,
        "half": config.head_dim // 2,
        "pair": 2,
    }


# --- declarations ----------------------------------------------------------------------------


def block_decls(config: Config, *, stacked: bool = False) -> dict[str, Any]:
    """One block's params; with ``stacked``, each gets a leading ``layers`` dim."""
    p = declarer(config, stacked)
    proj = Normal(0.02)
    out = Normal(0.02 / math.sqrt(2 * config.layers))

    return {
        "attn_norm": {"scale": p("embed", Constant(1.0))},
        "attn": {
            "w_q": p("embed heads head_dim", proj),
            "w_k": p("embed kv_heads head_dim", proj),
            "w_v": p("embed kv_heads head_dim", proj),
            "w_o": p("heads head_dim embed", out),
        },
        "mlp_norm": {"scale": p("embed", Constant(1.0))},
        "mlp": {"w_gate": p("embed mlp", proj), "w_up": p("embed mlp", proj), "w_down": p("mlp embed", out)},
    }


def decls(config: Config) -> dict[str, Any]:
    """Declarations of the whole decoder (see the module docstring for the names)."""
    _check(config)
    dt = config.dtype
    tree: dict[str, Any] = {"token_embed": mj.param("vocab embed", Normal(0.02), dt)}
    tree.update(layer_decls(config, block_decls))
    tree["norm_f"] = {"scale": mj.param("embed", Constant(1.0), dt)}
    tree["unembed"] = mj.param("embed vocab", Normal(0.02), dt)
    return tree


init, abstract_params, param_count = param_functions(decls, sizes)


_QUARTER_TURN = np.array([[0.0, 1.0], [-1.0, 0.0]], np.float32)


def rotary_tables(seq: int, head_dim: int, theta: float = ROPE_THETA, dtype=jnp.float32) -> tuple[NamedArray, NamedArray]:
    """``(cos, sin)``, each "seq half": the rotary angles ``pos * theta ** (-2i / head_dim)``."""
    half = head_dim // 2

    def inv_freq(i):
        return jnp.power(jnp.float32(theta), -2.0 * i.astype(jnp.float32) / head_dim)

    def cos(a):
        return jnp.cos(a).astype(dtype)

    def sin(a):
        return jnp.sin(a).astype(dtype)

    pos = mj.cast(mj.arange("seq", seq, name="pos"), jnp.float32, name="pos_f")
    freq = mj.elementwise(inv_freq, mj.arange("half", half, name="freq_index"), name="inv_freq")
    angle = mj.elementwise("multiply", pos, freq, name="angle")  # "seq half"
    return mj.elementwise(cos, angle, name="cos"), mj.elementwise(sin, angle, name="sin")


def apply_rotary(x: NamedArray, cos: NamedArray, sin: NamedArray, *, name: str = "rope") -> NamedArray:
    """Rotate the ``head_dim`` pairs of ``x`` (any dims with ``seq`` and ``head_dim``)."""
    with mj.scope(name):
        pairs = mj.split_dim(x, "head_dim", "half pair", {"pair": 2}, name="pairs")
        turn = mj.named(jnp.asarray(_QUARTER_TURN, x.dtype), "pair_in pair")
        pairs_in = mj.rename(pairs, {"pair": "pair_in"}, name="pairs_in")
        dims = " ".join(pairs.dims)
        turned = mj.einsum(f"{' '.join(pairs_in.dims)}, pair_in pair -> {dims}", pairs_in, turn, name="turned")
        rotated = mj.elementwise(
            "add",
            mj.elementwise("multiply", pairs, cos, name="x_cos"),
            mj.elementwise("multiply", turned, sin, name="x_sin"),
            name="rotated",
        )
        return mj.merge_dims(rotated, "half pair", "head_dim", name="out")


def attention(p: dict[str, NamedArray], x: NamedArray, cos: NamedArray, sin: NamedArray, *, form: str = "flash") -> NamedArray:
    """Grouped-query causal self-attention with rotary embeddings, "batch seq embed" -> same.

    ``form="flash"``: one :func:`meshjax.attention` op with ``kv_heads``; ``"einsum"``: the
    grouped scores, mask, softmax and context ops described in the module docstring."""
    seq = x.size("seq")
    kv_heads = p["w_k"].size("kv_heads")
    head_dim = p["w_q"].size("head_dim")
    q = mj.einsum("batch seq embed, embed heads head_dim -> batch seq heads head_dim", x, p["w_q"], name="q")
    k = mj.einsum("batch seq embed, embed kv_heads head_dim -> batch seq kv_heads head_dim", x, p["w_k"], name="k")
    v = mj.einsum("batch seq embed, embed kv_heads head_dim -> batch seq kv_heads head_dim", x, p["w_v"], name="v")
    q = apply_rotary(q, cos, sin, name="q_rope")
    k = apply_rotary(k, cos, sin, name="k_rope")
    if check_form(form) == "flash":
        keys = mj.rename(k, {"seq": "key_seq"}, name="keys")
        values = mj.rename(v, {"seq": "key_seq"}, name="values")
        ctx = mj.attention(
            q, keys, values, kv_heads="kv_heads", causal=True, scale=1.0 / math.sqrt(head_dim), name="context"
        )
        return mj.einsum("batch seq heads head_dim, heads head_dim embed -> batch seq embed", ctx, p["w_o"], name="out")
    q = mj.split_dim(q, "heads", "kv_heads group", {"kv_heads": kv_heads}, name="q_groups")
    keys = mj.rename(k, {"seq": "key_seq"}, name="keys")
    values = mj.rename(v, {"seq": "key_seq"}, name="values")
    scores = mj.einsum(
        "batch seq kv_heads group head_dim, batch key_seq kv_heads head_dim -> batch kv_heads group seq key_seq",
        q, keys, name="scores",
    )
    scores = mj.elementwise("multiply", scores, 1.0 / math.sqrt(head_dim), name="scaled")
    causal = mj.greater_equal(mj.arange("seq", seq, name="q_pos"), mj.arange("key_seq", seq, name="k_pos"), name="causal")
    mask = mj.where(causal, 0.0, MASK_VALUE, name="mask")
    scores = mj.elementwise("add", scores, mask, name="masked")
    probs = mj.softmax(scores, "key_seq", name="probs")
    ctx = mj.einsum(
        "batch kv_heads group seq key_seq, batch key_seq kv_heads head_dim -> batch seq kv_heads group head_dim",
        probs, values, name="context",
    )
    ctx = mj.merge_dims(ctx, "kv_heads group", "heads", name="context_heads")
    return mj.einsum("batch seq heads head_dim, heads head_dim embed -> batch seq embed", ctx, p["w_o"], name="out")


def swiglu(p: dict[str, NamedArray], x: NamedArray) -> NamedArray:
    """``w_down(silu(w_gate x) * w_up x)``, "batch seq embed" -> same."""
    gate = mj.einsum("batch seq embed, embed mlp -> batch seq mlp", x, p["w_gate"], name="gate")
    up = mj.einsum("batch seq embed, embed mlp -> batch seq mlp", x, p["w_up"], name="up")
    h = mj.elementwise("multiply", mj.silu(gate, name="act"), up, name="hidden")
    return mj.einsum("batch seq mlp, mlp embed -> batch seq embed", h, p["w_down"], name="out")


def block(
    p: dict[str, Any], x: NamedArray, cos: NamedArray, sin: NamedArray, *, eps: float = NORM_EPS, form: str = "flash"
) -> NamedArray:
    """One pre-norm LLaMA block: ``x + attn(rms(x))``, then ``x + swiglu(rms(x))``."""
    with mj.scope("attn"):
        h = mj.rms_norm(x, "embed", p["attn_norm"]["scale"], eps=eps, name="norm")
        x = mj.elementwise("add", x, attention(p["attn"], h, cos, sin, form=form), name="residual")
    with mj.scope("mlp"):
        h = mj.rms_norm(x, "embed", p["mlp_norm"]["scale"], eps=eps, name="norm")
        x = mj.elementwise("add", x, swiglu(p["mlp"], h), name="residual")
    return x


def forward(
    params: dict[str, Any], tokens: NamedArray, *, rope_theta: float = ROPE_THETA, eps: float = NORM_EPS, form: str = "flash"
) -> NamedArray:
    """Logits "batch seq vocab" for integer ``tokens`` "batch seq" (scanned or unrolled by the params)."""
    head_dim = (params["blocks"] if "blocks" in params else params[block_keys(params)[0]])["attn"]["w_q"].size("head_dim")
    with mj.scope("embed"):
        x = mj.embed(tokens, params["token_embed"], name="tokens")
    with mj.scope("rope"):
        cos, sin = rotary_tables(tokens.size("seq"), head_dim, rope_theta, x.dtype)
    if "blocks" in params:

        def body(h, p):
            return block(p, h, cos, sin, eps=eps, form=form), None

        x, _ = mj.scan(body, x, params["blocks"], dim="layers", name="blocks")
    else:
        for key in block_keys(params):
            x = mj.repeated(key, lambda p, h: block(p, h, cos, sin, eps=eps, form=form), params[key], x)
    with mj.scope("head"):
        x = mj.rms_norm(x, "embed", params["norm_f"]["scale"], eps=eps, name="norm")
        return mj.einsum("batch seq embed, embed vocab -> batch seq vocab", x, params["unembed"], name="logits")


def loss(params: dict[str, Any], tokens: NamedArray, targets: NamedArray, *, form: str = "flash") -> NamedArray:
    """Mean next-token cross-entropy; ``targets`` "batch seq" are the tokens shifted by one."""
    return next_token_loss(forward(params, tokens, form=form), targets)


def make_loss(config: Config):
    """``loss(params, tokens, targets)`` with ``config``'s attention form."""
    return loss_with_form(loss, check_form(config.attention))


def example_batch(config: Config, key: jax.Array | int) -> tuple[NamedArray, NamedArray]:
    """``(tokens, targets)``, int32 "batch seq" (a random stream and its next tokens)."""
    return _gpt_example_batch(config, key)


abstract_batch = abstract_tokens  # example_batch as jax.ShapeDtypeStruct values


__all__ = [
    "Config", "PRESETS", "sizes", "decls", "block_decls", "init", "abstract_params", "param_count",
    "rotary_tables", "apply_rotary", "attention", "swiglu", "block", "forward", "loss", "make_loss",
    "example_batch", "abstract_batch",
]
