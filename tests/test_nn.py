"""meshjax.nn: Flax NNX layers on named ops. Params carry logical dims in ``out_sharding``;
traced names are NNX state paths; Flax's own ``nnx.get_partition_spec`` under the plan's
logical axis rules gives exactly the plan's param specs; NNX training works; a plan's sharded
program computes the NNX model's unsharded loss and gradients."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import meshjax as mj
from meshjax import nn
from meshjax.devices import make_mesh
from meshjax.models import llama
from meshjax.models import transformer as gpt
from meshjax.plan import solve

TINY = dict(vocab=64, seq=16, embed=32, heads=4, head_dim=8, mlp=64, layers=2)
RULES = "batch:data;heads:model;kv_heads:model;mlp:model;vocab:model"


def _batch(batch=8):
    return gpt.example_batch(gpt.Config(vocab=64, seq=16, batch=batch), 1)


def _model(kind="gpt", **kw):
    return getattr(nn.Transformer, kind)(**{**TINY, **kw}, rngs=nnx.Rngs(0))


def _is_named(x):
    return isinstance(x, mj.NamedArray)


def test_layers_carry_logical_dims_and_compute_named():
    rngs = nnx.Rngs(0)
    dense = nn.Dense("embed", "mlp", {"embed": 4, "mlp": 8}, rngs=rngs)
    assert dense.kernel.get_metadata(nn.SHARDING_KEY) == ("embed", "mlp") and nn.SHARDING_KEY == "out_sharding"
    x = mj.named(jnp.ones((2, 3, 4)), "batch seq embed")
    y = dense(x)
    assert y.dims == ("batch", "seq", "mlp")
    np.testing.assert_allclose(np.asarray(y.value), np.broadcast_to(np.asarray(dense.kernel.get_value()).sum(0), (2, 3, 8)), rtol=1e-6)
    ein = nn.Einsum("batch seq embed, embed heads head_dim -> batch seq heads head_dim", {"embed": 4, "heads": 2, "head_dim": 3}, rngs=rngs)
    assert ein(x).sizes == {"batch": 2, "seq": 3, "heads": 2, "head_dim": 3}
    emb = nn.Embed(10, 4, rngs=rngs)
    ids = mj.named(jnp.array([[1, 2, 3]]), "batch seq")
    np.testing.assert_array_equal(np.asarray(emb(ids).value[0, 0]), np.asarray(emb.embedding.get_value()[1]))
    assert nn.RMSNorm(4)(x).dims == x.dims and nn.LayerNorm(4)(x).dims == x.dims
    attn = nn.Attention(4, heads=4, head_dim=2, kv_heads=2, rotary=True, rngs=rngs)
    assert attn.w_k.get_metadata(nn.SHARDING_KEY) == ("embed", "kv_heads", "head_dim")
    moe_layer = nn.MoE(4, 8, experts=4, rngs=rngs)
    a, (out, aux) = nnx.jit(lambda at, mo, x: (at(x), mo(x)))(attn, moe_layer, x)
    assert a.dims == out.dims == x.dims and aux.dims == ()
    # Flax reads the logical dims: without rules they are the spec itself
    assert nnx.get_partition_spec(nnx.state(dense))["kernel"].get_value() == jax.sharding.PartitionSpec("embed", "mlp")


@pytest.mark.slow
def test_nnx_llama_equals_the_zoo_llama_with_the_same_params():
    model = _model("llama", kv_heads=2)
    p = nn.named_params(model)
    zoo = {"token_embed": p["token_embed"]["embedding"], "norm_f": p["final_norm"], "unembed": p["unembed"]["kernel"]}
    for i, blk in p["blocks"].items():
        zoo[f"block_{i}"] = {"attn_norm": blk["attn_norm"], "attn": blk["attn"], "mlp_norm": blk["ffn_norm"], "mlp": blk["mlp"]}
    tokens, targets = _batch()
    ours = jax.jit(lambda m, t, y: nn.lm_loss(m, t, y).value)(model, tokens, targets)
    theirs = jax.jit(lambda q, t, y: llama.loss(q, t, y).value)(zoo, tokens, targets)
    np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)


@pytest.mark.parametrize(
    "kind, kw",
    [("gpt", {}), ("llama", dict(kv_heads=2, scan_layers=True)), ("moe_gpt", dict(experts=4))],
    ids=["gpt-unrolled", "llama-gqa-scanned", "moe-unrolled"],
)
def test_flax_partition_specs_equal_the_plan(kind, kw):
    model = _model(kind, **kw)
    tokens, targets = _batch()
    traced = nn.trace_module(model, tokens, targets, loss_fn=nn.lm_loss)
    graph = traced.graph
    # names: the NNX state paths; inputs after the loss function's arguments; nothing constant
    state_paths = {nn.param_name(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert {t.name for t in graph.params} == state_paths
    assert [t.name for t in graph.inputs] == ["tokens", "targets"]
    assert not [t for t in graph.by_role("constant") if "rope" not in t.name]
    prefix = "blocks/layer/" if kw.get("scan_layers") else "blocks/0/"
    assert graph.tensors[prefix + "attn/w_q"].dims[-3:] == ("embed", "heads", "head_dim")
    assert ("blocks" if kw.get("scan_layers") else "blocks/") in graph.blocks
    rules = ";".join(r for r in RULES.split(";") if r.split(":")[0] in graph.dim_names)
    plan = solve(graph, {"data": 4, "model": 2}, train=True, rules=rules)
    assert plan.rules is not None
    with nnx.logical_axis_rules(plan.logical_axis_rules()):
        flax_specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    flat = {nn.param_name(path): var.get_value() for path, var in nnx.to_flat_state(flax_specs)}
    assert set(flat) == set(plan.param_specs)
    for name, spec in flat.items():
        assert nn.normalize_spec(spec) == plan.param_specs[name], name
    assert any(spec != jax.sharding.PartitionSpec() for spec in plan.param_specs.values())
    assert nn.partition_specs(model, plan) == flat


def test_split_merge_round_trip_and_update():
    model = _model("gpt")
    graphdef, state = nnx.split(model)
    again = nnx.merge(graphdef, state)
    tokens, targets = _batch()
    f = jax.jit(lambda m: nn.lm_loss(m, tokens, targets).value)
    assert float(f(model)) == float(f(again))
    fn = nn.functional(model, nn.lm_loss)
    doubled = jax.tree_util.tree_map(lambda a: mj.named(a.value * 2, a.dims), fn.params, is_leaf=_is_named)
    merged = fn.merge(doubled)
    np.testing.assert_array_equal(np.asarray(merged.unembed.kernel.get_value()), 2 * np.asarray(model.unembed.kernel.get_value()))
    nn.update_module(model, doubled)
    np.testing.assert_array_equal(np.asarray(model.unembed.kernel.get_value()), np.asarray(merged.unembed.kernel.get_value()))


@pytest.mark.slow
def test_nnx_optimizer_trains():
    model = _model("llama", kv_heads=2, layers=1)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    tokens, targets = _batch()

    @nnx.jit
    def step(model, optimizer, tokens, targets):
        loss, grads = nnx.value_and_grad(lambda m: nn.lm_loss(m, tokens, targets).value)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, tokens, targets)) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_sharded_program_equals_unsharded_nnx_grads():
    model = _model("gpt", layers=1)
    tokens, targets = _batch()
    traced = nn.trace_module(model, tokens, targets, loss_fn=nn.lm_loss)
    shape = {"data": 4, "model": 2}
    plan = solve(traced.graph, shape, train=True, rules="batch:data;heads:model;mlp:model;vocab:model")
    mesh = make_mesh(shape)
    loss, grads = traced.program(plan, mesh).jit(grad=True)(traced.params, tokens, targets)

    @nnx.jit
    def reference(model):
        return nnx.value_and_grad(lambda m: nn.lm_loss(m, tokens, targets).value)(model)

    ref_loss, ref_grads = reference(model)
    np.testing.assert_allclose(float(loss.value), float(ref_loss), rtol=1e-5)
    ref = dict(jax.tree_util.tree_flatten_with_path(nn.named_grads(ref_grads), is_leaf=_is_named)[0])
    got = jax.tree_util.tree_flatten_with_path(grads, is_leaf=_is_named)[0]
    assert len(got) == len(ref) == len(traced.graph.params)
    for path, g in got:
        name = mj.params.path_name(path)
        np.testing.assert_allclose(np.asarray(g.value), np.asarray(ref[path].value), rtol=1e-4, atol=1e-6, err_msg=name)
        assert g.value.sharding.spec == plan.param_specs[name] or g.value.sharding.is_equivalent_to(
            jax.sharding.NamedSharding(mesh, plan.param_specs[name]), g.value.ndim
        ), name
