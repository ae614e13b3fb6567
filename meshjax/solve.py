"""Solving: ``solve`` builds the decision problem of a graph on a mesh, has the ILP choose, and
returns the :class:`~meshjax.plan.Plan`; ``search_meshes`` does so for every factorisation of a
device count. When a memory budget cannot be met, the error says what the least memory is and
which tensors dominate it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from jax.sharding import Mesh

from meshjax.cost.hardware import Hardware, get_hardware
from meshjax.cost.memory import kept_copies
from meshjax.cost.strategies import per_device_bytes
from meshjax.errors import InfeasibleError
from meshjax.graph import Graph
from meshjax.plan import Plan
from meshjax.solver.evaluate import op_costs
from meshjax.solver.ilp import Solution, solve_ilp
from meshjax.solver.problem import Constraints, Problem, build_problem
from meshjax.units import format_bytes


def plan_from_choice(problem: Problem, solution: Solution, solve_time: float, memory_budget: float | None = None) -> Plan:
    return Plan(
        graph=problem.graph,
        mesh_shape=problem.mesh_shape,
        hardware=problem.hardware,
        train=problem.train,
        layouts=problem.layouts(solution.choice),
        problem=problem,
        solution=solution,
        solve_time_s=solve_time,
        memory_budget=memory_budget,
        op_costs=op_costs(problem, solution.choice),
        remat=dict(problem.remat),
        microbatches=problem.microbatches,
        optimizer_state_factor=problem.optimizer_state_factor,
    )


def solve(
    graph: Graph,
    mesh: Mesh | Mapping[str, int],
    *,
    hardware: str | Hardware = "h100-node",
    train: bool = False,
    memory_budget: float | None = None,
    rules: Any = None,
    pins: Mapping[str, Any] | None = None,
    candidates: Mapping[str, list] | None = None,
    time_limit: float | None = None,
    optimizer_state_factor: float = 2.0,
    zero: bool = False,
    remat: str | Mapping[str, str] = "none",
    microbatches: int | str = 1,
) -> Plan:
    """Choose a layout for every tensor of ``graph`` minimising predicted step time.

    ``rules`` fix dims to mesh axes (``"batch:data;seq:none"``), ``pins`` fix tensors to a
    layout, ``candidates`` limit a dim to a set of axis tuples. ``zero`` lets training shard
    gradients and optimizer state over more axes than their param. With ``memory_budget`` (bytes
    per device) layouts that do not fit are excluded; if none fits, the error gives the smallest
    memory any layout reaches and the tensors that dominate it.

    In training, ``remat`` is a policy for every repeated block (``"none"``, ``"selective"``,
    ``"full"``), a mapping block -> policy, or ``"auto"``: the solver picks each block's policy
    together with the layouts. ``microbatches`` is a count of micro-batches the global batch is
    split into (gradient accumulation), or ``"auto"``: the solver picks it among the divisors of
    the batch. Both are chosen exactly: see :mod:`meshjax.levers`.
    """
    from meshjax.levers import search

    start = time.perf_counter()
    mesh_shape = dict(zip(mesh.axis_names, mesh.devices.shape)) if isinstance(mesh, Mesh) else dict(mesh)
    hw = get_hardware(hardware)
    constraints = Constraints.make(graph, mesh_shape, rules, pins, candidates)

    def build(g: Graph, policies: Mapping[str, str], k: int, cache: dict, edges: bool = True) -> Problem:
        return build_problem(
            g, mesh_shape, hw, train=train, constraints=constraints, optimizer_state_factor=optimizer_state_factor,
            zero=zero, remat=policies, microbatches=k, cache=cache, edges=edges,
        )

    problem, solution = search(graph, build, train=train, remat=remat, microbatches=microbatches,
                               memory_budget=memory_budget, time_limit=time_limit, infeasible=_memory_infeasible)
    return plan_from_choice(problem, solution, time.perf_counter() - start, memory_budget)


def _memory_infeasible(problem: Problem, budget: float) -> InfeasibleError:
    least = solve_ilp(problem, objective="memory")
    plan = plan_from_choice(problem, least, 0.0)
    kept = kept_copies(problem.graph) if problem.train else {}
    per_tensor = []
    for name, tensor in problem.graph.tensors.items():
        b = per_device_bytes(tensor, plan.layouts[name], problem.mesh_shape)
        if tensor.role == "param" and problem.train:
            b *= 4  # param, gradient, two Adam moments
        elif tensor.role not in ("param", "input") and problem.train:
            b *= problem.graph.trip_count(tensor.block) * kept.get(name, 0)
        per_tensor.append((b, name))
    per_tensor.sort(reverse=True)
    top = ", ".join(f"{n} ({format_bytes(b)})" for b, n in per_tensor[:3])
    return InfeasibleError(
        f"no layout fits {format_bytes(budget)} per device on mesh {problem.mesh_shape}; "
        f"the least memory any layout needs is {format_bytes(least.memory)}, dominated by {top}"
    )


def search_meshes(
    graph_for: Callable[[dict[str, int]], Graph] | Graph,
    n_devices: int,
    *,
    max_axes: int = 2,
    axis_names: tuple[str, ...] = ("data", "model", "pipe"),
    **solve_kwargs: Any,
) -> list[tuple[dict[str, int], Plan | InfeasibleError]]:
    """Solve every factorisation of ``n_devices`` into up to ``max_axes`` mesh axes (for 8:
    8, 4x2, 2x4, 1x8 ...) and return each mesh with its plan (or why none fits), best first."""
    results = []
    for shape in factorisations(n_devices, max_axes):
        names = axis_names[: len(shape)] if len(shape) > 1 else ("data",)
        mesh_shape = dict(zip(names, shape))
        graph = graph_for(mesh_shape) if callable(graph_for) else graph_for
        try:
            results.append((mesh_shape, solve(graph, mesh_shape, **solve_kwargs)))
        except InfeasibleError as err:
            results.append((mesh_shape, err))
    results.sort(key=lambda r: r[1].step_time_s if isinstance(r[1], Plan) else math.inf)
    return results


def factorisations(n: int, max_axes: int) -> list[tuple[int, ...]]:
    """Ordered factorisations of ``n`` into 1..max_axes factors; 1D as ``(n,)``, and in 2D+
    every factor >= 1 so ``1x8`` and ``8x1`` appear (they put devices on different axis names)."""
    out: list[tuple[int, ...]] = [(n,)]

    def rec(rest: int, k: int, prefix: tuple[int, ...]):
        if k == 1:
            out.append((*prefix, rest))
            return
        for f in range(1, rest + 1):
            if rest % f == 0:
                rec(rest // f, k - 1, (*prefix, f))

    for k in range(2, max_axes + 1):
        rec(n, k, ())
    return out
