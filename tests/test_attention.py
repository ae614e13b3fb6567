"""The memory-efficient attention op: numerics against the einsum form, sharded plans against
one device, compiled memory against the einsum form, predicted against compiled collectives."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshjax as mj
from meshjax import flash, models
from meshjax.cost.memory import kept_copies
from meshjax.devices import make_mesh
from meshjax.errors import ShapeError
from meshjax.layout import layout_from_rules
from meshjax.lower import Program
from meshjax.plan import solve
from meshjax.verify import verify


def _reference(q, k, v, causal, scale):
    """Softmax attention written out with einsums: ``q [B,T,N,H]``, ``k, v [B,S,K,H]``."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k, precision="highest", preferred_element_type=jnp.float32) * scale
    if causal:
        s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -1e30)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p.astype(v.dtype), v, precision="highest", preferred_element_type=jnp.float32)


def _inputs(dtype, heads=4, kv_heads=2, seq=40, keys=40, head_dim=8):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, seq, heads, head_dim))
    k = rng.standard_normal((2, keys, kv_heads, head_dim))
    v = rng.standard_normal((2, keys, kv_heads, head_dim))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


TOLERANCE = {"float32": 2e-6, "bfloat16": 3e-2}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_named_attention_and_its_gradients_equal_the_einsum_form(dtype, causal, kv_heads):
    q, k, v = _inputs(dtype, kv_heads=kv_heads)
    scale = 0.3
    grouped = kv_heads != q.shape[2]
    kv_dims = "batch key_seq kv_heads head_dim" if grouped else "batch key_seq heads head_dim"

    def named_loss(q, k, v):
        # q arrives in another dim order: the op aligns by name
        out = mj.attention(
            mj.named(jnp.transpose(q, (2, 0, 3, 1)), "heads batch head_dim seq"), mj.named(k, kv_dims), mj.named(v, kv_dims),
            kv_heads="kv_heads" if grouped else None, causal=causal, scale=scale, block=16,
        )
        assert out.dims == ("heads", "batch", "head_dim", "seq")
        return jnp.sum(jnp.sin(out.align_to("batch seq heads head_dim").astype(jnp.float32)))

    def ref_loss(q, k, v):
        return jnp.sum(jnp.sin(_reference(q, k, v, causal, scale)))

    got = jax.jit(jax.value_and_grad(named_loss, (0, 1, 2)))(q, k, v)
    want = jax.jit(jax.value_and_grad(ref_loss, (0, 1, 2)))(q, k, v)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=tol * 10, atol=tol * q.size)
    for g, w in zip(got[1], want[1]):
        scale_of = float(jnp.max(jnp.abs(w.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=tol * max(1.0, scale_of))


def test_blockwise_handles_key_lengths_that_are_not_a_multiple_of_the_block():
    q, k, v = _inputs("float32", seq=12, keys=30)
    out = flash.dot_product_attention(q, k, v, block=8)  # tiles of 6 keys
    np.testing.assert_allclose(out, _reference(q, k, v, False, 1 / math.sqrt(8)), atol=2e-6)
    causal = flash.dot_product_attention(q[:, :12], k[:, :12], v[:, :12], causal=True, block=5)
    np.testing.assert_allclose(causal, _reference(q[:, :12], k[:, :12], v[:, :12], True, 1 / math.sqrt(8)), atol=2e-6)


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "name, dtype",
    [("gpt-tiny", "float32"), pytest.param("gpt-tiny", "bfloat16", marks=SLOW), pytest.param("llama-tiny", "float32", marks=SLOW),
     pytest.param("llama-tiny", "bfloat16", marks=SLOW), pytest.param("moe-tiny", "float32", marks=SLOW)],
)
def test_models_give_the_same_loss_and_grads_with_either_attention_form(name, dtype):
    flash_ex = models.example(name, 0, dtype=dtype)
    einsum_ex = models.example(name, 0, dtype=dtype, attention="einsum")

    def grads(ex):
        return jax.jit(jax.value_and_grad(lambda p, *b: ex.loss(p, *b).value.astype(jnp.float32)))(ex.params, *ex.batch)

    (a, ga), (b, gb) = grads(flash_ex), grads(einsum_ex)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(float(a), float(b), rtol=tol)
    for x, y in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        np.testing.assert_allclose(x, y, atol=tol * max(1e-3, float(np.abs(y).max())) * (1 if dtype == "float32" else 5))


def test_attention_form_is_checked_by_name():
    with pytest.raises(mj.MeshjaxError, match="attention='dense': expected one of flash, einsum"):
        models.example("gpt-tiny", attention="dense").loss


def test_bad_operands_are_one_line_errors_naming_the_dim():
    q = mj.named(jnp.ones((2, 8, 6, 4)), "batch seq heads head_dim")
    kv = mj.named(jnp.ones((2, 8, 4, 4)), "batch key_seq kv_heads head_dim")
    with pytest.raises(ShapeError, match="dim 'heads' of size 6 is not a multiple of dim 'kv_heads' of size 4"):
        mj.attention(q, kv, kv, kv_heads="kv_heads")
    with pytest.raises(ShapeError, match="k has dims 'batch key_seq kv_heads head_dim', it lacks dim 'heads'"):
        mj.attention(q, kv, kv)
    with pytest.raises(ValueError, match="attention implementation 'magic'"):
        flash.choose_implementation(jnp.float32, "magic")


# --------------------------------------------------------------------------- #
# memory: what the model keeps, what XLA compiles
# --------------------------------------------------------------------------- #
def test_training_keeps_q_k_v_output_and_row_statistics_only():
    ex = models.example("gpt-tiny", abstract=True, dtype="bfloat16")
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    kept = kept_copies(graph)
    attn = {n: c for n, c in kept.items() if n.startswith("block_0/attn/") and n not in ("block_0/attn/ln", "block_0/attn/residual")}
    head_dim = ex.sizes["head_dim"]
    # the output once plus its float32 log-sum-exp per row (2 bytes per bf16 element -> 4/2/head_dim)
    assert attn == {"block_0/attn/q": 1, "block_0/attn/keys": 1, "block_0/attn/values": 1,
                    "block_0/attn/context": 1 + 2 / head_dim}


def test_what_jax_saves_is_q_k_v_the_output_and_the_row_log_sum_exp(capsys):
    from jax.ad_checkpoint import print_saved_residuals

    q = mj.named(jnp.ones((2, 32, 4, 8)), "batch seq heads head_dim")
    kv = mj.named(jnp.ones((2, 48, 2, 8)), "batch key_seq kv_heads head_dim")
    print_saved_residuals(
        lambda q, k, v: mj.attention(q, k, v, kv_heads="kv_heads", causal=True, block=16).value.sum(), q, kv, kv
    )
    shapes = sorted(line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("f32["))
    # q, k, v, the output, and the log-sum-exp [batch, kv_heads, group, seq]: nothing [.., 32, 48]
    assert shapes == sorted(["f32[2,32,4,8]", "f32[2,48,2,8]", "f32[2,48,2,8]", "f32[2,32,4,8]", "f32[2,2,2,32]"])


# (batch, seq, heads, kv_heads, head_dim, block): one and several key blocks, plain and grouped heads
KERNEL_SHAPES = [(8, 16, 4, 4, 8, 128), (2, 256, 8, 8, 64, 64), (2, 256, 8, 2, 64, 64), (2, 512, 4, 4, 16, 64)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_declared_scratch_is_what_xla_allocates_for_the_kernel(shape, dtype):
    """The forward's and the backward's compiled temporaries (beyond operands, result, the
    cotangent and the gradients) against :func:`meshjax.ops.attention_scratch`: the backward
    within 10%; the forward within 10% but for grouped heads over several key blocks, where
    XLA:CPU holds up to 1.26x more (24 shapes measured: backward 0.89-1.10, forward 0.92-1.26)."""
    from meshjax.ops import attention_scratch

    b, t, n, kv, h, block = shape
    q = jax.ShapeDtypeStruct((b, t, n, h), dtype)
    k = jax.ShapeDtypeStruct((b, t, kv, h), dtype)
    lse = jax.ShapeDtypeStruct((b, kv, n // kv, t), jnp.float32)
    width = flash.block_size(t, block)
    forward = jax.jit(lambda q, k, v: flash._forward(q, k, v, 1.0, True, width)).lower(q, k, k).compile()
    backward = jax.jit(lambda res, ct: flash._blockwise_bwd(1.0, True, width, res, ct)).lower((q, k, k, q, lse), q).compile()
    out = b * t * n * h * jnp.dtype(dtype).itemsize
    declared_forward, declared_backward = attention_scratch(jnp.dtype(dtype).itemsize, h, width, t // width, kv / n)
    forward_ratio = forward.memory_analysis().temp_size_in_bytes / (declared_forward * out)
    backward_ratio = backward.memory_analysis().temp_size_in_bytes / (declared_backward * out)
    assert 0.9 <= backward_ratio <= 1.1, backward_ratio
    grouped_blocks = kv < n and t > width
    assert 0.9 <= forward_ratio <= (1.3 if grouped_blocks else 1.1), forward_ratio


def _compiled_temp_bytes(form: str, seq: int) -> int:
    ex = models.example("gpt-tiny", 0, abstract=True, batch=1, seq=seq, layers=1, attention=form)

    def loss(params, *batch):
        return ex.loss(params, *batch).value

    return jax.jit(jax.grad(loss)).lower(ex.params, *ex.batch).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_compiled_training_memory_is_far_below_the_einsum_form_at_a_long_sequence():
    flash_bytes, einsum_bytes = _compiled_temp_bytes("flash", 2048), _compiled_temp_bytes("einsum", 2048)
    # the einsum form keeps [heads, seq, seq] scores and probabilities (4 x 2048^2 x 4 bytes each)
    assert flash_bytes < 0.25 * einsum_bytes, (flash_bytes, einsum_bytes)


# --------------------------------------------------------------------------- #
# sharded plans and their collectives
# --------------------------------------------------------------------------- #
SMALL = dict(batch=8, seq=64, embed=64, heads=8, head_dim=8, mlp=128, vocab=64, layers=1)
CP = "seq:data;batch:none;embed:none;mlp:none;vocab:none"
SHARDED = [
    ("gpt-tiny", {"data": 4}, CP),  # context parallel: queries split, keys and values gathered
    ("gpt-tiny", {"data": 2, "model": 4}, "seq:data;heads:model;batch:none;embed:none;vocab:none"),
    ("llama-tiny", {"data": 2, "model": 4}, "batch:data;heads:model;kv_heads:model;mlp:model"),
    ("llama-tiny", {"data": 4}, CP + ";heads:none;kv_heads:none"),
]


@functools.lru_cache(maxsize=None)
def _small(name):
    ex = models.example(name, 0, **SMALL, **({"kv_heads": 4} if name == "llama-tiny" else {}))
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    ref = jax.jit(jax.value_and_grad(lambda p, *b: ex.loss(p, *b).value))(ex.params, *ex.batch)
    return ex, graph, ref


@pytest.mark.slow
@pytest.mark.parametrize("case", SHARDED, ids=[f"{c[0]}-{'x'.join(map(str, c[1].values()))}" for c in SHARDED])
def test_sharded_attention_plans_give_the_unsharded_loss_and_grads(case):
    name, shape, rules = case
    ex, graph, (ref_loss, ref_grads) = _small(name)
    layouts = layout_from_rules(graph, shape, rules)
    assert layouts["block_0/attn/context"].axes[graph.tensors["block_0/attn/context"].dims.index("seq")] == (
        ("data",) if "seq:data" in rules else ()
    )
    loss, grads = Program(ex.loss, graph, make_mesh(shape), layouts).jit(grad=True)(ex.params, *ex.batch)
    np.testing.assert_allclose(np.asarray(loss.value), ref_loss, rtol=1e-5)
    is_named = lambda x: isinstance(x, mj.NamedArray)  # noqa: E731
    for g, r in zip(jax.tree_util.tree_leaves(grads, is_leaf=is_named), jax.tree_util.tree_leaves(ref_grads, is_leaf=is_named)):
        np.testing.assert_allclose(np.asarray(g.value), np.asarray(r.value), rtol=1e-4, atol=1e-6)


COMM = [
    ("gpt-tiny", {"model": 8}, "heads:model;embed:none;mlp:model;vocab:none"),
    ("gpt-tiny", {"data": 8}, CP + ";heads:none"),
    ("llama-tiny", {"model": 4}, "heads:model;kv_heads:model;embed:none;mlp:model;vocab:none"),
    ("llama-tiny", {"data": 4}, CP + ";heads:none;kv_heads:none"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", COMM, ids=[f"{c[0]}-{'x'.join(map(str, c[1].values()))}" for c in COMM])
def test_predicted_attention_collectives_match_compiled(case):
    """Heads over an axis need no collective inside attention; the query sequence over an axis
    gathers keys and values (forward, and again in the backward pass, which reads them) and
    all-reduces their gradients."""
    name, shape, rules = case
    sizes = dict(SMALL, seq=256, embed=128, mlp=256, vocab=128, **({"kv_heads": 4} if name == "llama-tiny" else {}))
    ex = models.example(name, abstract=True, **sizes)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    plan = solve(graph, shape, hardware="cpu-sim", train=True, rules=rules)
    check = verify(plan, ex.loss, make_mesh(shape), ex.params, *ex.batch)
    assert check.compiled.comm_bytes == pytest.approx(plan.comm_bytes, rel=0.02), (
        check.predicted_by_kind, check.compiled_by_kind
    )
    rows = {r.op: r for r in check.per_op()}
    row = rows.get("block_0/attn/context")
    if "seq:data" in rules:
        assert row.predicted_bytes > 0 and row.compiled_bytes == pytest.approx(row.predicted_bytes, rel=0.05), row
    else:
        assert row is None or row.compiled_bytes == row.predicted_bytes == 0, row
