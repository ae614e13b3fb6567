"""The LLaMA-style and mixture-of-experts zoo models: forward passes equal independent plain-jnp
/ numpy references, sharded loss and gradients equal unsharded ones, MoE capacity drops
overflowing tokens, and the paper-size presets trace and solve abstractly."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import meshjax as mj
from meshjax import models
from meshjax.devices import make_mesh
from meshjax.layout import layout_from_rules
from meshjax.lower import Program
from meshjax.models import llama, moe
from meshjax.plan import solve

RTOL = ATOL = 1e-5


def _is_named(x):
    return isinstance(x, mj.NamedArray)


def _values(params):
    return jax.tree_util.tree_map(lambda a: a.value, params, is_leaf=_is_named)


# --------------------------------------------------------------------------- #
# LLaMA against a plain-jnp reference
# --------------------------------------------------------------------------- #
def _llama_reference(p, tokens, *, theta=10000.0, eps=1e-5):
    """LLaMA written directly in jnp: interleaved rotary pairs, K/V repeated per query group."""

    def rms(x, w):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w

    b, s = tokens.shape
    hd = p["block_0"]["attn"]["w_q"].shape[-1]
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float32) / hd)
    angle = np.arange(s, dtype=np.float32)[:, None] * inv[None, :]  # s, hd/2
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]

    def rope(t):
        pairs = t.reshape(*t.shape[:-1], hd // 2, 2)
        a, c = pairs[..., 0], pairs[..., 1]
        return jnp.stack([a * cos - c * sin, a * sin + c * cos], axis=-1).reshape(t.shape)

    x = p["token_embed"][tokens]
    causal = np.tril(np.ones((s, s), bool))
    for i in range(len([k for k in p if k.startswith("block_")])):
        blk = p[f"block_{i}"]
        a = blk["attn"]
        h = rms(x, blk["attn_norm"]["scale"])
        q = rope(jnp.einsum("bse,ehd->bshd", h, a["w_q"]))
        k = rope(jnp.einsum("bse,ekd->bskd", h, a["w_k"]))
        v = jnp.einsum("bse,ekd->bskd", h, a["w_v"])
        group = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        probs = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        x = x + jnp.einsum("bqhd,hde->bqe", jnp.einsum("bhqk,bkhd->bqhd", probs, v), a["w_o"])
        m = blk["mlp"]
        h = rms(x, blk["mlp_norm"]["scale"])
        x = x + (jax.nn.silu(h @ m["w_gate"]) * (h @ m["w_up"])) @ m["w_down"]
    return rms(x, p["norm_f"]["scale"]) @ p["unembed"]


def test_llama_forward_equals_plain_jnp_reference():
    config = llama.PRESETS["llama-tiny"]
    assert config.heads // config.kv_heads == 2  # grouped-query: two query heads per kv head
    params = llama.init(config, 0)
    tokens, _ = llama.example_batch(config, 1)
    logits = jax.jit(llama.forward)(params, tokens)
    assert logits.dims == ("batch", "seq", "vocab")
    expected = jax.jit(_llama_reference)(_values(params), tokens.value)
    np.testing.assert_allclose(np.asarray(logits.value), np.asarray(expected), rtol=1e-4, atol=1e-5)


def test_rotary_is_a_rotation_by_position():
    """Rotating queries and keys makes their dot product depend only on the offset."""
    cos, sin = llama.rotary_tables(6, 4)
    rng = np.random.default_rng(0)
    q = mj.named(jnp.asarray(np.tile(rng.standard_normal((1, 4), np.float32), (6, 1))), "seq head_dim")
    qr = llama.apply_rotary(q, cos, sin).align_to("seq head_dim")
    np.testing.assert_allclose(np.linalg.norm(qr, axis=-1), np.linalg.norm(q.value, axis=-1), rtol=1e-5)
    dots = np.asarray(qr @ qr.T)
    np.testing.assert_allclose(np.diag(dots, 1), np.full(5, dots[0, 1]), rtol=1e-4)


# --------------------------------------------------------------------------- #
# MoE against a numpy reference; capacity
# --------------------------------------------------------------------------- #
def _moe_reference(x, router, w_in, w_out, top_k, cap):
    """Token by token: top-k experts, slots taken in order (all first choices first), overflow dropped."""
    x, router, w_in, w_out = (np.asarray(a, np.float64) for a in (x, router, w_in, w_out))
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    n_batch, n_seq, n_experts = probs.shape
    out = np.zeros_like(x)
    for b in range(n_batch):
        order = np.argsort(-probs[b], axis=-1, kind="stable")[:, :top_k]
        gates = np.take_along_axis(probs[b], order, axis=-1)
        if top_k > 1:
            gates = gates / gates.sum(-1, keepdims=True)
        taken = np.zeros(n_experts, int)
        for rank in range(top_k):
            for s in range(n_seq):
                e = order[s, rank]
                if taken[e] < cap:
                    taken[e] += 1
                    hidden = np.asarray(jax.nn.gelu(jnp.asarray(x[b, s] @ w_in[e], jnp.float32)), np.float64)
                    out[b, s] += gates[s, rank] * (hidden @ w_out[e])
    top = probs.argmax(-1)
    fraction = np.array([(top == e).mean() for e in range(n_experts)])
    aux = n_experts * np.sum(fraction * probs.mean((0, 1)))
    return out, aux


def _moe_params(config, seed=0):
    return moe.init(config, seed)["block_0"]["moe"]


@pytest.mark.parametrize("top_k, capacity_factor", [(2, 1.25), (1, 0.5)])
def test_moe_ffn_equals_token_by_token_reference(top_k, capacity_factor):
    config = moe.PRESETS["moe-tiny"]
    p = _moe_params(config)
    # a router strong enough that the routing is uneven (some experts overflow)
    p = dict(p, router=mj.named(p["router"].value * 50.0, p["router"].dims))
    x = mj.named(jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, config.embed), np.float32)), "batch seq embed")
    y, aux = jax.jit(functools.partial(moe.moe_ffn, top_k=top_k, capacity_factor=capacity_factor))(p, x)
    cap = moe.expert_capacity(16, config.experts, top_k, capacity_factor)
    ref, ref_aux = _moe_reference(x.value, p["router"].value, p["w_in"].value, p["w_out"].value, top_k, cap)
    assert y.dims == ("batch", "seq", "embed") and aux.dims == ()
    np.testing.assert_allclose(np.asarray(y.value), ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(aux.value), ref_aux, rtol=1e-5)


@pytest.mark.slow
def test_moe_capacity_drops_tokens_beyond_capacity():
    """A zero router ties every expert, so every token's first choice is expert 0 (and its second
    expert 1): the first ``capacity`` tokens of each sequence are served, the rest dropped (with
    top-2, tokens past capacity lose both choices, since expert 1's slots fill in the same order)."""
    config = moe.PRESETS["moe-tiny"]
    p = _moe_params(config)
    p = dict(p, router=mj.named(jnp.zeros_like(p["router"].value), p["router"].dims))
    seq = 16
    x = mj.named(jnp.asarray(np.random.default_rng(2).standard_normal((2, seq, config.embed), np.float32)), "batch seq embed")
    for top_k, factor in [(1, 1.0), (2, 1.0)]:
        cap = moe.expert_capacity(seq, config.experts, top_k, factor)
        assert cap < seq
        probs = np.full((2, seq, config.experts), 1.0 / config.experts, np.float32)  # = softmax of the zero router
        combine = np.asarray(moe.route_values(jnp.asarray(probs), top_k, cap))
        served = combine.sum(axis=(2, 3))  # total gate per token
        # top-1 keeps the raw router probability (Switch); top-2 gates are renormalised (GShard)
        np.testing.assert_allclose(served[:, :cap], 1.0 / config.experts if top_k == 1 else 1.0, rtol=1e-6)
        np.testing.assert_array_equal(served[:, cap:], 0.0)
        # expert 0 (and expert 1 for the second choices) fill their slots in token order
        for e in range(top_k):
            np.testing.assert_array_equal(combine[0, :cap, e, :].argmax(-1), np.arange(cap))
        assert combine[:, :, top_k:, :].sum() == 0
        y, _ = jax.jit(functools.partial(moe.moe_ffn, top_k=top_k, capacity_factor=factor))(p, x)
        y = np.asarray(y.value)
        assert np.abs(y[:, :cap]).min(axis=-1).max() > 0
        np.testing.assert_array_equal(y[:, cap:], 0.0)


def test_moe_route_is_recorded_as_one_op_with_whole_routing_dims():
    ex = models.example("moe-tiny", abstract=True)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    route = graph.producer["block_0/moe/combine"]
    assert route.kind == "moe_route"
    assert set(route.index.whole) == {"seq", "experts", "capacity"}
    assert graph.tensors["block_0/moe/combine"].dims == ("batch", "seq", "experts", "capacity")
    assert graph.tensors["block_0/moe/expert_in"].dims == ("batch", "experts", "capacity", "embed")
    assert {"block_0/moe/aux_loss", "head/aux_weighted", "loss"} <= set(graph.tensors)


# --------------------------------------------------------------------------- #
# sharded == unsharded
# --------------------------------------------------------------------------- #
# One layer keeps the compiles short; llama gets 8 heads over 4 kv heads so Megatron on a
# 4-way model axis divides kv_heads too.
SMALL = {"llama-tiny": dict(layers=1, heads=8, kv_heads=4, head_dim=4), "moe-tiny": dict(layers=1)}


@functools.lru_cache(maxsize=None)
def _reference(name):
    ex = models.example(name, 0, **SMALL[name])
    graph = mj.trace(ex.loss, ex.params, *ex.batch)

    def plain(params, *batch):
        return ex.loss(params, *batch).value

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(plain))(ex.params, *ex.batch)
    return ex, graph, np.asarray(ref_loss), ref_grads


DP = "batch:data"
LLAMA_2D = "batch:data;heads:model;kv_heads:model;mlp:model"
CASES = [
    ("llama-tiny", {"model": 8}, "heads:model;mlp:model;vocab:model"),  # Megatron over 8 ways
    ("llama-tiny", {"data": 2, "model": 4}, LLAMA_2D + ";vocab:model"),  # 2D
    ("moe-tiny", {"data": 8}, DP),  # data parallel
    ("moe-tiny", {"data": 4, "model": 2}, "batch:data;experts:model"),  # expert parallel
]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{'x'.join(map(str, c[1].values()))}-{c[2]}" for c in CASES])
def test_sharded_loss_and_grads_equal_unsharded(case):
    name, shape, rules = case
    ex, graph, ref_loss, ref_grads = _reference(name)
    layouts = layout_from_rules(graph, shape, rules)
    mesh = make_mesh(shape)
    loss, grads = Program(ex.loss, graph, mesh, layouts).jit(grad=True)(ex.params, *ex.batch)
    np.testing.assert_allclose(np.asarray(loss.value), ref_loss, rtol=RTOL, atol=ATOL)
    flat = jax.tree_util.tree_flatten_with_path(grads, is_leaf=_is_named)[0]
    ref_flat = jax.tree_util.tree_leaves(ref_grads, is_leaf=_is_named)
    assert len(flat) == len(ref_flat) == len(graph.params)
    split = 0
    for (path, g), ref in zip(flat, ref_flat):
        tensor = "/".join(str(p.key) for p in path)
        np.testing.assert_allclose(np.asarray(g.value), np.asarray(ref.value), rtol=1e-4, atol=1e-6, err_msg=tensor)
        spec = layouts[tensor].spec()
        assert g.value.sharding.is_equivalent_to(NamedSharding(mesh, spec), g.value.ndim), tensor
        split += spec != P()
    if rules != DP:
        assert split > 0


# --------------------------------------------------------------------------- #
# paper-size presets, abstractly
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "name, billions",
    [("llama-7b", 6.74), ("llama-70b", 68.98), ("llama3-8b", 8.03), ("moe-64e", None)],
)
def test_paper_presets_trace_abstractly(name, billions):
    module, config = models.get(name, scan_layers=True)
    if billions is not None:
        assert module.param_count(config) / 1e9 == pytest.approx(billions, rel=0.01)
    ex = models.example(name, abstract=True, scan_layers=True)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    assert graph.tensors["loss"].dims == ()
    assert graph.blocks["blocks"].trip_count == config.layers
    if name == "llama-70b":
        op = graph.producer["blocks/attn/context"]
        assert op.kind == "attention" and op.inputs == ("blocks/attn/q_rope/out", "blocks/attn/keys", "blocks/attn/values")
        assert op.index.loop_sizes == {
            "batch": 512, "kv_heads": 8, "heads_per_kv_heads": 8, "seq": 4096, "key_seq": 4096, "head_dim": 128
        }
        assert not any("key_seq" in t.dims and "seq" in t.dims for t in graph.tensors.values())
        einsum = models.example(name, abstract=True, scan_layers=True, attention="einsum")
        graph = mj.trace(einsum.loss, einsum.params, *einsum.batch)
        assert graph.tensors["blocks/attn/q_groups"].sizes == {
            "batch": 512, "seq": 4096, "kv_heads": 8, "group": 8, "head_dim": 128
        }
    if name == "moe-64e":
        assert graph.tensors["blocks/moe/combine"].sizes["capacity"] == moe.capacity(config) == 80
        assert graph.tensors["blocks/moe/w_in"].shape == (24, 64, 2048, 8192)


def test_solver_plans_llama_7b_on_a_2d_mesh():
    ex = models.example("llama-7b", abstract=True, scan_layers=True)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    plan = solve(graph, {"data": 8, "model": 8}, train=True)
    assert plan.solution.status.lower().startswith("optimal")
    assert set(plan.layouts) == set(graph.tensors)
    assert plan.step_time_s > 0


def test_solver_splits_experts_for_moe_64e():
    """On an 8x8 mesh the solver puts the 64 experts over mesh axes (expert parallelism)."""
    ex = models.example("moe-64e", abstract=True, scan_layers=True)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    plan = solve(graph, {"data": 8, "model": 8}, train=True)
    w_in = plan.layouts["blocks/moe/w_in"]
    assert w_in.of("experts"), f"experts not split: {w_in}"
    assert plan.layouts["blocks/moe/expert_in"].of("experts") or plan.layouts["blocks/moe/hidden"].of("experts")
