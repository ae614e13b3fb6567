"""Choosing the memory levers with the layouts: a rematerialisation policy per repeated block
and the number of micro-batches.

For a fixed micro-batch count ``k`` and policy per block, the layouts are the layout ILP's
(:func:`~meshjax.solver.ilp.solve_ilp`) with the policies' terms in its coefficients
(:mod:`meshjax.cost.remat`, :mod:`meshjax.microbatch`), solved exactly. Around it:

- *policies*: every assignment of ``none`` / ``selective`` / ``full`` to the scan bodies
  (``auto``; unrolled blocks keep ``none`` unless forced), leanest first under a budget, so the
  first plan found is a cutoff: a later assignment's ILP stops as soon as its relaxation bound
  proves it cannot beat the best plan (``solve_ilp(cutoff=...)``);
- *micro-batches*: for each assignment, the fewest micro-batches that fit. Counts are screened
  before any problem is built with a memory lower bound scaled from one micro-batch
  (batch-sized bytes shrink by ``k``). More micro-batches run the same layouts with more
  collective launches and weight re-gathers, so they are slower for a fixed layout; the search
  does not prove that no larger count unlocks a faster layout.

Without a budget the levers only cost time: ``auto`` is no recompute and one micro-batch.

Example: the levers forced (``"auto"`` chooses them under a budget)::

    >>> import meshjax as mj
    >>> from meshjax import models
    >>> from meshjax.solve import solve
    >>> ex = models.example("gpt-tiny", abstract=True, scan_layers=True)
    >>> graph = mj.trace(ex.loss, ex.params, *ex.batch)
    >>> plan = solve(graph, {"data": 4, "model": 2}, train=True, remat="full", microbatches=2)
    >>> plan.remat, plan.microbatches
    ({'blocks': 'full'}, 2)

Under a budget that binds, ``"auto"`` trades time for memory; for GPT-3 175B at global batch
1536 on 8x8 H100s under 80 GB it chooses full recompute and 12 micro-batches (``meshjax plan
gpt3-175b ... --json``: ``"remat": {"blocks": "full"}, "microbatches": 12``).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping

import numpy as np

from meshjax.cost.remat import POLICIES, remat_units
from meshjax.errors import InfeasibleError, MeshjaxError
from meshjax.graph import Graph
from meshjax.microbatch import BATCH_DIM, candidates, split_batch
from meshjax.solver.ilp import Solution, solve_ilp
from meshjax.solver.problem import Problem
from meshjax.solver.reduce import BUDGET_TOLERANCE

Build = Callable[..., Problem]  # (graph, policies, k, cache, edges=True) -> Problem


def policy_assignments(graph: Graph, remat: str | Mapping[str, str], train: bool) -> list[dict[str, str]]:
    """Every policy per block ``remat`` allows, the fastest (no recompute) first."""
    units = list(remat_units(graph)) if train else []
    if isinstance(remat, Mapping):
        unknown = set(remat) - set(units)
        if unknown:
            raise MeshjaxError(f"remat: no repeated block {sorted(unknown)[0]!r} (blocks: {', '.join(units) or 'none'})")
        bad = [p for p in remat.values() if p not in POLICIES]
        if bad:
            raise MeshjaxError(f"remat policy {bad[0]!r}: expected one of {', '.join(POLICIES)}")
        return [{u: remat.get(u, "none") for u in units}]
    if remat == "auto":
        # Only scan bodies: XLA schedules an unrolled block's recomputation wherever it likes
        # (measured on XLA:CPU: all of it at the start of the backward pass, saving nothing),
        # while a scan runs it one iteration at a time. ``--remat`` still forces unrolled ones.
        chosen = [u for u in units if graph.blocks[u].kind == "scan"]
        combos = itertools.product(POLICIES, repeat=len(chosen))
        ordered = sorted(combos, key=lambda c: sorted(POLICIES.index(p) for p in c)[::-1])
        return [{u: dict(zip(chosen, c)).get(u, "none") for u in units} for c in ordered]
    if remat not in POLICIES:
        raise MeshjaxError(f"remat {remat!r}: expected auto or one of {', '.join(POLICIES)}")
    return [{u: remat for u in units}]


def microbatch_counts(graph: Graph, microbatches: int | str, train: bool) -> list[int]:
    """The micro-batch counts to consider, ascending."""
    if microbatches == "auto":
        return candidates(graph, BATCH_DIM) if train and any(BATCH_DIM in t.dims for t in graph.inputs) else [1]
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise MeshjaxError(f"microbatches {microbatches!r}: expected auto or a positive integer")
    if microbatches > 1 and not train:
        raise MeshjaxError(f"microbatches {microbatches}: micro-batches apply to training only")
    return [microbatches]


def least_memory(problem: Problem) -> float:
    """No choice of ``problem`` needs less memory than this."""
    resident = sum(float(n.memory.min()) for n in problem.nodes)
    return resident + problem.least_peak()


def least_time(problem: Problem) -> float:
    """No choice of ``problem`` is faster than this."""
    t = sum(float(n.time.min()) for n in problem.nodes)
    for e in problem.edges:
        finite = e.cost[np.isfinite(e.cost)]
        t += float(finite.min()) if finite.size else math.inf
    return t


def _scaled_memory(problem: Problem, dim: str) -> Callable[[int], float]:
    """A lower bound on the memory at ``k`` micro-batches from a problem at one: batch-sized
    activations shrink by ``k``, the rest stays."""
    fixed = scaled = peak = 0.0
    for n in problem.nodes:
        batchy = n.op is not None and dim in n.tensor.dims
        if batchy:
            scaled += float(n.memory.min())
        else:
            fixed += float(n.memory.min())
        peak = max(peak, float(n.peak.min()) if not batchy else 0.0)
    batch_peak = max((float(n.peak.min()) for n in problem.nodes if n.op is not None and dim in n.tensor.dims), default=0.0)
    # A rematerialised block's shared peak rows are counted as if all batch-sized (a lower bound).
    batch_peak = max(batch_peak, problem.least_peak())
    return lambda k: fixed + scaled / k + max(peak, batch_peak / k)


def search(
    graph: Graph,
    build: Build,
    *,
    train: bool,
    remat: str | Mapping[str, str],
    microbatches: int | str,
    memory_budget: float | None,
    time_limit: float | None,
    infeasible: Callable[[Problem, float], Exception],
) -> tuple[Problem, Solution]:
    """The fastest (problem, solution) over the allowed micro-batch counts and policies."""
    deadline = math.inf if time_limit is None else time.perf_counter() + time_limit
    assignments = policy_assignments(graph, remat, train)
    ks = microbatch_counts(graph, microbatches, train)
    if memory_budget is None:  # the levers only add time
        if remat == "auto":
            assignments = assignments[:1]
        if microbatches == "auto":
            ks = [1]
    else:
        # Under a budget the leanest policies fit soonest: their plan is a cutoff for the rest.
        assignments = assignments[::-1]
    searching = len(ks) > 1 or len(assignments) > 1
    limit = memory_budget * (1 + BUDGET_TOLERANCE) if memory_budget is not None else math.inf

    def remaining() -> float | None:
        return None if time_limit is None else max(deadline - time.perf_counter(), 0.01)

    best: tuple[Problem, Solution] | None = None
    best_time = math.inf
    leanest: Problem | None = None
    cache: dict = {}  # strategies and reshard times, shared by every build
    fastest = assignments[-1] if memory_budget is not None else assignments[0]
    if (searching and memory_budget is not None and 1 in ks and all(p == "none" for p in fastest.values())
            and least_memory(build(graph, fastest, 1, cache, edges=False)) <= limit):
        # The fastest levers (no recompute, one micro-batch) solved with no budget: when that
        # plan fits, nothing is faster, and the search is over.
        problem = build(graph, fastest, 1, cache)
        free = solve_ilp(problem, time_limit=remaining())
        if free.memory <= limit:
            return problem, free
    for policies in assignments:
        screen = None
        if len(ks) > 1 and memory_budget is not None:
            screen = _scaled_memory(build(graph, policies, 1, cache, edges=False), BATCH_DIM)
        for k in ks:
            if screen is not None and screen(k) > limit:
                continue
            g = split_batch(graph, k, BATCH_DIM)
            if searching and least_memory(build(g, policies, k, cache, edges=False)) > limit:
                continue
            problem = build(g, policies, k, cache)
            leanest = problem
            if searching and least_time(problem) >= best_time:
                break  # more micro-batches only add time
            try:
                solution = solve_ilp(problem, memory_budget=memory_budget, time_limit=remaining(), cutoff=best_time)
            except InfeasibleError:
                if memory_budget is None:
                    raise
                continue
            if solution is not None and solution.objective < best_time:
                best, best_time = (problem, solution), solution.objective
            break  # the fewest micro-batches that fit these policies
    if best is None:
        if leanest is None:  # every k was screened out before building
            leanest = build(split_batch(graph, ks[-1], BATCH_DIM), assignments[-1], ks[-1], {})
        raise infeasible(leanest, memory_budget)
    return best
