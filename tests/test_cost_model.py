"""The cost model's building blocks against figures worked out by hand from docs/cost_model.md.

Every expected value below is written as the arithmetic of the documented formula on the test's
own numbers (bandwidth, latency, sizes), never as a number the code printed. The hardware is a
made-up profile with round figures so the arithmetic stays readable.
"""

import math

import pytest

import meshjax as mj
from meshjax.cost.collectives import Collective, collective_time
from meshjax.cost.hardware import Hardware, Link
from meshjax.cost.memory import kept_copies
from meshjax.cost.strategies import op_strategies, reshard
from meshjax.layout import Layout

B_IN, A_IN = 1e9, 1e-5  # intra-node link: bytes/s per device and direction, latency per step
B_OUT, A_OUT = 1e8, 1e-4  # inter-node link
PEAK = 1e12  # float32 flops per second


def hardware(devices_per_node: int = 4, fuses_reduce_scatter: bool = True) -> Hardware:
    return Hardware(
        name="round",
        flops={"float32": PEAK},
        memory_bytes=1e9,
        intra_node=Link(B_IN, A_IN),
        inter_node=Link(B_OUT, A_OUT),
        devices_per_node=devices_per_node,
        fuses_reduce_scatter=fuses_reduce_scatter,
    )


HW = hardware()
N = 8e6  # bytes


# --- collective_time --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, expected",
    [
        # over 4 devices: n - 1 = 3 ring steps, r = ceil(log2 4) = 2 tree rounds
        ("all-reduce", 2 * 3 / 4 * N / B_IN + 2 * 2 * A_IN),
        ("all-gather", 3 / 4 * N / B_IN + 2 * A_IN),
        ("reduce-scatter", 3 * N / B_IN + 2 * A_IN),
        ("all-to-all", 3 / 4 * N / B_IN + 3 * A_IN),
        ("collective-permute", N / B_IN + A_IN),
    ],
)
def test_collective_time_is_the_documented_formula(kind, expected):
    assert collective_time(kind, N, ("model",), {"model": 4}, HW) == pytest.approx(expected, rel=1e-12)


def test_collective_time_rounds_up_log2_and_scales_latency_by_share():
    # 6 devices: ceil(log2 6) = 3 rounds
    assert collective_time("all-gather", N, ("x",), {"x": 6}, hardware(8)) == pytest.approx(5 / 6 * N / B_IN + 3 * A_IN)
    # latency_share = 1/4 scales only the latency term
    got = collective_time("all-reduce", N, ("model",), {"model": 4}, HW, latency_share=0.25)
    assert got == pytest.approx(2 * 3 / 4 * N / B_IN + 2 * 2 * A_IN * 0.25)


def test_collective_over_two_axes_runs_one_ring_at_the_slowest_link():
    # devices_per_node = 4: "model" (4, last) fits a node; "data" spans 2 * 4 = 8 > 4: inter-node
    mesh = {"data": 2, "model": 4}
    assert HW.link(mesh, "model") == Link(B_IN, A_IN)
    assert HW.link(mesh, "data") == Link(B_OUT, A_OUT)
    # one ring over 2 * 4 = 8 devices: 7 steps, ceil(log2 8) = 3 rounds, slowest bandwidth, largest latency
    got = collective_time("all-reduce", N, ("data", "model"), mesh, HW)
    assert got == pytest.approx(2 * 7 / 8 * N / B_OUT + 2 * 3 * A_OUT)
    # the same two axes on one node: intra-node figures
    got = collective_time("all-reduce", N, ("data", "model"), mesh, hardware(devices_per_node=8))
    assert got == pytest.approx(2 * 7 / 8 * N / B_IN + 2 * 3 * A_IN)


def test_collective_time_of_nothing_is_zero_and_unknown_kinds_raise():
    assert collective_time("all-reduce", N, ("model",), {"model": 1}, HW) == 0.0
    assert collective_time("all-reduce", 0, ("model",), {"model": 4}, HW) == 0.0
    with pytest.raises(ValueError, match="all-sum"):
        collective_time("all-sum", N, ("model",), {"model": 4}, HW)


# --- op_strategies ----------------------------------------------------------------------------

BATCH, EMBED, MLP = 8, 4, 16
F32 = 4  # bytes


def _matmul_graph():
    sizes = {"batch": BATCH, "embed": EMBED, "mlp": MLP}

    def f(params, x):
        return mj.einsum("batch embed, embed mlp -> batch mlp", x, params["w"], name="h")

    return mj.trace(f, mj.abstract_params({"w": mj.param("embed mlp")}, sizes), mj.abstract("batch embed", sizes))


def _by_label_and_result(strategies):
    return {(s.label, str(s.result_layout)): s for s in strategies}


def test_matmul_strategies_inference():
    graph = _matmul_graph()
    op = graph.producer["h"]
    mesh = {"model": 4}
    got = _by_label_and_result(op_strategies(op, graph, mesh, HW))
    flops = 2 * BATCH * EMBED * MLP  # a multiply and an add per (batch, embed, mlp)
    result_bytes = BATCH * MLP * F32  # [batch, mlp], whole on every device
    # model on batch or on mlp: no collectives; on embed (summed): an all-reduce of the result,
    # or a reduce-scatter onto batch or onto mlp (a quarter of the result each)
    assert set(got) == {
        ("replicated", "[batch, mlp]"),
        ("batch:model", "[batch:model, mlp]"),
        ("mlp:model", "[batch, mlp:model]"),
        ("embed:model", "[batch, mlp]"),
        ("embed:model", "[batch:model, mlp]"),
        ("embed:model", "[batch, mlp:model]"),
    }
    replicated = got["replicated", "[batch, mlp]"]
    assert replicated.compute_time == pytest.approx(flops / PEAK) and replicated.comm_time == 0
    by_batch = got["batch:model", "[batch:model, mlp]"]
    assert by_batch.compute_time == pytest.approx(flops / 4 / PEAK) and by_batch.collectives == ()
    assert [str(l) for l in by_batch.operand_layouts] == ["[batch:model, embed]", "[embed, mlp]"]

    reduced = got["embed:model", "[batch, mlp]"]
    assert reduced.collectives == (Collective("all-reduce", ("model",), result_bytes),)
    assert reduced.comm_time == pytest.approx(2 * 3 / 4 * result_bytes / B_IN + 2 * 2 * A_IN)
    assert reduced.compute_time == pytest.approx(flops / 4 / PEAK)
    scattered = got["embed:model", "[batch:model, mlp]"]
    assert scattered.collectives == (Collective("reduce-scatter", ("model",), result_bytes / 4),)
    assert scattered.comm_time == pytest.approx(3 * (result_bytes / 4) / B_IN + 2 * A_IN)


def test_matmul_strategies_training():
    graph = _matmul_graph()
    op = graph.producer["h"]
    mesh = {"model": 4}
    got = _by_label_and_result(op_strategies(op, graph, mesh, HW, train=True))
    flops = 2 * BATCH * EMBED * MLP
    w_bytes = EMBED * MLP * F32
    result_bytes = BATCH * MLP * F32
    # data parallel: w's gradient is a partial sum over model, all-reduced whole (w is
    # replicated); the graph's only param carries the whole latency (share 1/1)
    by_batch = got["batch:model", "[batch:model, mlp]"]
    assert by_batch.compute_time == pytest.approx(3 * flops / 4 / PEAK)  # forward + two backward matmuls
    assert by_batch.collectives == (Collective("all-reduce", ("model",), w_bytes, latency_share=1.0),)
    assert by_batch.comm_time == pytest.approx(2 * 3 / 4 * w_bytes / B_IN + 2 * 2 * A_IN)
    # split on mlp: x lacks mlp but is an input (no gradient), so no backward sync
    assert got["mlp:model", "[batch, mlp:model]"].collectives == ()
    # reduce-scatter forward, all-gather of the whole result's cotangent backward
    scattered = got["embed:model", "[batch, mlp:model]"]
    assert scattered.collectives == (
        Collective("reduce-scatter", ("model",), result_bytes / 4),
        Collective("all-gather", ("model",), result_bytes),
    )
    assert scattered.comm_time == pytest.approx(
        (3 * (result_bytes / 4) / B_IN + 2 * A_IN) + (3 / 4 * result_bytes / B_IN + 2 * A_IN)
    )


def test_reduce_scatter_is_an_all_reduce_where_xla_does_not_fuse_it():
    graph = _matmul_graph()
    got = _by_label_and_result(op_strategies(graph.producer["h"], graph, {"model": 4}, hardware(fuses_reduce_scatter=False)))
    result_bytes = BATCH * MLP * F32
    scattered = got["embed:model", "[batch:model, mlp]"]
    assert scattered.collectives == (Collective("all-reduce", ("model",), result_bytes),)
    assert scattered.comm_time == pytest.approx(2 * 3 / 4 * result_bytes / B_IN + 2 * 2 * A_IN)


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("bfloat16", 2)])
def test_softmax_statistics_are_float32_rows(dtype, itemsize):
    rows, vocab = 8, 16
    sizes = {"batch": rows, "vocab": vocab}

    def f(params, x):
        return mj.softmax(mj.einsum("batch vocab, vocab -> batch vocab", x, params["s"], name="y"), "vocab", name="p")

    graph = mj.trace(f, mj.abstract_params({"s": mj.param("vocab", dtype=dtype)}, sizes), mj.abstract("batch vocab", sizes, dtype))
    assert graph.tensors["p"].itemsize == itemsize
    for train, runs in ((False, 2), (True, 4)):  # softmax keeps 2 statistics; twice in training
        got = _by_label_and_result(op_strategies(graph.producer["p"], graph, {"model": 4}, HW, train=train))
        split = got["vocab:model", "[batch, vocab:model]"]
        stat_bytes = rows * 4  # one float32 per row, whatever the activation dtype
        assert split.collectives == (Collective("all-reduce", ("model",), stat_bytes),) * runs
        assert split.comm_time == pytest.approx(runs * (2 * 3 / 4 * stat_bytes / B_IN + 2 * 2 * A_IN))
        assert got["batch:model", "[batch:model, vocab]"].collectives == ()


def test_logsumexp_split_needs_two_all_reduces():
    sizes = {"batch": 8, "vocab": 16}

    def f(params, x):
        return mj.logsumexp(mj.einsum("batch vocab, vocab -> batch vocab", x, params["s"], name="y"), "vocab", name="lse")

    graph = mj.trace(f, mj.abstract_params({"s": mj.param("vocab")}, sizes), mj.abstract("batch vocab", sizes))
    got = _by_label_and_result(op_strategies(graph.producer["lse"], graph, {"model": 4}, HW))
    assert got["vocab:model", "[batch]"].collectives == (Collective("all-reduce", ("model",), 8 * F32),) * 2


# --- reshard ----------------------------------------------------------------------------------

MESH2 = {"data": 2, "model": 4}
HW8 = hardware(devices_per_node=8)  # both axes on one node: intra-node link
ROWS, COLS = 8, 16
T = ROWS * COLS * F32  # bytes of the whole tensor


@pytest.fixture(scope="module")
def tensor():
    sizes = {"batch": ROWS, "embed": COLS}
    graph = mj.trace(lambda p, x: mj.square(x, name="y"), {}, mj.abstract("batch embed", sizes))
    return graph.tensors["y"]


def L(batch=(), embed=()):
    return Layout(("batch", "embed"), (tuple(batch), tuple(embed)))


def gather(nbytes, n):
    return (n - 1) / n * nbytes / B_IN + math.ceil(math.log2(n)) * A_IN


def test_reshard_each_kind_of_move(tensor):
    assert reshard(tensor, L(["model"]), L(["model"]), MESH2, HW8) == (0.0, ())
    # model moves from batch to embed: an all-to-all of the local array (a quarter)
    t, colls = reshard(tensor, L(["model"]), L(embed=["model"]), MESH2, HW8)
    assert colls == (Collective("all-to-all", ("model",), T / 4),)
    assert t == pytest.approx(3 / 4 * (T / 4) / B_IN + 3 * A_IN)
    # dropped: an all-gather whose result is the whole tensor
    t, colls = reshard(tensor, L(["model"]), L(), MESH2, HW8)
    assert colls == (Collective("all-gather", ("model",), T),)
    assert t == pytest.approx(gather(T, 4))
    # only the destination has it: a local slice
    assert reshard(tensor, L(), L(["model"]), MESH2, HW8) == (0.0, ())
    # batch:data+model -> batch:model+data: no common leading run, both axes move within the dim
    t, colls = reshard(tensor, L(["data", "model"]), L(["model", "data"]), MESH2, HW8)
    assert colls == (Collective("collective-permute", ("data", "model"), T / 8),)
    assert t == pytest.approx((T / 8) / B_IN + A_IN)
    # batch:data+model -> batch:data: data stays, model is gathered (result: the data shard)
    t, colls = reshard(tensor, L(["data", "model"]), L(["data"]), MESH2, HW8)
    assert colls == (Collective("all-gather", ("model",), T / 2),)
    assert t == pytest.approx(gather(T / 2, 4))


def test_reshard_in_training_sends_the_cotangent_back(tensor):
    # a free slice forward; its cotangent comes back as an all-gather of the whole tensor
    t, colls = reshard(tensor, L(), L(["model"]), MESH2, HW8, train=True)
    assert colls == (Collective("all-gather", ("model",), T),)
    assert t == pytest.approx(gather(T, 4))
    # no gradient: nothing comes back
    assert reshard(tensor, L(), L(["model"]), MESH2, HW8, train=True, needs_grad=False) == (0.0, ())
    # a gather forward, redone in the backward pass (recompute), and a slice back (free)
    t, colls = reshard(tensor, L(["model"]), L(), MESH2, HW8, train=True, recompute=True)
    assert colls == (Collective("all-gather", ("model",), T),) * 2
    assert t == pytest.approx(2 * gather(T, 4))
    # an all-to-all both ways
    t, colls = reshard(tensor, L(["model"]), L(embed=["model"]), MESH2, HW8, train=True)
    assert colls == (Collective("all-to-all", ("model",), T / 4),) * 2
    assert t == pytest.approx(2 * (3 / 4 * (T / 4) / B_IN + 3 * A_IN))


# --- kept_copies ------------------------------------------------------------------------------


def test_kept_copies_counts_what_each_backward_reads():
    sizes = {"batch": 4, "embed": 8, "mlp": 16}

    def f(params, x):
        h = mj.einsum("batch embed, embed mlp -> batch mlp", x, params["w_in"], name="h")
        a = mj.gelu(h, name="a")
        y = mj.einsum("batch mlp, mlp embed -> batch embed", a, params["w_out"], name="y")
        p = mj.softmax(y, "embed", name="p")
        r = mj.elementwise("add", p, y, name="r")
        return mj.mean(mj.exp(r, name="e"), "batch embed", name="loss")

    decls = {"w_in": mj.param("embed mlp"), "w_out": mj.param("mlp embed")}
    graph = mj.trace(f, mj.abstract_params(decls, sizes), mj.abstract("batch embed", sizes))
    assert kept_copies(graph) == {
        "h": 1,  # gelu's input
        "a": 2,  # the second einsum's operand, plus gelu's tanh residual
        # y: read by softmax (which keeps its exponentials instead) and by add: not kept
        "p": 1,  # not read by add (linear); softmax's unnormalised exponentials, of its size
        # r: exp's derivative is its own result, so exp keeps that instead of its input
        "e": 1,  # exp's result (read by mean, which is linear)
        # loss: read by nothing; x: an input, not an activation
    }


def test_kept_copies_without_params_is_empty():
    sizes = {"batch": 4, "embed": 8}
    graph = mj.trace(lambda p, x: mj.sum(mj.gelu(x, name="a"), "batch embed"), {}, mj.abstract("batch embed", sizes))
    assert kept_copies(graph) == {}
