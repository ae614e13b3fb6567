"""Predicted comm bytes against what XLA compiles, for the solver's own plans.

Comm bytes are defined once (see :mod:`meshjax.inspect`): each collective's result bytes per
device, times its runs per step. For every case below the solver's prediction must be within
10% of the compiled program's.
"""

import pytest

import meshjax as mj
from meshjax import models
from meshjax.devices import make_mesh
from meshjax.plan import solve
from meshjax.verify import verify

LARGE = dict(batch=8, seq=1024, embed=2048, heads=16, head_dim=128, mlp=8192, vocab=2048, layers=2)
WIDE_BATCH = dict(batch=64, seq=1024, embed=512, heads=8, head_dim=64, mlp=2048, vocab=2048, layers=2)

CASES = [
    # (model, overrides, mesh, hardware, train)
    ("gpt-tiny", LARGE, {"model": 8}, "h100-node", True),
    ("gpt-tiny", LARGE, {"data": 8}, "h100-2node", True),
    ("gpt-tiny", LARGE, {"data": 4, "model": 2}, "h100-2node", True),
    ("gpt-tiny", LARGE, {"data": 2, "model": 4}, "cpu-sim", True),
    ("gpt-tiny", LARGE, {"data": 2, "model": 4}, "h100-node", False),
    ("gpt-tiny", {**LARGE, "scan_layers": True}, {"data": 4, "model": 2}, "h100-2node", True),
    ("gpt-tiny", {**LARGE, "scan_layers": True}, {"data": 2, "model": 4}, "cpu-sim", True),
    ("gpt-tiny", WIDE_BATCH, {"data": 4, "model": 2}, "h100-node", True),
    ("gpt-tiny", WIDE_BATCH, {"model": 8}, "cpu-sim", False),
    ("gpt-tiny", {}, {"data": 4, "model": 2}, "cpu-sim", True),
    ("gpt-tiny", {}, {"data": 2, "model": 4}, "cpu-sim", False),
    ("mlp-small", {}, {"data": 4, "model": 2}, "cpu-sim", True),
]


def _id(case):
    name, overrides, mesh, hardware, train = case
    size = "large" if overrides.get("embed") == 2048 else "wide" if overrides.get("batch") == 64 else "tiny"
    scan = "-scan" if overrides.get("scan_layers") else ""
    shape = "x".join(f"{n}{a[0]}" for a, n in mesh.items())
    return f"{name}-{size}{scan}-{shape}-{hardware}-{'train' if train else 'infer'}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_predicted_comm_bytes_within_ten_percent_of_compiled(case):
    name, overrides, mesh_shape, hardware, train = case
    ex = models.example(name, abstract=True, **overrides)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    plan = solve(graph, mesh_shape, hardware=hardware, train=train)
    check = verify(plan, ex.loss, make_mesh(mesh_shape), ex.params, *ex.batch)
    compiled, predicted = check.compiled.comm_bytes, plan.comm_bytes
    assert compiled == pytest.approx(predicted, rel=0.10), (
        f"predicted {check.predicted_by_kind}, compiled {check.compiled_by_kind}"
    )
