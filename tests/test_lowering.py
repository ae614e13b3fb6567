"""Lowering: sharded programs compute what the unsharded model computes, with the planned
shardings, and pinned intermediate layouts are honoured by the compiler.

For each model (MLP, one transformer block, the tiny GPT unrolled and scanned) and each layout
(data-parallel, Megatron tensor-parallel, 2D, GSPMD-style weights split over both axes) on 8
simulated CPU devices, the loss and every gradient equal those of a plain single-device
``jax.jit(jax.value_and_grad(...))`` of the same function, and the loss and gradients come back
with the shardings the layout planned.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import meshjax as mj
from meshjax import models
from meshjax.devices import make_mesh
from meshjax.layout import Layout, layout_from_rules
from meshjax.lower import Program
from meshjax.models import mlp
from meshjax.plan import solve
from meshjax.solver.ilp import solve_ilp

RTOL = ATOL = 1e-5

# Tiny shapes: compiles are the cost. The block has 8 heads so that 8-way tensor
# parallelism divides them; gpt-tiny (4 heads) runs on the 4x2 and 2x4 meshes only.
MODELS = {
    "mlp": ("mlp-tiny", {}),
    "block": ("block-tiny", dict(batch=8, seq=8, embed=16, heads=8, head_dim=4, mlp=32)),
    "gpt": ("gpt-tiny", {}),
    "gpt-scan": None,  # the unrolled GPT's params, stacked: see _model
}


def _is_named(x):
    return isinstance(x, mj.NamedArray)


def _stack_blocks(params, layers):
    """Unrolled GPT params (``block_i/...``) -> scanned ones (``blocks/...`` with ``layers`` first)."""
    out = {k: v for k, v in params.items() if not k.startswith("block_")}
    out["blocks"] = jax.tree_util.tree_map(
        lambda *leaves: mj.named(jnp.stack([leaf.value for leaf in leaves]), ("layers", *leaves[0].dims)),
        *[params[f"block_{i}"] for i in range(layers)],
        is_leaf=_is_named,
    )
    return out


@functools.lru_cache(maxsize=None)
def _model(key):
    """(example, graph, reference loss, reference grads) of one model, computed once.

    The scanned GPT reuses the unrolled GPT's params, stacked, and is checked against the
    unrolled GPT's unsharded loss and (stacked) gradients.
    """
    if key == "gpt-scan":
        unrolled, _, ref_loss, ref_grads = _model("gpt")
        config = dataclasses.replace(unrolled.config, scan_layers=True)
        ex = dataclasses.replace(
            unrolled, config=config, params=_stack_blocks(unrolled.params, config.layers)
        )
        graph = mj.trace(ex.loss, ex.params, *ex.batch)
        return ex, graph, ref_loss, _stack_blocks(ref_grads, config.layers)
    preset, overrides = MODELS[key]
    ex = models.example(preset, 0, **overrides)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)

    def plain(params, *batch):
        return ex.loss(params, *batch).value

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(plain))(ex.params, *ex.batch)
    return ex, graph, np.asarray(ref_loss), ref_grads


def _gspmd_overrides(graph):
    """Every weight split over both mesh axes: ``embed`` over data, ``heads``/``mlp``/``vocab``
    over model (activations keep the rules' layout)."""
    split = {"embed": "data", "heads": "model", "mlp": "model", "vocab": "model"}
    return {t.name: {d: split[d] for d in t.dims if d in split} for t in graph.params}


def _fsdp_overrides(graph):
    """ZeRO-3 / FSDP style on a 1D data mesh: every weight's ``embed`` dim split over data."""
    return {t.name: {"embed": "data"} for t in graph.params if "embed" in t.dims}


DP, TP, TP2D = "batch:data", "mlp:model;heads:model", "batch:data;mlp:model;heads:model"

# (model, mesh shape, rules, overrides) ; overrides: None or a function of the graph
CASES = [
    # MLP
    ("mlp", {"data": 8}, DP, None),
    ("mlp", {"data": 8}, DP, _fsdp_overrides),
    ("mlp", {"model": 8}, "mlp:model", None),
    ("mlp", {"data": 4, "model": 2}, DP, None),
    ("mlp", {"data": 4, "model": 2}, "mlp:model", None),
    ("mlp", {"data": 4, "model": 2}, "batch:data;mlp:model", None),
    ("mlp", {"data": 4, "model": 2}, "batch:data;mlp:model", _gspmd_overrides),
    ("mlp", {"data": 2, "model": 4}, DP, None),
    ("mlp", {"data": 2, "model": 4}, "batch:data;mlp:model", None),
    ("mlp", {"data": 2, "model": 4}, "batch:data;mlp:model", _gspmd_overrides),
    # one transformer block
    ("block", {"data": 8}, DP, None),
    ("block", {"model": 8}, TP, None),
    ("block", {"data": 2, "model": 4}, TP2D, None),
    ("block", {"data": 4, "model": 2}, TP2D, _gspmd_overrides),
    # tiny GPT, unrolled and scanned
    ("gpt", {"data": 4, "model": 2}, TP2D, None),
    ("gpt", {"data": 2, "model": 4}, TP2D + ";vocab:model", _gspmd_overrides),
    ("gpt-scan", {"data": 4, "model": 2}, TP2D, None),
    ("gpt-scan", {"data": 2, "model": 4}, TP2D, _gspmd_overrides),
]


def _case_id(case):
    model, shape, rules, overrides = case
    mesh = "x".join(f"{v}{k[0]}" for k, v in shape.items())
    return f"{model}-{mesh}-{rules}" + (f"-{overrides.__name__.strip('_').split('_')[0]}" if overrides else "")


def _assert_sharding(array, mesh, spec, what):
    expected = NamedSharding(mesh, spec)
    assert array.sharding.is_equivalent_to(expected, array.ndim), (
        f"{what}: sharding {array.sharding} is not the planned {spec}"
    )


def _marked(case):
    """The MLP cases and one 2D transformer block run in the fast subset; the rest are slow."""
    fast = case[0] == "mlp" or case[:3] == ("block", {"data": 2, "model": 4}, TP2D)
    return case if fast else pytest.param(case, marks=pytest.mark.slow)


@pytest.mark.parametrize("case", [_marked(c) for c in CASES], ids=[_case_id(c) for c in CASES])
def test_sharded_loss_and_grads_equal_unsharded(case):
    key, shape, rules, overrides = case
    ex, graph, ref_loss, ref_grads = _model(key)
    layouts = layout_from_rules(graph, shape, rules, overrides(graph) if overrides else None)
    mesh = make_mesh(shape)
    program = Program(ex.loss, graph, mesh, layouts)

    loss, grads = program.jit(grad=True)(ex.params, *ex.batch)

    assert loss.dims == ()
    np.testing.assert_allclose(np.asarray(loss.value), ref_loss, rtol=RTOL, atol=ATOL)
    _assert_sharding(loss.value, mesh, P(), "loss")
    flat = jax.tree_util.tree_flatten_with_path(grads, is_leaf=_is_named)[0]
    ref_flat = jax.tree_util.tree_leaves(ref_grads, is_leaf=_is_named)
    assert len(flat) == len(ref_flat) == len(graph.params)
    split_somewhere = False
    for (path, g), ref in zip(flat, ref_flat):
        name = "/".join(str(p.key) for p in path)
        assert g.dims == ref.dims == graph.tensors[name].dims
        np.testing.assert_allclose(np.asarray(g.value), np.asarray(ref.value), rtol=RTOL, atol=ATOL, err_msg=name)
        _assert_sharding(g.value, mesh, layouts[name].spec(), f"grad of {name}")
        split_somewhere |= bool(layouts[name].mapping)
    # the params really are laid out as planned (not everything replicated)
    if overrides is not None or "mlp:model" in rules:
        assert split_somewhere


def test_forward_program_outputs_keep_their_planned_sharding():
    """A non-scalar output leaves with its planned sharding and equals the unsharded output."""
    ex, _, _, _ = _model("mlp")
    x = ex.batch[0]
    graph = mj.trace(mlp.forward, ex.params, x)
    assert graph.outputs == ("mlp/residual",)
    shape = {"data": 4, "model": 2}
    layouts = layout_from_rules(graph, shape, "batch:data;mlp:model", {"mlp/residual": {"batch": "data", "embed": "model"}})
    mesh = make_mesh(shape)
    y = Program(mlp.forward, graph, mesh, layouts).jit()(ex.params, x)
    assert y.dims == ("batch", "embed")
    _assert_sharding(y.value, mesh, P("data", "model"), "mlp/residual")
    expected = jax.jit(mlp.forward)(ex.params, x)
    np.testing.assert_allclose(np.asarray(y.value), np.asarray(expected.value), rtol=RTOL, atol=ATOL)


def test_forward_only_loss_program():
    ex, graph, ref_loss, _ = _model("mlp")
    shape = {"data": 2, "model": 4}
    mesh = make_mesh(shape)
    program = Program(ex.loss, graph, mesh, layout_from_rules(graph, shape, "batch:data;mlp:model"))
    loss = program.jit()(ex.params, *ex.batch)
    np.testing.assert_allclose(np.asarray(loss.value), ref_loss, rtol=RTOL, atol=ATOL)
    _assert_sharding(loss.value, mesh, P(), "loss")


def test_place_puts_params_and_inputs_on_their_planned_shardings():
    ex, graph, _, _ = _model("mlp")
    shape = {"data": 4, "model": 2}
    mesh = make_mesh(shape)
    layouts = layout_from_rules(graph, shape, "batch:data;mlp:model", _gspmd_overrides(graph))
    params, (x, target) = Program(ex.loss, graph, mesh, layouts).place(ex.params, *ex.batch)
    _assert_sharding(params["mlp"]["w_in"].value, mesh, P("data", "model"), "w_in")
    _assert_sharding(params["mlp"]["w_out"].value, mesh, P("model", "data"), "w_out")
    _assert_sharding(x.value, mesh, P("data"), "x")
    assert params["mlp"]["w_in"].value.addressable_shards[0].data.shape == (4, 32)


# --------------------------------------------------------------------------- #
# Pinned intermediates are honoured
# --------------------------------------------------------------------------- #
def _constraint_in(text, shardy, gspmd):
    """Whether the lowered ``text`` pins a tensor as given, in Shardy (``<@mesh, [{}, {"data"}]>
    : tensor<8x64xf32>``) or GSPMD (``{devices=[1,8]<=[8]}``) form, whichever JAX emitted."""
    return shardy in text or gspmd in text


def _probed_mlp_loss(seen):
    """The MLP's loss, reporting the sharding the compiler gives ``mlp/hidden``."""

    def loss(params, x, target):
        p = params["mlp"]
        with mj.scope("mlp"):
            h = mj.einsum("batch embed, embed mlp -> batch mlp", x, p["w_in"], name="hidden")
            jax.debug.inspect_array_sharding(h.value, callback=lambda s: seen.__setitem__("hidden", s))
            h = mj.gelu(h, name="act")
            y = mj.einsum("batch mlp, mlp embed -> batch embed", h, p["w_out"], name="out")
            y = mj.elementwise("add", x, y, name="residual")
        err = mj.elementwise("subtract", y, target, name="error")
        return mj.mean(mj.square(err, name="sq_error"), "batch embed", name="loss")

    return loss


@pytest.mark.parametrize(
    "pin, expected",
    [
        (None, P("data")),  # the rules' layout: batch split
        ({"mlp": "data"}, P(None, "data")),  # pinned against the rules: mlp split, batch whole
        ({"batch": "data"}, P("data")),
    ],
    ids=["rules", "pinned-mlp", "pinned-batch"],
)
def test_pinned_intermediate_layout_is_honoured(pin, expected):
    ex, _, ref_loss, ref_grads = _model("mlp")
    seen = {}
    fn = _probed_mlp_loss(seen)
    graph = mj.trace(fn, ex.params, *ex.batch)
    shape = {"data": 8}
    mesh = make_mesh(shape)
    layouts = layout_from_rules(graph, shape, "batch:data", {"mlp/hidden": pin} if pin else None)
    program = Program(fn, graph, mesh, layouts)

    lowered = program.lower(ex.params, *ex.batch, grad=True)
    text = lowered.as_text()
    # the constraint on mlp/hidden (f32[8,64]) is in the program, split along the pinned dim
    mlp_split = _constraint_in(text, '<@mesh, [{}, {"data"}]> : tensor<8x64xf32>', "{devices=[1,8]<=[8]}")
    assert mlp_split == (expected == P(None, "data"))
    compiled = lowered.compile()
    assert seen["hidden"].is_equivalent_to(NamedSharding(mesh, expected), 2), seen["hidden"]
    # per-device shapes in the partitioned program follow the pin: hidden is f32[8,64] globally
    hlo = compiled.as_text()
    local = "f32[8,8]" if expected == P(None, "data") else "f32[1,64]"
    assert local in hlo

    loss, grads = program.jit(grad=True)(ex.params, *ex.batch)
    np.testing.assert_allclose(np.asarray(loss.value), ref_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        np.asarray(grads["mlp"]["w_in"].value), np.asarray(ref_grads["mlp"]["w_in"].value), rtol=RTOL, atol=ATOL
    )


def test_scan_body_tensors_are_pinned():
    """A layout given to a tensor inside the scan body reaches the compiled loop."""
    ex, graph, _, _ = _model("gpt-scan")
    shape = {"data": 4, "model": 2}
    mesh = make_mesh(shape)
    pinned = Layout(graph.tensors["blocks/mlp/hidden"].dims, ((), (), ("data", "model")))
    layouts = layout_from_rules(graph, shape, DP, {"blocks/mlp/hidden": pinned})
    shardy = '<@mesh, [{}, {}, {"data", "model"}]> : tensor<8x16x128xf32>'
    gspmd = "{devices=[1,1,8]<=[8]}"
    text = Program(ex.loss, graph, mesh, layouts).lower(ex.params, *ex.batch).as_text()
    # batch split 4 ways everywhere else; only the pinned tensor splits its mlp dim 8 ways
    assert _constraint_in(text, shardy, gspmd)
    plain = Program(ex.loss, graph, mesh, layout_from_rules(graph, shape, DP)).lower(ex.params, *ex.batch).as_text()
    assert not _constraint_in(plain, shardy, gspmd)


def test_program_rejects_an_invalid_layout():
    ex, graph, _, _ = _model("mlp")
    mesh = make_mesh({"data": 8})
    layouts = layout_from_rules(graph, {"data": 8}, DP)
    layouts["mlp/w_in"] = Layout(("embed", "mlp"), (("data",), ("data",)))
    with pytest.raises(mj.LayoutError, match="'mlp/w_in'"):
        Program(ex.loss, graph, mesh, layouts)


def test_grad_needs_a_scalar_loss():
    ex, _, _, _ = _model("mlp")
    graph = mj.trace(mlp.forward, ex.params, ex.batch[0])
    mesh = make_mesh({"data": 8})
    program = Program(mlp.forward, graph, mesh, layout_from_rules(graph, {"data": 8}, DP))
    with pytest.raises(mj.TraceError, match="scalar"):
        program.jit(grad=True)


SMALL_GPT = dict(batch=8, seq=16, embed=128, heads=4, head_dim=32, mlp=512, vocab=128, layers=2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [SMALL_GPT, dict(SMALL_GPT, batch=16, seq=32, embed=256, head_dim=64, mlp=1024, vocab=256, scan_layers=True)],
    ids=["unrolled", "scanned"],
)
def test_reshards_recomputed_in_the_backward_pass_give_the_unsharded_gradients(overrides):
    """Under a tight budget (a tenth of the way from the least memory any layout needs to
    Megatron's data-parallel layout's) the solver gathers weights (and activations) for ops
    whose backward reads them; those ops redo the reshard in their backward pass (a custom
    VJP) rather than keep the gathered copy. Loss and gradients still equal the single-device
    ones."""
    ex = models.example("gpt-tiny", 0, **overrides)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    shape = {"data": 4, "model": 2}
    megatron_dp = solve(graph, shape, hardware="h100-node", train=True, rules="batch:data;heads:model;mlp:model;embed:none")
    least = solve_ilp(solve(graph, shape, hardware="h100-node", train=True).problem, objective="memory").memory
    budget = least + 0.1 * (megatron_dp.peak_memory_bytes - least)
    plan = solve(graph, shape, hardware="h100-node", train=True, memory_budget=budget)
    mesh = make_mesh(shape)
    program = plan.program(ex.loss, mesh)
    recomputed = [op for op, flags in program.recomputed.items() if any(flags)]
    assert recomputed, "the budget should make the plan reshard an operand some backward pass reads"

    loss, grads = program.jit(grad=True)(ex.params, *ex.batch)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p, *b: ex.loss(p, *b).value))(ex.params, *ex.batch)
    np.testing.assert_allclose(np.asarray(loss.value), np.asarray(ref_loss), rtol=RTOL, atol=ATOL)
    flat = jax.tree_util.tree_flatten_with_path(grads, is_leaf=_is_named)[0]
    for (path, g), ref in zip(flat, jax.tree_util.tree_leaves(ref_grads, is_leaf=_is_named)):
        name = "/".join(str(p.key) for p in path)
        np.testing.assert_allclose(np.asarray(g.value), np.asarray(ref.value), rtol=RTOL, atol=ATOL, err_msg=name)
