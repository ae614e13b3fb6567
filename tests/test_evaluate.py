"""The one evaluator: what a plan reports is what the solver optimised, priced once."""

import pytest

import meshjax as mj
from meshjax import models
from meshjax.plan import solve


def test_bfloat16_and_float16_plans_price_the_same_gradients():
    """bf16 params need gradients like fp16 ones: the same layouts, comm and step time (NumPy
    alone does not call bfloat16 floating; meshjax.dtypes asks JAX)."""
    dtype = "float16"
    graphs = {
        d: mj.trace(*(lambda ex: (ex.loss, ex.params, *ex.batch))(models.example("gpt-tiny", abstract=True, batch=8, dtype=d)))
        for d in ("bfloat16", dtype)
    }
    plans = {d: solve(g, {"data": 4, "model": 2}, hardware="h100-node", train=True, rules="batch:data") for d, g in graphs.items()}
    bf16, other = plans["bfloat16"], plans[dtype]
    assert bf16.comm_bytes > 0  # the data-parallel gradient all-reduce is priced
    assert other.comm_bytes == pytest.approx(bf16.comm_bytes)
    assert {c.kind for c in bf16.collectives} == {c.kind for c in other.collectives}
    assert bf16.step_time_s == pytest.approx(other.step_time_s)
