"""NamedArrays under vmap: by name with meshjax.vmap, and plain jax.vmap on raw values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshjax as mj
from meshjax.errors import ShapeError


def test_vmap_over_a_named_dim_equals_the_unmapped_computation():
    x = mj.named(jax.random.normal(jax.random.key(0), (4, 3, 5)), "batch seq embed")
    w = mj.named(jax.random.normal(jax.random.key(1), (5, 6)), "embed mlp")

    def per_example(x_row, w):
        assert x_row.dims == ("seq", "embed")  # batch is mapped away
        return mj.softmax(mj.einsum("seq embed, embed mlp -> seq mlp", x_row, w), "mlp")

    mapped = mj.vmap(per_example, "batch")(x, w)
    whole = mj.softmax(mj.einsum("batch seq embed, embed mlp -> batch seq mlp", x, w), "mlp")
    assert mapped.dims == ("batch", "seq", "mlp")
    np.testing.assert_allclose(mapped.value, whole.value, rtol=1e-6)


def test_vmap_takes_the_dim_from_any_position_and_composes_with_jit_and_grad():
    x = mj.named(jnp.arange(12.0).reshape(3, 4), "embed batch")
    f = mj.vmap(lambda row: mj.sum(mj.square(row), "embed"), "batch")
    out = jax.jit(f)(x)
    np.testing.assert_allclose(out.value, (x.value**2).sum(axis=0))
    grad = jax.grad(lambda v: f(mj.named(v, "embed batch")).value.sum())(x.value)
    np.testing.assert_allclose(grad, 2 * x.value)


def test_plain_jax_vmap_over_raw_values():
    x = jax.random.normal(jax.random.key(2), (4, 7))
    out = jax.vmap(lambda v: mj.softmax(mj.named(v, "vocab"), "vocab").value)(x)
    np.testing.assert_allclose(out, jax.nn.softmax(x, axis=-1), rtol=1e-6)


def test_vmap_errors_name_the_dim():
    x = mj.named(jnp.ones((2, 3)), "batch embed")
    y = mj.named(jnp.ones((5,)), "batch")
    with pytest.raises(ShapeError, match="'seq'"):
        mj.vmap(lambda a: a, "seq")(x)
    with pytest.raises(ShapeError, match="'batch'.*disagree"):
        mj.vmap(lambda a, b: a, "batch")(x, y)
