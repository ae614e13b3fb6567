"""Training under a plan: sharded Adam steps match one device; batches arrive per shard; the
shipped text and its batches; the ``meshjax train`` command."""

import functools
import json
import shutil

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import meshjax as mj
from meshjax import cli, data, models
from meshjax.devices import make_mesh
from meshjax.errors import MeshjaxError
from meshjax.plan import solve
from meshjax.checkpoint import state_leaves
from meshjax.train import make_train_step, shard_batch

RULES = "batch:data;heads:model;mlp:model"
LR = 1e-2
STEPS = 3


@pytest.fixture(scope="module")
def gpt():
    ex = models.example("gpt-tiny", key=jax.random.key(0))
    return ex, mj.trace(ex.loss, ex.params, *ex.batch)


def host_batches(ex, n):
    """``n`` distinct host batches of the example's shapes."""
    cfg = ex.config
    return [models.transformer.example_batch(cfg, i) for i in range(n)]


@pytest.fixture(scope="module")
def reference(gpt):
    """Losses of the same Adam steps on one device: plain jit of value_and_grad + optax."""
    ex, _ = gpt
    opt = optax.adam(LR)

    @jax.jit
    def step(params, state, tokens, targets):
        loss, grads = jax.value_and_grad(lambda p: ex.loss(p, tokens, targets).value)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    params, state, losses = ex.params, opt.init(ex.params), []
    for tokens, targets in host_batches(ex, STEPS):
        params, state, loss = step(params, state, tokens, targets)
        losses.append(float(loss))
    return losses


def _sharding(mesh, spec):
    return NamedSharding(mesh, spec if spec is not None else PartitionSpec())


@pytest.mark.parametrize(
    "shape, rules",
    [
        ({"data": 4, "model": 2}, RULES),
        pytest.param({"data": 2, "model": 4}, None, marks=pytest.mark.slow),  # the solver's own plan
        pytest.param({"data": 8}, "batch:data", marks=pytest.mark.slow),
    ],
    ids=["4x2", "2x4-free", "8"],
)
def test_sharded_adam_matches_one_device(gpt, reference, shape, rules):
    ex, graph = gpt
    plan = solve(graph, shape, hardware="cpu-sim", train=True, rules=rules)
    mesh = make_mesh(shape)
    trainer = make_train_step(plan, ex.loss, mesh, optax.adam(LR))
    state = trainer.init(ex.params)

    # Params and optimizer state carry the plan's shardings from the start.
    specs = plan.state_specs
    for name, leaf in state_leaves(state).items():
        group, _, rest = name.partition("/")
        if group == "params":
            want = _sharding(mesh, plan.param_specs[rest])
        elif leaf.ndim == 0:
            want = _sharding(mesh, PartitionSpec())
        else:  # opt_state/0/mu/<param>
            want = _sharding(mesh, specs[rest.split("/", 2)[2]])
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), name
    mu = state.opt_state[0].mu["block_0"]["mlp"]["w_in"].value
    assert mu.sharding.is_equivalent_to(_sharding(mesh, specs["block_0/mlp/w_in"]), 2)

    losses = []
    for tokens, targets in host_batches(ex, STEPS):
        old = state
        state, loss = trainer.step(state, np.asarray(tokens.value), np.asarray(targets.value))
        losses.append(float(loss))
    assert state.step == STEPS
    assert old.params["unembed"].value.is_deleted()  # donated
    np.testing.assert_allclose(losses, reference, rtol=1e-4)
    # Still laid out as planned after the updates.
    w = state.params["block_0"]["attn"]["w_q"].value
    assert w.sharding.is_equivalent_to(_sharding(mesh, plan.param_specs["block_0/attn/w_q"]), 3)
    nu = state.opt_state[0].nu["block_0"]["attn"]["w_q"].value
    assert nu.sharding.is_equivalent_to(_sharding(mesh, specs["block_0/attn/w_q"]), 3)
    # The caller's params were copied, not consumed.
    assert not ex.params["unembed"].value.is_deleted()


def test_shard_batch_gives_each_device_its_slice(gpt):
    ex, graph = gpt
    plan = solve(graph, {"data": 4, "model": 2}, hardware="cpu-sim", train=True, rules=RULES)
    mesh = make_mesh({"data": 4, "model": 2})
    host = [np.asarray(b.value) for b in ex.batch]
    tokens, targets = shard_batch(plan, mesh, host)
    assert tokens.dims == ("batch", "seq")
    assert tokens.value.sharding.is_equivalent_to(NamedSharding(mesh, plan.specs["tokens"]), 2)
    for shard in tokens.value.addressable_shards:
        assert shard.data.shape == (host[0].shape[0] // 4, host[0].shape[1])  # no device holds it all
        np.testing.assert_array_equal(np.asarray(shard.data), host[0][shard.index])
    np.testing.assert_array_equal(np.asarray(targets.value), host[1])
    with pytest.raises(MeshjaxError, match="input 'tokens' has shape"):
        shard_batch(plan, mesh, [host[0][:2], host[1]])
    with pytest.raises(MeshjaxError, match="takes 2 inputs"):
        shard_batch(plan, mesh, host[:1])


def test_optimizer_state_the_plan_cannot_place(gpt):
    ex, graph = gpt
    plan = solve(graph, {"data": 4, "model": 2}, hardware="cpu-sim", train=True, rules=RULES)
    mesh = make_mesh({"data": 4, "model": 2})

    def init(params):
        return {"proj": jax.numpy.zeros((3, 5))}

    odd = optax.GradientTransformation(init, lambda u, s, p=None: (u, s))
    with pytest.raises(MeshjaxError, match=r"optimizer state leaf 'proj' \(shape \(3, 5\)\) has no layout in the plan"):
        make_train_step(plan, ex.loss, mesh, odd).init(ex.params)
    # Adafactor's factored moments mirror the params' tree but not their shapes.
    with pytest.raises(MeshjaxError, match=r"optimizer state leaf '0/v_row/block_0/attn/w_k' has shape \(1,\) but its param"):
        make_train_step(plan, ex.loss, mesh, optax.adafactor(1e-3)).init(ex.params)
    inference = solve(graph, {"data": 4, "model": 2}, hardware="cpu-sim", train=False, rules=RULES)
    with pytest.raises(MeshjaxError, match="train=True"):
        make_train_step(inference, ex.loss, mesh, optax.adam(1e-3))


# --- data ----------------------------------------------------------------------------------


def test_shipped_text_and_batches():
    raw = data.text()
    assert 50_000 <= len(raw) <= 150_000
    assert raw.startswith(b"THE DECLARATION OF INDEPENDENCE")
    assert b"Four score and seven years ago" in raw
    toks = data.tokens()
    assert toks.dtype == np.int32 and toks.max() < data.VOCAB
    assert data.decode(data.encode("Shall I compare thee")) == "Shall I compare thee"

    a = list(data.batches(4, 16, seed=3, steps=3))
    b = list(data.batches(4, 16, seed=3, steps=3))
    c = list(data.batches(4, 16, seed=4, steps=3))
    assert len(a) == 3
    for (x, y), (x2, y2) in zip(a, b):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    assert not np.array_equal(a[0][0], c[0][0])
    tokens, targets = a[0]
    assert tokens.shape == targets.shape == (4, 16) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens[:, 1:], targets[:, :-1])
    # Resuming at step 2 gives the batch an uninterrupted run sees at step 2.
    resumed = next(data.batches(4, 16, seed=3, start=2))
    np.testing.assert_array_equal(resumed[0], a[2][0])
    with pytest.raises(MeshjaxError, match="window"):
        data.batch_at(0, 1, 10**7)


# --- the command -----------------------------------------------------------------------------


@pytest.mark.slow
def test_train_command_loss_falls_and_resumes(tmp_path):
    ckpt = tmp_path / "ckpt"
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    common = ["gpt-tiny", "--mesh", "4x2", "--batch", "8", "--seq", "16", "--rules", RULES]
    assert cli.main(["train", *common, "--steps", "60", "--checkpoint", str(ckpt), "--save-every", "30",
                     "--losses-json", str(first)]) == 0
    run = json.loads(first.read_text())
    losses = run["losses"]
    assert run["steps"] == list(range(1, 61)) and len(losses) == 60 and run["saved_steps"] == [30, 60]
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 1.0  # from ln(256) ~ 5.5 down
    assert sorted(p.name for p in ckpt.iterdir() if p.name.isdigit()) == ["30", "60"]

    # Resume from step 30 (drop step 60): steps 31..40 repeat the uninterrupted run.
    shutil.rmtree(ckpt / "60")
    assert cli.main(["train", *common, "--steps", "40", "--resume", str(ckpt), "--losses-json", str(second)]) == 0
    resumed = json.loads(second.read_text())
    assert resumed["start_step"] == 30 and resumed["steps"] == list(range(31, 41))
    np.testing.assert_allclose(resumed["losses"], losses[30:40], rtol=1e-5)


def test_train_command_errors(tmp_path, capsys):
    assert cli.main(["train", "gpt-tiny", "--resume", str(tmp_path / "none")]) == 2
    assert cli.main(["train", "gpt-tiny", "--mesh", "3y"]) == 2
    assert cli.main(["train", "no-such-model"]) == 2
    assert cli.main(["train", "gpt-tiny", "--save-every", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("meshjax: error: ") for line in err)


@functools.lru_cache(maxsize=None)
def _zoo_reference(name):
    """A zoo model, its graph, and the losses of ``STEPS`` Adam steps on one device (plain jit of
    value_and_grad + optax): computed once per model, shared by its three meshes."""
    ex = models.example(name, key=jax.random.key(1))
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    opt = optax.adam(LR)

    @jax.jit
    def one_device_step(params, state, *batch):
        loss, grads = jax.value_and_grad(lambda p: ex.loss(p, *batch).value)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    params, opt_state, reference = ex.params, opt.init(ex.params), []
    for _ in range(STEPS):
        params, opt_state, loss = one_device_step(params, opt_state, *ex.batch)
        reference.append(float(loss))
    return ex, graph, reference


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, shape",
    [
        ("llama-tiny", {"data": 8}),
        ("llama-tiny", {"data": 4, "model": 2}),
        ("llama-tiny", {"data": 2, "model": 4}),
        ("moe-tiny", {"model": 8}),
        ("moe-tiny", {"data": 4, "model": 2}),
        ("moe-tiny", {"data": 2, "model": 4}),
    ],
    ids=["llama-8", "llama-4x2", "llama-2x4", "moe-8", "moe-4x2", "moe-2x4"],
)
def test_zoo_models_train_under_the_solvers_plan_like_one_device(name, shape):
    ex, graph, reference = _zoo_reference(name)
    plan = solve(graph, shape, hardware="cpu-sim", train=True)
    trainer = make_train_step(plan, ex.loss, make_mesh(shape), optax.adam(LR))
    state, losses = trainer.init(ex.params), []
    host = [np.asarray(leaf.value) for leaf in ex.batch]
    for _ in range(STEPS):
        state, loss = trainer.step(state, *host)
        losses.append(float(loss))
    np.testing.assert_allclose(losses, reference, rtol=1e-4)
