"""Tracing: tensor names, roles, dims and shapes; scan blocks; unrolled-block detection;
abstract paper-size models; and the model registry (meshjax.models)."""

import math
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshjax as mj
from meshjax import models
from meshjax.errors import MeshjaxError, TraceError
from meshjax.models import mlp, transformer

TINY = transformer.PRESETS["gpt-tiny"]


def _trace(name, **overrides):
    ex = models.example(name, abstract=True, **overrides)
    return ex, mj.trace(ex.loss, ex.params, *ex.batch)


def _summary(graph, name):
    t = graph.tensors[name]
    return t.role, t.dims, t.shape, t.dtype


# --------------------------------------------------------------------------- #
# MLP
# --------------------------------------------------------------------------- #
def test_mlp_tensor_names_roles_dims_shapes():
    ex, g = _trace("mlp-tiny")
    b, e, m = ex.config.batch, ex.config.embed, ex.config.mlp
    expected = {
        "mlp/w_in": ("param", ("embed", "mlp"), (e, m), "float32"),
        "mlp/w_out": ("param", ("mlp", "embed"), (m, e), "float32"),
        "x": ("input", ("batch", "embed"), (b, e), "float32"),
        "target": ("input", ("batch", "embed"), (b, e), "float32"),
        "mlp/hidden": ("activation", ("batch", "mlp"), (b, m), "float32"),
        "mlp/act": ("activation", ("batch", "mlp"), (b, m), "float32"),
        "mlp/out": ("activation", ("batch", "embed"), (b, e), "float32"),
        "mlp/residual": ("activation", ("batch", "embed"), (b, e), "float32"),
        "error": ("activation", ("batch", "embed"), (b, e), "float32"),
        "sq_error": ("activation", ("batch", "embed"), (b, e), "float32"),
        "loss": ("output", (), (), "float32"),
    }
    assert {n: _summary(g, n) for n in g.tensors} == expected
    assert g.outputs == ("loss",)
    assert [t.name for t in g.params] == ["mlp/w_in", "mlp/w_out"]
    assert [t.name for t in g.inputs] == ["x", "target"]


def test_mlp_ops_and_edges():
    _, g = _trace("mlp-tiny")
    edges = {op.output: (op.kind, op.inputs) for op in g.ops}
    assert edges == {
        "mlp/hidden": ("einsum", ("x", "mlp/w_in")),
        "mlp/act": ("gelu", ("mlp/hidden",)),
        "mlp/out": ("einsum", ("mlp/act", "mlp/w_out")),
        "mlp/residual": ("add", ("x", "mlp/out")),
        "error": ("subtract", ("mlp/residual", "target")),
        "sq_error": ("square", ("error",)),
        "loss": ("mean", ("sq_error",)),
    }
    hidden = g.producer["mlp/hidden"].index
    assert hidden.loop_sizes == {"batch": 8, "embed": 16, "mlp": 64}
    assert hidden.reduced == ("embed",)
    assert hidden.flops == 2 * 8 * 16 * 64
    assert [op.output for op in g.consumers["x"]] == ["mlp/hidden", "mlp/residual"]
    assert g.blocks == {}


def test_concrete_and_abstract_traces_agree():
    config = mlp.PRESETS["mlp-tiny"]
    params = mlp.init(config, jax.random.key(0))
    batch = mlp.example_batch(config, jax.random.key(1))
    concrete = mj.trace(mlp.loss, params, *batch)
    abstract = mj.trace(mlp.loss, mlp.abstract_params(config), *mlp.abstract_batch(config))
    assert concrete.tensors == abstract.tensors
    assert concrete.ops == abstract.ops


def test_input_names_come_from_argument_names_and_paths():
    def fn(params, features, batch):
        h = mj.einsum("batch embed, embed mlp -> batch mlp", features, params["layer"]["w"], name="h")
        return mj.mean(h * batch["scale"], "batch mlp")

    params = {"layer": {"w": mj.abstract("embed mlp", {"embed": 4, "mlp": 8})}}
    g = mj.trace(fn, params, mj.abstract("batch embed", {"batch": 2, "embed": 4}), {"scale": mj.abstract("mlp", {"mlp": 8})})
    assert _summary(g, "layer/w")[0] == "param"
    assert _summary(g, "features") == ("input", ("batch", "embed"), (2, 4), "float32")
    assert _summary(g, "batch/scale") == ("input", ("mlp",), (8,), "float32")
    assert g.producer["multiply"].inputs == ("h", "batch/scale")


def test_repeated_op_names_are_made_unique():
    def fn(params, x):
        with mj.scope("a"):
            y = mj.tanh(x, name="t")
            y = mj.tanh(y, name="t")
        return mj.sum(mj.tanh(y, name="t"), "embed")

    g = mj.trace(fn, {}, mj.abstract("embed", {"embed": 3}))
    assert [op.output for op in g.ops] == ["a/t", "a/t_1", "t", "sum"]
    assert g.producer["a/t_1"].inputs == ("a/t",)


def test_constants_made_inside_the_function_are_recorded():
    def fn(params, x):
        return mj.sum(x * mj.named(jnp.arange(3.0), "embed"), "embed")

    g = mj.trace(fn, {}, mj.abstract("embed", {"embed": 3}))
    consts = g.by_role("constant")
    assert [(t.dims, t.shape) for t in consts] == [(("embed",), (3,))]
    assert g.producer["multiply"].inputs == ("x", consts[0].name)


def test_trace_errors():
    x = mj.abstract("embed", {"embed": 3})
    with pytest.raises(TraceError, match="must return NamedArrays"):
        mj.trace(lambda p, x: x.value, {}, x)
    with pytest.raises(TraceError, match="'w'.*not a NamedArray"):
        mj.trace(lambda p, x: x, {"w": np.ones(3)}, x)
    with pytest.raises(TraceError, match="'/'"):
        with mj.scope("a/b"):
            pass
    g = mj.trace(lambda p, x: mj.tanh(x, name="hidden"), {}, x)
    with pytest.raises(TraceError, match="did you mean hidden"):
        g.tensor("hiden")


def test_op_named_like_an_input_is_an_error_naming_both():
    def fn(params, x):
        h = mj.einsum("batch embed, embed mlp -> batch mlp", x, params["w"], name="x")
        return mj.sum(h, "batch mlp")

    with pytest.raises(mj.TraceError, match="einsum op named 'x' would share its name with the input 'x'"):
        mj.trace(fn, {"w": mj.abstract("embed mlp", {"embed": 4, "mlp": 6})}, mj.abstract("batch embed", {"batch": 2, "embed": 4}))


def test_identity_op_keeps_edges_right():
    def fn(params, x):
        c = mj.cast(x, jnp.float32, name="c")
        return mj.sum(mj.elementwise("add", x, c, name="y"), "embed")

    g = mj.trace(fn, {}, mj.abstract("embed", {"embed": 3}))
    assert g.producer["c"].inputs == ("x",)
    assert g.producer["y"].inputs == ("x", "c")


# --------------------------------------------------------------------------- #
# Transformer (unrolled)
# --------------------------------------------------------------------------- #
def _expected_params(config, prefix, lead=()):
    L = lead
    s = transformer.sizes(config)

    def shape(dims):
        return tuple(s[d] for d in dims)

    block = {
        "ln_1/scale": L + ("embed",),
        "ln_1/bias": L + ("embed",),
        "attn/w_q": L + ("embed", "heads", "head_dim"),
        "attn/w_k": L + ("embed", "heads", "head_dim"),
        "attn/w_v": L + ("embed", "heads", "head_dim"),
        "attn/w_o": L + ("heads", "head_dim", "embed"),
        "ln_2/scale": L + ("embed",),
        "ln_2/bias": L + ("embed",),
        "mlp/w_in": L + ("embed", "mlp"),
        "mlp/w_out": L + ("mlp", "embed"),
    }
    return {f"{prefix}{k}": (dims, shape(dims)) for k, dims in block.items()}


def test_transformer_params_are_named_by_path():
    config = TINY
    _, g = _trace("gpt-tiny")
    expected = {
        "token_embed": (("vocab", "embed"), (64, 32)),
        "pos_embed": (("seq", "embed"), (16, 32)),
        "ln_f/scale": (("embed",), (32,)),
        "ln_f/bias": (("embed",), (32,)),
        "unembed": (("embed", "vocab"), (32, 64)),
    }
    for i in range(config.layers):
        expected.update(_expected_params(config, f"block_{i}/"))
    assert {t.name: (t.dims, t.shape) for t in g.params} == expected
    assert {t.name: _summary(g, t.name) for t in g.inputs} == {
        "tokens": ("input", ("batch", "seq"), (8, 16), "int32"),
        "targets": ("input", ("batch", "seq"), (8, 16), "int32"),
    }


def test_transformer_activations_are_named_by_scope():
    _, g = _trace("gpt-tiny", attention="einsum")
    B, S, E, H, D, M, V = 8, 16, 32, 4, 8, 128, 64
    expected = {
        "embed/tokens": (("batch", "seq", "embed"), (B, S, E)),
        "embed/out": (("batch", "seq", "embed"), (B, S, E)),
        "block_1/attn/ln": (("batch", "seq", "embed"), (B, S, E)),
        "block_1/attn/q": (("batch", "seq", "heads", "head_dim"), (B, S, H, D)),
        "block_1/attn/keys": (("batch", "key_seq", "heads", "head_dim"), (B, S, H, D)),
        "block_1/attn/scores": (("batch", "heads", "seq", "key_seq"), (B, H, S, S)),
        "block_1/attn/causal": (("seq", "key_seq"), (S, S)),
        "block_1/attn/probs": (("batch", "heads", "seq", "key_seq"), (B, H, S, S)),
        "block_1/attn/context": (("batch", "seq", "heads", "head_dim"), (B, S, H, D)),
        "block_1/mlp/hidden": (("batch", "seq", "mlp"), (B, S, M)),
        "head/logits": (("batch", "seq", "vocab"), (B, S, V)),
        "head/xent": (("batch", "seq"), (B, S)),
        "loss": ((), ()),
    }
    assert {n: (g.tensors[n].dims, g.tensors[n].shape) for n in expected} == expected
    assert g.tensors["block_1/attn/causal"].dtype == "bool"
    assert g.outputs == ("loss",) and g.tensors["loss"].role == "output"
    # the blocks are chained through the residual stream
    assert g.producer["block_0/attn/ln"].inputs == ("embed/out", "block_0/ln_1/scale", "block_0/ln_1/bias")
    assert g.producer["block_1/attn/ln"].inputs[0] == "block_0/mlp/residual"
    assert g.producer["block_1/attn/q"].inputs == ("block_1/attn/ln", "block_1/attn/w_q")
    assert g.producer["head/ln"].inputs[0] == "block_1/mlp/residual"
    assert g.producer["embed/tokens"].inputs == ("tokens", "token_embed")
    assert g.producer["head/xent"].inputs == ("head/logits", "targets")
    assert g.producer["block_0/attn/probs"].index.stats == (("key_seq", 2),)


def test_flash_attention_is_one_op_with_no_seq_by_seq_tensor():
    _, g = _trace("gpt-tiny")
    B, S, H, D = 8, 16, 4, 8
    op = g.producer["block_1/attn/context"]
    assert op.kind == "attention" and op.inputs == ("block_1/attn/q", "block_1/attn/keys", "block_1/attn/values")
    assert (g.tensors[op.output].dims, g.tensors[op.output].shape) == (("batch", "seq", "heads", "head_dim"), (B, S, H, D))
    assert op.index.loop == (("batch", B), ("heads", H), ("seq", S), ("key_seq", S), ("head_dim", D))
    assert op.index.reduced == ("key_seq", "head_dim") and set(op.index.whole) == {"key_seq", "head_dim"}
    assert op.attrs["causal"] and op.attrs["scale"] == pytest.approx(D**-0.5)
    assert not any({"seq", "key_seq"} <= set(t.dims) for t in g.tensors.values())


def test_unrolled_identical_blocks_are_one_block():
    for layers in (2, 3):
        _, g = _trace("gpt-tiny", layers=layers)
        assert set(g.blocks) == {"block_"}
        block = g.blocks["block_"]
        assert block.kind == "unrolled"
        assert block.trip_count == layers
        assert block.instances == tuple(f"block_{i}/" for i in range(layers))
        # unrolled ops are not tagged as living in a scan body
        assert all(op.block is None for op in g.ops)


def test_unrolled_blocks_that_differ_are_not_grouped():
    def fn(params, x):
        for i, p in enumerate(params):
            with mj.scope(f"layer_{i}"):
                h = mj.gelu(mj.einsum("batch embed, embed mlp -> batch mlp", x, p["w_in"], name="hidden"))
                x = x + mj.einsum("batch mlp, mlp embed -> batch embed", h, p["w_out"], name="out")
        return mj.mean(x, "batch embed")

    def layer(mlp_size):
        return {
            "w_in": mj.abstract("embed mlp", {"embed": 4, "mlp": mlp_size}),
            "w_out": mj.abstract("mlp embed", {"embed": 4, "mlp": mlp_size}),
        }

    x = mj.abstract("batch embed", {"batch": 2, "embed": 4})
    same = mj.trace(fn, [layer(8), layer(8), layer(8)], x)
    assert same.blocks["layer_"].instances == ("layer_0/", "layer_1/", "layer_2/")
    differ = mj.trace(fn, [layer(8), layer(16)], x)
    assert differ.blocks == {}
    assert mj.trace(fn, [layer(8), layer(8)], x, find_repeats=False).blocks == {}


# --------------------------------------------------------------------------- #
# Transformer (scanned)
# --------------------------------------------------------------------------- #
def test_scanned_params_are_stacked_along_layers():
    _, g = _trace("gpt-tiny", scan_layers=True)
    params = {t.name: (t.dims, t.shape) for t in g.params}
    expected = _expected_params(TINY, "blocks/", lead=("layers",))
    assert {k: v for k, v in params.items() if k.startswith("blocks/")} == expected
    assert not any(k.startswith("block_") for k in params)


@pytest.mark.parametrize("layers", [2, 5])
def test_scan_body_is_recorded_once(layers):
    _, g = _trace("gpt-tiny", scan_layers=True, layers=layers, attention="einsum")
    assert set(g.blocks) == {"blocks"}
    block = g.blocks["blocks"]
    assert (block.kind, block.trip_count) == ("scan", layers)
    body = [op for op in g.ops if op.block == "blocks"]
    # one copy of the body whatever the trip count: 10 param slices, the carry and 22 block ops
    assert len(body) == 10 + 1 + 22
    names = {op.output for op in body}
    assert {"blocks/attn/q", "blocks/attn/probs", "blocks/mlp/hidden", "blocks/mlp/residual"} <= names
    assert not any(n.endswith("_1") and not n.startswith("blocks/slice") for n in names)
    assert g.tensors["blocks/attn/q"].block == "blocks"
    assert g.tensors["blocks/attn/q"].shape == (8, 16, 4, 8)
    # the carry takes the block's input and, as its back edge, the block's output
    assert g.producer["blocks/carry"].inputs == ("embed/out", "blocks/mlp/residual")
    assert g.producer["blocks/final_carry"].block is None
    assert g.producer["head/ln"].inputs[0] == "blocks/final_carry"
    # the body reads per-layer slices of the stacked params
    (w_q_slice,) = [op for op in body if op.kind == "slice" and op.inputs == ("blocks/attn/w_q",)]
    assert g.tensors[w_q_slice.output].dims == ("embed", "heads", "head_dim")
    assert w_q_slice.index.whole == ("layers",)
    assert g.trip_count("blocks") == layers and g.trip_count(None) == 1


def test_scanned_and_unrolled_traces_have_the_same_block_ops():
    _, scanned = _trace("gpt-tiny", scan_layers=True)
    _, unrolled = _trace("gpt-tiny")
    body = [(op.kind, op.output.removeprefix("blocks/")) for op in scanned.ops if op.block and op.kind not in ("slice", "loop_carry")]
    first = [(op.kind, op.output.removeprefix("block_0/")) for op in unrolled.ops if op.output.startswith("block_0/")]
    assert body == first


def test_transformer_block_loss_on_its_own():
    _, g = _trace("block-tiny", attention="einsum")
    assert {t.name for t in g.inputs} == {"x"}
    assert set(t.name for t in g.params) == set(_expected_params(TINY, ""))
    assert g.tensors["block/attn/probs"].dims == ("batch", "heads", "seq", "key_seq")
    assert g.producer["block/attn/ln"].inputs[0] == "x"
    assert g.outputs == ("loss",)


# --------------------------------------------------------------------------- #
# Paper-size models stay abstract
# --------------------------------------------------------------------------- #
@pytest.mark.slow
def test_gpt3_175b_traces_without_allocating():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    ex, g = _trace("gpt3-175b")
    elapsed = time.perf_counter() - start
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert all(isinstance(leaf.value, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(ex.params, is_leaf=lambda x: isinstance(x, mj.NamedArray)))
    # 175B float32 params are 700 GB; the trace must not come near even one layer's worth
    param_bytes = sum(t.nbytes for t in g.params)
    assert 170e9 * 4 < param_bytes < 180e9 * 4
    assert grown_mib < 1024, f"tracing grew the process by {grown_mib:.0f} MiB"
    assert elapsed < 60
    assert g.blocks["block_"].trip_count == 96
    assert g.producer["block_95/attn/context"].index.loop_sizes == {
        "batch": 1536, "heads": 96, "seq": 2048, "key_seq": 2048, "head_dim": 128
    }
    assert g.tensors["head/logits"].shape == (1536, 2048, 50304)
    assert g.tensors["block_0/mlp/w_in"].shape == (12288, 49152)


def test_gpt3_175b_scanned_trace_is_small():
    _, g = _trace("gpt3-175b", scan_layers=True)
    assert g.blocks["blocks"].trip_count == 96
    assert g.tensors["blocks/attn/w_q"].shape == (96, 12288, 96, 128)
    assert len(g.ops) < 60


def test_param_counts_match_the_paper_sizes():
    assert transformer.param_count(models.get("gpt3-175b")[1]) == pytest.approx(175e9, rel=0.01)
    # 125M and 1.3B are close to the paper's count plus the separate (untied) unembedding
    for name, paper in [("gpt3-125m", 125e6), ("gpt3-1.3b", 1.3e9)]:
        config = models.get(name)[1]
        untied = config.vocab * config.embed
        assert transformer.param_count(config) - untied == pytest.approx(paper, rel=0.03)


# --------------------------------------------------------------------------- #
# The registry
# --------------------------------------------------------------------------- #
def test_registry_lists_the_presets():
    for name in ["mlp-tiny", "gpt-tiny", "gpt-small", "gpt3-125m", "gpt3-1.3b", "gpt3-175b", "block-tiny"]:
        assert name in models.PRESETS
    module, config = models.get("gpt3-175b")
    assert module is transformer
    assert (config.embed, config.heads, config.layers, config.mlp, config.seq, config.vocab) == (
        12288, 96, 96, 49152, 2048, 50304
    )
    assert config.vocab % 128 == 0
    assert models.get("gpt-tiny")[1] == transformer.Config(
        vocab=64, seq=16, embed=32, heads=4, head_dim=8, mlp=128, layers=2, batch=8
    )


def test_registry_overrides():
    _, config = models.get("gpt-tiny", scan_layers=True, layers=3)
    assert config.scan_layers and config.layers == 3
    assert not models.get("gpt-tiny")[1].scan_layers  # presets are not mutated
    with pytest.raises(MeshjaxError, match="'layer'"):
        models.get("gpt-tiny", layer=3)


def test_registry_unknown_name_lists_known_ones():
    with pytest.raises(MeshjaxError) as info:
        models.get("gpt-tiyn")
    message = str(info.value)
    assert "'gpt-tiyn'" in message and "did you mean gpt-tiny" in message
    for name in models.PRESETS:
        assert name in message
    with pytest.raises(KeyError):
        models.get("nope")


@pytest.mark.parametrize("name", ["mlp-tiny", "block-tiny", "gpt-tiny"])
def test_models_run_and_match_their_abstract_shapes(name):
    ex = models.example(name, jax.random.key(3))
    # eagerly for the MLP (named ops run outside any context); jitted for the rest (quicker)
    value = ex.loss(ex.params, *ex.batch) if name == "mlp-tiny" else jax.jit(ex.loss)(ex.params, *ex.batch)
    assert value.dims == () and np.isfinite(float(value.value))
    abstract = models.example(name, abstract=True)
    same = jax.tree_util.tree_map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), ex.params, abstract.params)
    assert all(jax.tree_util.tree_leaves(same))
    assert [(b.dims, b.shape) for b in ex.batch] == [(b.dims, b.shape) for b in abstract.batch]


def test_gpt_tiny_initial_loss_is_near_uniform():
    ex = models.example("gpt-tiny", jax.random.key(0))
    assert float(jax.jit(ex.loss)(ex.params, *ex.batch).value) == pytest.approx(math.log(64), abs=0.1)


def test_example_batch_targets_are_next_tokens():
    tokens, targets = transformer.example_batch(TINY, jax.random.key(0))
    assert tokens.dims == targets.dims == ("batch", "seq") and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(tokens.value)[:, 1:], np.asarray(targets.value)[:, :-1])
    assert 0 <= int(tokens.value.min()) and int(tokens.value.max()) < TINY.vocab


def test_causal_attention_ignores_future_tokens():
    """Changing the last token must not change any earlier position's logits."""
    params = transformer.init(TINY, jax.random.key(0))
    tokens, _ = transformer.example_batch(TINY, jax.random.key(1))
    raw = np.asarray(tokens.value)
    changed = raw.copy()
    changed[:, -1] = (changed[:, -1] + 1) % TINY.vocab
    forward = jax.jit(transformer.forward)
    a = forward(params, tokens).value
    b = forward(params, mj.named(changed, "batch seq")).value
    np.testing.assert_allclose(a[:, :-1], b[:, :-1], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, -1], b[:, -1])


def test_scanned_and_unrolled_models_compute_the_same_loss():
    unrolled = models.example("gpt-tiny", jax.random.key(0))
    stacked = {k: v for k, v in unrolled.params.items() if not k.startswith("block_")}
    stacked["blocks"] = jax.tree_util.tree_map(
        lambda *leaves: mj.named(jnp.stack([leaf.value for leaf in leaves]), ("layers", *leaves[0].dims)),
        *[unrolled.params[f"block_{i}"] for i in range(TINY.layers)],
        is_leaf=lambda x: isinstance(x, mj.NamedArray),
    )
    a = jax.jit(transformer.loss)(unrolled.params, *unrolled.batch).value
    b = jax.jit(transformer.loss)(stacked, *unrolled.batch).value
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_model_init_is_deterministic_and_declarations_work_with_jax_init():
    config = mlp.PRESETS["mlp-tiny"]
    a, b, c = mlp.init(config, jax.random.key(0)), mlp.init(config, jax.random.key(0)), mlp.init(config, 1)
    np.testing.assert_array_equal(a["mlp"]["w_in"].value, b["mlp"]["w_in"].value)
    assert not np.array_equal(a["mlp"]["w_in"].value, c["mlp"]["w_in"].value)
    assert not np.array_equal(a["mlp"]["w_in"].value[:4, :4], a["mlp"]["w_out"].value[:4, :4].T)
    std = float(np.std(np.asarray(a["mlp"]["w_in"].value)))
    assert std == pytest.approx(config.embed**-0.5, rel=0.2)
    via_jax = mj.init_params(mlp.decls(config), mlp.sizes(config), jax.random.key(0))
    assert via_jax["mlp"]["w_in"].dims == ("embed", "mlp") and via_jax["mlp"]["w_in"].shape == (16, 64)
    # meshjax's own initializers draw on the host, as the models' init does: the same values.
    np.testing.assert_array_equal(via_jax["mlp"]["w_in"].value, a["mlp"]["w_in"].value)
    # A jax.nn initializer runs JAX's sampler.
    decl = {"w": mj.param("embed mlp", init=jax.nn.initializers.zeros)}
    assert not np.asarray(mj.init_params(decl, {"embed": 2, "mlp": 3}, jax.random.key(0))["w"].value).any()
    block = transformer.init(TINY, 0)["block_0"]
    np.testing.assert_array_equal(block["ln_1"]["scale"].value, np.ones(32))
    np.testing.assert_array_equal(block["ln_1"]["bias"].value, np.zeros(32))
