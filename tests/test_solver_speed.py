"""The solver's shortcuts (reductions, relaxation bounds, rounds) keep the optimum that brute
force and the plain integer program find."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_solver import einsum_graphs

import meshjax as mj
from meshjax import models
from meshjax.cost import get_hardware
from meshjax.solver import build_problem, ilp, solve_exhaustive, solve_ilp
from meshjax.solver.bound import lp_bounds
from meshjax.solver.model import build_model, run_milp
from meshjax.solver.reduce import Known, reduce_problem

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def all_choices(problem):
    """Every choice that runs: none with a forbidden reshard (infinite time)."""
    return (c for c in itertools.product(*(range(len(n.options)) for n in problem.nodes)) if math.isfinite(problem.total_time(c)))


@st.composite
def budgeted_problems(draw):
    """A random small problem and a memory budget (None, or between its least and most memory)."""
    graph = draw(einsum_graphs())
    mesh = draw(st.sampled_from([{"x": 4}, {"x": 2}, {"x": 2, "y": 2}]))
    problem = build_problem(graph, mesh, get_hardware(draw(st.sampled_from(["h100-node", "cpu-sim"]))), train=draw(st.booleans()))
    assume(math.prod(len(n.options) for n in problem.nodes) <= 4_000)
    fraction = draw(st.sampled_from([None, 0.1, 0.6]))
    if fraction is None:
        return problem, None
    memories = [problem.memory(c) for c in all_choices(problem)]
    return problem, min(memories) + fraction * (max(memories) - min(memories))


@SETTINGS
@given(case=budgeted_problems(), max_pairs=st.sampled_from([0, 6, 10**6]))
def test_reductions_keep_the_exhaustive_optimum(case, max_pairs):
    problem, budget = case
    best = solve_exhaustive(problem, memory_budget=budget)
    reduced = reduce_problem(problem, memory_budget=budget, max_pairs=max_pairs)
    if max_pairs == 10**6:
        assert len(reduced.problem.nodes) == 1  # merged to one node: the answer is read off
    found = solve_exhaustive(reduced.problem, memory_budget=budget)
    choice = reduced.expand(found.choice)
    assert found.objective == pytest.approx(best.objective, rel=1e-9, abs=1e-18)
    assert problem.total_time(choice) == pytest.approx(best.objective, rel=1e-9, abs=1e-18)
    assert reduced.problem.memory(found.choice) == pytest.approx(problem.memory(choice), rel=1e-12)
    if budget is not None:
        assert problem.memory(choice) <= budget * (1 + 1e-9)


@SETTINGS
@given(case=budgeted_problems(), max_pairs=st.sampled_from([0, 6, 10**6]))
def test_pruning_by_the_relaxation_bound_keeps_an_optimum(case, max_pairs):
    problem, budget = case
    best = solve_exhaustive(problem, memory_budget=budget)
    model = build_model(problem, memory_budget=budget)
    lp = lp_bounds(model)
    # The tightest slack a known choice can give: the optimum itself is the known choice.
    known = Known(
        [p / model.factor for p in lp.node_penalty], [p / model.factor for p in lp.edge_penalty],
        best.objective - lp.lower / model.factor + 1e-9 * best.objective,
    )
    reduced = reduce_problem(problem, memory_budget=budget, max_pairs=max_pairs, known=known)
    found = solve_exhaustive(reduced.problem, memory_budget=budget)
    assert problem.total_time(reduced.expand(found.choice)) == pytest.approx(best.objective, rel=1e-9, abs=1e-18)


@SETTINGS
@given(case=budgeted_problems())
def test_relaxation_bound_split_over_options_and_edges_is_below_every_choice(case):
    problem, budget = case
    model = build_model(problem, memory_budget=budget)
    lp = lp_bounds(model)
    best = math.inf
    for choice in all_choices(problem):
        value = problem.total_time(choice)
        if not math.isfinite(value) or (budget is not None and problem.memory(choice) > budget):
            continue
        bound = lp.lower + sum(p[c] for p, c in zip(lp.node_penalty, choice))
        bound += sum(p[e.src_group[choice[e.src]], e.dst_group[choice[e.dst]]] for p, e in zip(lp.edge_penalty, problem.edges))
        assert bound / model.factor <= value * (1 + 1e-7) + 1e-18
        best = min(best, value)
    assert lp.lower / model.factor <= best * (1 + 1e-7)


@SETTINGS
@given(case=budgeted_problems(), knobs=st.sampled_from([(0, 0, 0), (6, 0, 0), (600, 300, 1_000_000)]))
def test_solve_ilp_in_rounds_finds_the_exhaustive_optimum(case, knobs):
    problem, budget = case
    best = solve_exhaustive(problem, memory_budget=budget)
    with pytest.MonkeyPatch.context() as patch:  # (0, 0, 0): HiGHS gets what the rounds leave
        for name, value in zip(("MAX_PAIRS", "SMALL", "LAST_PAIRS"), knobs):
            patch.setattr(ilp, name, value)
        found = solve_ilp(problem, memory_budget=budget)
        least = solve_ilp(problem, objective="memory")
    assert found.status == "optimal" and found.gap == 0.0
    assert found.objective == pytest.approx(best.objective, rel=1e-6, abs=1e-15)
    assert found.objective == pytest.approx(problem.total_time(found.choice))
    if budget is not None:
        assert found.memory <= budget * (1 + 1e-9)
    assert least.memory == pytest.approx(min(problem.memory(c) for c in all_choices(problem)), rel=1e-9)


def test_gpt_under_a_binding_budget_matches_the_plain_integer_program():
    ex = models.example("gpt-tiny", abstract=True)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    problem = build_problem(graph, {"data": 4, "model": 2}, get_hardware("h100-node"), train=True)
    least = solve_ilp(problem, objective="memory").memory
    free = solve_ilp(problem)
    budget = least + 0.3 * (free.memory - least)
    assert free.memory > budget

    model = build_model(problem, memory_budget=budget)
    plain = problem.total_time(model.choice(run_milp(model).x))
    reduced = reduce_problem(problem, memory_budget=budget)
    assert sum(len(n.options) for n in reduced.problem.nodes) < sum(len(n.options) for n in problem.nodes) or len(
        reduced.problem.nodes
    ) < len(problem.nodes)
    fast = solve_ilp(problem, memory_budget=budget)
    assert fast.status == "optimal" and fast.gap == 0.0
    assert fast.objective == pytest.approx(plain, rel=1e-9)
    assert fast.memory <= budget
    assert fast.objective > free.objective  # the budget binds
    with pytest.MonkeyPatch.context() as patch:  # one round, then HiGHS on what is left
        patch.setattr(ilp, "SHRINK", 0.0)
        patch.setattr(ilp, "LAST_PAIRS", 0)
        one_round = solve_ilp(problem, memory_budget=budget)
    assert one_round.status == "optimal"
    assert one_round.objective == pytest.approx(plain, rel=1e-9)


def test_time_limit_still_returns_the_best_layout_found_with_its_gap():
    ex = models.example("gpt-tiny", abstract=True)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    problem = build_problem(graph, {"data": 4, "model": 2}, get_hardware("h100-node"), train=True)
    result = solve_ilp(problem, memory_budget=0.5 * solve_ilp(problem).memory, time_limit=5)
    assert result.status in ("optimal", "time limit")
    assert result.gap >= 0
    assert len(result.choice) == len(problem.nodes)
    assert all(0 <= c < len(n.options) for c, n in zip(result.choice, problem.nodes))
    assert np.isfinite(result.objective)
