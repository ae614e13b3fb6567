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
from meshjax import validate
from meshjax.errors import InfeasibleError
from meshjax.graph import Graph
from meshjax.plan import Plan, Settings
from meshjax.solver.evaluate import computed_layouts, evaluate, operand_layouts, state_layouts
from meshjax.solver.ilp import Solution, solve_ilp
from meshjax.solver.problem import Constraints, Problem, build_problem
from meshjax.optimizer import Optimizer
from meshjax.units import format_bytes


def plan_from_choice(problem: Problem, solution: Solution, solve_time: float, memory_budget: float | None = None) -> Plan:
    """The :class:`Plan` recording ``solution`` of ``problem``, priced by the evaluator."""
    choice = solution.choice
    layouts = problem.layouts(choice)
    priced = evaluate(problem, choice)
    settings = Settings(problem.hardware, problem.train, memory_budget, problem.optimizer, problem.zero)
    return Plan(
        remat=dict(problem.remat),
        microbatches=problem.microbatches,
        graph=problem.graph,
        mesh_shape=dict(problem.mesh_shape),
        settings=settings,
        layouts=layouts,
        operand_layouts=operand_layouts(problem, choice),
        state_layouts=state_layouts(problem, choice, layouts),
        op_costs=priced.rows,
        memory=priced.memory,
        problem=problem,
        solution=solution,
        solve_time_s=solve_time,
        computed_layouts=computed_layouts(problem, choice),
    )


def solve(
    graph: Graph,
    mesh: Mesh | Mapping[str, int],
    *,
    hardware: str | Hardware = "h100-node",
    train: bool = False,
    memory_budget: float | str | None = None,
    rules: Any = None,
    pins: Mapping[str, Any] | None = None,
    candidates: Mapping[str, list] | None = None,
    time_limit: float | None = None,
    optimizer: Optimizer | str | None = None,
    zero: bool = False,
    remat: str | Mapping[str, str] = "none",
    microbatches: int | str = 1,
) -> Plan:
    """Choose a layout for every tensor of ``graph`` minimising predicted step time.

    ``mesh`` is a ``jax.sharding.Mesh`` or ``{axis: size}``. ``rules`` fix dims to mesh axes
    (``"batch:data;seq:none"``), ``pins`` fix tensors to a layout, ``candidates`` limit a dim to a set of axis tuples. In training, ``optimizer`` (an
    :class:`~meshjax.optimizer.Optimizer` or ``"adam"``, ``"sgd"``, ``"adafactor"``; default
    Adam with fp32 moments and fp32 master weights) says what state each param keeps, and
    ``zero`` lets that state be sharded over more axes than its param.

    ``memory_budget``: bytes per device (a number or ``"16GiB"``); ``"device"`` is the hardware
    profile's memory less its reserve (``Hardware.usable_memory_bytes``, what ``meshjax plan``
    uses by default); ``None`` (the default here) sets no budget. Layouts that do not fit are
    excluded; if none fits, the one-line error gives the least memory any layout needs, the
    tensors that take most of it, and what would make it fit.

    In training, ``remat`` is a policy for every repeated block (``"none"``, ``"selective"``,
    ``"full"``), a mapping block -> policy, or ``"auto"``: the solver picks it per scanned block
    together with the layouts. ``microbatches`` is the number of micro-batches the global batch
    is split into (gradient accumulation), or ``"auto"``: the solver picks it among the divisors
    of the batch. See :mod:`meshjax.levers`.
    """
    from meshjax.levers import search

    start = time.perf_counter()
    mesh_shape = validate.mesh_shape(mesh)
    hw = get_hardware(hardware)
    budget = budget_bytes(memory_budget, hw)
    if train:
        validate.scalar_loss(graph)
    constraints = Constraints.make(graph, mesh_shape, rules, pins, candidates)
    validate.rules(constraints.rules, graph, mesh_shape)
    validate.pins(constraints.pins, graph, mesh_shape)

    def build(g: Graph, policies: Mapping[str, str], k: int, cache: dict, edges: bool = True) -> Problem:
        return build_problem(
            g, mesh_shape, hw, train=train, constraints=constraints, optimizer=optimizer, zero=zero,
            remat=policies, microbatches=k, cache=cache, edges=edges,
        )

    problem, solution = search(graph, build, train=train, remat=remat, microbatches=microbatches,
                               memory_budget=budget, time_limit=time_limit, infeasible=_memory_infeasible)
    return plan_from_choice(problem, solution, time.perf_counter() - start, budget)


def budget_bytes(memory_budget: float | str | None, hardware: Hardware) -> float | None:
    """A per-device budget in bytes from what :func:`solve` accepts.

    >>> from meshjax.cost.hardware import PROFILES
    >>> budget_bytes("device", PROFILES["h100-node"]) / 1e9, budget_bytes("1GiB", PROFILES["h100-node"])
    (72.0, 1073741824.0)
    """
    return validate.memory_budget(memory_budget, hardware=hardware)


def _memory_infeasible(problem: Problem, budget: float) -> InfeasibleError:
    """One line: the least memory any layout needs, the tensors that take most of it (summed over
    tied layers and scan trips, with the optimizer's real state), and what would make it fit."""
    least = solve_ilp(problem, objective="memory")
    priced = evaluate(problem, least.choice)
    per_node = []
    for node, c in zip(problem.nodes, least.choice):
        total = sum(float(v[c]) for v in node.parts.values())
        if total:
            layers = node.multiplicity if node.op is not None else len(node.members)
            name = node.key + (f" x{layers}" if layers > 1 else "")
            per_node.append((total, name))
    per_node.sort(reverse=True)
    top = ", ".join(f"{n} {format_bytes(b)}" for b, n in per_node[:3])
    mem = priced.memory
    state = mem.get("params", 0) + mem.get("gradients", 0) + mem.get("optimizer_state", 0)
    activations = sum(mem.get(kind, 0) for kind in ("activations", "backward_peak", "inputs", "held_cotangents"))
    fixes = []
    # ZeRO-1 helps only where the leanest layout leaves some param's state unsharded on an axis.
    mesh_axes = {a for a, n in problem.mesh_shape.items() if n > 1}
    partial = any(
        set(node.result_layouts[c].used_axes) != mesh_axes
        for node, c in zip(problem.nodes, least.choice)
        if node.op is None and node.tensor.role == "param"
    )
    if problem.train and not problem.zero and partial and mem.get("optimizer_state", 0) > 0.1 * least.memory:
        fixes.append(f"ZeRO-1 (zero=True, --zero; optimizer state takes {format_bytes(mem['optimizer_state'])})")
    if problem.train and problem.optimizer is not None and problem.optimizer.name == "adam" and mem.get("optimizer_state", 0) > 0.1 * least.memory:
        fixes.append("a lighter optimizer (sgd, adafactor)")
    if activations > 0.2 * least.memory:
        fixes.append(f"a smaller batch (activations take {format_bytes(activations)})")
    if state > 0.2 * least.memory:
        fixes.append(f"more devices (params, gradients and optimizer state take {format_bytes(state)} at their most sharded)")
    return InfeasibleError(
        f"no layout fits {format_bytes(budget)} per device on mesh {problem.mesh_shape}: the least memory any "
        f"layout needs is {format_bytes(least.memory)}, most of it {top}; to fit, try " + " or ".join(fixes or ["more devices"])
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
