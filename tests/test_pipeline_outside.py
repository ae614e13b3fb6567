"""What runs outside a pipelined layer scan (embedding, head, loss) is laid out over the whole
mesh, stage axis included: where it pays the solver splits it over the stages, the predicted
memory per device drops against the placement replicated over the stage axis, and the program
still trains like one device with its collectives as predicted."""

import numpy as np
import optax
import pytest

import meshjax as mj
from meshjax import data, models
from meshjax.cost.stage_boundary import off_stage
from meshjax.devices import make_mesh
from meshjax.hlo import inspect_compiled
from meshjax.pipeline import Pipeline
from meshjax.pipeline.plan import solve_pipelined
from meshjax.pipeline.stage_graph import preset_tracer, scan_block, stage_graph
from meshjax.solve import solve
from meshjax.train import make_train_step

VOCAB = 8192  # a head large against gpt-tiny's layers: splitting it over the stages pays
SHAPE = {"stage": 4, "model": 2}


def tracer():
    return preset_tracer("gpt-tiny", layers=4, scan_layers=True, vocab=VOCAB)


def plan_for(schedule, outside_on_stage=True):
    return solve_pipelined(tracer(), SHAPE, microbatches=4, schedule=schedule, train=True, hardware="cpu-sim",
                           outside_on_stage=outside_on_stage)


def test_stage_tensors_stay_off_the_stage_axis():
    trace_for = tracer()
    full = trace_for({})
    pipe = Pipeline(stages=4, microbatches=4)
    graph = stage_graph(trace_for, full, pipe)
    block = scan_block(full, pipe)
    avoid = off_stage(graph, block, "stage", "layers")
    # A stacked weight, the loop's carry, and the carry entering the stages.
    assert {"blocks/mlp/w_in", "blocks/carry", "embed/out"} <= set(avoid)
    assert not {"unembed", "token_embed", "embed/tokens", "blocks/final_carry", "head/logits", "loss"} & set(avoid)
    plan = plan_for("gpipe")
    for name, layout in plan.stage_plan.layouts.items():
        if name in avoid:
            assert all("stage" not in axes for axes in layout.axes), name


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_large_head_goes_on_the_stage_axis_and_memory_drops(schedule):
    split = plan_for(schedule)
    replicated = plan_for(schedule, outside_on_stage=False)
    # The unembedding weight's vocab dim is split over the stages (each holds 1/4 of it and of
    # its Adam state), and so are its logits.
    assert "stage" in split.specs["unembed"] and "stage" in split.specs["head/logits"]
    assert not any("stage" in spec for name, spec in replicated.specs.items() if not name.startswith("blocks/"))
    assert split.peak_memory_bytes < 0.75 * replicated.peak_memory_bytes
    assert split.step_time_s < replicated.step_time_s


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_head_on_the_stage_axis_trains_like_one_device_with_predicted_comm(schedule):
    ex = models.example("gpt-tiny", key=0, layers=4, scan_layers=True, vocab=VOCAB)
    plan = plan_for(schedule)
    assert "stage" in plan.specs["unembed"]
    trainer = make_train_step(plan, ex.loss, make_mesh(SHAPE), optax.adam(3e-3))
    report = inspect_compiled(trainer.lower(trainer.abstract_state(), *ex.batch).compile(), trainer.mesh)
    assert report.comm_bytes == pytest.approx(plan.comm_bytes, rel=0.05)
    reference = make_train_step(solve(mj.trace(ex.loss, ex.params, *ex.batch), {"data": 1}, train=True, hardware="cpu-sim"),
                                ex.loss, make_mesh({"data": 1}), optax.adam(3e-3))
    got, want = [], []
    for t, out in ((trainer, got), (reference, want)):
        state = t.init(ex.params)
        for batch in data.batches(ex.config.batch, ex.config.seq, seed=0, steps=3):
            state, loss = t.step(state, *batch)
            out.append(float(loss))
    np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.slow
def test_one_f_one_b_with_data_replicas_keeps_its_head_off_the_stage_axis():
    """1F1B runs its head once per data replica, on the replica's own copy of the head's
    weights; with the batch split over the stages as well this cell compiled to 1.25x its
    predicted comm. Such a plan keeps the head off the stage axis, and compiles as predicted."""
    from meshjax.cost.pipeline import replica_axes
    from meshjax.cost.stage_boundary import off_stage_after

    sizes = dict(layers=4, scan_layers=True, vocab=256, batch=64, seq=32)
    shape = {"data": 2, "model": 2, "stage": 2}
    trace_for = preset_tracer("gpt-tiny", **sizes)
    plan = solve_pipelined(trace_for, shape, microbatches=4, schedule="1f1b", train=True, hardware="cpu-sim")
    graph = stage_graph(trace_for, trace_for({}), plan.pipeline)
    layouts = plan.stage_plan.layouts
    assert replica_axes(graph, layouts, scan_block(graph, plan.pipeline), plan.pipeline)
    assert all("stage" not in layouts[name].used_axes for name in off_stage_after(graph, "stage"))
    ex = models.example("gpt-tiny", key=0, **sizes)
    trainer = make_train_step(plan, ex.loss, make_mesh(shape), optax.adam(3e-3))
    report = inspect_compiled(trainer.lower(trainer.abstract_state(), *ex.batch).compile(), trainer.mesh)
    assert report.comm_bytes == pytest.approx(plan.comm_bytes, rel=0.03)
