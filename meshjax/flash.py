"""Memory-efficient attention on plain arrays: the kernels behind :func:`meshjax.ops.attention`.

Shapes follow :func:`jax.nn.dot_product_attention`: ``q [B, T, N, H]``, ``k`` and ``v
[B, S, K, H]`` with ``N`` a multiple of ``K`` (query head ``n`` reads key/value head
``n // (N // K)``). Two implementations:

- ``"cudnn"``: :func:`jax.nn.dot_product_attention` with cuDNN's fused flash kernel (GPU,
  bfloat16/float16);
- ``"blockwise"``: online softmax over blocks of keys in JAX (Rabe & Staats 2021, with the
  flash-attention backward of Dao 2022). The forward keeps a running row maximum and row sum per
  query and never forms more than one ``[B, N, T, block]`` tile of scores; the backward recomputes
  each tile from ``q``, ``k``, ``v``, the output and the per-row log-sum-exp, the only residuals
  it keeps. It runs anywhere, so XLA:CPU's compiled memory shows the saving.

``implementation=None`` picks cuDNN on GPU for 16-bit dtypes and the blockwise kernel otherwise.
Causal masking is top-left aligned (query ``i`` sees keys ``0..i``), as in JAX.

Example::

    >>> import jax.numpy as jnp
    >>> q = jnp.ones((1, 8, 4, 16)); kv = jnp.ones((1, 8, 2, 16))
    >>> dot_product_attention(q, kv, kv, causal=True, block=4).shape
    (1, 8, 4, 16)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("blockwise", "cudnn")
DEFAULT_BLOCK = 128  # keys per tile of the blockwise kernel
_MASKED = -1e30  # finite, so a fully masked tile gives exp(-inf - m) = 0 without NaNs


def choose_implementation(dtype, implementation: str | None = None) -> str:
    """The kernel to run: ``implementation`` if given, else cuDNN on GPU for 16-bit floats and the
    blockwise kernel elsewhere.

    >>> choose_implementation(jnp.float32)
    'blockwise'
    """
    if implementation is not None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attention implementation {implementation!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
        return implementation
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "blockwise"


def block_size(keys: int, block: int = DEFAULT_BLOCK) -> int:
    """The largest divisor of ``keys`` not above ``block``: the blockwise kernel's tile width.

    >>> block_size(1000, 512), block_size(2048, 512), block_size(7, 512)
    (500, 512, 7)
    """
    return max(d for d in range(1, min(keys, block) + 1) if keys % d == 0)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    scale: float | None = None,
    implementation: str | None = None,
    block: int = DEFAULT_BLOCK,
) -> jax.Array:
    """``softmax(q k^T * scale [+ causal mask]) v`` per head without a ``[T, S]`` residual."""
    batch, t, n, h = q.shape
    _, s, kv, _ = k.shape
    if n % kv:
        raise ValueError(f"attention: {n} query heads are not a multiple of {kv} key/value heads")
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    if choose_implementation(q.dtype, implementation) == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")
    return _blockwise(q, k, v, scale, causal, block_size(s, block))


def _grouped(q: jax.Array, kv: int) -> jax.Array:
    """``[B, T, N, H] -> [B, T, K, N/K, H]``: query heads grouped by the key head they read."""
    b, t, n, h = q.shape
    return q.reshape(b, t, kv, n // kv, h)


def _tiles(x: jax.Array, width: int) -> jax.Array:
    """``[B, S, K, H] -> [S/width, B, width, K, H]``: the scanned key blocks."""
    b, s, kv, h = x.shape
    return jnp.moveaxis(x.reshape(b, s // width, width, kv, h), 1, 0)


def _scores(q, k_tile, start, scale, causal):
    """Scaled scores of all queries against one key tile, ``[B, K, G, T, width]`` in float32."""
    s = jnp.einsum("btkgh,bskh->bkgts", q, k_tile, preferred_element_type=jnp.float32) * scale
    if causal:
        rows = jnp.arange(q.shape[1])[:, None]
        cols = start + jnp.arange(k_tile.shape[1])[None, :]
        s = jnp.where(rows >= cols, s, _MASKED)
    return s


def _forward(q, k, v, scale, causal, width):
    """Output ``[B, T, N, H]`` and log-sum-exp ``[B, K, G, T]`` (float32)."""
    shape = q.shape
    q = _grouped(q, k.shape[2])
    b, t, kv, g, h = q.shape
    ks, vs = _tiles(k, width), _tiles(v, width)
    starts = jnp.arange(ks.shape[0]) * width

    def step(carry, tile):
        m, l, acc = carry
        k_tile, v_tile, start = tile
        s = _scores(q, k_tile, start, scale, causal)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(-1)
        pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(v.dtype), v_tile, preferred_element_type=jnp.float32)
        acc = acc * correction[..., None] + pv
        return (m_new, l, acc), None

    init = (
        jnp.full((b, kv, g, t), _MASKED, jnp.float32),
        jnp.zeros((b, kv, g, t), jnp.float32),
        jnp.zeros((b, kv, g, t, h), jnp.float32),
    )
    (m, l, acc), _ = jax.lax.scan(step, init, (ks, vs, starts))
    out = jnp.einsum("bkgth->btkgh", acc / l[..., None]).astype(q.dtype).reshape(shape)
    lse = m + jnp.log(l)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _blockwise(q, k, v, scale, causal, width):
    return _forward(q, k, v, scale, causal, width)[0]


def _blockwise_fwd(q, k, v, scale, causal, width):
    out, lse = _forward(q, k, v, scale, causal, width)
    return out, (q, k, v, out, lse)


def _blockwise_bwd(scale, causal, width, residuals, d_out):
    # The residuals are the arrays callers see (no reshaped copies), so a scan that also keeps
    # the output for the next op stacks it once.
    q, k, v, out, lse = residuals
    shape = q.shape
    q, out, d_out = (_grouped(x, k.shape[2]) for x in (q, out, d_out))
    ks, vs = _tiles(k, width), _tiles(v, width)
    starts = jnp.arange(ks.shape[0]) * width
    d_out32 = d_out.astype(jnp.float32)
    delta = jnp.einsum("btkgh,btkgh->bkgt", d_out32, out.astype(jnp.float32))

    def step(dq, tile):
        k_tile, v_tile, start = tile
        p = jnp.exp(_scores(q, k_tile, start, scale, causal) - lse[..., None])
        dv = jnp.einsum("bkgts,btkgh->bskh", p, d_out32)
        dp = jnp.einsum("btkgh,bskh->bkgts", d_out32, v_tile.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bkgts,bskh->btkgh", ds, k_tile.astype(jnp.float32))
        dk = jnp.einsum("bkgts,btkgh->bskh", ds, q.astype(jnp.float32))
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dks, dvs) = jax.lax.scan(step, jnp.zeros(q.shape, jnp.float32), (ks, vs, starts))

    def untile(x):
        return jnp.moveaxis(x, 0, 1).reshape(k.shape)

    return dq.astype(q.dtype).reshape(shape), untile(dks), untile(dvs)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


__all__ = ["IMPLEMENTATIONS", "DEFAULT_BLOCK", "choose_implementation", "block_size", "dot_product_attention"]
