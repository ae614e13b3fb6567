"""Exhaustive search over every combination of node options: the reference the ILP is tested
against. It scores choices with the same :class:`~meshjax.solver.problem.Problem` methods.

Example::

    >>> from meshjax.cost.hardware import PROFILES
    >>> from meshjax.solver import build_problem, solve_ilp
    >>> sizes = {"batch": 256, "embed": 512, "mlp": 1024}
    >>> def f(params, x):
    ...     return mj.sum(mj.einsum("batch embed, embed mlp -> batch mlp", x, params["w"]), "batch mlp")
    >>> graph = mj.trace(f, mj.abstract_params({"w": mj.param("embed mlp")}, sizes), mj.abstract("batch embed", sizes))
    >>> problem = build_problem(graph, {"data": 2, "model": 4}, PROFILES["cpu-sim"], train=True)
    >>> best = solve_exhaustive(problem)
    >>> abs(best.objective - solve_ilp(problem).objective) <= 1e-9 * best.objective
    True
"""

from __future__ import annotations

import itertools
import math

from meshjax.errors import InfeasibleError
from meshjax.solver.ilp import Solution
from meshjax.solver.problem import Problem


def solve_exhaustive(problem: Problem, *, memory_budget: float | None = None, max_combinations: int = 2_000_000) -> Solution:
    """The best choice by brute force; refuses problems with more than ``max_combinations``."""
    sizes = [len(n.options) for n in problem.nodes]
    total = math.prod(sizes)
    if total > max_combinations:
        raise ValueError(f"{total} combinations: too many for exhaustive search")
    best, best_time = None, math.inf
    for choice in itertools.product(*(range(s) for s in sizes)):
        if memory_budget is not None and problem.memory(choice) > memory_budget * (1 + 1e-9):
            continue
        t = problem.total_time(choice)
        if t < best_time:  # inf: a forbidden combination
            best, best_time = choice, t
    if best is None:
        raise InfeasibleError("no combination fits the memory budget")
    return Solution(tuple(best), best_time, problem.memory(best), 0.0, "optimal")
