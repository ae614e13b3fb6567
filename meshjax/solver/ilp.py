"""The exact layout solver: reductions, relaxation bounds, and HiGHS for what is left.

The integer program (:mod:`meshjax.solver.model`) is exact, but when a memory budget binds its
relaxation mixes fast and lean layouts and HiGHS branches for seconds. So the problem is first
made smaller without losing its optimum, in rounds:

1. :func:`~meshjax.solver.reduce.reduce_problem` prunes over-budget and dominated options and
   merges adjacent nodes;
2. the relaxation is solved: the best choice among the few options it uses (found by the same
   reductions, or a small ILP) is a known solution, and its duals split a lower bound over
   options and edges (:mod:`meshjax.solver.bound`);
3. the next reduction drops every option, and every merged pair, whose share of the bound
   already exceeds the known solution, which lets it merge far more.

Rounds end when one node is left (its best option is the optimum), when the known solution
meets the bound, or when a round no longer shrinks the problem; HiGHS then solves what is left.
On GPT-3 175B at 80 GB per device this takes 0.3 s where HiGHS alone takes 5 s.

Example::

    >>> from meshjax import models
    >>> from meshjax.cost.hardware import PROFILES
    >>> from meshjax.solver.problem import build_problem
    >>> ex = models.example("gpt-tiny", abstract=True)
    >>> problem = build_problem(mj.trace(ex.loss, ex.params, *ex.batch), {"data": 8}, PROFILES["cpu-sim"], train=True)
    >>> result = solve_ilp(problem, memory_budget=1e9, time_limit=10)
    >>> result.status, result.gap, result.objective == problem.total_time(result.choice)
    ('optimal', 0.0, True)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from meshjax.errors import InfeasibleError
from meshjax.solver.bound import lp_bounds
from meshjax.solver.model import build_model, run_milp
from meshjax.solver.evaluate import sync_rows
from meshjax.solver.problem import Problem
from meshjax.solver.reduce import (
    BUDGET_TOLERANCE,
    Known,
    Reduction,
    reduce_problem,
    restrict,
)

# Tuned on GPT-3 175B and 1.3B and on budgeted GPT, Llama, MoE and MLP presets on 8 devices.
# The first reduction merges nodes while a merge makes at most MAX_PAIRS option pairs; each
# round after it GROWTH times more (up to MAX_PAIRS_CAP), as the bounds keep merged nodes small.
MAX_PAIRS = 600
GROWTH = 2
MAX_PAIRS_CAP = 4800
MAX_ROUNDS = 8
# Two nodes left with at most this many option pairs are solved by trying every pair.
LAST_PAIRS = 1_000_000
# What is left goes to HiGHS once a round keeps more than SHRINK of the ILP's variables.
SHRINK = 0.75
# ... merged, unless the problem had at most SMALL options.
SMALL = 300
# Relative margin on dropping options: the bounds are exact up to floating-point sums.
MARGIN = 1e-9
# HiGHS accepts a budget row violated by this much (its MIP feasibility tolerance).
HIGHS_FEASIBILITY = 1e-6


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
    cutoff: float = math.inf,
) -> Solution | None:
    """Minimise predicted step time (or, with ``objective="memory"``, bytes per device).

    ``cutoff``: a value the caller already has; None is returned as soon as a lower bound
    proves no choice is below it (what :mod:`meshjax.levers` needs to skip a lever choice).
    """
    deadline = math.inf if time_limit is None else time.perf_counter() + float(time_limit)
    search = _Search(problem, memory_budget if objective == "time" else None, objective, deadline)
    search.cutoff = cutoff
    proven = search.run(Reduction.identity(problem))
    if search.cut:
        return None
    return search.solution(proven=proven)


class _Search:
    """The rounds of :func:`solve_ilp`, the best choice found so far and the best lower bound
    on the optimum (both in the problem's units)."""

    def __init__(self, problem: Problem, budget: float | None, objective: str, deadline: float):
        self.problem = problem
        self.budget = budget
        self.objective = objective
        self.deadline = deadline
        self.best: tuple[int, ...] | None = None
        self.best_value = math.inf
        self.lower = -math.inf
        self.message = ""
        self.cutoff = math.inf
        self.cut = False

    def run(self, current: Reduction) -> bool:
        """Search ``current`` (which keeps an optimum); True when the best found is proven optimal."""
        # HiGHS is often slower on merged nodes than on the nodes they replace: a small problem
        # goes to it unmerged if the rounds do not finish it.
        unmerged = self._reduce(current, 0) if sum(len(n.options) for n in current.problem.nodes) <= SMALL else None
        current = self._reduce(current, MAX_PAIRS)
        stalled = False
        for step in range(1, MAX_ROUNDS + 1):
            if _enumerable(current.problem):
                self._offer_last(current)
                return True
            if stalled or self._remaining() <= 0:
                break
            model = build_model(current.problem, memory_budget=self.budget, objective=self.objective)
            lp = lp_bounds(model, self._remaining())
            if lp is None:
                break
            per_node = list(pairwise(model.offsets))
            self._incumbent(current.then(restrict(current.problem, [np.flatnonzero(lp.x[a:b] > 1e-9) for a, b in per_node])))
            lower = lp.lower / model.factor
            self._bound(lower)
            if min(lower, self.best_value) >= self.cutoff:
                self.cut = True  # nothing here beats what the caller has
                return False
            if self._proven():
                return True
            known = Known(
                [p / model.factor for p in lp.node_penalty], [p / model.factor for p in lp.edge_penalty],
                min(self.best_value, self.cutoff) - lower + MARGIN * abs(min(self.best_value, self.cutoff)),
            )
            try:
                reduced = self._reduce(current, min(MAX_PAIRS * GROWTH**step, MAX_PAIRS_CAP), known)
            except InfeasibleError:
                return self.best is not None  # nothing beats the best found
            stalled = _size(reduced.problem) > SHRINK * len(model.c)
            current = reduced
        return self._milp(unmerged or current, complete=True) or self._proven()

    def _reduce(self, current: Reduction, max_pairs: int, known: Known | None = None) -> Reduction:
        return current.then(
            reduce_problem(current.problem, memory_budget=self.budget, objective=self.objective, max_pairs=max_pairs, known=known)
        )

    def _remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def _incumbent(self, restricted: Reduction) -> None:
        """Offer the best choice of a few options (those the relaxation uses), if any fits."""
        try:
            restricted = self._reduce(restricted, MAX_PAIRS)
        except InfeasibleError:
            return
        if _enumerable(restricted.problem):
            self._offer_last(restricted)
        else:
            self._milp(restricted, complete=False)

    def _offer(self, choice: tuple[int, ...], tolerance: float = BUDGET_TOLERANCE) -> None:
        if self.budget is not None and self.problem.memory(choice) > self.budget * (1 + tolerance):
            return
        value = self.problem.total_time(choice) if self.objective == "time" else self.problem.memory(choice)
        if value < self.best_value:
            self.best, self.best_value = choice, value

    def _offer_last(self, reduction: Reduction) -> None:
        """Offer the best choice of a problem reduced to one node, or to two (every pair of
        their options is tried)."""
        nodes = reduction.problem.nodes
        if len(nodes) == 1:
            choices = [np.arange(len(nodes[0].options))]
            step_time, memory, peak = nodes[0].time, nodes[0].memory, nodes[0].peak
            for values in (nodes[0].shares or {}).values():
                peak = np.maximum(peak, values)
            sync = _sync(nodes[0])
        else:
            choices = list(np.divmod(np.arange(len(nodes[0].options) * len(nodes[1].options)), len(nodes[1].options)))
            step_time = nodes[0].time[choices[0]] + nodes[1].time[choices[1]]
            memory = nodes[0].memory[choices[0]] + nodes[1].memory[choices[1]]
            for e in reduction.problem.edges:
                step_time = step_time + e.cost[e.src_group[choices[e.src]], e.dst_group[choices[e.dst]]]
                if e.memory is not None:
                    memory = memory + e.memory[e.src_group[choices[e.src]], e.dst_group[choices[e.dst]]]
            peak = np.maximum(nodes[0].peak[choices[0]], nodes[1].peak[choices[1]])
            shared: dict[int, np.ndarray] = {}
            for node, c in zip(nodes, choices):
                for row, values in (node.shares or {}).items():
                    shared[row] = shared.get(row, 0.0) + values[c]
            for values in shared.values():
                peak = np.maximum(peak, values)
            sync = _sync(nodes[0])[choices[0]] + _sync(nodes[1])[choices[1]]
        total = np.maximum(memory + peak, sync.max(axis=1))
        fits = np.isfinite(step_time)
        if self.budget is not None:
            fits &= total <= self.budget * (1 + BUDGET_TOLERANCE)
        if fits.any():
            value = step_time if self.objective == "time" else total
            best = np.flatnonzero(fits)[np.argmin(value[fits])]
            self._offer(reduction.expand([int(c[best]) for c in choices]))

    def _bound(self, lower: float) -> None:
        """Take a lower bound on the optimum of a problem that keeps every choice better than
        the best so far: the optimum is at least the smaller of the two."""
        self.lower = max(self.lower, min(lower, self.best_value))

    def _milp(self, reduction: Reduction, *, complete: bool) -> bool:
        """Solve ``reduction``'s problem with HiGHS and offer its answer. ``complete``: the
        problem keeps every choice better than the best so far, so HiGHS's bound is one on the
        optimum, and a proven answer proves the optimum (returns True)."""
        model = build_model(reduction.problem, memory_budget=self.budget, objective=self.objective)
        res = run_milp(model, self._remaining())
        self.message = res.message
        if res.x is not None:
            self._offer(reduction.expand(model.choice(res.x)), HIGHS_FEASIBILITY)
        if not complete:
            return False
        bound = getattr(res, "mip_dual_bound", None)
        if bound is not None and np.isfinite(bound):
            self._bound(float(bound) / model.factor)
        return res.status == 0 or (res.status == 2 and self.best is not None)  # 2: nothing better

    def _proven(self) -> bool:
        return self.best_value <= self.lower + MARGIN * abs(self.lower)

    def solution(self, proven: bool) -> Solution:
        if self.best is None:
            raise InfeasibleError(f"the layout ILP has no solution ({self.message or 'no choice fits the memory budget'})")
        if proven or self.best_value == 0:
            gap = 0.0
        else:
            gap = max(0.0, (self.best_value - self.lower) / abs(self.best_value))  # inf: no bound yet
        status = "optimal" if proven else "time limit"
        return Solution(self.best, self.problem.total_time(self.best), self.problem.memory(self.best), gap, status)


def _size(problem: Problem) -> int:
    """Variables of ``problem``'s ILP, less the one for the peak."""
    return sum(len(n.options) for n in problem.nodes) + sum(e.cost.size for e in problem.edges)


def _enumerable(problem: Problem) -> bool:
    """One node left, or two with few enough option pairs to try them all."""
    sizes = [len(n.options) for n in problem.nodes]
    return len(sizes) == 1 or (len(sizes) == 2 and sizes[0] * sizes[1] <= LAST_PAIRS)


def _sync(node) -> np.ndarray:
    """A node's sync memory, options x phases (zeros where it has none)."""
    return sync_rows(node)
