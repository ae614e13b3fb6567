"""Hand-written baselines as layouts, and pricing them with the solver's cost model."""

import pytest

import meshjax as mj
from meshjax import models
from meshjax.baselines import BASELINES, baseline, predict
from meshjax.errors import InfeasibleError, MeshjaxError
from meshjax.layout import Layout, validate
from meshjax.plan import solve


@pytest.fixture(scope="module")
def gpt():
    ex = models.example("gpt-tiny", abstract=True)
    return mj.trace(ex.loss, ex.params, *ex.batch)


MESH = {"data": 4, "model": 2}


@pytest.fixture(scope="module")
def solved(gpt):
    return solve(gpt, MESH, hardware="h100-node", train=True)


@pytest.mark.parametrize("name", list(BASELINES))
def test_baselines_are_valid_layouts(gpt, name):
    base = baseline(name, gpt, MESH)
    assert base.layouts
    for tensor_name, layout in base.layouts.items():
        validate(gpt.tensors[tensor_name], layout, MESH)
    if name == "xla-prop":
        assert base.partial and {gpt.tensors[n].role for n in base.layouts} <= {"param", "input"}
    else:
        assert set(base.layouts) == set(gpt.tensors)


def test_strategy_shapes(gpt):
    dp = baseline("dp", gpt, MESH).layouts
    assert dp["block_0/mlp/w_in"].axes == ((), ())
    assert dp["tokens"].axes[0] == ("data", "model")
    fsdp = baseline("fsdp", gpt, MESH).layouts
    assert fsdp["block_0/mlp/w_in"].axes == ((), ("data", "model"))  # largest dim: mlp (128)
    mega = baseline("megatron", gpt, MESH).layouts
    assert mega["block_0/mlp/w_in"].axes == ((), ("model",))
    assert mega["block_0/mlp/w_out"].axes == (("model",), ())
    assert mega["tokens"].axes == (("data",), ())
    gspmd = baseline("gspmd", gpt, MESH).layouts
    assert gspmd["block_0/mlp/w_in"].axes == (("data",), ("model",))


def test_indivisible_dims_fall_back_with_a_note(gpt):
    base = baseline("megatron", gpt, {"model": 8})  # gpt-tiny has 4 heads
    assert any("heads" in n and "replicated" in n for n in base.notes)
    assert base.layouts["block_0/attn/w_q"].of("heads") == ()
    with pytest.raises(MeshjaxError, match="unknown baseline"):
        baseline("zero-9", gpt, MESH)


def test_predict_prices_the_solvers_own_plan_identically(gpt, solved):
    plan = solved
    priced, notes = predict(gpt, MESH, plan.layouts, "h100-node", train=True)
    assert notes == []
    assert priced.layouts == plan.layouts
    assert priced.step_time_s == pytest.approx(plan.step_time_s, rel=1e-9)
    assert priced.peak_memory_bytes == pytest.approx(plan.peak_memory_bytes)


@pytest.mark.parametrize("name", list(BASELINES))
def test_solver_is_never_worse_than_a_baseline(gpt, solved, name):
    plan = solved
    priced, _ = predict(gpt, MESH, baseline(name, gpt, MESH).layouts, "h100-node", train=True)
    assert plan.step_time_s <= priced.step_time_s * (1 + 1e-9)
    assert priced.comm_bytes >= 0 and priced.peak_memory_bytes > 0


def test_predict_reports_layouts_that_are_not_options(gpt):
    # A strategy gives a dim its mesh axes in mesh order (data, then model); an elementwise op
    # has no partial sum that could be scattered onto a dim after the others. So gelu's result
    # split batch:model+data (a valid layout: 8 rows over 2 x 4 devices) is no option of its
    # op, and no source tensor has it either.
    layouts = dict(baseline("dp", gpt, MESH).layouts)

    def odd(name):
        dims = gpt.tensors[name].dims
        return Layout(dims, tuple(("model", "data") if d == "batch" else () for d in dims))

    acts = ["block_0/mlp/act", "block_1/mlp/act"]  # tied blocks: both, so only one note
    for name in [*acts, "tokens"]:
        validate(gpt.tensors[name], odd(name), MESH)
        layouts[name] = odd(name)
    priced, notes = predict(gpt, MESH, layouts, "cpu-sim", train=True)
    assert sorted(notes) == sorted([
        f"block_0/mlp/act: op 'block_0/mlp/act' has no strategy giving {odd(acts[0])}; priced as the solver's choice",
        f"tokens: no valid layout is {odd('tokens')}; priced as the solver's choice",
    ])
    assert priced.layouts["block_0/mlp/act"] != odd("block_0/mlp/act")  # left to the solver
    assert priced.layouts["tokens"] != odd("tokens")
    with pytest.raises(InfeasibleError, match="has no strategy giving|no valid layout is"):
        predict(gpt, MESH, layouts, "cpu-sim", train=True, strict=True)
