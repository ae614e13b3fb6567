"""Tests for meshjax.inspect: HLO collective parsing and reports on compiled programs.

The expected replica groups in the hand-written HLO tests are worked out by hand
in the comments, not taken from the code under test. Each hand-written module is
also run through XLA's own HLO parser (from jaxlib), which shows that it is real
HLO syntax.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from meshjax.hlo import (  # noqa: E402
    Collective,
    CompiledReport,
    inspect_compiled,
    parse_collectives,
    parse_replica_groups,
    replica_groups_to_axes,
    shape_bytes,
)

MESH_SHAPE = {"data": 4, "model": 2}
AUTO2 = (jax.sharding.AxisType.Auto,) * 2


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=AUTO2)


def _sharding(mesh: Mesh, *spec) -> NamedSharding:
    return NamedSharding(mesh, P(*spec))


def _assert_valid_hlo(text: str) -> None:
    """XLA's own parser accepts ``text`` (skipped if jaxlib does not expose it)."""
    try:
        from jaxlib import _hlo
    except ImportError:  # pragma: no cover
        pytest.skip("jaxlib._hlo is not available")
    _hlo.hlo_module_from_text(text)


_AR_MODULE = """HloModule m, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %a = f32[] add(%x, %y)
}

ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %ar = f32[4]{0} all-reduce(%p), channel_id=1, replica_groups=RG, use_global_device_ids=true, to_apply=%add
}
"""


# --------------------------------------------------------------------------- #
# Replica-group syntaxes
# --------------------------------------------------------------------------- #
# Mesh (data=4, model=2): partition id = 2 * data + model.
@pytest.mark.parametrize(
    "text, expected",
    [
        # Explicit lists are the groups themselves.
        ("{{0,2,4,6},{1,3,5,7}}", ((0, 2, 4, 6), (1, 3, 5, 7))),
        ("{{0,1},{2,3},{4,5},{6,7}}", ((0, 1), (2, 3), (4, 5), (6, 7))),
        # {} is one group holding every device.
        ("{}", ((0, 1, 2, 3, 4, 5, 6, 7),)),
        # iota(8) reshaped to [2,4].
        ("[2,4]<=[8]", ((0, 1, 2, 3), (4, 5, 6, 7))),
        # iota over [2,4] = [[0,1,2,3],[4,5,6,7]], transposed -> [[0,4],[1,5],[2,6],[3,7]].
        ("[4,2]<=[2,4]T(1,0)", ((0, 4), (1, 5), (2, 6), (3, 7))),
        # iota over [4,2] transposed = [[0,2,4,6],[1,3,5,7]], reshaped to [2,4].
        ("[2,4]<=[4,2]T(1,0)", ((0, 2, 4, 6), (1, 3, 5, 7))),
        # Same iota, reshaped to [4,2]: rows [0,2],[4,6],[1,3],[5,7].
        ("[4,2]<=[4,2]T(1,0)", ((0, 2), (4, 6), (1, 3), (5, 7))),
        # Devices = iota reshaped (4,1,2); grouping axis_0 leaves (axis_1, axis_2) = 2 groups.
        ("mesh['axis_0'=4,'axis_1'=1,'axis_2'=2] {'axis_0'}", ((0, 2, 4, 6), (1, 3, 5, 7))),
        # Devices = [[0,2,4,6],[1,3,5,7]] as (1,2,4); grouping axis_1 pairs (0,1),(2,3),...
        (
            "mesh['axis_0'=1,'axis_1'=2,'axis_2'=4], device_ids=([4,2]T(1,0)) {'axis_1'}",
            ((0, 1), (2, 3), (4, 5), (6, 7)),
        ),
        # Explicit device ids [[0,2],[1,3],[4,6],[5,7]]; grouping 'a' takes the columns.
        ("mesh['a'=4,'b'=2], device_ids=(0,2,1,3,4,6,5,7) {'a'}", ((0, 1, 4, 5), (2, 3, 6, 7))),
        # Both axes, 'b' major: one group ordered b=0 (0,2,4,6) then b=1 (1,3,5,7).
        ("mesh['a'=4,'b'=2] {'b','a'}", ((0, 2, 4, 6, 1, 3, 5, 7),)),
        # Sub-axis: a=8 as [2,2,2] (id = 4i+2j+k), group over j: (0,2),(1,3),(4,6),(5,7).
        ("mesh['a'=8] {'a':(2)2}", ((0, 2), (1, 3), (4, 6), (5, 7))),
        # a=8 as [4,2,1] (id = 2i+j), group over j.
        ("mesh['a'=8] {'a':(4)2}", ((0, 1), (2, 3), (4, 5), (6, 7))),
        # Two sub-axes of a=8 as [2,2,2]: group over i and k, one group per j.
        ("mesh['a'=8] {'a':(1)2,'a':(4)2}", ((0, 1, 4, 5), (2, 3, 6, 7))),
    ],
)
def test_parse_replica_groups(text: str, expected: tuple) -> None:
    _assert_valid_hlo(_AR_MODULE.replace("RG", text))
    assert parse_replica_groups(text, 8) == expected
    assert parse_replica_groups("replica_groups=" + text, 8) == expected


def test_parse_replica_groups_maximal_mesh() -> None:
    assert parse_replica_groups("maximal_mesh[device_id=3] {}", 8) == ((3,),)


def test_parse_replica_groups_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_replica_groups("<<nonsense>>", 8)


@pytest.mark.parametrize(
    "groups, axes",
    [
        (((0, 2, 4, 6), (1, 3, 5, 7)), ("data",)),
        (((0, 1), (2, 3), (4, 5), (6, 7)), ("model",)),
        ((tuple(range(8)),), ("data", "model")),
        (tuple((i,) for i in range(8)), ()),
        # 0=(0,0), 4=(2,0): only data varies, though not the whole data axis.
        (((0, 4), (1, 5), (2, 6), (3, 7)), ("data",)),
        # Irregular group: 0=(0,0), 3=(1,1), and 5=(2,1) alone.
        (((0, 3), (5,)), ("data", "model")),
    ],
)
def test_replica_groups_to_axes(groups: tuple, axes: tuple) -> None:
    assert replica_groups_to_axes(groups, MESH_SHAPE) == axes


def test_replica_groups_to_axes_other_mesh_shape() -> None:
    # On a (2,4) mesh, 0=(0,0) and 4=(1,0): the groups vary exactly along "x".
    assert replica_groups_to_axes(((0, 4), (1, 5), (2, 6), (3, 7)), {"x": 2, "y": 4}) == ("x",)


# --------------------------------------------------------------------------- #
# Shapes
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "shape, nbytes",
    [
        ("f32[4,32]{1,0}", 512),
        ("bf16[8,8]{1,0}", 128),
        ("pred[3]", 3),
        ("s8[5]{0}", 5),
        ("f8e4m3fn[10]{0}", 10),
        ("c64[2]{0}", 16),
        ("c128[2]{0}", 32),
        ("f64[]", 8),
        ("s4[3]{0}", 2),  # 12 bits round up to 2 bytes
        ("(f32[16,16]{1,0}, f32[16,16]{1,0})", 2048),
        ("(s32[], (f32[2]{0}, u64[1]{0}))", 20),
        ("f32[8,128]{1,0:T(8,128)}", 4096),
        ("token[]", 0),
    ],
)
def test_shape_bytes(shape: str, nbytes: int) -> None:
    assert shape_bytes(shape) == nbytes


# --------------------------------------------------------------------------- #
# Hand-written HLO modules
# --------------------------------------------------------------------------- #
_ADD = """%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %a = f32[] add(%x, %y)
}
"""

_TUPLE_HLO = (
    "HloModule tuples, num_partitions=8\n\n"
    + _ADD
    + """
ENTRY %main (p: f32[16,16], q: f32[16,16], r: bf16[8,16]) -> ((f32[16,16], f32[16,16]), (bf16[8,8], bf16[8,8])) {
  %p = f32[16,16]{1,0} parameter(0)
  %q = f32[16,16]{1,0} parameter(1)
  %r = bf16[8,16]{1,0} parameter(2)
  %ar = (f32[16,16]{1,0}, f32[16,16]{1,0}) all-reduce(%p, %q), channel_id=1, replica_groups=[4,2]<=[8], use_global_device_ids=true, to_apply=%add, metadata={op_name="jit(f)/psum"}
  %lo = bf16[8,8]{1,0} slice(%r), slice={[0:8], [0:8]}
  %hi = bf16[8,8]{1,0} slice(%r), slice={[0:8], [8:16]}
  %a2a = (bf16[8,8]{1,0}, bf16[8,8]{1,0}) all-to-all(%lo, %hi), channel_id=2, replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=4], device_ids=([4,2]T(1,0)) {'axis_1'}
  ROOT %t = ((f32[16,16]{1,0}, f32[16,16]{1,0}), (bf16[8,8]{1,0}, bf16[8,8]{1,0})) tuple(%ar, %a2a)
}
"""
)


def test_tuple_shaped_collectives() -> None:
    _assert_valid_hlo(_TUPLE_HLO)
    ar, a2a = parse_collectives(_TUPLE_HLO, MESH_SHAPE)
    assert (ar.kind, ar.bytes_per_device, ar.axes, ar.count) == ("all-reduce", 2 * 16 * 16 * 4, ("model",), 1)
    assert ar.groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert ar.op_name == "jit(f)/psum" and ar.name == "ar"
    assert (a2a.kind, a2a.bytes_per_device, a2a.axes) == ("all-to-all", 2 * 8 * 8 * 2, ("model",))
    assert a2a.groups == ((0, 1), (2, 3), (4, 5), (6, 7)) and a2a.op_name == ""


_ASYNC_HLO = (
    "HloModule async, num_partitions=8\n\n"
    + _ADD
    + """
%wrapped_rs (p0: f32[16,8]) -> f32[4,8] {
  %p0 = f32[16,8]{1,0} parameter(0)
  ROOT %rs = f32[4,8]{1,0} reduce-scatter(%p0), channel_id=5, replica_groups=[2,4]<=[4,2]T(1,0), use_global_device_ids=true, dimensions={0}, to_apply=%add
}

ENTRY %main (p: f32[16,8]) -> (f32[16,8], f32[64,8], f32[16,8], f32[4,8], f32[4,8]) {
  %p = f32[16,8]{1,0} parameter(0)
  %ars = f32[16,8]{1,0} all-reduce-start(%p), channel_id=1, replica_groups={{0,1},{2,3},{4,5},{6,7}}, use_global_device_ids=true, to_apply=%add
  %ard = f32[16,8]{1,0} all-reduce-done(%ars)
  %ags = (f32[16,8]{1,0}, f32[64,8]{1,0}) all-gather-start(%p), channel_id=2, replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}, use_global_device_ids=true
  %agd = f32[64,8]{1,0} all-gather-done(%ags)
  %cps = (f32[16,8]{1,0}, f32[16,8]{1,0}, u32[], u32[]) collective-permute-start(%p), channel_id=3, source_target_pairs={{0,2},{2,4},{4,6},{6,0}}
  %cpd = f32[16,8]{1,0} collective-permute-done(%cps)
  %rss = ((f32[16,8]{1,0}), f32[4,8]{1,0}) reduce-scatter-start(%p), channel_id=4, replica_groups={{0,2,4,6},{1,3,5,7}}, use_global_device_ids=true, dimensions={0}, to_apply=%add
  %rsd = f32[4,8]{1,0} reduce-scatter-done(%rss)
  %as = ((f32[16,8]{1,0}), f32[4,8]{1,0}) async-start(%p), calls=%wrapped_rs
  %ad = f32[4,8]{1,0} async-done(%as), calls=%wrapped_rs
  ROOT %t = (f32[16,8]{1,0}, f32[64,8]{1,0}, f32[16,8]{1,0}, f32[4,8]{1,0}, f32[4,8]{1,0}) tuple(%ard, %agd, %cpd, %rsd, %ad)
}
"""
)


def test_async_collectives_count_once() -> None:
    _assert_valid_hlo(_ASYNC_HLO)
    found = {c.name: c for c in parse_collectives(_ASYNC_HLO, MESH_SHAPE)}
    # One entry per logical collective: the -start (or the op inside async-start).
    assert set(found) == {"ars", "ags", "cps", "rss", "rs"}
    assert (found["ars"].kind, found["ars"].bytes_per_device, found["ars"].axes) == (
        "all-reduce", 16 * 8 * 4, ("model",))
    # Result of the all-gather is the -done's f32[64,8], not the start's tuple.
    assert (found["ags"].kind, found["ags"].bytes_per_device, found["ags"].axes) == (
        "all-gather", 64 * 8 * 4, ("data",))
    # Pairs 0->2, 2->4, ...: 0=(0,0), 2=(1,0), so source and target differ in "data".
    assert (found["cps"].kind, found["cps"].bytes_per_device, found["cps"].axes) == (
        "collective-permute", 16 * 8 * 4, ("data",))
    assert found["cps"].groups == ((0, 2), (2, 4), (4, 6), (6, 0))
    for name in ("rss", "rs"):
        assert (found[name].kind, found[name].bytes_per_device, found[name].axes) == (
            "reduce-scatter", 4 * 8 * 4, ("data",))
    assert all(c.count == 1 for c in found.values())


def test_async_start_without_done_uses_start_tuple() -> None:
    # Only the -start lines (no -done): the data part of the start's tuple is used.
    lines = [ln for ln in _ASYNC_HLO.splitlines() if "-done(" not in ln and "async-done" not in ln]
    found = {c.name: c.bytes_per_device for c in parse_collectives("\n".join(lines), MESH_SHAPE)}
    assert found == {"ars": 512, "ags": 2048, "cps": 512, "rss": 128, "rs": 128}


def _loop(name: str, trip_bound: str, body_extra: str) -> str:
    """A counting loop: body ``{name}_body`` with ``body_extra``, condition ``i < trip_bound``."""
    return f"""
%{name}_body (b: (s32[], f32[8], s32[])) -> (s32[], f32[8], s32[]) {{
  %b = (s32[], f32[8]{{0}}, s32[]) parameter(0)
  %i = s32[] get-tuple-element(%b), index=0
  %v = f32[8]{{0}} get-tuple-element(%b), index=1
  %n = s32[] get-tuple-element(%b), index=2
  %one = s32[] constant(1)
  %i1 = s32[] add(%i, %one)
{body_extra}
  ROOT %out = (s32[], f32[8]{{0}}, s32[]) tuple(%i1, %res, %n)
}}

%{name}_cond (c: (s32[], f32[8], s32[])) -> pred[] {{
  %c = (s32[], f32[8]{{0}}, s32[]) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
{trip_bound}
  ROOT %lt = pred[] compare(%ci, %bound), direction=LT
}}
"""


def _const_bound(n: int) -> str:
    return f"  %bound = s32[] constant({n})"


_PARAM_BOUND = "  %bound = s32[] get-tuple-element(%c), index=2"

_NESTED_HLO = (
    "HloModule nested, num_partitions=8\n\n"
    + _ADD
    + _loop(
        "inner",
        _const_bound(3),
        '  %res = f32[8]{0} all-reduce(%v), channel_id=1, replica_groups={{0,1},{2,3},{4,5},{6,7}}, '
        'use_global_device_ids=true, to_apply=%add, metadata={op_name="inner/psum"}',
    )
    + _loop(
        "outer",
        _const_bound(4),
        """  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}, s32[]) tuple(%zero, %v, %n)
  %w = (s32[], f32[8]{0}, s32[]) while(%init), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  %wv = f32[8]{0} get-tuple-element(%w), index=1
  %ag = f32[32]{0} all-gather(%wv), channel_id=2, replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}, use_global_device_ids=true
  %res = f32[8]{0} slice(%ag), slice={[0:8]}""",
    )
    + """
%unused (u: f32[8]) -> f32[8] {
  %u = f32[8]{0} parameter(0)
  ROOT %never = f32[8]{0} all-reduce(%u), channel_id=9, replica_groups={}, use_global_device_ids=true, to_apply=%add
}

ENTRY %main (p: f32[8], n: s32[]) -> f32[16] {
  %p = f32[8]{0} parameter(0)
  %n = s32[] parameter(1)
  %z = s32[] constant(0)
  %t = (s32[], f32[8]{0}, s32[]) tuple(%z, %p, %n)
  %w = (s32[], f32[8]{0}, s32[]) while(%t), condition=%outer_cond, body=%outer_body, backend_config={"known_induction_variable":{"tuple_index":"0"},"known_trip_count":{"n":"4"}}
  %wv = f32[8]{0} get-tuple-element(%w), index=1
  ROOT %top = f32[16]{0} all-gather(%wv), channel_id=3, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}, use_global_device_ids=true
}
"""
)


def test_nested_while_multiplies_trip_counts() -> None:
    _assert_valid_hlo(_NESTED_HLO)
    found = {c.name: c for c in parse_collectives(_NESTED_HLO, MESH_SHAPE)}
    # %never sits in a computation nothing calls.
    assert set(found) == {"res", "ag", "top"}
    inner, middle, top = found["res"], found["ag"], found["top"]
    assert (inner.kind, inner.count, inner.bytes_per_device, inner.comm_bytes) == ("all-reduce", 12, 32, 12 * 32)
    assert inner.op_name == "inner/psum" and inner.trip_count_known
    assert (middle.kind, middle.count, middle.axes, middle.comm_bytes) == ("all-gather", 4, ("data",), 4 * 128)
    assert (top.count, top.bytes_per_device, top.axes) == (1, 64, ("model",))


def test_trip_count_inferred_from_condition_constant() -> None:
    # Same loops without backend_config: counts come from `i < constant`.
    text = _NESTED_HLO.replace(
        ', backend_config={"known_trip_count":{"n":"3"}}', ""
    ).replace(', backend_config={"known_induction_variable":{"tuple_index":"0"},"known_trip_count":{"n":"4"}}', "")
    assert "known_trip_count" not in text
    _assert_valid_hlo(text)
    found = {c.name: c for c in parse_collectives(text, MESH_SHAPE)}
    assert (found["res"].count, found["ag"].count) == (12, 4)
    assert found["res"].trip_count_known and found["ag"].trip_count_known


def test_unknown_trip_count_counts_once_and_flags() -> None:
    # The outer bound is a loop-carried value: nothing to read, so count 1 and flag it.
    text = _NESTED_HLO.replace(_const_bound(4), _PARAM_BOUND).replace(
        ', backend_config={"known_induction_variable":{"tuple_index":"0"},"known_trip_count":{"n":"4"}}', ""
    )
    _assert_valid_hlo(text)
    found = {c.name: c for c in parse_collectives(text, MESH_SHAPE)}
    assert (found["res"].count, found["res"].trip_count_known) == (3, False)
    assert (found["ag"].count, found["ag"].trip_count_known) == (1, False)
    assert (found["top"].count, found["top"].trip_count_known) == (1, True)


_COND_HLO = (
    "HloModule cond, num_partitions=8\n\n"
    + _ADD
    + """
%br0 (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %ar0 = f32[8]{0} all-reduce(%a), channel_id=1, replica_groups={{0,2,4,6},{1,3,5,7}}, use_global_device_ids=true, to_apply=%add
}

%br1 (b: f32[8]) -> f32[8] {
  %b = f32[8]{0} parameter(0)
  ROOT %ar1 = f32[8]{0} all-reduce(%b), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, use_global_device_ids=true, to_apply=%add
}

ENTRY %main (i: s32[], p: f32[8]) -> f32[8] {
  %i = s32[] parameter(0)
  %p = f32[8]{0} parameter(1)
  ROOT %c = f32[8]{0} conditional(%i, %p, %p), branch_computations={%br0, %br1}
}
"""
)


def test_conditional_branches_are_each_counted() -> None:
    _assert_valid_hlo(_COND_HLO)
    found = {c.name: (c.axes, c.count) for c in parse_collectives(_COND_HLO, MESH_SHAPE)}
    assert found == {"ar0": (("data",), 1), "ar1": (("model",), 1)}


def test_partial_groups_are_flagged_not_exact() -> None:
    text = _AR_MODULE.replace("RG", "[4,2]<=[4,2]T(1,0)")
    (c,) = parse_collectives(text, MESH_SHAPE)
    # Groups (0,2),(4,6),(1,3),(5,7): half of the data axis each.
    assert c.axes == ("data",) and not c.axes_exact
    (full,) = parse_collectives(_AR_MODULE.replace("RG", "[2,4]<=[4,2]T(1,0)"), MESH_SHAPE)
    assert full.axes == ("data",) and full.axes_exact


def test_partition_to_mesh_remaps_groups() -> None:
    # Partition i sits at mesh index perm[i]; with this perm, groups {0,1},{2,3},...
    # become {0,2},{4,6},{1,3},{5,7}: data pairs rather than model pairs.
    perm = [0, 2, 4, 6, 1, 3, 5, 7]
    (c,) = parse_collectives(_AR_MODULE.replace("RG", "{{0,1},{2,3},{4,5},{6,7}}"), MESH_SHAPE,
                             partition_to_mesh=perm)
    assert c.groups == ((0, 2), (4, 6), (1, 3), (5, 7))
    assert c.axes == ("data",)


# --------------------------------------------------------------------------- #
# Report helpers
# --------------------------------------------------------------------------- #
def _coll(kind: str, nbytes: int, axes: tuple, count: int) -> Collective:
    return Collective(kind=kind, bytes_per_device=nbytes, axes=axes, count=count, groups=(), name=kind)


def test_report_aggregates() -> None:
    report = CompiledReport(
        collectives=(
            _coll("all-reduce", 100, ("model",), 3),
            _coll("all-reduce", 10, ("data",), 1),
            _coll("all-gather", 7, ("model",), 2),
        ),
        memory={},
        flops=0.0,
    )
    assert report.comm_bytes == 300 + 10 + 14
    assert report.by_kind() == {"all-reduce": {"count": 4, "bytes": 310}, "all-gather": {"count": 2, "bytes": 14}}
    assert report.by_axes() == {("model",): 314, ("data",): 10}

    from rich.console import Console
    from rich.table import Table

    table = report.table()
    assert isinstance(table, Table) and table.row_count == 3
    console = Console(width=200, record=True)
    console.print(table)
    rendered = console.export_text()
    assert "all-gather" in rendered and "model" in rendered and "324" in rendered


# --------------------------------------------------------------------------- #
# Real programs compiled by XLA on the CPU backend (8 simulated devices)
# --------------------------------------------------------------------------- #
def _mlp(x, w_in, w_out):
    return jax.nn.relu(x @ w_in) @ w_out


def test_megatron_mlp_has_one_model_all_reduce(mesh: Mesh) -> None:
    batch, embed, hidden = 16, 32, 64
    s = lambda *spec: _sharding(mesh, *spec)  # noqa: E731
    compiled = (
        jax.jit(_mlp, in_shardings=(s("data", None), s(None, "model"), s("model", None)),
                out_shardings=s("data", None))
        .lower(jnp.zeros((batch, embed)), jnp.zeros((embed, hidden)), jnp.zeros((hidden, embed)))
        .compile()
    )
    report = inspect_compiled(compiled, mesh)
    (ar,) = report.collectives
    activation = batch // 4 * embed * 4  # per-device f32[4,32]
    assert (ar.kind, ar.axes, ar.bytes_per_device, ar.count) == ("all-reduce", ("model",), activation, 1)
    assert ar.groups == ((0, 1), (2, 3), (4, 5), (6, 7)) and ar.axes_exact
    assert report.comm_bytes == activation
    assert report.by_kind() == {"all-reduce": {"count": 1, "bytes": activation}}

    # Per-device arguments: x f32[4,32], w_in f32[32,32], w_out f32[32,32].
    mem = report.memory
    assert mem["argument_bytes"] == (4 * 32 + 32 * 32 + 32 * 32) * 4
    assert mem["output_bytes"] == activation
    assert mem["peak_bytes"] == mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"] - mem["alias_bytes"]
    assert set(mem) == {"argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
                        "generated_code_bytes", "peak_bytes"}
    # Two per-device matmuls [4,32]@[32,32] at 2 flops per multiply-add.
    assert report.flops >= 2 * (2 * 4 * 32 * 32)


def test_reshard_to_replicated_is_data_all_gather(mesh: Mesh) -> None:
    compiled = (
        jax.jit(lambda x: x * 2, in_shardings=_sharding(mesh, "data", None),
                out_shardings=_sharding(mesh, None, None))
        .lower(jnp.zeros((16, 32)))
        .compile()
    )
    (ag,) = inspect_compiled(compiled, mesh).collectives
    assert (ag.kind, ag.axes, ag.bytes_per_device, ag.count) == ("all-gather", ("data",), 16 * 32 * 4, 1)
    assert ag.groups == ((0, 2, 4, 6), (1, 3, 5, 7))


def test_scan_multiplies_by_layers(mesh: Mesh) -> None:
    layers, batch, embed, hidden = 3, 16, 32, 64

    def stack(x, w_in, w_out):
        def layer(h, ws):
            return _mlp(h, *ws), None

        return jax.lax.scan(layer, x, (w_in, w_out))[0]

    s = lambda *spec: _sharding(mesh, *spec)  # noqa: E731
    compiled = (
        jax.jit(stack, in_shardings=(s("data", None), s(None, None, "model"), s(None, "model", None)),
                out_shardings=s("data", None))
        .lower(jnp.zeros((batch, embed)), jnp.zeros((layers, embed, hidden)), jnp.zeros((layers, hidden, embed)))
        .compile()
    )
    report = inspect_compiled(compiled, mesh)
    (ar,) = report.collectives
    activation = batch // 4 * embed * 4
    assert (ar.kind, ar.axes, ar.bytes_per_device, ar.count) == ("all-reduce", ("model",), activation, layers)
    assert ar.trip_count_known
    assert ar.comm_bytes == report.comm_bytes == layers * activation


def test_gspmd_reduce_scatter_is_all_reduce_on_cpu(mesh: Mesh) -> None:
    # Contract over a dim split on "model" and pin the output split on "model" along
    # another dim. The CPU pipeline does not form reduce-scatters: XLA emits an
    # all-reduce of the full per-device [16,64] partial sum, then a local dynamic-slice.
    def f(a, b):
        return jax.lax.with_sharding_constraint(a @ b, _sharding(mesh, "data", "model"))

    compiled = (
        jax.jit(f, in_shardings=(_sharding(mesh, "data", "model"), _sharding(mesh, "model", None)),
                out_shardings=_sharding(mesh, "data", "model"))
        .lower(jnp.zeros((64, 32)), jnp.zeros((32, 64)))
        .compile()
    )
    (ar,) = inspect_compiled(compiled, mesh).collectives
    assert (ar.kind, ar.axes, ar.bytes_per_device) == ("all-reduce", ("model",), 16 * 64 * 4)


def test_shard_map_psum_scatter_is_reduce_scatter(mesh: Mesh) -> None:
    def f(x):
        return jax.lax.psum_scatter(x, "data", scatter_dimension=0, tiled=True)

    fn = jax.shard_map(f, mesh=mesh, in_specs=P("data", "model"), out_specs=P("data", "model"))
    compiled = jax.jit(fn).lower(jnp.zeros((32, 16))).compile()
    (rs,) = inspect_compiled(compiled, mesh).collectives
    # Per-device block [8,8] is summed over data and scattered 4 ways: [2,8].
    assert (rs.kind, rs.axes, rs.bytes_per_device) == ("reduce-scatter", ("data",), 2 * 8 * 4)


def test_transpose_reshard_is_model_all_to_all(mesh: Mesh) -> None:
    compiled = (
        jax.jit(lambda x: x * 2, in_shardings=_sharding(mesh, "model", None),
                out_shardings=_sharding(mesh, None, "model"))
        .lower(jnp.zeros((16, 16)))
        .compile()
    )
    (a2a,) = inspect_compiled(compiled, mesh).collectives
    # CPU emits a tuple-shaped all-to-all of two f32[8,1,8] pieces = one [8,16] block.
    assert (a2a.kind, a2a.axes, a2a.bytes_per_device) == ("all-to-all", ("model",), 8 * 16 * 4)
    assert a2a.groups == ((0, 1), (2, 3), (4, 5), (6, 7))


def test_permuted_device_mesh(mesh: Mesh) -> None:
    # Partition i runs on mesh.devices.flat[i] even when the mesh's device ids are shuffled.
    devices = np.array(jax.devices())[[5, 2, 7, 0, 1, 6, 3, 4]].reshape(4, 2)
    shuffled = Mesh(devices, ("data", "model"), axis_types=AUTO2)
    compiled = (
        jax.jit(lambda x: x.sum(0), in_shardings=NamedSharding(shuffled, P("model", None)),
                out_shardings=NamedSharding(shuffled, P()))
        .lower(jnp.zeros((8, 8)))
        .compile()
    )
    (ar,) = inspect_compiled(compiled, shuffled).collectives
    assert (ar.kind, ar.axes) == ("all-reduce", ("model",))
