"""Layouts, PartitionSpecs, rules and their errors (meshjax.layout), on traced models."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import meshjax as mj
from meshjax import models
from meshjax.devices import make_mesh, mesh_shape, parse_mesh_shape
from meshjax.errors import LayoutError, TraceError
from meshjax.layout import (
    Layout,
    as_layout,
    format_rules,
    layout_from_rules,
    parse_rules,
    rules_of,
    validate,
)

MESH = {"data": 4, "model": 2}


@pytest.fixture(scope="module")
def mlp_graph():
    ex = models.example("mlp-tiny", abstract=True)  # batch 8, embed 16, mlp 64
    return mj.trace(ex.loss, ex.params, *ex.batch)


@pytest.fixture(scope="module")
def gpt_graph():
    ex = models.example("gpt-tiny", abstract=True)
    return mj.trace(ex.loss, ex.params, *ex.batch)


# --------------------------------------------------------------------------- #
# Layout <-> PartitionSpec
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "axes, spec",
    [
        (((), (), ()), P()),
        ((("data",), (), ()), P("data")),
        ((("data",), (), ("model",)), P("data", None, "model")),
        (((), ("model",), ()), P(None, "model")),
        ((("data", "model"), (), ()), P(("data", "model"))),
        (((), ("model", "data"), ()), P(None, ("model", "data"))),
    ],
)
def test_layout_spec_round_trip(axes, spec):
    dims = ("batch", "seq", "embed")
    layout = Layout(dims, axes)
    assert layout.spec() == spec
    assert Layout.from_spec(dims, spec) == layout
    assert Layout.from_spec(dims, layout.spec()).spec() == spec


_AXES = ["data", "model", "pipe"]


@st.composite
def _layouts(draw):
    n = draw(st.integers(0, 4))
    dims = tuple(f"d{i}" for i in range(n))
    axes = draw(st.permutations(_AXES))
    cut = sorted(draw(st.lists(st.integers(0, len(axes)), min_size=n, max_size=n))) if n else []
    # hand out disjoint slices of the permuted axes, some empty
    groups, start = [], 0
    for end in cut:
        groups.append(tuple(axes[start:end]))
        start = end
    return Layout(dims, tuple(groups))


@settings(max_examples=200, deadline=None)
@given(_layouts())
def test_layout_spec_round_trip_property(layout):
    spec = layout.spec()
    assert Layout.from_spec(layout.dims, spec) == layout
    assert len(spec) <= len(layout.dims)
    assert spec == P() or spec[-1] is not None  # trailing unsplit dims are dropped
    assert layout.used_axes == tuple(a for group in layout.axes for a in group)


def test_from_spec_with_too_many_entries():
    with pytest.raises(LayoutError, match="more entries"):
        Layout.from_spec(("batch",), P("data", "model"))


def test_layout_helpers():
    layout = Layout(("batch", "seq", "embed"), (("data",), (), ("model", "pipe")))
    assert layout.mapping == {"batch": ("data",), "embed": ("model", "pipe")}
    assert layout.of("seq") == ()
    shape = {"data": 4, "model": 2, "pipe": 3}
    assert layout.split_factor("embed", shape) == 6
    assert layout.shard_shape((8, 5, 12), shape) == (2, 5, 2)
    assert str(layout) == "[batch:data, seq, embed:model+pipe]"
    assert Layout.replicated(("a", "b")).spec() == P()
    assert Layout.from_mapping(("batch", "embed"), {"embed": "model"}) == Layout(("batch", "embed"), ((), ("model",)))


# --------------------------------------------------------------------------- #
# parse_rules
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "text, expected",
    [
        ("batch:data;mlp:model", {"batch": ("data",), "mlp": ("model",)}),
        ("batch=data,mlp=model,seq=none", {"batch": ("data",), "mlp": ("model",), "seq": ()}),
        ("batch:data+model", {"batch": ("data", "model")}),
        ("batch:data,model;mlp:none", {"batch": ("data", "model"), "mlp": ()}),
        (" batch : data ; mlp : model ; ", {"batch": ("data",), "mlp": ("model",)}),
        ("", {}),
        (None, {}),
        ({"batch": "data", "mlp": ("model",), "seq": None}, {"batch": ("data",), "mlp": ("model",), "seq": ()}),
        ({"batch": ["data", "model"]}, {"batch": ("data", "model")}),
    ],
)
def test_parse_rules_forms(text, expected):
    assert parse_rules(text) == expected


def test_format_rules_is_the_inverse():
    rules = {"batch": ("data", "model"), "mlp": ("model",), "seq": ()}
    assert format_rules(rules) == "batch:data+model;mlp:model;seq:none"
    assert parse_rules(format_rules(rules)) == rules


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("batch", "'batch' is not of the form dim:axis"),
        ("batch:data;batch:model", "dim 'batch' has two rules"),
        ("batch:da-ta", "'da-ta' is not a mesh axis name"),
        ("seq=", "dim 'seq' has no axis after 'seq='; write seq:none"),
        ("batch:data+data", "dim 'batch' uses mesh axis 'data' twice"),
    ],
)
def test_parse_rules_errors(text, pattern):
    with pytest.raises(LayoutError, match=pattern):
        parse_rules(text)


# --------------------------------------------------------------------------- #
# layout_from_rules and its errors
# --------------------------------------------------------------------------- #
def test_rules_give_every_tensor_a_layout(mlp_graph):
    layouts = layout_from_rules(mlp_graph, MESH, "batch:data;mlp:model")
    assert set(layouts) == set(mlp_graph.tensors)
    assert layouts["mlp/w_in"] == Layout(("embed", "mlp"), ((), ("model",)))
    assert layouts["mlp/hidden"].spec() == P("data", "model")
    assert layouts["x"].spec() == P("data")
    assert layouts["loss"].spec() == P()


def test_axis_used_twice_in_one_tensor(mlp_graph):
    with pytest.raises(LayoutError) as info:
        layout_from_rules(mlp_graph, MESH, "batch:data;embed:data")
    message = str(info.value)
    # the first tensor with both dims is the input x (params have no batch dim)
    assert "tensor 'x'" in message
    assert "'data'" in message and "'batch'" in message and "'embed'" in message


def test_axis_used_twice_within_one_dim(mlp_graph):
    with pytest.raises(LayoutError, match="'data'"):
        layout_from_rules(mlp_graph, MESH, "batch:data+data")


def test_indivisible_dim(mlp_graph):
    with pytest.raises(LayoutError) as info:
        layout_from_rules(mlp_graph, {"data": 3}, "batch:data")
    message = str(info.value)
    assert "tensor 'x'" in message and "dim 'batch'" in message and "size 8" in message
    assert "divisible by 3" in message


def test_indivisible_product_of_axes(gpt_graph):
    # heads = 4 is not divisible by data*model = 8
    with pytest.raises(LayoutError, match=r"dim 'heads' of size 4 is not divisible by 8 \(mesh axes data\+model\)"):
        layout_from_rules(gpt_graph, MESH, "heads:data+model")


def test_unknown_mesh_axis_in_rules(mlp_graph):
    with pytest.raises(LayoutError, match="unknown mesh axis 'dta'.*data, model"):
        layout_from_rules(mlp_graph, MESH, "batch:dta")


def test_unknown_mesh_axis_in_an_override(mlp_graph):
    with pytest.raises(LayoutError, match="tensor 'mlp/hidden', dim 'mlp': unknown mesh axis 'tensor'"):
        layout_from_rules(mlp_graph, MESH, "batch:data", {"mlp/hidden": {"mlp": "tensor"}})


def test_rule_for_a_dim_no_tensor_has(mlp_graph):
    with pytest.raises(LayoutError, match="rule for dim 'heads': no tensor has that dim"):
        layout_from_rules(mlp_graph, MESH, "batch:data;heads:model")
    with pytest.raises(LayoutError, match="'mpl'.*did you mean mlp"):
        layout_from_rules(mlp_graph, MESH, "mpl:model")


def test_per_tensor_overrides(mlp_graph):
    overrides = {
        "mlp/w_in": {"embed": "data", "mlp": "model"},  # dict
        "mlp/w_out": P("model", "data"),  # PartitionSpec
        "mlp/hidden": Layout(("batch", "mlp"), ((), ("data", "model"))),  # Layout
    }
    layouts = layout_from_rules(mlp_graph, MESH, "batch:data;mlp:model", overrides)
    assert layouts["mlp/w_in"].spec() == P("data", "model")
    assert layouts["mlp/w_out"].mapping == {"mlp": ("model",), "embed": ("data",)}
    assert layouts["mlp/hidden"].spec() == P(None, ("data", "model"))
    assert layouts["mlp/act"].spec() == P("data", "model")  # untouched tensors follow the rules


def test_overrides_are_validated(mlp_graph):
    with pytest.raises(LayoutError, match="tensor 'mlp/w_in': mesh axis 'data' splits both dim 'embed' and dim 'mlp'"):
        layout_from_rules(mlp_graph, MESH, None, {"mlp/w_in": P("data", "data")})
    with pytest.raises(LayoutError, match="tensor 'mlp/w_in' has no dim 'batch'"):
        layout_from_rules(mlp_graph, MESH, None, {"mlp/w_in": {"batch": "data"}})
    with pytest.raises(TraceError, match="'mlp/w_inn'.*did you mean mlp/w_in"):
        layout_from_rules(mlp_graph, MESH, None, {"mlp/w_inn": P()})
    with pytest.raises(LayoutError, match="cannot read a layout"):
        layout_from_rules(mlp_graph, MESH, None, {"mlp/w_in": "data"})
    with pytest.raises(LayoutError, match="not its dims"):
        validate(mlp_graph.tensors["mlp/w_in"], Layout(("mlp", "embed"), ((), ())), MESH)


def test_as_layout_of_a_spec_pads_with_unsplit_dims(mlp_graph):
    assert as_layout(mlp_graph.tensors["mlp/w_in"], P("data")).axes == (("data",), ())


# --------------------------------------------------------------------------- #
# rules_of
# --------------------------------------------------------------------------- #
def test_rules_of_uniform_layouts(gpt_graph):
    layouts = layout_from_rules(gpt_graph, MESH, "batch:data;mlp:model;heads:model")
    rules = rules_of(gpt_graph, layouts)
    assert rules == {d: ({"batch": ("data",), "mlp": ("model",), "heads": ("model",)}.get(d, ())) for d in gpt_graph.dim_names}
    # rules read back give the same layouts
    assert layout_from_rules(gpt_graph, MESH, rules) == layouts


def test_rules_of_non_uniform_layouts(gpt_graph):
    layouts = layout_from_rules(gpt_graph, MESH, "batch:data", {"block_0/mlp/w_in": {"mlp": "model"}})
    assert rules_of(gpt_graph, layouts) is None
    # an override that agrees with the rules keeps them uniform
    same = layout_from_rules(gpt_graph, MESH, "batch:data", {"embed/out": {"batch": "data"}})
    assert rules_of(gpt_graph, same) is not None


# --------------------------------------------------------------------------- #
# meshes
# --------------------------------------------------------------------------- #
def test_parse_mesh_shape():
    assert parse_mesh_shape("8") == {"data": 8}
    assert parse_mesh_shape("4x2") == {"data": 4, "model": 2}
    assert parse_mesh_shape("2x2x2") == {"axis0": 2, "axis1": 2, "axis2": 2}
    assert parse_mesh_shape("8", ["model"]) == {"model": 8}
    with pytest.raises(LayoutError, match="'4y2'"):
        parse_mesh_shape("4y2")
    with pytest.raises(LayoutError, match="2 axes but 1 names"):
        parse_mesh_shape("4x2", ["data"])


def test_make_mesh():
    mesh = make_mesh({"data": 2, "model": 4})
    assert mesh_shape(mesh) == {"data": 2, "model": 4}
    with pytest.raises(LayoutError, match="needs 16 devices but 8 exist"):
        make_mesh({"data": 16})
