"""Flax NNX layers computed with meshjax's named ops.

Every parameter is an ``nnx.Param`` whose ``out_sharding`` metadata holds its LOGICAL dim names
(``("embed", "mlp")``): the key Flax reads in ``nnx.get_partition_spec`` and maps through
``nnx.logical_axis_rules``. ``eager_sharding`` is off, so building a layer needs no mesh. A
layer's ``__call__`` takes and returns :class:`~meshjax.NamedArray`, wraps each param value as
a NamedArray with the param's dims (:func:`value_of`) and calls meshjax ops, so the same code
runs eagerly, under ``nnx.jit``, inside :func:`meshjax.trace` (recording the graph) and inside
a plan's program (pinning every tensor). Sub-layers run under :func:`meshjax.scope` with their
attribute name, so activation names follow param paths (``blocks/0/attn/q`` next to
``blocks/0/attn/w_q``).

Sizes are given by name (``sizes={"embed": 32, "mlp": 64}``) or as keyword ints. Initial
values are drawn on the host with numpy from a key taken from ``rngs.params()`` (fast on CPU,
deterministic in the ``nnx.Rngs`` seed).

Example::

    >>> from flax import nnx
    >>> dense = Dense("embed", "mlp", {"embed": 4, "mlp": 8}, rngs=nnx.Rngs(0))
    >>> dense.kernel.get_metadata("out_sharding")
    ('embed', 'mlp')
    >>> dense(mj.named(jnp.ones((2, 4)), "batch embed")).dims
    ('batch', 'mlp')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

import meshjax as mj
from meshjax.errors import ShapeError
from meshjax.models import llama as _llama
from meshjax.models import moe as _moe
from meshjax.models.common import Normal, host_rng
from meshjax.models.transformer import MASK_VALUE
from meshjax.named import DimsLike, NamedArray, parse_dims, shape_of
from meshjax.ops import parse_einsum

SHARDING_KEY = "out_sharding"  # the nnx.Variable metadata key holding the logical dim names


# --- params ----------------------------------------------------------------------------------


def param(value: Any, dims: DimsLike) -> nnx.Param:
    """An ``nnx.Param`` holding ``value`` with logical dims ``dims`` (no eager sharding)."""
    dims = parse_dims(dims)
    if len(getattr(value, "shape", ())) != len(dims):
        raise ShapeError(f"param of shape {getattr(value, 'shape', ())} cannot have dims {' '.join(dims)!r}")
    return nnx.Param(value, out_sharding=dims, eager_sharding=False)


def init_param(
    rngs: nnx.Rngs, dims: DimsLike, sizes: Mapping[str, int], init: Any = None, dtype: Any = jnp.float32
) -> nnx.Param:
    """A new param of ``dims`` (sized by ``sizes``). ``init`` is a :class:`Normal`/:class:`Constant`
    (drawn on the host) or any ``jax.nn.initializers`` callable; default ``Normal(0.02)``."""
    dims = parse_dims(dims)
    shape = shape_of(dims, sizes, context="param")
    init = Normal(0.02) if init is None else init
    key = rngs.params()
    if hasattr(init, "host"):
        value = jnp.asarray(init.host(host_rng(key), shape, jnp.dtype(dtype)))
    else:
        value = init(key, shape, jnp.dtype(dtype))
    return param(value, dims)


def dims_of(variable: nnx.Variable) -> tuple[str, ...]:
    """The logical dims of a param (its ``out_sharding`` metadata)."""
    dims = variable.get_metadata(SHARDING_KEY, None)
    if not dims:
        raise ShapeError(f"{type(variable).__name__} has no {SHARDING_KEY!r} metadata naming its dims")
    return tuple(dims)


def value_of(variable: nnx.Variable) -> NamedArray:
    """A param's value as a NamedArray with the param's dims."""
    return NamedArray(variable.get_value(), dims_of(variable))


def _sizes(sizes: Mapping[str, int] | None, **named: int | None) -> dict[str, int]:
    out = dict(sizes or {})
    out.update({k: int(v) for k, v in named.items() if v is not None})
    return out


# --- basic layers ----------------------------------------------------------------------------


class Einsum(nnx.Module):
    """``spec(x, kernel)`` for a two-operand named einsum; the kernel has the second term's dims.

    >>> layer = Einsum("batch seq embed, embed mlp -> batch seq mlp", {"embed": 4, "mlp": 8}, rngs=nnx.Rngs(0))
    """

    def __init__(
        self, spec: str, sizes: Mapping[str, int], *, rngs: nnx.Rngs, init: Any = None,
        dtype: Any = jnp.float32, name: str = "out",
    ):
        terms, _ = parse_einsum(spec)
        if len(terms) != 2:
            raise ShapeError(f"Einsum {spec!r}: needs exactly two operands (input, kernel)")
        self.spec = spec
        self.name = name
        self.kernel = init_param(rngs, terms[1], sizes, init, dtype)

    def __call__(self, x: NamedArray, *, name: str | None = None) -> NamedArray:
        return mj.einsum(self.spec, x, value_of(self.kernel), name=name or self.name)


class Dense(nnx.Module):
    """Contract the ``in_dims`` of the input with a kernel ``in_dims out_dims``; other dims pass through."""

    def __init__(
        self, in_dims: DimsLike, out_dims: DimsLike, sizes: Mapping[str, int], *, rngs: nnx.Rngs,
        init: Any = None, dtype: Any = jnp.float32, name: str = "out",
    ):
        self.in_dims = parse_dims(in_dims)
        self.out_dims = parse_dims(out_dims)
        self.name = name
        self.kernel = init_param(rngs, (*self.in_dims, *self.out_dims), sizes, init, dtype)

    def __call__(self, x: NamedArray, *, name: str | None = None) -> NamedArray:
        kernel = value_of(self.kernel)
        keep = [d for d in x.dims if d not in self.in_dims]
        spec = f"{' '.join(x.dims)}, {' '.join(kernel.dims)} -> {' '.join([*keep, *self.out_dims])}"
        return mj.einsum(spec, x, kernel, name=name or self.name)


class Embed(nnx.Module):
    """A ``vocab embed`` table looked up by integer ids."""

    def __init__(self, vocab: int, embed: int, *, rngs: nnx.Rngs, init: Any = None, dtype: Any = jnp.float32,
                 dims: DimsLike = "vocab embed"):
        dims = parse_dims(dims)
        self.vocab_dim = dims[0]
        self.embedding = init_param(rngs, dims, dict(zip(dims, (vocab, embed))), init, dtype)

    def __call__(self, ids: NamedArray, *, name: str = "tokens") -> NamedArray:
        return mj.embed(ids, value_of(self.embedding), vocab=self.vocab_dim, name=name)


class LayerNorm(nnx.Module):
    """Layer norm over ``dim`` with a scale and a bias."""

    def __init__(self, size: int, *, rngs: nnx.Rngs | None = None, dim: str = "embed", eps: float = 1e-5,
                 dtype: Any = jnp.float32):
        self.dim, self.eps = dim, eps
        self.scale = param(jnp.ones((size,), dtype), (dim,))
        self.bias = param(jnp.zeros((size,), dtype), (dim,))

    def __call__(self, x: NamedArray, *, name: str = "norm") -> NamedArray:
        return mj.layer_norm(x, self.dim, value_of(self.scale), value_of(self.bias), eps=self.eps, name=name)


class RMSNorm(nnx.Module):
    """RMS norm over ``dim`` with a scale."""

    def __init__(self, size: int, *, rngs: nnx.Rngs | None = None, dim: str = "embed", eps: float = 1e-5,
                 dtype: Any = jnp.float32):
        self.dim, self.eps = dim, eps
        self.scale = param(jnp.ones((size,), dtype), (dim,))

    def __call__(self, x: NamedArray, *, name: str = "norm") -> NamedArray:
        return mj.rms_norm(x, self.dim, value_of(self.scale), eps=self.eps, name=name)


# --- attention -------------------------------------------------------------------------------


def attend(
    x: NamedArray, w_q: NamedArray, w_k: NamedArray, w_v: NamedArray, w_o: NamedArray, *,
    causal: bool = True, rotary: bool = False, rope_theta: float = _llama.ROPE_THETA,
) -> NamedArray:
    """Self-attention of "batch seq embed". Multi-head when the key weights have ``heads``;
    grouped-query when they have ``kv_heads`` (queries' ``heads`` split into ``kv_heads group``,
    as in :mod:`meshjax.models.llama`)."""
    seq = x.size("seq")
    head_dim = w_q.size("head_dim")
    kv = "kv_heads" if "kv_heads" in w_k.dims else "heads"
    q = mj.einsum("batch seq embed, embed heads head_dim -> batch seq heads head_dim", x, w_q, name="q")
    k = mj.einsum(f"batch seq embed, embed {kv} head_dim -> batch seq {kv} head_dim", x, w_k, name="k")
    v = mj.einsum(f"batch seq embed, embed {kv} head_dim -> batch seq {kv} head_dim", x, w_v, name="v")
    if rotary:
        with mj.scope("rope"):
            cos, sin = _llama.rotary_tables(seq, head_dim, rope_theta, x.dtype)
        q = _llama.apply_rotary(q, cos, sin, name="q_rope")
        k = _llama.apply_rotary(k, cos, sin, name="k_rope")
    heads = "heads"
    if kv == "kv_heads":
        q = mj.split_dim(q, "heads", "kv_heads group", {"kv_heads": w_k.size("kv_heads")}, name="q_groups")
        heads = "kv_heads group"
    keys = mj.rename(k, {"seq": "key_seq"}, name="keys")
    values = mj.rename(v, {"seq": "key_seq"}, name="values")
    scores = mj.einsum(
        f"batch seq {heads} head_dim, batch key_seq {kv} head_dim -> batch {heads} seq key_seq", q, keys, name="scores"
    )
    scores = mj.elementwise("multiply", scores, 1.0 / math.sqrt(head_dim), name="scaled")
    if causal:
        q_pos, k_pos = mj.arange("seq", seq, name="q_pos"), mj.arange("key_seq", seq, name="k_pos")
        mask = mj.where(mj.greater_equal(q_pos, k_pos, name="causal"), 0.0, MASK_VALUE, name="mask")
        scores = mj.elementwise("add", scores, mask, name="masked")
    probs = mj.softmax(scores, "key_seq", name="probs")
    ctx = mj.einsum(
        f"batch {heads} seq key_seq, batch key_seq {kv} head_dim -> batch seq {heads} head_dim", probs, values, name="context"
    )
    if kv == "kv_heads":
        ctx = mj.merge_dims(ctx, "kv_heads group", "heads", name="context_heads")
    return mj.einsum("batch seq heads head_dim, heads head_dim embed -> batch seq embed", ctx, w_o, name="out")


class Attention(nnx.Module):
    """Causal self-attention: multi-head, or grouped-query when ``kv_heads`` is given (and
    differs from ``heads``); rotary position embeddings with ``rotary=True``.

    Params: ``w_q`` "embed heads head_dim", ``w_k``/``w_v`` "embed heads head_dim" (or
    "embed kv_heads head_dim"), ``w_o`` "heads head_dim embed".
    """

    def __init__(
        self, embed: int, heads: int, head_dim: int, *, rngs: nnx.Rngs, kv_heads: int | None = None,
        causal: bool = True, rotary: bool = False, rope_theta: float = _llama.ROPE_THETA,
        out_init: Any = None, dtype: Any = jnp.float32,
    ):
        gqa = kv_heads is not None and kv_heads != heads
        if gqa and heads % kv_heads:
            raise ShapeError(f"Attention: heads={heads} is not a multiple of kv_heads={kv_heads}")
        sizes = _sizes(None, embed=embed, heads=heads, head_dim=head_dim, kv_heads=kv_heads)
        kv = "kv_heads" if gqa else "heads"
        self.causal, self.rotary, self.rope_theta = causal, rotary, rope_theta
        self.w_q = init_param(rngs, "embed heads head_dim", sizes, None, dtype)
        self.w_k = init_param(rngs, f"embed {kv} head_dim", sizes, None, dtype)
        self.w_v = init_param(rngs, f"embed {kv} head_dim", sizes, None, dtype)
        self.w_o = init_param(rngs, "heads head_dim embed", sizes, out_init, dtype)

    def __call__(self, x: NamedArray) -> NamedArray:
        return attend(
            x, value_of(self.w_q), value_of(self.w_k), value_of(self.w_v), value_of(self.w_o),
            causal=self.causal, rotary=self.rotary, rope_theta=self.rope_theta,
        )


# --- feed-forward ----------------------------------------------------------------------------


class MLP(nnx.Module):
    """``w_out(gelu(w_in x))`` or, with ``activation="swiglu"``, ``w_down(silu(w_gate x) * w_up x)``."""

    def __init__(self, embed: int, mlp: int, *, rngs: nnx.Rngs, activation: str = "gelu", out_init: Any = None,
                 dtype: Any = jnp.float32):
        sizes = {"embed": embed, "mlp": mlp}
        self.activation = activation
        if activation == "gelu":
            self.w_in = init_param(rngs, "embed mlp", sizes, None, dtype)
            self.w_out = init_param(rngs, "mlp embed", sizes, out_init, dtype)
        elif activation == "swiglu":
            self.w_gate = init_param(rngs, "embed mlp", sizes, None, dtype)
            self.w_up = init_param(rngs, "embed mlp", sizes, None, dtype)
            self.w_down = init_param(rngs, "mlp embed", sizes, out_init, dtype)
        else:
            raise ValueError(f"MLP: unknown activation {activation!r} (gelu or swiglu)")

    def __call__(self, x: NamedArray) -> NamedArray:
        if self.activation == "swiglu":
            p = {k: value_of(getattr(self, k)) for k in ("w_gate", "w_up", "w_down")}
            return _llama.swiglu(p, x)
        h = mj.einsum("batch seq embed, embed mlp -> batch seq mlp", x, value_of(self.w_in), name="hidden")
        h = mj.gelu(h, name="act")
        return mj.einsum("batch seq mlp, mlp embed -> batch seq embed", h, value_of(self.w_out), name="out")


class MoE(nnx.Module):
    """Mixture-of-experts FFN (see :mod:`meshjax.models.moe`); returns ``(y, aux_loss)``.

    Params: ``router`` "embed experts", ``w_in`` "experts embed mlp", ``w_out`` "experts mlp embed".
    """

    def __init__(
        self, embed: int, mlp: int, experts: int, *, rngs: nnx.Rngs, top_k: int = _moe.TOP_K,
        capacity_factor: float = _moe.CAPACITY_FACTOR, out_init: Any = None, dtype: Any = jnp.float32,
    ):
        sizes = {"embed": embed, "mlp": mlp, "experts": experts}
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.router = init_param(rngs, "embed experts", sizes, None, dtype)
        self.w_in = init_param(rngs, "experts embed mlp", sizes, None, dtype)
        self.w_out = init_param(rngs, "experts mlp embed", sizes, out_init, dtype)

    def __call__(self, x: NamedArray) -> tuple[NamedArray, NamedArray]:
        p = {k: value_of(getattr(self, k)) for k in ("router", "w_in", "w_out")}
        return _moe.moe_ffn(p, x, top_k=self.top_k, capacity_factor=self.capacity_factor)


# --- blocks and stacks -----------------------------------------------------------------------


class Block(nnx.Module):
    """A pre-norm decoder block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``.

    ``norm``: ``"layer"`` or ``"rms"``; ``ffn``: ``"gelu"``, ``"swiglu"`` or ``"moe"`` (then
    the call returns ``(x, aux_loss)``). Attributes: ``attn_norm``, ``attn``, ``ffn_norm`` and
    ``mlp`` (or ``moe``); activations under the scopes ``attn`` and ``mlp`` (or ``moe``).
    """

    def __init__(
        self, embed: int, heads: int, head_dim: int, mlp: int, *, rngs: nnx.Rngs, kv_heads: int | None = None,
        norm: str = "layer", ffn: str = "gelu", rotary: bool = False, experts: int = 4,
        top_k: int = _moe.TOP_K, capacity_factor: float = _moe.CAPACITY_FACTOR, layers: int = 1,
        dtype: Any = jnp.float32,
    ):
        if norm not in ("layer", "rms"):
            raise ValueError(f"Block: unknown norm {norm!r} (layer or rms)")
        Norm = LayerNorm if norm == "layer" else RMSNorm
        out_init = Normal(0.02 / math.sqrt(2 * layers))
        self.ffn = ffn
        self.attn_norm = Norm(embed, dtype=dtype)
        self.attn = Attention(embed, heads, head_dim, kv_heads=kv_heads, rotary=rotary, out_init=out_init,
                              rngs=rngs, dtype=dtype)
        self.ffn_norm = Norm(embed, dtype=dtype)
        if ffn == "moe":
            self.moe = MoE(embed, mlp, experts, top_k=top_k, capacity_factor=capacity_factor, out_init=out_init,
                           rngs=rngs, dtype=dtype)
        else:
            self.mlp = MLP(embed, mlp, activation=ffn, out_init=out_init, rngs=rngs, dtype=dtype)

    def __call__(self, x: NamedArray):
        with mj.scope("attn"):
            x = mj.elementwise("add", x, self.attn(self.attn_norm(x)), name="residual")
        if self.ffn == "moe":
            with mj.scope("moe"):
                h, aux = self.moe(self.ffn_norm(x))
                return mj.elementwise("add", x, h, name="residual"), aux
        with mj.scope("mlp"):
            return mj.elementwise("add", x, self.mlp(self.ffn_norm(x)), name="residual")


class Stack(nnx.Module):
    """``layers`` copies of a layer with their params stacked along a leading ``dim`` (each
    param's dims become ``("layers", *dims)``), run with :func:`meshjax.scan`: the block is
    traced, costed and laid out once. ``make(rngs)`` builds one layer; its params are drawn
    independently per layer. A layer returning ``(x, y)`` has its ``y`` stacked along ``dim``.

    The stacked layer is the attribute ``layer`` (param paths ``.../layer/attn/w_q``); its
    activations are named under ``name`` (``blocks/attn/q``).
    """

    def __init__(self, make: Callable[[nnx.Rngs], nnx.Module], layers: int, *, rngs: nnx.Rngs,
                 dim: str = "layers", name: str = "blocks"):
        self.dim, self.name = dim, name
        modules = [make(rngs) for _ in range(layers)]
        graphdef, first, *rest = nnx.split(modules[0], nnx.Param, ...)
        flats = [list(nnx.to_flat_state(nnx.state(m, nnx.Param))) for m in modules]
        stacked = []
        for i, (path, var) in enumerate(flats[0]):
            values = jnp.stack([flat[i][1].get_value() for flat in flats])
            stacked.append((path, var.replace(values, **{SHARDING_KEY: (dim, *dims_of(var))})))
        self.layer = nnx.merge(graphdef, nnx.from_flat_state(stacked), *rest)

    def __call__(self, x: NamedArray):
        graphdef, state, *rest = nnx.split(self.layer, nnx.Param, ...)
        flat = list(nnx.to_flat_state(state))
        xs = [value_of(var) for _, var in flat]
        dim = self.dim

        def body(h, layer_values):
            per_layer = [
                (path, var.replace(v.value, **{SHARDING_KEY: tuple(d for d in dims_of(var) if d != dim)}))
                for (path, var), v in zip(flat, layer_values)
            ]
            layer = nnx.merge(graphdef, nnx.from_flat_state(per_layer), *rest)
            out = layer(h)
            return out if isinstance(out, tuple) else (out, None)

        x, ys = mj.scan(body, x, xs, dim=dim, name=self.name)
        return x if ys is None else (x, ys)
