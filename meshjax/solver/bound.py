"""Lower bounds from the ILP's linear relaxation, split over the problem's options and edges:
every choice costs at least ``lower`` plus the penalties of its options and of its edges'
layout pairs (the bound behind *reduced-cost fixing*).

The relaxation's duals price every constraint but the "one option per node" rows. What is left
is a Lagrangian problem: one option per node and any value of the other variables, each priced
at its reduced cost ``d``. Its minimum is a lower bound on the ILP valid for *any* duals, so
HiGHS's tolerances cannot make it wrong; a choice's own price exceeds that minimum by
``d[k, s] - min_t d[k, t]`` per chosen option ``s`` of node ``k`` and, per edge, by the
reduced cost of the chosen layout pair less the edge's negative reduced costs.

Example::

    >>> from meshjax import models
    >>> from meshjax.cost.hardware import PROFILES
    >>> from meshjax.solver import build_problem, solve_ilp
    >>> from meshjax.solver.model import build_model
    >>> ex = models.example("gpt-tiny", abstract=True, batch=64)
    >>> problem = build_problem(mj.trace(ex.loss, ex.params, *ex.batch), {"data": 4, "model": 2}, PROFILES["h100-node"], train=True)
    >>> model = build_model(problem)
    >>> lp = lp_bounds(model)
    >>> lp.lower <= solve_ilp(problem).objective * model.factor     # a lower bound
    True

A node's option ``s`` whose ``lp.lower + lp.node_penalty[k][s]`` exceeds a known solution's
cost is in no better choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

from meshjax.errors import InfeasibleError
from meshjax.solver.model import Model


@dataclass(frozen=True)
class LPBounds:
    """In the model's units (``model.factor`` times the problem's)."""

    x: np.ndarray  # the relaxation's solution
    lower: float  # a lower bound on the ILP's optimum
    node_penalty: list[np.ndarray]  # per node, per option; >= 0
    edge_penalty: list[np.ndarray]  # per edge, per (row, column) layout pair; >= 0, inf if forbidden


def lp_bounds(model: Model, time_limit: float | None = None) -> LPBounds | None:
    """Solve ``model``'s relaxation and split its bound (see the module docstring); None when
    HiGHS stops first (``time_limit``, in seconds)."""
    eq = model.row_lower == model.row_upper
    rows_eq = np.flatnonzero(eq)
    rows_le = np.flatnonzero(~eq & np.isfinite(model.row_upper))
    rows_ge = np.flatnonzero(~eq & np.isfinite(model.row_lower))
    A_eq = model.A[rows_eq]
    A_ub = sp.vstack([model.A[rows_le], -model.A[rows_ge]]).tocsr()
    b_eq = model.row_lower[rows_eq]
    b_ub = np.concatenate([model.row_upper[rows_le], -model.row_lower[rows_ge]])
    # HiGHS's presolve costs more than it saves on these LPs (half the time without it).
    options = {"presolve": False}
    if time_limit is not None and math.isfinite(time_limit):
        options["time_limit"] = max(float(time_limit), 0.01)
    res = linprog(
        model.c, A_ub=A_ub if len(b_ub) else None, b_ub=b_ub if len(b_ub) else None, A_eq=A_eq, b_eq=b_eq,
        bounds=np.stack([np.zeros(len(model.c)), model.upper], axis=1), method="highs", options=options,
    )
    if res.status == 2:
        raise InfeasibleError(f"the layout ILP has no solution ({res.message})")
    if res.x is None or res.status != 0:
        return None

    pi_eq = res.eqlin.marginals.copy()
    pi_eq[rows_eq < model.n_nodes] = 0.0  # the node rows stay in the Lagrangian problem
    pi_ub = np.minimum(res.ineqlin.marginals, 0.0) if len(b_ub) else np.zeros(0)
    reduced = model.c - A_eq.T @ pi_eq - (A_ub.T @ pi_ub if len(b_ub) else 0.0)
    n_x = model.n_x
    negative = np.minimum(reduced, 0.0) * model.upper  # the others' cheapest values (upper 0: forbidden)
    constant = float(pi_eq @ b_eq + pi_ub @ b_ub + negative[n_x:].sum())
    cheapest = np.minimum.reduceat(reduced[:n_x], model.offsets[:-1])
    node_penalty = [reduced[a:b] - m for a, b, m in zip(model.offsets[:-1], model.offsets[1:], cheapest)]
    edge_penalty = []
    for a, b, shape in zip(model.edge_offsets[:-1], model.edge_offsets[1:], model.edge_shapes):
        block = np.where(model.upper[a:b] > 0, reduced[a:b] - negative[a:b].sum(), np.inf)
        edge_penalty.append(np.maximum(block, 0.0).reshape(shape))
    return LPBounds(res.x, constant + float(cheapest.sum()), node_penalty, edge_penalty)
