"""The integer program over a :class:`~meshjax.solver.problem.Problem`, as arrays for HiGHS.

Variables: a binary ``x[n, s]`` per node option; per edge a continuous ``y[a, b]`` per pair of
(producer layout, consumer layout) whose row sums equal the producer's chosen layout and whose
column sums equal the consumer's. With the ``x`` binary, the only feasible ``y`` is the chosen
pair, so the edge cost is exact. A memory budget adds one row per memory phase (the backward
pass's, and in training the end-of-step gradient sync's); peaks add one continuous
``z >= peak`` of every chosen option, and ``z >=`` each shared peak row of a rematerialised
block (a sum over its nodes' options, :func:`~meshjax.solver.problem.peak_rows`); minimising memory over both phases minimises one more,
``m`` above both.

Example::

    >>> from meshjax import models
    >>> from meshjax.cost.hardware import PROFILES
    >>> from meshjax.solver.problem import build_problem
    >>> ex = models.example("mlp-tiny", abstract=True, batch=1024)
    >>> problem = build_problem(mj.trace(ex.loss, ex.params, *ex.batch), {"data": 2, "model": 4}, PROFILES["h100-node"])
    >>> model = build_model(problem, memory_budget=80e9)
    >>> res = run_milp(model)
    >>> choice = model.choice(res.x)       # an option per node
    >>> len(choice) == len(problem.nodes)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, OptimizeResult, milp

from meshjax.solver.evaluate import SYNC_PHASES, sync_rows
from meshjax.solver.problem import Problem

# The objective is scaled so the least a choice could cost is OBJECTIVE_SCALE (HiGHS's absolute
# tolerances are then negligible), unless some coefficient would exceed COST_CAP.
OBJECTIVE_SCALE = 1e4
COST_CAP = 1e7


@dataclass(frozen=True)
class Model:
    """``min c @ w`` over ``row_lower <= A @ w <= row_upper``, ``0 <= w <= upper``, the first
    ``n_x`` of ``w`` binary. Rows ``0 .. n_nodes - 1`` say "one option per node"."""

    c: np.ndarray
    A: sp.csr_array
    row_lower: np.ndarray
    row_upper: np.ndarray
    upper: np.ndarray
    offsets: np.ndarray  # node k's x are columns offsets[k]:offsets[k + 1]
    edge_offsets: np.ndarray  # edge e's y are columns edge_offsets[e]:edge_offsets[e + 1], row-major
    edge_shapes: tuple[tuple[int, int], ...]
    factor: float  # c @ w = factor * (the problem's objective)

    @property
    def n_nodes(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_x(self) -> int:
        return int(self.offsets[-1])

    def choice(self, w: np.ndarray) -> tuple[int, ...]:
        return tuple(int(np.argmax(w[a:b])) for a, b in pairwise(self.offsets))


def build_model(problem: Problem, *, memory_budget: float | None = None, objective: str = "time") -> Model:
    """The ILP minimising step time (``objective="memory"``: bytes per device)."""
    nodes, edges = problem.nodes, problem.edges
    sizes = np.array([len(n.options) for n in nodes], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n_x = int(offsets[-1])
    edge_offsets = n_x + np.concatenate([[0], np.cumsum([e.cost.size for e in edges], dtype=np.int64)])
    shared = _shared_rows(problem)
    has_peak = any(n.peak.any() for n in nodes) or bool(shared)
    has_sync = any(n.sync is not None and n.sync.any() for n in nodes)
    z = int(edge_offsets[-1])
    n_vars = z + int(has_peak)
    # objective="memory" with a sync row minimises one more variable, m >= either memory row.
    m = n_vars if has_sync and objective == "memory" else None
    n_vars += m is not None

    c = np.zeros(n_vars)
    mem = np.zeros(n_vars)
    upper = np.ones(n_vars)
    sync = np.zeros((len(SYNC_PHASES), n_vars))  # a row per phase
    if nodes:
        c[:n_x] = np.concatenate([n.time for n in nodes])
        mem[:n_x] = np.concatenate([n.memory for n in nodes])
        if has_sync:
            sync[:, :n_x] = np.concatenate([sync_rows(n) for n in nodes]).T
    for e, start in zip(edges, edge_offsets):
        cost = e.cost.ravel()
        forbidden = ~np.isfinite(cost)
        c[start:start + cost.size] = np.where(forbidden, 0.0, cost)
        upper[start:start + cost.size][forbidden] = 0.0
        if e.memory is not None:
            mem[start:start + cost.size] = np.where(forbidden, 0.0, e.memory.ravel())
    # Memory in units of the budget (or of the largest footprint): bytes run to 1e11, and
    # coefficients that large break HiGHS's tolerances.
    peak_max = max([float(n.peak.max()) for n in nodes] + [sum(float(v.max()) for _, v in row) for row in shared.values()], default=0.0)
    unit = float(memory_budget) if memory_budget else max(float(mem.max(initial=0.0)), float(sync.max(initial=0.0)), peak_max, 1.0)
    mem /= unit
    sync /= unit
    if has_peak:
        mem[z] = 1.0
        upper[z] = peak_max / unit  # no choice needs z above its largest peak
    factor = 1.0 / unit if objective == "memory" else 1.0
    if objective == "memory":
        c = mem.copy()
        if m is not None:
            c = np.zeros(n_vars)
            c[m] = 1.0
            # No choice needs more than the larger row at every node's largest option.
            most = lambda row: sum(float(row[a:b].max(initial=0.0)) for a, b in pairwise([*offsets, *edge_offsets[1:]]))  # noqa: E731
            upper[m] = max(most(mem) + (mem[z] * upper[z] if has_peak else 0.0), *map(most, sync))

    # One option per node: rows 0 .. len(nodes) - 1.
    rows, cols, vals = [np.repeat(np.arange(len(nodes)), sizes)], [np.arange(n_x)], [np.ones(n_x)]
    lower, upper_rows = [np.ones(len(nodes))], [np.ones(len(nodes))]
    r = len(nodes)
    for e, start in zip(edges, edge_offsets):
        n_rows, n_cols = e.cost.shape
        a, b = np.divmod(np.arange(e.cost.size), n_cols)
        y = start + np.arange(e.cost.size)
        # Row a: sum_b y[a, b] = x of the producer options in group a; column b likewise.
        rows += [r + a, r + n_rows + b, r + e.src_group, r + n_rows + e.dst_group]
        cols += [y, y, offsets[e.src] + np.arange(len(e.src_group)), offsets[e.dst] + np.arange(len(e.dst_group))]
        vals += [np.ones(e.cost.size), np.ones(e.cost.size), -np.ones(len(e.src_group)), -np.ones(len(e.dst_group))]
        lower.append(np.zeros(n_rows + n_cols))
        upper_rows.append(np.zeros(n_rows + n_cols))
        r += n_rows + n_cols
    if has_peak:
        for k, n in enumerate(nodes):
            nz = np.flatnonzero(n.peak)
            if len(nz):
                rows += [np.array([r]), np.full(len(nz), r)]
                cols += [np.array([z]), offsets[k] + nz]
                vals += [np.ones(1), -n.peak[nz] / unit]
                lower.append(np.zeros(1))
                upper_rows.append(np.full(1, np.inf))
                r += 1
        for row in shared.values():  # z >= a rematerialised block's shared peak row
            rows.append(np.array([r]))
            cols.append(np.array([z]))
            vals.append(np.ones(1))
            for k, values in row:
                nz = np.flatnonzero(values)
                rows.append(np.full(len(nz), r))
                cols.append(offsets[k] + nz)
                vals.append(-values[nz] / unit)
            lower.append(np.zeros(1))
            upper_rows.append(np.full(1, np.inf))
            r += 1
    if memory_budget is not None and objective != "memory":
        for row in (mem, *sync) if has_sync else (mem,):
            nz = np.flatnonzero(row)
            rows.append(np.full(len(nz), r))
            cols.append(nz)
            vals.append(row[nz])
            lower.append(np.full(1, -np.inf))
            upper_rows.append(np.ones(1))
            r += 1
    if m is not None:  # m - mem @ w >= 0 and m - sync @ w >= 0 (every phase)
        for row in (mem, *sync):
            nz = np.flatnonzero(row)
            rows += [np.array([r]), np.full(len(nz), r)]
            cols += [np.array([m]), nz]
            vals += [np.ones(1), -row[nz]]
            lower.append(np.zeros(1))
            upper_rows.append(np.full(1, np.inf))
            r += 1
    A = sp.csr_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, n_vars))
    # HiGHS's absolute tolerances (1e-6 on the MIP gap, 1e-7 on reduced costs) once made it
    # stop 4e-5 short of the optimum on GPT-3 175B: scale them to nothing.
    floor = sum(float(c[a:b].min()) for a, b in pairwise(offsets) if b > a)
    floor += sum(float(c[a:b][upper[a:b] > 0].min(initial=np.inf)) for a, b in pairwise(edge_offsets))
    largest = float(np.abs(c).max(initial=0.0))
    scale = min(OBJECTIVE_SCALE / floor if 0 < floor < math.inf else math.inf, COST_CAP / max(largest, 1e-300))
    return Model(
        c * scale, A, np.concatenate(lower), np.concatenate(upper_rows), upper, offsets, edge_offsets,
        tuple(e.cost.shape for e in edges), factor * scale,
    )


def _shared_rows(problem: Problem) -> dict[int, list[tuple[int, np.ndarray]]]:
    """Each shared peak row (:attr:`~meshjax.solver.problem.Node.shares`): its (node, values)."""
    out: dict[int, list[tuple[int, np.ndarray]]] = {}
    for k, n in enumerate(problem.nodes):
        for row, values in (n.shares or {}).items():
            out.setdefault(row, []).append((k, values))
    return out


def run_milp(model: Model, time_limit: float | None = None) -> OptimizeResult:
    """HiGHS on ``model``; ``time_limit`` in seconds."""
    integrality = np.zeros(len(model.c))
    integrality[:model.n_x] = 1
    options = {"disp": False, "mip_rel_gap": 1e-9}
    if time_limit is not None and math.isfinite(time_limit):
        options["time_limit"] = max(float(time_limit), 0.01)
    return milp(
        model.c, constraints=LinearConstraint(model.A, model.row_lower, model.row_upper),
        integrality=integrality, bounds=Bounds(0, model.upper), options=options,
    )
