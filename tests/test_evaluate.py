"""The one evaluator: what a plan reports is what the solver optimised, priced once."""

import math

import numpy as np

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


def test_an_op_emitted_without_its_facts_is_an_error():
    """The cost model has no default for what an op's backward keeps: an op must declare it."""
    import jax.numpy as jnp

    from meshjax.context import emit
    from meshjax.errors import TraceError
    from meshjax.graph import IndexForm

    def loss(params, x):
        y = mj.NamedArray(x.value * 2, x.dims)
        y = emit("my_op", [x], y, IndexForm(loop=tuple(x.sizes.items()), operands=(x.dims,), result=x.dims), name="mine")
        return mj.sum(mj.einsum("a, a ->", y, params["w"]), ())

    params = {"w": mj.named(jnp.ones(4), "a")}
    with pytest.raises(TraceError, match=r"'mine' \(kind 'my_op'\) was emitted without its OpFacts"):
        mj.trace(loss, params, mj.named(jnp.ones(4), "a"))


def test_a_custom_elementwise_function_declares_what_its_backward_reads():
    import jax.numpy as jnp

    from meshjax.graph import OpFacts

    def loss(params, x):
        h = mj.einsum("a, a b -> b", x, params["w"], name="h")
        h = mj.elementwise(jnp.cos, h, name="cos")
        h = mj.elementwise(lambda v: v * 3.0, h, name="triple", facts=OpFacts())
        return mj.sum(h, "b")

    params = {"w": mj.named(jnp.ones((4, 2)), "a b")}
    graph = mj.trace(loss, params, mj.named(jnp.ones(4), "a"))
    assert graph.producer["cos"].facts.saves == (0,)  # default: jax.vjp keeps the inputs
    assert graph.producer["triple"].facts.saves == ()
    assert graph.producer["sum"].facts.reduction


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from meshjax.cost import get_hardware  # noqa: E402
from meshjax.solve import plan_from_choice  # noqa: E402
from meshjax.solver import build_problem  # noqa: E402
from meshjax.solver.ilp import Solution  # noqa: E402
from test_solver import einsum_graphs  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    graph=einsum_graphs(),
    mesh=st.sampled_from([{"x": 4}, {"x": 2, "y": 2}]),
    train=st.booleans(),
    zero=st.booleans(),
    optimizer=st.sampled_from(["adam", "sgd", "adafactor"]),
    hardware=st.sampled_from(["h100-node", "cpu-sim", "h100-2node"]),
    data=st.data(),
)
def test_a_plan_reports_what_the_ilp_counts(graph, mesh, train, zero, optimizer, hardware, data):
    """For any choice, the plan's step time is the ILP's objective and its memory breakdown sums
    to the ILP's memory row."""
    problem = build_problem(graph, mesh, get_hardware(hardware), train=train, optimizer=optimizer, zero=zero)
    choice = tuple(data.draw(st.integers(0, len(n.options) - 1)) for n in problem.nodes)
    time, memory = problem.total_time(choice), problem.memory(choice)
    if time == float("inf"):
        return  # a forbidden reshard: no plan has it
    plan = plan_from_choice(problem, Solution(choice, time, memory, 0.0, "given"), 0.0)
    assert plan.step_time_s == pytest.approx(time, rel=1e-9, abs=1e-18)
    assert plan.peak_memory_bytes == pytest.approx(memory, rel=1e-9)
    breakdown = plan.memory_breakdown()
    assert sum(v for k, v in breakdown.items() if k != "total") == pytest.approx(breakdown["total"], rel=1e-12)
    assert plan.comm_bytes == pytest.approx(sum(c.comm_bytes for row in plan.op_costs for c in row.collectives))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, per_param", [("adam", 16), ("sgd", 8)])
def test_mixed_precision_step_holds_what_the_memory_model_counts(optimizer, per_param):
    """bf16 params train with an fp32 master copy and fp32 moments: the compiled step's arguments
    are exactly the params, optimizer state and inputs the plan counts (16 B per param element
    with Adam, 2 + 2 + 4 + 8; 8 B with SGD: param, gradient, master; a data-parallel gradient,
    2 B, is counted in the end-of-step sync, not in the breakdown's resident kinds)."""
    from meshjax.devices import make_mesh
    from meshjax.verify import verify

    ex = models.example("gpt-tiny", abstract=True, dtype="bfloat16")
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    mesh = {"data": 4, "model": 2}
    plan = solve(graph, mesh, hardware="cpu-sim", train=True, optimizer=optimizer)
    mem = plan.memory_breakdown()
    elements = sum(math.prod(t.shape) for t in graph.params)
    assert {t.dtype for t in graph.params} == {"bfloat16"}
    unsharded = solve(graph, {"data": 8}, hardware="cpu-sim", train=True, optimizer=optimizer, rules="batch:data")
    full = unsharded.memory_breakdown()
    if all(not l.used_axes for n, l in unsharded.layouts.items() if graph.tensors[n].role == "param"):
        assert full["params"] + full["optimizer_state"] == pytest.approx((per_param - 2) * elements)
    compiled = verify(plan, ex.loss, make_mesh(mesh), ex.params, *ex.batch).compiled.memory
    # The step's arguments: params, optimizer state (master copy, moments, a step count), inputs.
    counted = mem["params"] + mem["optimizer_state"] + mem["inputs"]
    assert compiled["argument_bytes"] == pytest.approx(counted, rel=0.01, abs=4096)


@pytest.mark.slow
def test_mixed_precision_training_updates_an_fp32_master_copy():
    """The sharded bf16 step equals a one-device reference written with optax by hand: SGD on
    fp32 master weights (SGD, so a bf16 rounding of a gradient moves the result by lr times that
    rounding only), the forward and backward pass in bf16 on the master cast down."""
    import jax
    import optax

    from meshjax.devices import make_mesh
    from meshjax.optimizer import Optimizer
    from meshjax.train import make_train_step

    ex = models.example("gpt-tiny", key=jax.random.key(0), dtype="bfloat16")
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    batches = [models.transformer.example_batch(ex.config, i) for i in range(3)]
    lr = 1e-2

    adam = optax.sgd(lr)
    master = jax.tree_util.tree_map(lambda p: p.astype("float32"), ex.params)
    state, ref_losses = adam.init(master), []

    @jax.jit
    def ref_step(master, state, tokens, targets):
        params = jax.tree_util.tree_map(lambda m: m.astype("bfloat16"), master)
        loss, grads = jax.value_and_grad(lambda p: ex.loss(p, tokens, targets).value)(params)
        grads = jax.tree_util.tree_map(lambda g: g.astype("float32"), grads)
        updates, state = adam.update(grads, state, master)
        return optax.apply_updates(master, updates), state, loss

    for tokens, targets in batches:
        master, state, loss = ref_step(master, state, tokens, targets)
        ref_losses.append(float(loss))

    plan = solve(graph, {"data": 4, "model": 2}, hardware="cpu-sim", train=True, optimizer=Optimizer("sgd", lr))
    trainer = make_train_step(plan, ex.loss, make_mesh({"data": 4, "model": 2}))
    train_state, losses = trainer.init(ex.params), []
    for tokens, targets in batches:
        train_state, loss = trainer.step(train_state, tokens, targets)
        losses.append(float(loss))
    assert losses == pytest.approx(ref_losses, rel=2e-2)
    got_master = train_state.opt_state[0]
    for ours, ref, p in zip(jax.tree_util.tree_leaves(got_master), jax.tree_util.tree_leaves(master), jax.tree_util.tree_leaves(train_state.params)):
        assert ours.dtype == "float32" and p.dtype == "bfloat16"
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-4)
        np.testing.assert_array_equal(np.asarray(p), np.asarray(ours.astype("bfloat16")))
    # The master copy holds what bf16 params would round away.
    leaves = jax.tree_util.tree_leaves(got_master)
    assert any(bool((np.asarray(m) != np.asarray(m.astype("bfloat16").astype("float32"))).any()) for m in leaves)


def test_scanned_and_unrolled_layers_get_the_same_plan():
    """XLA combines a scanned layer's per-trip weight-gradient syncs as it does unrolled layers',
    and a scan's weight slices are read back from the stacked param, not kept: the scanned and
    unrolled variants of a model get the same layouts and time (before, h100-node replicated the
    scanned one: 916.6 MiB/device where data parallel needs 231.6 MiB). A scan keeps more
    residuals (every one jax.vjp saves is stacked), so it may need more memory, never less."""
    from meshjax.cost.memory import kept_copies

    plans = {}
    for scan in (False, True):
        ex = models.example("gpt-small", abstract=True, scan_layers=scan, batch=1024)
        graph = mj.trace(ex.loss, ex.params, *ex.batch)
        plans[scan] = solve(graph, {"data": 4, "model": 2}, hardware="h100-node", train=True)
        if scan:
            assert not set(kept_copies(graph)) & set(graph.sliced_from)
    unrolled, scanned = plans[False], plans[True]
    assert any(l.used_axes for l in scanned.layouts.values())
    assert scanned.layouts["tokens"] == unrolled.layouts["tokens"]
    assert scanned.layouts["blocks/mlp/hidden"].axes == unrolled.layouts["block_0/mlp/hidden"].axes
    assert scanned.step_time_s == pytest.approx(unrolled.step_time_s, rel=1e-3)
    assert scanned.peak_memory_bytes >= unrolled.peak_memory_bytes


@pytest.mark.parametrize("op", ["gelu", "silu", "tanh", "exp", "sigmoid", "relu", "softmax", "layer_norm", "rms_norm"])
def test_declared_scan_residuals_are_what_jax_saves(op, capsys):
    """Inside a scan every residual jax.vjp saves is stacked over the trips, so the tensors of
    the result's size an op declares it keeps (read operands, its result, scan_residuals) are
    exactly those ``jax.ad_checkpoint.print_saved_residuals`` lists."""
    import jax.numpy as jnp
    from jax.ad_checkpoint import print_saved_residuals

    from meshjax.context import Recorder, active

    x = mj.named(jnp.ones((8, 16)), "b e")
    scale = mj.named(jnp.ones((16,)), "e")
    run = {
        "softmax": lambda x, s: mj.softmax(x, "e"),
        "layer_norm": lambda x, s: mj.layer_norm(x, "e", s, s),
        "rms_norm": lambda x, s: mj.rms_norm(x, "e", s),
    }.get(op, lambda x, s: mj.elementwise(op, x))
    print_saved_residuals(lambda x, s: run(x, s).value.sum(), x, scale)
    saved = [line for line in capsys.readouterr().out.splitlines() if line.startswith("f32[8,16]")]
    recorder = Recorder()
    with active(recorder):
        recorder.register(x, "x", "input")
        recorder.register(scale, "s", "param")
        run(x, scale)
    recorded = next(iter(recorder.ops.values()))
    facts = recorded.facts
    read = [recorded.inputs[i] for i in (() if facts.saves_result else facts.saves)]
    declared = sum(recorder.tensors[name].shape == (8, 16) for name in read)
    declared += facts.saves_result + facts.residuals_in(scanned=True)
    assert declared == len(saved), saved


def test_weight_gradients_are_held_only_while_they_wait_for_their_all_reduce():
    """mlp-tiny (x [8, 16] @ w_in [16, 64], gelu, @ w_out [64, 16], float32) on 8 devices.
    Replicated, each weight gradient (4,096 B) goes straight into its Adam update (XLA fuses it
    after the gradient's dot): none is resident, and the backward peak is the largest op's
    cotangent, a temporary of its size and its own weight's gradient: ``x @ w_in``'s
    2 x 2,048 + 4,096 (its operands x and w_in are resident already). Data parallel, both wait
    whole for the step's combined all-reduce, which holds each as partial sums and as result
    beside the params, the two Adam moments and the step's shard of the inputs (x and target,
    1,024 B / 8), when the backward pass has freed the activations: that phase is the step's
    peak."""
    ex = models.example("mlp-tiny", abstract=True)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    replicated = solve(graph, {"data": 8}, hardware="cpu-sim", train=True, rules={"batch": None}).memory_breakdown()
    data_parallel = solve(graph, {"data": 8}, hardware="cpu-sim", train=True, rules="batch:data").memory_breakdown()
    assert replicated["gradients"] == data_parallel["gradients"] == 0
    assert replicated["backward_peak"] == 2 * 2048 + 4096
    assert "gradient_sync" not in replicated
    assert data_parallel["total"] == 2 * 4096 + 2 * 2 * 4096 + 2 * 2 * 4096 + 1024 / 8


def test_unrolled_layers_hold_one_layers_weight_gradient_cotangents():
    """gpt-tiny (batch 8, seq 16, embed 32, 4 heads of 8, mlp 128, vocab 64, float32, 2 unrolled
    layers), replicated on 8 devices: the cotangents of the results of the ops that read a
    param, once per layer template. A layer's ln_1, q, k, v, out and ln_2 results are 8 x 16 x
    32 x 4 = 16,384 B each, its MLP hidden 65,536 B and its MLP out 16,384 B; around the layers,
    the token and position embeddings and the final norm (16,384 B each) and the logits (8 x 16
    x 64 x 4). Scanned, or with one block (``block-tiny``), nothing is held."""
    layer = 6 * 16_384 + 65_536 + 16_384
    outside = 3 * 16_384 + 32_768
    for name, overrides, expected in (("gpt-tiny", {}, layer + outside), ("gpt-tiny", {"scan_layers": True}, None),
                                      ("block-tiny", {}, None)):
        ex = models.example(name, abstract=True, **overrides)
        graph = mj.trace(ex.loss, ex.params, *ex.batch)
        replicated = {dim: None for tensor in graph.tensors.values() for dim in tensor.dims}
        memory = solve(graph, {"data": 8}, hardware="cpu-sim", train=True, rules=replicated).memory_breakdown()
        assert memory.get("held_cotangents") == expected, (name, overrides)


def test_a_scans_weight_slice_makes_no_weight_gradient_of_its_own():
    """The stacked param's gradient is its own (resident through the backward loop); the op
    that slices one layer's weight out of it holds, in its backward, only its result's cotangent
    and one temporary of that size, never the whole stack's gradient."""
    from meshjax.cost.hardware import get_hardware
    from meshjax.cost.strategies import per_device_bytes
    from meshjax.solver.problem import build_problem

    ex = models.example("gpt-tiny", abstract=True, scan_layers=True)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    problem = build_problem(graph, {"data": 4, "model": 2}, get_hardware("cpu-sim"), train=True)
    slices = [n for n in problem.nodes if n.op is not None and n.op.facts.slices and graph.tensors[n.op.inputs[0]].role == "param"]
    assert slices
    for node in slices:
        expected = [2 * per_device_bytes(node.tensor, layout, problem.mesh_shape) for layout in node.result_layouts]
        assert list(node.peak) == expected, node.key
