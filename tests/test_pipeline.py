"""Pipeline parallelism: a scanned layer stack split over a stage mesh axis trains like one
device; the schedule's timeline; one-line errors."""

import numpy as np
import optax
import pytest

import meshjax as mj
from meshjax import data, models
from meshjax.devices import make_mesh
from meshjax.errors import LayoutError
from meshjax.pipeline import Pipeline, timeline
from meshjax.hlo import inspect_compiled
from meshjax.pipeline.plan import solve_pipelined
from meshjax.pipeline.stage_graph import preset_tracer
from meshjax.solve import solve
from meshjax.train import make_train_step

STEPS = 10
LR = 3e-3


def gpt4(dtype="float32"):
    ex = models.example("gpt-tiny", key=0, layers=4, scan_layers=True, vocab=data.VOCAB, dtype=dtype)
    return ex, mj.trace(ex.loss, ex.params, *ex.batch)


def tracer(dtype="float32", **sizes):
    return preset_tracer("gpt-tiny", layers=4, scan_layers=True, vocab=data.VOCAB, dtype=dtype, **sizes)


def trainer_for(plan, ex, mesh_shape):
    return make_train_step(plan, ex.loss, make_mesh(mesh_shape), optax.adam(LR))


def losses(plan, ex, mesh_shape, steps=STEPS):
    trainer = trainer_for(plan, ex, mesh_shape)
    state = trainer.init(ex.params)
    out = []
    for batch in data.batches(ex.config.batch, ex.config.seq, seed=0, steps=steps):
        state, loss = trainer.step(state, *batch)
        out.append(float(loss))
    return np.array(out)


@pytest.fixture(scope="module")
def one_device():
    ex, graph = gpt4()
    return losses(solve(graph, {"data": 1}, train=True, hardware="cpu-sim"), ex, {"data": 1})


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_shape, microbatches, remat",
    [
        ({"data": 2, "model": 2, "stage": 2}, 2, False),
        ({"stage": 4, "model": 2}, 4, False),
        ({"stage": 4, "model": 2}, 8, True),
        ({"data": 2, "model": 2, "stage": 2}, 4, True),
    ],
)
def test_pipelined_training_matches_one_device(one_device, mesh_shape, microbatches, remat):
    ex, _ = gpt4()
    plan = solve_pipelined(tracer(), mesh_shape, microbatches=microbatches, remat=remat, train=True, hardware="cpu-sim")
    assert plan.specs["blocks/mlp/w_in"][0] == "stage"  # each stage holds only its layers
    assert (plan.pipeline.microbatches, plan.pipeline.remat) == (microbatches, remat)
    got = losses(plan, ex, mesh_shape)
    np.testing.assert_allclose(got, one_device, rtol=1e-4)
    assert got[-1] < got[0] - 0.5  # it trains


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape, microbatches", [({"data": 2, "model": 2, "stage": 2}, 2), ({"stage": 4, "model": 2}, 4)])
def test_predicted_comm_matches_compiled(mesh_shape, microbatches):
    """The whole training step's collectives (in-stage and over the stage axis) against the
    prediction: total bytes within 5%, and the stage axis's collective-permutes exactly."""
    ex, _ = gpt4()
    plan = solve_pipelined(tracer(), mesh_shape, microbatches=microbatches, remat=False, train=True, hardware="cpu-sim")
    trainer = trainer_for(plan, ex, mesh_shape)
    report = inspect_compiled(trainer.lower(trainer.abstract_state(), *ex.batch).compile(), trainer.mesh)
    permutes = [c for c in report.collectives if c.kind == "collective-permute"]
    predicted = [c for c in plan.cost.collectives if c.kind == "collective-permute"]
    assert sum(c.comm_bytes for c in permutes) == sum(c.comm_bytes for c in predicted) > 0
    assert {c.axes for c in permutes} == {("stage",)}
    assert sum(c.count for c in permutes) == 2 * plan.pipeline.iterations
    assert report.comm_bytes == pytest.approx(plan.comm_bytes, rel=0.05)


@pytest.mark.slow
def test_pipelined_training_bfloat16():
    ex, graph = gpt4("bfloat16")
    reference = losses(solve(graph, {"data": 1}, train=True, hardware="cpu-sim"), ex, {"data": 1}, steps=3)
    shape = {"data": 2, "model": 2, "stage": 2}
    plan = solve_pipelined(tracer("bfloat16"), shape, microbatches=2, remat=True, train=True, hardware="cpu-sim")
    got = losses(plan, ex, shape, steps=3)
    # bf16 sums micro-batches in another order: agreement to bf16's precision.
    np.testing.assert_allclose(got, reference, rtol=2e-2)


def test_layers_must_split_into_stages():
    three = preset_tracer("gpt-tiny", layers=3, scan_layers=True)
    with pytest.raises(LayoutError, match="dim 'layers' of size 3 does not split into 2 stages"):
        solve_pipelined(three, {"stage": 2, "model": 4}, train=True, hardware="cpu-sim")
    with pytest.raises(LayoutError, match="dim 'batch' of size 8 does not split into 3 micro-batches"):
        solve_pipelined(three, {"stage": 1, "model": 4}, microbatches=3, train=True, hardware="cpu-sim")
    with pytest.raises(LayoutError, match="no scan over 'layers'"):
        solve_pipelined(preset_tracer("gpt-tiny", layers=4), {"stage": 2, "model": 4}, train=True, hardware="cpu-sim")


def test_unknown_stage_axis_is_one_line():
    with pytest.raises(LayoutError, match="mesh axis 'pipe' is not in the mesh"):
        solve_pipelined(tracer(), {"data": 4, "model": 2}, axis="pipe", train=True, hardware="cpu-sim")


def test_pipeline_record():
    pipe = Pipeline(stages=4, microbatches=12)
    assert pipe.iterations == 15
    assert pipe.bubble_fraction == pytest.approx(3 / 15)
    assert pipe.in_flight == 12 and Pipeline(stages=4, microbatches=12, schedule="1f1b").in_flight == 4
    with pytest.raises(LayoutError, match="unknown schedule 'zb'"):
        Pipeline(schedule="zb")


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(2, 2), (4, 8), (4, 3), (8, 16)])
def test_timeline_runs_every_op_once_in_order(schedule, p, m):
    slots = timeline(p, m, schedule)
    assert sorted((s.stage, s.microbatch, s.kind) for s in slots) == sorted(
        (s, i, k) for s in range(p) for i in range(m) for k in "FB"
    )
    end = {(s.kind, s.stage, s.microbatch): s.time + s.duration for s in slots}
    for s in slots:  # a forward follows the previous stage's, a backward the next stage's
        if s.kind == "F" and s.stage > 0:
            assert s.time >= end[("F", s.stage - 1, s.microbatch)]
        if s.kind == "B" and s.stage < p - 1:
            assert s.time >= end[("B", s.stage + 1, s.microbatch)]
    busy = [sum(x.duration for x in slots if x.stage == st) for st in range(p)]
    makespan = max(end.values())
    # Both schedules idle (p - 1) forward+backward slots per stage: the bubble (p-1)/(m+p-1).
    assert makespan == pytest.approx((m + p - 1) * 3)
    assert 1 - busy[0] / makespan == pytest.approx(Pipeline(stages=p, microbatches=m).bubble_fraction)


@pytest.mark.parametrize("p, m", [(4, 8), (3, 6)])
def test_1f1b_holds_at_most_p_microbatches(p, m):
    """Activations in flight on a stage (forwards done, backwards not yet): GPipe m, 1F1B p - s."""
    for schedule, first_stage in (("gpipe", m), ("1f1b", p)):
        slots = [s for s in timeline(p, m, schedule) if s.stage == 0]
        held, most = 0, 0
        for s in sorted(slots, key=lambda x: x.time):
            held += 1 if s.kind == "F" else -1
            most = max(most, held)
        assert most == first_stage == Pipeline(stages=p, microbatches=m, schedule=schedule).in_flight


# --- the solver ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_search_finds_the_best_of_every_microbatch_count_and_remat():
    from meshjax.pipeline.plan import microbatch_candidates, plan_stage

    mesh_shape = {"data": 2, "model": 2, "stage": 2}
    trace_for = tracer(batch=16)
    full = trace_for({})
    chosen = solve_pipelined(trace_for, mesh_shape, train=True, hardware="h100-2node")
    every = [
        plan_stage(trace_for, full, mesh_shape, Pipeline(stages=2, microbatches=m, remat=r), train=True, hardware="h100-2node")
        for m in microbatch_candidates(16, 2)
        for r in (False, True)
    ]
    assert chosen.step_time_s == pytest.approx(min(p.step_time_s for p in every), rel=1e-12)
    for plan in every:  # the bound the search prunes with never exceeds a real plan
        from meshjax.cost.pipeline import compute_bound
        from meshjax.pipeline.stage_graph import scan_block, stage_graph

        pipe = plan.pipeline
        bound = compute_bound(stage_graph(trace_for, full, pipe), scan_block(full, pipe), mesh_shape,
                              plan.hardware, pipe)
        assert 0 < bound <= plan.step_time_s
        assert plan.cost.p2p_time_s > 0 and plan.cost.collectives[0].count == 2 * pipe.iterations


@pytest.mark.slow
def test_remat_trades_memory_for_time_and_budgets_hold():
    from meshjax.pipeline.plan import plan_stage

    mesh_shape = {"data": 2, "model": 2, "stage": 2}
    trace_for = tracer(batch=32, seq=64)
    full = trace_for({})
    kept, remat = (
        plan_stage(trace_for, full, mesh_shape, Pipeline(stages=2, microbatches=8, remat=r), train=True, hardware="h100-node")
        for r in (False, True)
    )
    assert remat.peak_memory_bytes < kept.peak_memory_bytes
    assert remat.cost.recompute_time_s > 0 == kept.cost.recompute_time_s
    budget = (remat.peak_memory_bytes + kept.peak_memory_bytes) / 2
    fitted = solve_pipelined(trace_for, mesh_shape, microbatches=8, train=True, hardware="h100-node", memory_budget=budget)
    assert fitted.pipeline.remat and fitted.peak_memory_bytes <= budget


@pytest.mark.slow
def test_gpt3_175b_on_1024_devices_pipelines_within_80gb_quickly():
    import time

    trace_for = preset_tracer("gpt3-175b", batch=1536, seq=2048, dtype="bfloat16", scan_layers=True)
    start = time.process_time()
    plan = solve_pipelined(trace_for, {"data": 16, "stage": 8, "model": 8}, train=True, hardware="h100-2node", memory_budget=80e9)
    assert time.process_time() - start < 5.0
    assert plan.pipeline.stages == 8 and plan.pipeline.microbatches > 8
    assert plan.peak_memory_bytes <= 80e9


@pytest.mark.slow
def test_cli_plan_json_has_the_pipeline(tmp_path):
    import json

    from meshjax import cli

    out = tmp_path / "plan.json"
    rc = cli.main(["plan", "gpt-tiny", "--mesh", "2x2x2", "--axes", "data,model,stage", "--set", "layers=4",
                   "--no-verify", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["pipeline"]["stages"] == 2 and doc["pipeline"]["schedule"] == "gpipe"
    assert doc["pipeline"]["microbatches"] in (4, 8)
    assert doc["mesh"] == {"data": 2, "model": 2, "stage": 2}
    assert doc["predicted"]["step_time_s"] == pytest.approx(doc["pipeline"]["step_time_s"])


@pytest.mark.slow
def test_cli_compare_grows_a_3d_section(tmp_path):
    import json

    from meshjax import cli

    out = tmp_path / "cmp.json"
    rc = cli.main(["compare", "gpt-tiny", "--devices", "4", "--set", "layers=4", "--stage", "--no-verify",
                   "--strategies", "solver", "--json", str(out)])
    assert rc == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["strategy"] == "solver (pipelined)"]
    assert [r["mesh"] for r in rows] == [{"data": 1, "model": 2, "stage": 2}, {"data": 2, "model": 1, "stage": 2},
                                         {"data": 1, "model": 1, "stage": 4}]
    assert all(r["predicted"]["step_time_s"] > 0 for r in rows)


# --- 1F1B ----------------------------------------------------------------------------------------


def test_1f1b_record_recomputes_and_holds_a_ring():
    pipe = Pipeline(stages=4, microbatches=16, schedule="1f1b")
    assert pipe.remat  # its backward recomputes the stage from the kept input
    assert (pipe.held, Pipeline(stages=4, microbatches=16).held) == (7, 19)  # 2p - 1 vs m + p - 1
    assert Pipeline(stages=4, microbatches=3, schedule="1f1b").held == 3
    from meshjax.cost.pipeline import p2p_sends

    assert p2p_sends(pipe) == 2 * (16 + 4 - 2) and p2p_sends(Pipeline(stages=4, microbatches=16)) == 2 * 19


def test_1f1b_stage_graph_runs_the_head_per_microbatch():
    from meshjax.pipeline.stage_graph import AFTER, stage_graph

    trace_for = tracer()
    full = trace_for({})
    graph = stage_graph(trace_for, full, Pipeline(stages=2, microbatches=4, schedule="1f1b"))
    assert graph.blocks[AFTER].trip_count == 4
    after = {op.output for op in graph.ops if op.block == AFTER}
    assert {"head/logits", "head/xent", "loss"} <= after and "embed/out" not in after
    assert graph.tensors["head/logits"].shape[0] == 2 and graph.tensors["embed/out"].shape[0] == 8
    gpipe = stage_graph(trace_for, full, Pipeline(stages=2, microbatches=4))
    assert AFTER not in gpipe.blocks and gpipe.tensors["head/logits"].shape[0] == 8


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape, microbatches", [({"data": 2, "model": 2, "stage": 2}, 4), ({"stage": 4, "model": 2}, 8)])
def test_1f1b_training_matches_one_device(one_device, mesh_shape, microbatches):
    ex, _ = gpt4()
    plan = solve_pipelined(tracer(), mesh_shape, microbatches=microbatches, schedule="1f1b", train=True, hardware="cpu-sim")
    assert (plan.pipeline.schedule, plan.pipeline.microbatches, plan.pipeline.remat) == ("1f1b", microbatches, True)
    got = losses(plan, ex, mesh_shape)
    np.testing.assert_allclose(got, one_device, rtol=1e-4)
    assert got[-1] < got[0] - 0.5


@pytest.mark.slow
def test_1f1b_training_bfloat16():
    ex, graph = gpt4("bfloat16")
    reference = losses(solve(graph, {"data": 1}, train=True, hardware="cpu-sim"), ex, {"data": 1}, steps=3)
    shape = {"data": 2, "model": 2, "stage": 2}
    plan = solve_pipelined(tracer("bfloat16"), shape, microbatches=4, schedule="1f1b", train=True, hardware="cpu-sim")
    got = losses(plan, ex, shape, steps=3)
    np.testing.assert_allclose(got, reference, rtol=1e-3)  # measured 8e-5: bf16 sums in another order


@pytest.mark.slow
def test_1f1b_comm_is_predicted_and_it_holds_less_than_gpipe():
    """At m = 16 > p = 2: the stage axis's sends and every other collective as predicted, and
    1F1B's compiled memory below GPipe's (with and without stage remat), as the model predicts."""
    mesh_shape = {"data": 2, "model": 2, "stage": 2}
    ex = models.example("gpt-tiny", key=0, layers=4, scan_layers=True, vocab=data.VOCAB, batch=64, seq=64)
    trace_for = tracer(batch=64, seq=64)
    compiled, predicted = {}, {}
    for schedule, remat in (("gpipe", False), ("gpipe", True), ("1f1b", True)):
        plan = solve_pipelined(trace_for, mesh_shape, microbatches=16, schedule=schedule, remat=remat, train=True,
                               hardware="cpu-sim")
        trainer = trainer_for(plan, ex, mesh_shape)
        report = inspect_compiled(trainer.lower(trainer.abstract_state(), *ex.batch).compile(), trainer.mesh)
        key = (schedule, remat)
        compiled[key], predicted[key] = report.memory["peak_bytes"], plan.peak_memory_bytes
        if schedule == "1f1b":
            permutes = [c for c in report.collectives if c.kind == "collective-permute"]
            assert {c.axes for c in permutes} == {("stage",)}
            assert sum(c.count for c in permutes) == 2 * (16 + 2 - 2)
            assert sum(c.comm_bytes for c in permutes) == sum(
                c.comm_bytes for c in plan.cost.collectives if c.kind == "collective-permute")
            # Each micro-batch's output and the input gradient leave their stage by an all-reduce;
            # a head split over the stage axis adds its own (XLA may combine some: bytes, not counts).
            assert sum(c.count for c in plan.cost.collectives if c.kind == "all-reduce") == 16 + 1
            stage_reduces = [c for c in report.collectives if c.kind == "all-reduce" and c.axes == ("stage",)]
            assert sum(c.comm_bytes for c in stage_reduces) == sum(
                c.comm_bytes for c in plan.collectives if c.kind == "all-reduce" and c.axes == ("stage",))
            assert report.comm_bytes == pytest.approx(plan.comm_bytes, rel=0.03)
    order = [("1f1b", True), ("gpipe", True), ("gpipe", False)]
    assert sorted(order, key=compiled.get) == order == sorted(order, key=predicted.get)
    # Known gap (docs/pipeline.md, "Memory: compiled against predicted"): XLA:CPU packs 1F1B's
    # temporaries into an allocation well above its live peak, so it compiles above the
    # prediction (1.42 measured at seq 64; the benchmark's seq-32 cell, 1.44).
    assert 1.0 <= compiled[("1f1b", True)] / predicted[("1f1b", True)] <= 1.5


@pytest.mark.slow
def test_cli_plan_takes_the_schedule(tmp_path):
    import json

    from meshjax import cli

    out = tmp_path / "plan.json"
    rc = cli.main(["plan", "gpt-tiny", "--mesh", "2x2x2", "--axes", "data,model,stage", "--set", "layers=4",
                   "--schedule", "1f1b", "--no-verify", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())["pipeline"]
    assert (doc["schedule"], doc["remat"]) == ("1f1b", True)
    assert doc["p2p_sends"] == 2 * (doc["microbatches"] + 2 - 2)


@pytest.mark.slow
@pytest.mark.parametrize("microbatches", [2, 4])  # fewer micro-batches than the ring's 2p - 1
def test_1f1b_gradients_equal_one_device_with_a_short_ring(microbatches):
    import jax

    ex, _ = gpt4()
    shape = {"stage": 4, "model": 2}
    plan = solve_pipelined(tracer(), shape, microbatches=microbatches, schedule="1f1b", train=True, hardware="cpu-sim")
    program = plan.program(ex.loss, make_mesh(shape))
    with jax.set_mesh(program.mesh):
        loss, grads = jax.jit(program.value_and_grad())(ex.params, *ex.batch)
    want_loss, want = jax.jit(jax.value_and_grad(lambda p, *a: ex.loss(p, *a).value))(ex.params, *ex.batch)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
    for got, ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6)


def _pipeline_memory_benchmark():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline_memory.py"
    spec = importlib.util.spec_from_file_location("pipeline_memory_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_shape, schedule, remat, microbatches",
    [
        ({"data": 2, "model": 2, "stage": 2}, "gpipe", False, 16),
        ({"data": 2, "model": 2, "stage": 2}, "gpipe", True, 16),
        pytest.param({"data": 2, "model": 2, "stage": 2}, "1f1b", True, 16, marks=pytest.mark.xfail(
            strict=True, reason="1F1B on 2x2x2 compiles to 1.44-1.61x its predicted memory: XLA:CPU packs the "
            "slot loop's buffers into a temporary 20-60% above its live peak (docs/pipeline.md, known gaps)")),
    ],
)
def test_pipelined_memory_is_predicted_within_the_band(mesh_shape, schedule, remat, microbatches):
    """Compiled bytes per device of the training step (benchmarks/pipeline_memory.py's cell)
    within verify.MEMORY_BAND of the plan's memory row."""
    from meshjax.verify import MEMORY_BAND

    row = _pipeline_memory_benchmark().measure(mesh_shape, schedule, remat, microbatches)
    lo, hi = MEMORY_BAND
    assert lo <= row["ratio"] <= hi, row
