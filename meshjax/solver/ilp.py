"""The exact integer program over a :class:`~meshjax.solver.problem.Problem`, solved by HiGHS.

Variables: a binary ``x[n, s]`` per node option; per edge a continuous ``y[a, b]`` per pair of
(producer layout, consumer layout) whose row sums equal the producer's chosen layout and whose
column sums equal the consumer's. With the ``x`` binary, the only feasible ``y`` is the chosen
pair, so the edge cost is exact and the relaxation stays tight. A memory budget adds one row;
inference peaks add one continuous ``z >= activation bytes``.

Example::

    >>> result = solve_ilp(problem, memory_budget=80e9, time_limit=10)      # doctest: +SKIP
    >>> result.choice, result.objective, result.gap
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from meshjax.errors import InfeasibleError
from meshjax.solver.problem import Problem


@dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]
    objective: float  # predicted step time, seconds
    memory: float  # predicted bytes per device
    gap: float  # relative optimality gap (0: proven optimal)
    status: str


def solve_ilp(
    problem: Problem,
    *,
    memory_budget: float | None = None,
    time_limit: float | None = None,
    objective: str = "time",
) -> Solution:
    """Minimise predicted step time (or, with ``objective="memory"``, bytes per device)."""
    nodes, edges = problem.nodes, problem.edges
    offsets = np.cumsum([0] + [len(n.options) for n in nodes])
    n_x = int(offsets[-1])
    edge_offsets = [n_x]
    for e in edges:
        edge_offsets.append(edge_offsets[-1] + e.cost.size)
    has_peak = any(n.peak.any() for n in nodes)
    z = edge_offsets[-1]
    n_vars = z + (1 if has_peak else 0)

    c = np.zeros(n_vars)
    mem = np.zeros(n_vars)
    for k, n in enumerate(nodes):
        c[offsets[k]:offsets[k + 1]] = n.time
        mem[offsets[k]:offsets[k + 1]] = n.memory
    upper = np.ones(n_vars)
    for e, start in zip(edges, edge_offsets):
        cost = e.cost.ravel()
        forbidden = ~np.isfinite(cost)
        c[start:start + e.cost.size] = np.where(forbidden, 0.0, cost)
        upper[start:start + e.cost.size][forbidden] = 0.0
    # Memory in units of the budget (or of the largest footprint): bytes run to 1e11, and
    # coefficients that large break HiGHS's tolerances.
    unit = float(memory_budget) if memory_budget else max(float(mem.max()), max((float(n.peak.max()) for n in nodes), default=0.0), 1.0)
    mem /= unit
    if has_peak:
        mem[z] = 1.0
    if objective == "memory":
        c = mem.copy()

    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add_row(entries, low, high):
        nonlocal r
        for col, val in entries:
            rows.append(r)
            cols.append(col)
            vals.append(val)
        lo.append(low)
        hi.append(high)
        r += 1

    for k, n in enumerate(nodes):
        add_row([(offsets[k] + s, 1.0) for s in range(len(n.options))], 1.0, 1.0)
    for e, start in zip(edges, edge_offsets):
        n_rows, n_cols = e.cost.shape
        for a in range(n_rows):
            entries = [(start + a * n_cols + b, 1.0) for b in range(n_cols)]
            entries += [(offsets[e.src] + s, -1.0) for s in np.flatnonzero(e.src_group == a)]
            add_row(entries, 0.0, 0.0)
        for b in range(n_cols):
            entries = [(start + a * n_cols + b, 1.0) for a in range(n_rows)]
            entries += [(offsets[e.dst] + s, -1.0) for s in np.flatnonzero(e.dst_group == b)]
            add_row(entries, 0.0, 0.0)
    if has_peak:
        for k, n in enumerate(nodes):
            if n.peak.any():
                add_row([(z, 1.0)] + [(offsets[k] + s, -float(v) / unit) for s, v in enumerate(n.peak) if v], 0.0, np.inf)
    if memory_budget is not None and objective != "memory":
        add_row([(i, float(v)) for i, v in enumerate(mem) if v], -np.inf, 1.0)

    A = sp.csr_array((vals, (rows, cols)), shape=(r, n_vars))
    integrality = np.zeros(n_vars)
    integrality[:n_x] = 1
    if has_peak:
        upper[z] = np.inf
    options = {"disp": False, "mip_rel_gap": 1e-9}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    # Scale so HiGHS's absolute tolerances do not swallow microsecond differences.
    scale = 1.0 / max(np.abs(c).max(), 1e-30)
    res = milp(c * scale, constraints=LinearConstraint(A, lo, hi), integrality=integrality, bounds=Bounds(0, upper), options=options)
    if res.x is None:
        raise InfeasibleError(f"the layout ILP has no solution ({res.message})")
    x = res.x
    choice = tuple(int(np.argmax(x[offsets[k]:offsets[k + 1]])) for k in range(len(nodes)))
    gap = float(getattr(res, "mip_gap", 0.0) or 0.0)
    status = "optimal" if res.status == 0 else "time limit" if res.status == 1 else res.message
    return Solution(choice, problem.total_time(choice), problem.memory(choice), gap, status)
