"""The layout solver: the decision problem, the exact ILP, the exhaustive oracle, mesh search."""

from meshjax.solver.ilp import Solution, solve_ilp
from meshjax.solver.oracle import solve_exhaustive
from meshjax.solver.problem import Constraints, Problem, build_problem

__all__ = ["Solution", "solve_ilp", "solve_exhaustive", "Constraints", "Problem", "build_problem"]
