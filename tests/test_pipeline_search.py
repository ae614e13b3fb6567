"""The mesh search with a stage axis, and the pipeline's data-parallel gradient sum: the search
picks what an exhaustive comparison of its meshes picks; the compiled step reduces the stage
weights' gradients over the data axes once, as predicted."""

import itertools

import optax
import pytest

from meshjax import data, models
from meshjax.cost.pipeline import replica_axes
from meshjax.devices import make_mesh
from meshjax.errors import InfeasibleError
from meshjax.hlo import inspect_compiled
from meshjax.pipeline.lower import _drop_axes
from meshjax.pipeline.plan import PipelinedPlan, solve_pipelined
from meshjax.pipeline.search import best_of, mesh_candidates, search_stages
from meshjax.pipeline.stage_graph import preset_tracer, scan_block
from meshjax.solve import solve
from meshjax.train import make_train_step
from jax.sharding import PartitionSpec as P


def tracer(**sizes):
    return preset_tracer("gpt-tiny", layers=4, scan_layers=True, vocab=data.VOCAB, **sizes)


@pytest.mark.parametrize("n, layers, max_model", [(8, 4, None), (8, 4, 2), (12, 6, 4), (1024, 96, 8)])
def test_candidates_are_every_data_stage_model_mesh(n, layers, max_model):
    # Every (data, stage) pair, the model axis taking what is left: n^2 pairs, not n^3 triples.
    expected = {
        (d, s, n // (d * s))
        for d, s in itertools.product(range(1, n + 1), repeat=2)
        if n % (d * s) == 0 and (s == 1 or layers % s == 0) and (max_model is None or n // (d * s) <= max_model)
    }
    got = mesh_candidates(n, layers, max_model=max_model)
    assert {(m["data"], m.get("stage", 1), m["model"]) for m in got} == expected
    assert len(got) == len(expected)
    assert all(list(m) == (["data", "model"] if "stage" not in m else ["data", "stage", "model"]) for m in got)


@pytest.mark.slow
def test_search_picks_what_an_exhaustive_comparison_picks():
    trace_for = tracer(batch=16)
    kwargs = dict(train=True, hardware="h100-2node", memory_budget=None)
    results = search_stages(trace_for, 4, **kwargs)
    best_mesh, best = best_of(results)
    # Every mesh of 4 devices over data x stage x model (stage dividing 4 layers), solved on its own.
    every = {}
    for d, s, t in itertools.product((1, 2, 4), repeat=3):
        if d * s * t != 4:
            continue
        if s == 1:
            every[(d, s, t)] = solve(trace_for({}), {"data": d, "model": t}, **kwargs)
        else:
            every[(d, s, t)] = solve_pipelined(trace_for, {"data": d, "stage": s, "model": t}, **kwargs)
    assert len(results) == len(every) == 6
    fastest = min(p.step_time_s for p in every.values())
    assert best.step_time_s == pytest.approx(fastest, rel=1e-9)
    key = (best_mesh["data"], best_mesh.get("stage", 1), best_mesh["model"])
    assert every[key].step_time_s == pytest.approx(fastest, rel=1e-9)
    assert [p.step_time_s for _, p in results] == sorted(p.step_time_s for _, p in results)


def test_no_mesh_fits_is_one_line():
    results = [({"data": 2, "model": 1}, InfeasibleError("too big")), ({"data": 1, "stage": 2, "model": 1}, InfeasibleError("also"))]
    with pytest.raises(InfeasibleError, match=r"^mesh search: no mesh of the 2 candidates fits \(2x1: too big; 1x2x1: also\)$"):
        best_of(results)


def test_drop_axes():
    assert _drop_axes(P(("data", "model"), None, "data"), ("data",)) == P("model", None, None)
    assert _drop_axes(P("stage", ("data", "model")), ("data", "model")) == P("stage", None)


def test_replica_axes_are_the_batch_axes_the_stage_weights_do_not_use():
    trace_for = tracer()
    plan = solve_pipelined(trace_for, {"data": 2, "model": 2, "stage": 2}, microbatches=2, remat=False, train=True,
                           hardware="cpu-sim", rules="batch:data;mlp:model;heads:model;vocab:model")
    full = plan.graph
    block = scan_block(full, plan.pipeline)
    assert replica_axes(full, plan.stage_plan.layouts, block, plan.pipeline) == ("data",)


@pytest.mark.slow
@pytest.mark.parametrize("schedule, remat", [("gpipe", False), ("gpipe", True), ("1f1b", True)])
def test_weight_gradients_are_summed_over_data_once_per_step(schedule, remat):
    """2x2x2 data, model, stage: no collective over the data axis runs inside the pipeline's
    loop, for GPipe and for 1F1B (whose stages and head run per data replica); the compiled
    comm over it equals the prediction, and so does all of it without remat."""
    shape = {"data": 2, "model": 2, "stage": 2}
    ex = models.example("gpt-tiny", key=0, layers=4, scan_layers=True, vocab=data.VOCAB)
    plan = solve_pipelined(tracer(), shape, microbatches=4, remat=remat, schedule=schedule, train=True,
                           hardware="cpu-sim", rules="batch:data;mlp:model;heads:model;vocab:model")
    assert isinstance(plan, PipelinedPlan)
    trainer = make_train_step(plan, ex.loss, make_mesh(shape), optax.adam(1e-3))
    report = inspect_compiled(trainer.lower(trainer.abstract_state(), *ex.batch).compile(), trainer.mesh)
    over_data = [c for c in report.collectives if "data" in c.axes]
    assert over_data and all(c.count == 1 for c in over_data)  # not once per time slot
    in_loop = [c for c in report.collectives if c.count > 1]
    assert in_loop and all("data" not in c.axes for c in in_loop)  # the model axis's sums stay per slot
    if remat:
        # Stage remat re-runs the forward's collectives; the prediction also re-runs one small
        # all-gather over the model axis that XLA does not (a known over-count, < 10% here).
        assert plan.comm_bytes >= report.comm_bytes
        assert report.comm_bytes == pytest.approx(plan.comm_bytes, rel=0.1)
    else:
        assert report.comm_bytes == pytest.approx(plan.comm_bytes, rel=1e-6)
    predicted_data = sum(c.comm_bytes for c in plan.collectives if "data" in c.axes)
    # 1F1B: the loss's 4-byte sum over data is predicted per micro-batch and compiled once.
    assert sum(c.comm_bytes for c in over_data) == pytest.approx(predicted_data, rel=1e-6 if schedule == "gpipe" else 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("slow_network", [False, True])
def test_gpt3_175b_search_over_1024_devices_pipelines_when_that_is_cheaper(slow_network):
    """The search over tensor parallelism in a node with and without 8 stages picks the cheaper
    of the two; across a slow inter-node link (5 GB/s) FSDP's weight gathers lose to the
    pipeline's sends and the pick has 8 stages."""
    import dataclasses

    from meshjax.cost.hardware import Link, get_hardware

    hw = get_hardware("a100-selene")
    if slow_network:
        hw = dataclasses.replace(hw, name="a100-slow-ib", inter_node=Link(bandwidth=5e9, latency=hw.inter_node.latency))
    trace_for = preset_tracer("gpt3-175b", batch=1536, seq=2048, dtype="bfloat16", scan_layers=True)
    results = search_stages(trace_for, 1024, model_sizes=[8], stage_counts=[8], train=True, hardware=hw,
                            memory_budget=80e9, remat="auto", microbatches="auto")
    assert [m for m, _ in results] != [] and {tuple(m.items()) for m, _ in results} == {
        (("data", 128), ("model", 8)), (("data", 16), ("stage", 8), ("model", 8))}
    mesh, plan = best_of(results)
    times = {"stage" in m: p.step_time_s for m, p in results}
    assert plan.step_time_s == min(times.values())
    assert ("stage" in mesh) == (times[True] < times[False])
    if slow_network:
        assert mesh == {"data": 16, "stage": 8, "model": 8} and plan.pipeline.stages == 8
        assert plan.peak_memory_bytes <= 80e9


def test_cli_mesh_search_needs_devices(capsys):
    from meshjax import cli

    assert cli.main(["plan", "gpt-tiny", "--mesh", "search", "--no-verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "meshjax: error: --mesh search needs --devices N (the device count to factorise)"


@pytest.mark.slow
def test_cli_mesh_search_plans_the_fastest_mesh(tmp_path):
    import json

    from meshjax import cli

    out = tmp_path / "plan.json"
    rc = cli.main(["plan", "gpt-tiny", "--mesh", "search", "--devices", "4", "--set", "layers=4,batch=16",
                   "--hardware", "h100-2node", "--memory-limit", "none", "--no-verify", "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    results = search_stages(preset_tracer("gpt-tiny", layers=4, batch=16, scan_layers=True), 4, train=True, hardware="h100-2node", memory_budget=None,
                            remat="auto", microbatches="auto")
    mesh, plan = best_of(results)
    assert {k: v for k, v in doc["mesh"].items()} == mesh
    assert doc["predicted"]["step_time_s"] == pytest.approx(plan.step_time_s, rel=1e-9)
