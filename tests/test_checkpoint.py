"""Checkpoints: saved under a 4x2 plan, restored under 2x4 and 8 with the new plan's layout,
bitwise equal, and the next step's loss equals the uninterrupted run's; mismatches name the leaf."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import meshjax as mj
from meshjax import checkpoint, models
from meshjax.checkpoint import CheckpointError
from meshjax.devices import make_mesh
from meshjax.plan import solve
from meshjax.checkpoint import state_leaves
from meshjax.train import make_train_step

OPT = optax.adam(1e-2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two steps on 4x2, saved; then the uninterrupted third step's loss."""
    ex = models.example("gpt-tiny", key=jax.random.key(1))
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    host = [np.asarray(b.value) for b in ex.batch]
    shape = {"data": 4, "model": 2}
    plan = solve(graph, shape, hardware="cpu-sim", train=True, rules="batch:data;heads:model;mlp:model")
    trainer = make_train_step(plan, ex.loss, make_mesh(shape), OPT)
    state = trainer.init(ex.params)
    for _ in range(2):
        state, _ = trainer.step(state, *host)
    path = tmp_path_factory.mktemp("ckpt")
    checkpoint.save(path, state)
    values = {name: np.asarray(v) for name, v in state_leaves(state).items()}
    _, next_loss = trainer.step(state, *host)
    return ex, graph, host, path, values, float(next_loss)


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape, rules",
    [({"data": 2, "model": 4}, "batch:data;heads:model;mlp:model"), ({"data": 8}, "batch:data")],
    ids=["2x4", "8"],
)
def test_restore_onto_another_mesh(saved, shape, rules):
    ex, graph, host, path, values, next_loss = saved
    assert checkpoint.steps(path) == [2]
    plan = solve(graph, shape, hardware="cpu-sim", train=True, rules=rules)
    mesh = make_mesh(shape)
    trainer = make_train_step(plan, ex.loss, mesh, OPT)
    state = checkpoint.restore(path, plan, mesh, trainer.abstract_state())
    assert state.step == 2
    restored = state_leaves(state)
    assert set(restored) == set(values)
    for name, leaf in restored.items():
        np.testing.assert_array_equal(np.asarray(leaf), values[name], err_msg=name)
        assert np.asarray(leaf).dtype == values[name].dtype
        rest = name.partition("/")[2]
        spec = plan.param_specs[rest] if name.startswith("params/") else (
            PartitionSpec() if leaf.ndim == 0 else plan.state_specs[rest.split("/", 2)[2]]
        )
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim), name
    # The saved layout split w_in's mlp dim 2 ways; now it is split 4 ways, or replicated.
    w_in = restored["params/block_0/mlp/w_in"]
    assert w_in.addressable_shards[0].data.shape == ((32, 32) if "model" in shape else (32, 128))
    _, loss = trainer.step(state, *host)
    np.testing.assert_allclose(float(loss), next_loss, rtol=1e-5)


@pytest.mark.slow
def test_mismatched_checkpoint_names_the_leaf(saved, tmp_path):
    ex, graph, host, path, values, _ = saved
    shape = {"data": 8}
    mesh = make_mesh(shape)

    # A model with a wider MLP: same leaves, other shapes.
    wide = models.example("gpt-tiny", abstract=True, mlp=256)
    wide_plan = solve(mj.trace(wide.loss, wide.params, *wide.batch), shape, hardware="cpu-sim", train=True, rules="batch:data")
    target = make_train_step(wide_plan, wide.loss, mesh, OPT).abstract_state()
    with pytest.raises(CheckpointError, match=r"leaf 'params/block_0/mlp/w_in' has shape \(32, 128\); the model expects \(32, 256\)"):
        checkpoint.restore(path, wide_plan, mesh, target)

    # A model with one more layer: the checkpoint lacks block_2.
    deep = models.example("gpt-tiny", abstract=True, layers=3)
    deep_plan = solve(mj.trace(deep.loss, deep.params, *deep.batch), shape, hardware="cpu-sim", train=True, rules="batch:data")
    target = make_train_step(deep_plan, deep.loss, mesh, OPT).abstract_state()
    with pytest.raises(CheckpointError, match=r"checkpoint has no leaf '.*block_2/.*' that the model needs"):
        checkpoint.restore(path, deep_plan, mesh, target)

    # A model with one layer fewer: the checkpoint has block_1 the model lacks.
    shallow = models.example("gpt-tiny", abstract=True, layers=1)
    shallow_plan = solve(mj.trace(shallow.loss, shallow.params, *shallow.batch), shape, hardware="cpu-sim", train=True, rules="batch:data")
    target = make_train_step(shallow_plan, shallow.loss, mesh, OPT).abstract_state()
    with pytest.raises(CheckpointError, match=r"checkpoint has leaf '.*block_1/.*' that the model does not have"):
        checkpoint.restore(path, shallow_plan, mesh, target)

    # SGD has no moments: the checkpoint's Adam state is extra.
    plan = solve(graph, shape, hardware="cpu-sim", train=True, rules="batch:data")
    target = make_train_step(plan, ex.loss, mesh, optax.sgd(0.1)).abstract_state()
    with pytest.raises(CheckpointError, match="opt_state/0/"):
        checkpoint.restore(path, plan, mesh, target)

    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        checkpoint.restore(tmp_path / "missing", plan, mesh, target)
    with pytest.raises(CheckpointError, match="no step 7"):
        checkpoint.restore(path, plan, mesh, target, step=7)
