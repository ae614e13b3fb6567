"""Named ops against their plain jax.numpy equivalents, NamedArray under JAX transforms, and
the errors bad input gets.

Every expected value is computed independently with jax.numpy / jax.nn / optax on the raw
arrays (axes put in place by hand), never with meshjax itself.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshjax as mj
from meshjax.errors import EinsumError, MeshjaxError, ShapeError
from meshjax.named import NamedArray

RTOL = 1e-5
ATOL = 1e-6


def _rand(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- #
# NamedArray basics
# --------------------------------------------------------------------------- #
def test_named_array_sizes_axis_and_align():
    raw = _rand(0, (2, 3, 5))
    x = mj.named(raw, "batch seq embed")
    assert x.dims == ("batch", "seq", "embed")
    assert x.sizes == {"batch": 2, "seq": 3, "embed": 5}
    assert x.size("seq") == 3 and x.axis("embed") == 2
    _close(x.align_to("embed batch seq"), np.transpose(raw, (2, 0, 1)))
    with pytest.raises(ShapeError, match="'heads'"):
        x.size("heads")
    with pytest.raises(ShapeError, match="'batch seq'"):
        x.align_to("batch seq")


def test_named_rejects_wrong_rank():
    with pytest.raises(ShapeError, match="'batch embed'"):
        mj.named(np.ones((2, 3, 4)), "batch embed")


def test_named_array_is_not_a_plain_array():
    with pytest.raises(TypeError, match="not a plain array"):
        jnp.add(mj.named(np.ones(3), "embed"), 1.0)


# --------------------------------------------------------------------------- #
# einsum
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("x_dims", [" ".join(p) for p in itertools.permutations(("batch", "seq", "embed"))])
def test_einsum_operand_dim_order_does_not_matter(x_dims):
    sizes = {"batch": 2, "seq": 3, "embed": 4, "mlp": 5}
    raw_x = _rand(1, (2, 3, 4))  # batch seq embed
    raw_w = _rand(2, (5, 4))  # mlp embed
    dims = x_dims.split()
    perm = [("batch", "seq", "embed").index(d) for d in dims]
    x = mj.named(np.transpose(raw_x, perm), x_dims)
    assert x.sizes == {d: sizes[d] for d in dims}
    w = mj.named(raw_w, "mlp embed")
    out = mj.einsum("batch seq embed, embed mlp -> batch seq mlp", x, w)
    assert out.dims == ("batch", "seq", "mlp")
    _close(out.value, jnp.einsum("bse,me->bsm", raw_x, raw_w))


def test_einsum_result_order_follows_the_spec():
    raw_x, raw_w = _rand(1, (2, 4)), _rand(2, (4, 5))
    x, w = mj.named(raw_x, "batch embed"), mj.named(raw_w, "embed mlp")
    out = mj.einsum("batch embed, embed mlp -> mlp batch", x, w)
    assert out.dims == ("mlp", "batch")
    _close(out.value, (raw_x @ raw_w).T)


def test_einsum_outer_product():
    a, b = _rand(1, (3,)), _rand(2, (4,))
    out = mj.einsum("batch, embed -> embed batch", mj.named(a, "batch"), mj.named(b, "embed"))
    _close(out.value, np.outer(b, a))


def test_einsum_batch_dims_and_full_contraction():
    q, k = _rand(1, (2, 3, 4, 5)), _rand(2, (2, 6, 4, 5))  # batch seq heads head_dim / key_seq
    scores = mj.einsum(
        "batch seq heads head_dim, batch key_seq heads head_dim -> batch heads seq key_seq",
        mj.named(q, "batch seq heads head_dim"),
        mj.named(np.transpose(k, (3, 1, 0, 2)), "head_dim key_seq batch heads"),
    )
    assert scores.sizes == {"batch": 2, "heads": 4, "seq": 3, "key_seq": 6}
    _close(scores.value, jnp.einsum("bqhd,bkhd->bhqk", q, k))
    a, b = _rand(3, (3, 4)), _rand(4, (4, 3))
    total = mj.einsum("batch embed, embed batch ->", mj.named(a, "batch embed"), mj.named(b, "embed batch"))
    assert total.dims == ()
    _close(total.value, np.sum(a * b.T), rtol=1e-5, atol=1e-5)


def test_einsum_three_operands():
    a, b, c = _rand(1, (2, 3)), _rand(2, (3, 4)), _rand(3, (4, 5))
    out = mj.einsum(
        "batch embed, embed mlp, mlp vocab -> batch vocab",
        mj.named(a, "batch embed"),
        mj.named(b, "embed mlp"),
        mj.named(c, "mlp vocab"),
    )
    _close(out.value, a @ b @ c, atol=1e-5)


# --------------------------------------------------------------------------- #
# elementwise and broadcasting by name
# --------------------------------------------------------------------------- #
def test_broadcast_by_name_aligns_permuted_operands():
    a, b = _rand(1, (2, 3)), _rand(2, (3, 2))
    out = mj.named(a, "batch embed") + mj.named(b, "embed batch")
    assert out.dims == ("batch", "embed")
    _close(out.value, a + b.T)


def test_broadcast_by_name_adds_new_dims_in_order():
    a, b = _rand(1, (2,)), _rand(2, (3,))
    out = mj.elementwise("multiply", mj.named(a, "batch"), mj.named(b, "embed"))
    assert out.dims == ("batch", "embed")
    _close(out.value, a[:, None] * b[None, :])
    out = mj.named(b, "embed") - mj.named(_rand(3, (3, 2)), "embed batch")
    assert out.dims == ("embed", "batch")
    _close(out.value, b[:, None] - _rand(3, (3, 2)))


def test_python_operators_and_scalars():
    raw = np.abs(_rand(1, (2, 3))) + 0.5
    x = mj.named(raw, "batch embed")
    _close((x + 1).value, raw + 1)
    _close((2.0 * x).value, 2.0 * raw)
    _close((1 - x).value, 1 - raw)
    _close((x / 4).value, raw / 4)
    _close((3 / x).value, 3 / raw)
    _close((x**2).value, raw**2)
    _close((-x).value, -raw)
    _close((np.float32(2) * x).value, 2 * raw)
    assert isinstance(np.float32(2) * x, NamedArray)


@pytest.mark.parametrize(
    "op, ref",
    [
        (mj.exp, jnp.exp),
        (mj.log, jnp.log),
        (mj.tanh, jnp.tanh),
        (mj.relu, jax.nn.relu),
        (mj.gelu, jax.nn.gelu),
        (mj.silu, jax.nn.silu),
        (mj.sigmoid, jax.nn.sigmoid),
        (mj.square, jnp.square),
        (mj.sqrt, jnp.sqrt),
        (mj.rsqrt, lambda v: 1 / jnp.sqrt(v)),
    ],
)
def test_unary_ops(op, ref):
    raw = np.abs(_rand(5, (3, 4))) + 0.1
    _close(op(mj.named(raw, "batch embed")).value, ref(raw))


def test_maximum_minimum_where_greater_equal_arange():
    a, b = _rand(1, (3, 4)), _rand(2, (4,))
    x, y = mj.named(a, "batch embed"), mj.named(b, "embed")
    _close(mj.maximum(x, y).value, np.maximum(a, b[None]))
    _close(mj.minimum(x, y).value, np.minimum(a, b[None]))
    rows, cols = mj.arange("seq", 4), mj.arange("key_seq", 4)
    np.testing.assert_array_equal(rows.value, np.arange(4))
    mask = mj.greater_equal(rows, cols)
    assert mask.dims == ("seq", "key_seq") and mask.dtype == jnp.bool_
    np.testing.assert_array_equal(mask.value, np.tril(np.ones((4, 4), bool)))
    picked = mj.where(mask, 1.0, -1.0)
    np.testing.assert_array_equal(picked.value, np.where(np.tril(np.ones((4, 4), bool)), 1.0, -1.0))
    assert mj.cast(x, jnp.bfloat16).dtype == jnp.bfloat16


def test_elementwise_custom_callable_and_unknown_name():
    raw = _rand(1, (3,))
    out = mj.elementwise(lambda v: v * 3 + 1, mj.named(raw, "embed"))
    _close(out.value, raw * 3 + 1)
    with pytest.raises(ValueError, match="'frobnicate'"):
        mj.elementwise("frobnicate", mj.named(raw, "embed"))
    with pytest.raises(ShapeError, match="wrap it with named"):
        mj.elementwise("add", mj.named(raw, "embed"), np.ones(3))


# --------------------------------------------------------------------------- #
# reductions, softmax, norms
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "op, ref", [(mj.sum, jnp.sum), (mj.mean, jnp.mean), (mj.max, jnp.max)], ids=["sum", "mean", "max"]
)
@pytest.mark.parametrize("over", ["embed", "batch", "seq embed", "embed batch", "batch seq embed"])
def test_reductions(op, ref, over):
    raw = _rand(7, (2, 3, 4))
    order = ("batch", "seq", "embed")
    out = op(mj.named(raw, "batch seq embed"), over)
    keep = tuple(d for d in order if d not in over.split())
    assert out.dims == keep
    axes = tuple(order.index(d) for d in over.split())
    _close(out.value, ref(raw, axis=axes))


def test_softmax_and_logsumexp():
    raw = _rand(8, (3, 5)) * 4
    x = mj.named(raw.T, "vocab batch")  # held as vocab-major
    probs = mj.softmax(x, "vocab")
    assert probs.dims == ("vocab", "batch")
    _close(probs.value, jax.nn.softmax(raw, axis=1).T)
    _close(mj.sum(probs, "vocab").value, np.ones(3))
    lse = mj.logsumexp(x, "vocab")
    assert lse.dims == ("batch",)
    _close(lse.value, jax.scipy.special.logsumexp(raw, axis=1))


def test_logsumexp_is_stable():
    x = mj.named(np.array([1000.0, 1000.0], np.float32), "vocab")
    _close(mj.logsumexp(x, "vocab").value, 1000.0 + np.log(2.0))


def _ref_layer_norm(v, axis, scale, bias, eps):
    mu = v.mean(axis=axis, keepdims=True)
    var = ((v - mu) ** 2).mean(axis=axis, keepdims=True)
    return (v - mu) / np.sqrt(var + eps) * scale + bias


def test_layer_norm_with_scale_and_bias():
    raw = _rand(9, (3, 8)) * 3 + 1
    scale, bias = _rand(10, (8,)), _rand(11, (8,))
    x = mj.named(raw.T, "embed batch")
    out = mj.layer_norm(x, "embed", mj.named(scale, "embed"), mj.named(bias, "embed"), eps=1e-5)
    assert out.dims == ("embed", "batch")
    _close(out.value.T, _ref_layer_norm(raw, 1, scale, bias, 1e-5), atol=1e-5)
    plain = mj.layer_norm(mj.named(raw, "batch embed"), "embed")
    _close(plain.value, _ref_layer_norm(raw, 1, 1.0, 0.0, 1e-5), atol=1e-5)


def test_rms_norm_with_scale():
    raw = _rand(12, (4, 8)) * 2
    scale = _rand(13, (8,))
    out = mj.rms_norm(mj.named(raw, "batch embed"), "embed", mj.named(scale, "embed"), eps=1e-6)
    expected = raw / np.sqrt((raw**2).mean(axis=1, keepdims=True) + 1e-6) * scale
    _close(out.value, expected, atol=1e-5)


def test_norm_scale_must_have_the_norm_dim():
    x = mj.named(_rand(1, (2, 4)), "batch embed")
    with pytest.raises(ShapeError, match="'embed'"):
        mj.layer_norm(x, "embed", mj.named(np.ones(2, np.float32), "batch"))


# --------------------------------------------------------------------------- #
# embedding and cross-entropy
# --------------------------------------------------------------------------- #
def test_embed_is_a_row_lookup():
    table = _rand(14, (6, 5))  # embed=6 vocab=5 (vocab not first)
    ids = np.array([[0, 4, 2], [3, 3, 1]], np.int32)
    out = mj.embed(mj.named(ids, "batch seq"), mj.named(table, "embed vocab"))
    assert out.dims == ("batch", "seq", "embed")
    _close(out.value, table.T[ids])


def test_embed_rejects_float_ids():
    with pytest.raises(ShapeError, match="integers"):
        mj.embed(mj.named(np.zeros((2,), np.float32), "batch"), mj.named(np.ones((3, 4)), "vocab embed"))


def test_cross_entropy_matches_optax():
    logits = _rand(15, (2, 3, 7)) * 3  # batch seq vocab
    targets = np.random.default_rng(16).integers(0, 7, (2, 3)).astype(np.int32)
    out = mj.cross_entropy(
        mj.named(np.transpose(logits, (2, 0, 1)), "vocab batch seq"),
        mj.named(targets.T, "seq batch"),
    )
    assert sorted(out.dims) == ["batch", "seq"]
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    _close(jnp.asarray(out.align_to("batch seq")), expected, atol=1e-5)


def test_cross_entropy_target_dims_must_match():
    logits = mj.named(np.zeros((2, 3, 7), np.float32), "batch seq vocab")
    with pytest.raises(ShapeError, match="'batch'"):
        mj.cross_entropy(logits, mj.named(np.zeros((2,), np.int32), "batch"))


# --------------------------------------------------------------------------- #
# reshapes
# --------------------------------------------------------------------------- #
def test_split_and_merge_round_trip():
    raw = _rand(17, (2, 12, 3))
    x = mj.named(raw, "batch hidden seq")
    split = mj.split_dim(x, "hidden", "heads head_dim", {"heads": 4})
    assert split.sizes == {"batch": 2, "heads": 4, "head_dim": 3, "seq": 3}
    _close(split.value, raw.reshape(2, 4, 3, 3))
    _close(split.value[:, 1, 2, :], raw[:, 1 * 3 + 2, :])  # row-major
    merged = mj.merge_dims(split, "heads head_dim", "hidden")
    assert merged.dims == x.dims
    _close(merged.value, raw)


def test_split_dim_errors():
    x = mj.named(_rand(1, (2, 12)), "batch hidden")
    with pytest.raises(ShapeError, match="'hidden'"):
        mj.split_dim(x, "hidden", "heads head_dim", {"heads": 5})
    with pytest.raises(ShapeError, match="'hidden'"):
        mj.split_dim(x, "hidden", "a b c", {"a": 2})
    with pytest.raises(ShapeError, match="'hidden'"):
        mj.split_dim(x, "hidden", "heads head_dim", {"heads": 4, "head_dim": 4})


def test_merge_dims_must_be_adjacent():
    x = mj.named(_rand(1, (2, 3, 4)), "heads batch head_dim")
    with pytest.raises(ShapeError, match="adjacent"):
        mj.merge_dims(x, "heads head_dim", "hidden")


def test_rename_round_trip():
    raw = _rand(18, (2, 3))
    x = mj.named(raw, "batch seq")
    y = mj.rename(x, {"seq": "key_seq"})
    assert y.dims == ("batch", "key_seq")
    back = mj.rename(y, {"key_seq": "seq"})
    assert back.dims == x.dims
    _close(back.value, raw)
    with pytest.raises(ShapeError, match="'embed'"):
        mj.rename(x, {"embed": "hidden"})
    with pytest.raises(ShapeError, match="'batch'"):
        mj.rename(x, {"seq": "batch"})


# --------------------------------------------------------------------------- #
# NamedArray under JAX transforms
# --------------------------------------------------------------------------- #
def test_named_array_under_jit():
    raw_x, raw_w = _rand(1, (4, 3)), _rand(2, (3, 5))

    @jax.jit
    def f(x, w):
        return mj.gelu(mj.einsum("batch embed, embed mlp -> mlp batch", x, w))

    out = f(mj.named(raw_x, "batch embed"), mj.named(raw_w, "embed mlp"))
    assert isinstance(out, NamedArray) and out.dims == ("mlp", "batch")
    _close(out.value, jax.nn.gelu(raw_x @ raw_w).T, atol=1e-5)


def test_named_array_under_grad():
    raw_x, raw_w = _rand(1, (4, 3)), _rand(2, (3, 5))
    x = mj.named(raw_x, "batch embed")

    def loss(w):
        h = mj.einsum("batch embed, embed mlp -> batch mlp", x, w)
        return mj.mean(mj.square(mj.tanh(h)), "batch mlp").value

    g = jax.grad(loss)(mj.named(raw_w.T, "mlp embed"))
    assert isinstance(g, NamedArray) and g.dims == ("mlp", "embed")
    expected = jax.grad(lambda w: jnp.mean(jnp.tanh(raw_x @ w) ** 2))(raw_w)
    _close(g.value, expected.T, atol=1e-6)


def test_named_array_as_lax_scan_carry():
    raw_h, raw_ws = _rand(1, (2, 4)), _rand(2, (3, 4, 4)) * 0.5

    def step(h, w):
        out = mj.tanh(mj.einsum("batch embed, embed embed2 -> batch embed2", h, mj.named(w, "embed embed2")))
        return mj.rename(out, {"embed2": "embed"}), None

    out, _ = jax.lax.scan(step, mj.named(raw_h, "batch embed"), raw_ws)
    assert isinstance(out, NamedArray) and out.dims == ("batch", "embed")
    expected = raw_h
    for w in raw_ws:
        expected = np.tanh(expected @ w)
    _close(out.value, expected, atol=1e-5)


def test_named_array_under_eval_shape():
    x = mj.named(_rand(1, (4, 3)), "batch embed")
    w = mj.named(_rand(2, (3, 5)), "embed mlp")
    out = jax.eval_shape(lambda x, w: mj.einsum("batch embed, embed mlp -> mlp batch", x, w), x, w)
    assert isinstance(out, NamedArray) and out.dims == ("mlp", "batch")
    assert isinstance(out.value, jax.ShapeDtypeStruct) and out.shape == (5, 4)


def test_named_array_pytree_keeps_dims_static():
    x = mj.named(np.ones((2, 3), np.float32), "batch embed")
    leaves, treedef = jax.tree_util.tree_flatten(x)
    assert len(leaves) == 1
    assert jax.tree_util.tree_unflatten(treedef, leaves).dims == ("batch", "embed")
    assert treedef != jax.tree_util.tree_structure(mj.named(np.ones((2, 3)), "embed batch"))


# --------------------------------------------------------------------------- #
# mj.scan
# --------------------------------------------------------------------------- #
def test_scan_equals_a_python_loop_over_layers():
    layers, batch, embed, mlp = 3, 2, 4, 6
    raw_h = _rand(1, (batch, embed))
    raw_w_in = _rand(2, (layers, embed, mlp)) * 0.5
    raw_w_out = _rand(3, (mlp, layers, embed)) * 0.5  # "layers" not the leading axis

    def body(h, p):
        u = mj.gelu(mj.einsum("batch embed, embed mlp -> batch mlp", h, p["w_in"]))
        h = h + mj.einsum("batch mlp, mlp embed -> embed batch", u, p["w_out"])
        return h, mj.sum(h, "embed")

    stacked = {"w_in": mj.named(raw_w_in, "layers embed mlp"), "w_out": mj.named(raw_w_out, "mlp layers embed")}
    final, ys = mj.scan(body, mj.named(raw_h, "batch embed"), stacked, dim="layers")
    assert final.dims == ("batch", "embed")
    assert ys.dims == ("layers", "batch")

    h, per_layer = raw_h, []
    for i in range(layers):
        u = jax.nn.gelu(h @ raw_w_in[i])
        h = h + u @ raw_w_out[:, i, :]
        per_layer.append(h.sum(axis=1))
    _close(final.value, h, atol=1e-5)
    _close(ys.value, np.stack(per_layer), atol=1e-5)


def test_scan_leaves_must_agree_on_length():
    h = mj.named(np.ones((2, 4), np.float32), "batch embed")
    xs = {"a": mj.named(np.ones((3, 4)), "layers embed"), "b": mj.named(np.ones((2, 4)), "layers embed")}
    with pytest.raises(ShapeError, match="'layers'"):
        mj.scan(lambda c, x: (c, None), h, xs)


def test_scan_body_must_keep_the_carry_dims():
    h = mj.named(np.ones((2, 4), np.float32), "batch embed")
    xs = mj.named(np.ones((3, 4, 5), np.float32), "layers embed mlp")
    with pytest.raises(ShapeError, match="carry"):
        mj.scan(lambda c, w: (mj.einsum("batch embed, embed mlp -> batch mlp", c, w), None), h, xs)


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
X = mj.named(np.ones((8, 4), np.float32), "batch embed")
W = mj.named(np.ones((4, 6), np.float32), "embed mlp")


def test_einsum_operand_lacks_a_spec_dim():
    with pytest.raises(EinsumError) as info:
        mj.einsum("batch embed, embed mlp -> batch mlp", mj.named(np.ones(8), "batch"), W)
    message = str(info.value)
    # names the operand, what it has and what the spec asked for
    assert "operand 0" in message and "has dims 'batch'" in message and "'batch embed'" in message


def test_einsum_operand_lacks_a_spec_dim_names_it():
    with pytest.raises(EinsumError, match="'embed'"):
        mj.einsum("batch embed, embed mlp -> batch mlp", mj.named(np.ones(8), "batch"), W)


def test_einsum_result_dim_in_no_operand():
    with pytest.raises(EinsumError, match="result dim 'vocab'"):
        mj.einsum("batch embed, embed mlp -> batch vocab", X, W)


def test_einsum_size_mismatch_names_the_dim():
    with pytest.raises(ShapeError, match=r"dim 'embed' has size 4 and 5"):
        mj.einsum("batch embed, embed mlp -> batch mlp", X, mj.named(np.ones((5, 6)), "embed mlp"))


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("batch embed, embed mlp", "'->'"),
        ("batch embed, embed mlp -> batch -> mlp", "'->'"),
        ("batch embed, embed m-lp -> batch", "'m-lp'"),
        ("batch embed embed, embed mlp -> batch mlp", "dim 'embed' appears twice"),
        ("batch embed, embed mlp -> batch batch", "dim 'batch' appears twice"),
    ],
)
def test_einsum_malformed_spec(spec, pattern):
    with pytest.raises(EinsumError, match=pattern):
        mj.einsum(spec, X, W)


def test_einsum_operand_count_and_type():
    with pytest.raises(EinsumError, match="2 operands in the spec, 1 given"):
        mj.einsum("batch embed, embed mlp -> batch mlp", X)
    with pytest.raises(EinsumError, match="operand 1 is not a NamedArray"):
        mj.einsum("batch embed, embed mlp -> batch mlp", X, np.ones((4, 6)))


@pytest.mark.parametrize("dims", ["batch batch", "batch seq batch"])
def test_repeated_dim_in_a_dims_string(dims):
    with pytest.raises(ShapeError, match="dim 'batch' appears twice"):
        mj.named(np.ones((2,) * len(dims.split())), dims)


def test_invalid_dim_name():
    with pytest.raises(ShapeError, match="'2d'"):
        mj.named(np.ones((2, 2)), "batch 2d")


@pytest.mark.parametrize("op", [mj.sum, mj.mean, mj.max])
def test_unknown_dim_in_reduce(op):
    with pytest.raises(ShapeError, match="dim 'heads'"):
        op(X, "batch heads")


@pytest.mark.parametrize("op", [mj.softmax, mj.logsumexp])
def test_unknown_dim_in_softmax(op):
    with pytest.raises(ShapeError, match="dim 'vocab'"):
        op(X, "vocab")


def test_broadcast_size_mismatch_names_the_dim():
    with pytest.raises(ShapeError, match="dim 'embed' has size 4 and 3"):
        X + mj.named(np.ones(3, np.float32), "embed")


def test_every_error_is_a_meshjax_error_and_a_value_error():
    for cls in (ShapeError, EinsumError):
        assert issubclass(cls, MeshjaxError) and issubclass(cls, ValueError)
