"""Memory levers: rematerialisation per repeated block and gradient accumulation.

What each policy keeps and recomputes, that training under them matches one device, that the
compiled memory and recompute flops match the prediction, and the CLI's flags and JSON keys."""

import dataclasses
import json

import jax
import numpy as np
import optax
import pytest

import meshjax as mj
from meshjax import cli, data, models
from meshjax.cost.remat import remat_effect, remat_units
from meshjax.devices import make_mesh
from meshjax.errors import MeshjaxError
from meshjax.hlo import inspect_compiled
from meshjax.microbatch import split_batch
from meshjax.solve import solve
from meshjax.cost.hardware import get_hardware
from meshjax.solver.evaluate import recompute_flops
from meshjax.solver.ilp import solve_ilp
from meshjax.solver.problem import build_problem
from meshjax.train import make_train_step
from meshjax.verify import compile_plan


def _graph(name="gpt-tiny", **overrides):
    ex = models.example(name, key=0, vocab=256, **overrides)
    return ex, mj.trace(ex.loss, ex.params, *ex.batch)


ATTENTION_CORE = {"flash": ("attn/context",), "einsum": ("attn/scores", "attn/probs", "attn/context")}


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("form", ["flash", "einsum"])
def test_policies_keep_what_they_say(scan, form):
    _, g = _graph(scan_layers=scan, attention=form)
    (unit,) = remat_units(g)
    prefix = remat_units(g)[unit].prefix
    selective = remat_effect(g, unit, "selective")
    full = remat_effect(g, unit, "full")
    weight_matmuls = {prefix + n for n in ("attn/q", "attn/k", "attn/v", "attn/out", "mlp/hidden")}
    assert set(selective.kept) - {prefix + "carry"} == weight_matmuls
    assert set(full.kept) <= {prefix + "carry"}
    # The attention core is recomputed under selective; everything under full.
    assert {prefix + name for name in ATTENTION_CORE[form]} <= selective.recomputed
    assert prefix + "attn/q" not in selective.recomputed and prefix + "attn/q" in full.recomputed


def test_split_batch_scales_shapes_and_flops():
    _, g = _graph()
    micro = split_batch(g, 4)
    assert micro.tensors["tokens"].shape == (2, 16) and g.tensors["tokens"].shape == (8, 16)
    q = "block_0/attn/q"
    assert micro.producer[q].index.flops * 4 == pytest.approx(g.producer[q].index.flops)
    with pytest.raises(MeshjaxError, match="must divide the global batch 8"):
        split_batch(g, 3)


def test_levers_cost_time_and_save_memory():
    _, g = _graph()
    base = solve(g, {"data": 4, "model": 2}, train=True)
    for remat in ("selective", "full"):
        plan = solve(g, {"data": 4, "model": 2}, train=True, remat=remat)
        assert plan.remat == {"block_": remat}
        assert recompute_flops(plan.problem, plan.solution.choice) > 0
    full = solve(g, {"data": 4, "model": 2}, train=True, remat="full", microbatches=2)
    assert full.microbatches == 2 and full.memory_breakdown()["activations"] < base.memory_breakdown()["activations"]
    # No budget: the levers only cost time, so auto picks none of them.
    auto = solve(g, {"data": 4, "model": 2}, train=True, remat="auto", microbatches="auto")
    assert auto.remat == {} and auto.microbatches == 1 and auto.step_time_s == pytest.approx(base.step_time_s)


@pytest.mark.slow
@pytest.mark.parametrize("scan,remat,k", [(True, "full", 2), (False, "selective", 4)])
def test_training_under_levers_matches_one_device(scan, remat, k):
    ex, g = _graph(scan_layers=scan)

    def losses(mesh_shape, **kw):
        plan = solve(g, mesh_shape, hardware="cpu-sim", train=True, **kw)
        trainer = make_train_step(plan, ex.loss, make_mesh(mesh_shape), optax.adam(1e-3))
        state, out = trainer.init(ex.params), []
        for batch in data.batches(8, 16, seed=0, steps=4):
            state, loss = trainer.step(state, *batch)
            out.append(float(loss))
        return np.array(out)

    one = losses({"data": 1})
    levers = losses({"data": 4, "model": 2}, remat=remat, microbatches=k)
    np.testing.assert_allclose(levers, one, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("remat,k", [("selective", 1), ("full", 1), ("full", 2)])
def test_compiled_memory_matches_prediction(remat, k):
    ex, g = _graph("gpt-small", scan_layers=True)
    mesh_shape = {"data": 4, "model": 2}
    plan = solve(g, mesh_shape, hardware="cpu-sim", train=True, remat=remat, microbatches=k)
    mesh = make_mesh(mesh_shape)
    report = inspect_compiled(compile_plan(plan, ex.loss, mesh, ex.params, *ex.batch), mesh)
    assert 0.9 <= report.memory["peak_bytes"] / plan.peak_memory_bytes <= 1.1


def _recompute_flops(remat, **overrides):
    """``(compiled, predicted)`` extra flops of gpt-small's plan on 4x2 under ``remat``, against
    the same layouts without it. Unrolled, one micro-batch: XLA's cost analysis counts a while
    loop's body once."""
    ex, g = _graph("gpt-small", **overrides)
    mesh_shape = {"data": 4, "model": 2}
    mesh = make_mesh(mesh_shape)
    plan = solve(g, mesh_shape, hardware="cpu-sim", train=True, remat=remat)

    def flops(p):
        return compile_plan(p, ex.loss, mesh, ex.params, *ex.batch).cost_analysis()["flops"]

    extra = flops(plan) - flops(dataclasses.replace(plan, remat={}))
    return extra, recompute_flops(plan.problem, plan.solution.choice)


@pytest.mark.slow
def test_full_remat_compiled_flops_match_predicted_recompute():
    extra, predicted = _recompute_flops("full")
    assert extra == pytest.approx(predicted, rel=0.1)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "known gap: under selective recompute XLA's extra flops are 0.80x the predicted recompute with "
    "einsum attention and 1.43x with the attention op (its blockwise forward does more work than "
    "the op's declared flops); full recompute is within 4%"))
@pytest.mark.parametrize("form", ["einsum", "flash"])
def test_selective_remat_compiled_flops_match_predicted_recompute(form):
    extra, predicted = _recompute_flops("selective", attention=form)
    assert extra == pytest.approx(predicted, rel=0.1)


# Compiled / predicted memory under the half budget: both forms in the 0.90-1.10 band. Both
# plans recompute the scanned block in full; its backward peak is priced in op order (while the
# attention op's backward runs, the MLP's recomputed residuals are freed already), not as the
# whole block's recomputed residuals beside the largest backward working set, which put the
# attention op's plan at 0.83 of its prediction.
LEVERS_MEMORY_BAND = {"einsum": (0.9, 1.1), "flash": (0.9, 1.1)}


@pytest.mark.slow
@pytest.mark.parametrize("form", ["einsum", "flash"])
def test_half_the_least_memory_compiles_within_budget(form):
    ex, g = _graph("gpt-small", scan_layers=True, attention=form)
    mesh_shape = {"data": 4, "model": 2}
    least = solve_ilp(build_problem(g, mesh_shape, get_hardware("cpu-sim"), train=True), objective="memory").memory
    budget = least / 2
    plan = solve(g, mesh_shape, hardware="cpu-sim", train=True, memory_budget=budget, remat="auto", microbatches="auto")
    assert plan.peak_memory_bytes <= budget and (plan.remat != {"blocks": "none"} or plan.microbatches > 1)
    mesh = make_mesh(mesh_shape)
    report = inspect_compiled(compile_plan(plan, ex.loss, mesh, ex.params, *ex.batch), mesh)
    compiled = report.memory["peak_bytes"]
    low, high = LEVERS_MEMORY_BAND[form]
    assert low <= compiled / plan.peak_memory_bytes <= high
    assert compiled <= budget
    # The recomputed forward's reshards and the backward's own re-gathers are one collective
    # each in the compiled backward (XLA computes the identical pair once).
    assert report.comm_bytes == pytest.approx(plan.comm_bytes, rel=0.03)


def test_cli_plan_reports_levers(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = cli.main(["plan", "gpt-tiny", "--mesh", "4x2", "--no-verify", "--remat", "full", "--microbatches", "2",
                     "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["remat"] == {"block_": "full"} and doc["microbatches"] == 2
    assert cli.main(["plan", "gpt-tiny", "--no-verify", "--microbatches", "0"]) != 0
    assert "--microbatches '0'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_train_under_half_the_memory_matches_one_device(tmp_path):
    _, g = _graph("gpt-small", scan_layers=True)
    least = solve_ilp(build_problem(g, {"data": 4, "model": 2}, get_hardware("cpu-sim"), train=True), objective="memory").memory
    common = ["gpt-small", "--steps", "10", "--set", "scan_layers=true"]
    levers, one = tmp_path / "levers.json", tmp_path / "one.json"
    assert cli.main(["train", *common, "--mesh", "4x2", "--memory-limit", f"{least / 2:.0f}B",
                     "--losses-json", str(levers)]) == 0
    assert cli.main(["train", *common, "--mesh", "1", "--axes", "data", "--remat", "none", "--microbatches", "1",
                     "--losses-json", str(one)]) == 0
    np.testing.assert_allclose(json.loads(levers.read_text())["losses"], json.loads(one.read_text())["losses"], rtol=1e-4)


@pytest.mark.slow
def test_gradient_sync_runs_once_per_micro_batch_as_predicted():
    """With k micro-batches XLA reduces the data-parallel gradients inside the accumulation
    loop, once per micro-batch (the partitioner reduces where the weight-gradient matmul sums
    over the split batch, and a loop carry cannot hold an unreduced sum), so the step syncs k
    times. The cost model prices that: predicted comm equals compiled for k = 1, 2, 4."""
    from meshjax.verify import Verification

    ex, g = _graph(batch=64)
    mesh_shape = {"data": 8}
    mesh = make_mesh(mesh_shape)
    synced = {}
    for k in (1, 2, 4):
        plan = solve(g, mesh_shape, hardware="cpu-sim", train=True, microbatches=k)
        check = Verification(plan, inspect_compiled(compile_plan(plan, ex.loss, mesh, ex.params, *ex.batch), mesh))
        assert check.compiled.comm_bytes == check.predicted_comm_bytes, (k, check.predicted_by_kind, check.compiled_by_kind)
        reduces = [c for c in check.compiled.collectives if c.kind == "all-reduce"]
        assert reduces and all(c.count == k and c.trip_count_known for c in reduces)  # in the loop body
        synced[k] = check.compiled_by_kind["all-reduce"]
    assert synced[2] == 2 * synced[1] and synced[4] == 4 * synced[1]


BF16_RTOL = 2 ** -7  # two bfloat16 ulps


@pytest.mark.slow
def test_bfloat16_training_under_levers_matches_the_unlevered_step():
    """bf16 params and activations: recomputation re-runs the same bf16 ops, and accumulation
    sums micro-batch gradients in float32, so the losses stay within bf16's precision of the step
    without levers, and the four updates the params took differ from the unlevered ones by a
    small fraction of their size (Adam's normalised step turns a bf16 rounding of a near-zero
    gradient into a full-size step, so elementwise equality is not the measure)."""
    ex, g = _graph(dtype="bfloat16")
    mesh_shape = {"data": 4, "model": 2}

    def flat(params):
        leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: hasattr(x, "dims"))
        assert {str(getattr(x, "dtype", "")) for x in leaves} == {"bfloat16"}
        return np.concatenate([np.asarray(getattr(x, "value", x), np.float32).ravel() for x in leaves])

    def run(**kw):
        plan = solve(g, mesh_shape, hardware="cpu-sim", train=True, **kw)
        trainer = make_train_step(plan, ex.loss, make_mesh(mesh_shape), optax.adam(1e-3))
        state, out = trainer.init(ex.params), []
        for batch in data.batches(8, 16, seed=0, steps=4):
            state, loss = trainer.step(state, *batch)
            out.append(float(loss))
        return np.array(out), flat(state.params)

    start = flat(ex.params)
    base_losses, base_params = run(remat="none", microbatches=1)
    moved = np.linalg.norm(base_params - start)
    for kw in (dict(remat="selective"), dict(remat="full"), dict(remat="none", microbatches=2)):
        losses, params = run(**kw)
        np.testing.assert_allclose(losses, base_losses, rtol=BF16_RTOL, err_msg=str(kw))
        assert np.linalg.norm(params - base_params) <= 0.05 * moved, (kw, np.linalg.norm(params - base_params) / moved)


@pytest.mark.slow
@pytest.mark.parametrize("remat,k", [("selective", 1), ("full", 1), ("full", 2)])
def test_bfloat16_compiled_memory_under_levers(remat, k):
    """bf16 under levers on XLA:CPU: compiled memory is the prediction plus one thing the CPU
    compiler adds. XLA:CPU has no bf16 matmul: it converts the scanned blocks' bf16 weights to
    float32 and hoists that convert out of the loop, holding a float32 copy of every stacked
    block weight (an accelerator multiplies in bf16 and holds none). With that copy added the
    prediction is within the fp32 tests' band."""
    from meshjax.cost.strategies import per_device_bytes
    from meshjax.verify import MEMORY_BAND

    ex, g = _graph("gpt-small", scan_layers=True, dtype="bfloat16")
    mesh_shape = {"data": 4, "model": 2}
    plan = solve(g, mesh_shape, hardware="cpu-sim", train=True, remat=remat, microbatches=k)
    mesh = make_mesh(mesh_shape)
    compiled = inspect_compiled(compile_plan(plan, ex.loss, mesh, ex.params, *ex.batch), mesh).memory["peak_bytes"]
    stacked = [t for t in g.params if "layers" in t.dims]
    assert stacked and {t.dtype for t in stacked} == {"bfloat16"}
    f32_copy = sum(2 * per_device_bytes(t, plan.layouts[t.name], mesh_shape) for t in stacked)
    assert compiled > MEMORY_BAND[1] * plan.peak_memory_bytes  # the copy is visible
    assert MEMORY_BAND[0] <= compiled / (plan.peak_memory_bytes + f32_copy) <= MEMORY_BAND[1]
