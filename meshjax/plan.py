"""The plan users hold: a layout for every tensor, why, and what it is predicted to cost.

Example::

    >>> plan = solve(graph, {"data": 4, "model": 2}, hardware="h100-node", train=True)   # doctest: +SKIP
    >>> plan.specs["block_0/mlp/w_in"]
    PartitionSpec(None, 'model')
    >>> plan.rules                       # for nnx.logical_axis_rules, when uniform per name
    >>> print(plan.summary())
    >>> program = plan.program(loss, mesh)   # a jax.jit program with every tensor pinned
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jax.sharding import Mesh, PartitionSpec

from meshjax.cost.collectives import Collective
from meshjax.cost.hardware import Hardware, get_hardware
from meshjax.cost.memory import backward_working_set, kept_copies, working_set
from meshjax.cost.strategies import per_device_bytes, reshard
from meshjax.errors import InfeasibleError
from meshjax.graph import Graph
from meshjax.layout import Layout, Rules, rules_of
from meshjax.solver.ilp import Solution, solve_ilp
from meshjax.solver.problem import Constraints, Problem, build_problem
from meshjax.units import format_bytes


@dataclass(frozen=True)
class OpCost:
    """Predicted cost of one op (all its instances and loop trips), with the reshards into it."""

    op: str
    kind: str
    strategy: str
    comm_time: float
    compute_time: float
    collectives: tuple[Collective, ...]


@dataclass
class Plan:
    """A layout per tensor plus its predicted cost. A plain value: build programs from it."""

    graph: Graph
    mesh_shape: dict[str, int]
    hardware: Hardware
    train: bool
    layouts: dict[str, Layout]
    problem: Problem | None = None
    solution: Solution | None = None
    solve_time_s: float = 0.0
    memory_budget: float | None = None
    op_costs: list[OpCost] = field(default_factory=list)

    # --- what users read ---------------------------------------------------------------------
    @property
    def specs(self) -> dict[str, PartitionSpec]:
        return {name: layout.spec() for name, layout in self.layouts.items()}

    @property
    def param_specs(self) -> dict[str, PartitionSpec]:
        """Spec of every param, by tensor name (``block_0/mlp/w_in``)."""
        return {t.name: self.layouts[t.name].spec() for t in self.graph.params}

    @property
    def state_layouts(self) -> dict[str, Layout]:
        """Layout of each param's optimizer state (and of its gradient once reduced): the param's
        own, or (ZeRO-1) one sharded over more mesh axes, where the update then runs."""
        out = {}
        for t in self.graph.params:
            option = None
            if self.problem is not None and self.solution is not None:
                k = self.problem.node_of[t.name]
                option = self.problem.nodes[k].options[self.solution.choice[k]]
            state = getattr(option, "state", None)
            out[t.name] = Layout(t.dims, state.axes) if state is not None else self.layouts[t.name]
        return out

    @property
    def state_specs(self) -> dict[str, PartitionSpec]:
        """Spec of each param's gradient and optimizer state (every leaf of its Adam moments)."""
        return {name: layout.spec() for name, layout in self.state_layouts.items()}

    @property
    def rules(self) -> Rules | None:
        """Logical axis rules (dim name -> mesh axes) when the plan is uniform per name."""
        return rules_of(self.graph, self.layouts)

    def logical_axis_rules(self) -> list[tuple[str, Any]] | None:
        """``plan.rules`` in the form ``nnx.logical_axis_rules`` takes."""
        rules = self.rules
        if rules is None:
            return None
        return [(d, None if not a else a[0] if len(a) == 1 else tuple(a)) for d, a in rules.items()]

    @property
    def collectives(self) -> list[Collective]:
        return [c for cost in self.op_costs for c in cost.collectives]

    @property
    def comm_bytes(self) -> float:
        """Predicted comm bytes per step, defined as in :mod:`meshjax.inspect`."""
        return sum(c.comm_bytes for c in self.collectives)

    @property
    def comm_time_s(self) -> float:
        return sum(c.comm_time for c in self.op_costs)

    @property
    def compute_time_s(self) -> float:
        return sum(c.compute_time for c in self.op_costs)

    @property
    def step_time_s(self) -> float:
        return self.comm_time_s + self.compute_time_s

    def memory_breakdown(self, optimizer_state_factor: float = 2.0) -> dict[str, float]:
        """Predicted bytes per device by kind: params, grads, optimizer state, inputs, activations
        (in training, those kept for the backward pass, plus its peak)."""
        out: dict[str, float] = defaultdict(float)
        peak = 0.0
        kept = kept_copies(self.graph) if self.train else {}
        states = self.state_layouts if self.train else {}
        for name, tensor in self.graph.tensors.items():
            b = per_device_bytes(tensor, self.layouts[name], self.mesh_shape)
            if tensor.role == "param":
                out["params"] += b
                if self.train:
                    out["grads"] += b  # computed in the param's layout, whatever the state's
                    out["optimizer_state"] += per_device_bytes(tensor, states[name], self.mesh_shape) * optimizer_state_factor
            elif tensor.role == "input":
                out["inputs"] += b
            elif tensor.role != "constant":
                if self.train:
                    out["activations"] += kept.get(name, 0) * b * self.graph.trip_count(tensor.block)
        operand_layouts = self.operand_layouts
        transient = backward_working_set if self.train else working_set
        for op in self.graph.ops:
            operands = operand_layouts.get(op.name) or tuple(self.layouts[n] for n in op.inputs)
            peak = max(peak, transient(op, self.graph, self.layouts[op.output], operands, self.mesh_shape))
        out["backward_peak" if self.train else "activations"] = peak
        out["total"] = sum(out.values())
        return dict(out)

    @property
    def peak_memory_bytes(self) -> float:
        return self.memory_breakdown()["total"]

    def explain(self, tensor: str, top: int = 5) -> list[dict[str, Any]]:
        """Why ``tensor`` has its layout: its decision's options, each priced with every other
        decision kept as planned, cheapest first (the chosen one is marked)."""
        if self.problem is None or self.solution is None:
            raise InfeasibleError("this plan was not solved; nothing to explain")
        self.graph.tensor(tensor)
        k = self.problem.node_of[tensor]
        node = self.problem.nodes[k]
        rows = []
        for option in range(len(node.options)):
            choice = list(self.solution.choice)
            choice[k] = option
            rows.append(
                {
                    "layout": str(node.result_layouts[option]),
                    "strategy": node.options[option].label if node.op is not None else str(node.options[option]),
                    "step_time_s": self.problem.total_time(choice),
                    "memory_bytes": self.problem.memory(choice),
                    "chosen": option == self.solution.choice[k],
                }
            )
        rows.sort(key=lambda r: r["step_time_s"])
        return rows[:top] + [r for r in rows[top:] if r["chosen"]]

    # --- running it --------------------------------------------------------------------------
    def program(self, fn: Callable, mesh: Mesh):
        """The jit program of ``fn`` (the traced function) with every tensor pinned."""
        from meshjax.lower import Program

        shape = dict(zip(mesh.axis_names, mesh.devices.shape))
        if shape != self.mesh_shape:
            raise InfeasibleError(f"plan is for mesh {self.mesh_shape}, got {shape}")
        return Program(fn, self.graph, mesh, self.layouts, self.operand_layouts, self.computed_layouts)

    @property
    def operand_layouts(self) -> dict[str, tuple[Layout, ...]]:
        """Op name -> the layout each operand is computed in, by the chosen strategy."""
        if self.problem is None or self.solution is None:
            return {}
        out = {}
        for op in self.graph.ops:
            k = self.problem.node_of[op.output]
            strategy = self.problem.nodes[k].options[self.solution.choice[k]]
            out[op.name] = tuple(
                Layout(self.graph.tensors[name].dims, layout.axes)
                for name, layout in zip(op.inputs, strategy.operand_layouts)
            )
        return out

    @property
    def computed_layouts(self) -> dict[str, Layout]:
        """Op name -> the layout the op computes its result in, where its strategy then
        all-gathers it into the planned layout."""
        if self.problem is None or self.solution is None:
            return {}
        out = {}
        for op in self.graph.ops:
            k = self.problem.node_of[op.output]
            layout = self.problem.nodes[k].options[self.solution.choice[k]].computed_layout
            if layout is not None:
                out[op.name] = Layout(self.graph.tensors[op.output].dims, layout.axes)
        return out

    # --- output -------------------------------------------------------------------------------
    def tensor_rows(self) -> list[dict[str, Any]]:
        rows = []
        for name, t in self.graph.tensors.items():
            spec = self.layouts[name].spec()
            rows.append(
                {
                    "name": name,
                    "dims": list(t.dims),
                    "shape": list(t.shape),
                    "role": t.role,
                    "spec": [None if e is None else e if isinstance(e, str) else list(e) for e in spec]
                    + [None] * (len(t.dims) - len(spec)),
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "mesh": self.mesh_shape,
            "hardware": self.hardware.name,
            "train": self.train,
            "tensors": self.tensor_rows(),
            "rules": {d: list(a) for d, a in self.rules.items()} if self.rules is not None else None,
            "predicted": {
                "step_time_s": self.step_time_s,
                "comm_time_s": self.comm_time_s,
                "compute_time_s": self.compute_time_s,
                "comm_bytes": self.comm_bytes,
                "peak_memory_bytes": self.peak_memory_bytes,
                "memory": self.memory_breakdown(),
            },
            "solver": {
                "status": self.solution.status if self.solution else "manual",
                "gap": self.solution.gap if self.solution else 0.0,
            },
            "solve_time_s": self.solve_time_s,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    def table(self, roles: tuple[str, ...] = ("param", "input", "activation", "output")):
        """A rich table: every tensor with its dims, shape and spec."""
        from rich.table import Table

        table = Table(title=f"layout on mesh {self.mesh_shape} ({self.hardware.name}{', train' if self.train else ''})")
        for col in ("tensor", "role", "dims", "per-device shape", "spec"):
            table.add_column(col)
        for name, t in self.graph.tensors.items():
            if t.role not in roles:
                continue
            layout = self.layouts[name]
            shard = layout.shard_shape(t.shape, self.mesh_shape)
            table.add_row(name, t.role, " ".join(t.dims), str(shard), str(layout.spec()))
        return table

    def cost_table(self, top: int = 20):
        """A rich table of the costliest ops."""
        from rich.table import Table

        table = Table(title=f"predicted step {self.step_time_s * 1e3:.3f} ms (comm {self.comm_time_s * 1e3:.3f} ms)")
        for col in ("op", "kind", "strategy", "comm ms", "compute ms", "collectives"):
            table.add_column(col)
        for c in sorted(self.op_costs, key=lambda c: -(c.comm_time + c.compute_time))[:top]:
            colls = ", ".join(f"{x.kind}[{'+'.join(x.axes)}] {x.nbytes:.3g}B x{x.count}" for x in c.collectives)
            table.add_row(c.op, c.kind, c.strategy, f"{c.comm_time * 1e3:.4f}", f"{c.compute_time * 1e3:.4f}", colls)
        return table

    def summary(self) -> str:
        mem = self.memory_breakdown()
        return (
            f"mesh {self.mesh_shape} on {self.hardware.name}: step {self.step_time_s * 1e3:.4f} ms "
            f"(comm {self.comm_time_s * 1e3:.4f} ms, compute {self.compute_time_s * 1e3:.4f} ms), "
            f"comm {self.comm_bytes / 2**20:.3f} MiB, memory {mem['total'] / 2**30:.3f} GiB/device, "
            f"solved in {self.solve_time_s:.3f} s"
        )


def _op_costs(problem: Problem, choice: tuple[int, ...]) -> list[OpCost]:
    """Per-op costs of a choice, each reshard charged to the op that needs it."""
    incoming: dict[int, list[tuple[float, tuple[Collective, ...]]]] = defaultdict(list)
    for e in problem.edges:
        a = e.src_group[choice[e.src]]
        b = e.dst_group[choice[e.dst]]
        t, colls = reshard(
            e.tensor, e.src_layouts[a], e.dst_layouts[b], problem.mesh_shape, problem.hardware,
            train=problem.train, needs_grad=e.needs_grad, recompute=e.recompute,
        )
        incoming[e.dst].append((t * e.multiplicity, tuple(Collective(c.kind, c.axes, c.nbytes, c.count * e.multiplicity, c.latency_share) for c in colls)))
    out = []
    for k, (node, c) in enumerate(zip(problem.nodes, choice)):
        if node.op is None:
            continue
        s = node.options[c]
        mult = node.multiplicity
        colls = tuple(Collective(x.kind, x.axes, x.nbytes, x.count * mult, x.latency_share) for x in s.collectives)
        comm = s.comm_time * mult
        for t, extra in incoming.get(k, []):
            comm += t
            colls += extra
        # A self-edge (tied instances feeding their own twin) was folded into the node's time.
        comm += float(node.time[c]) - s.time * mult
        out.append(OpCost(node.key, node.op.kind, s.label, comm, s.compute_time * mult, colls))
    return out


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
        op_costs=_op_costs(problem, solution.choice),
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
) -> Plan:
    """Choose a layout for every tensor of ``graph`` minimising predicted step time.

    ``rules`` fix dims to mesh axes (``"batch:data;seq:none"``), ``pins`` fix tensors to a
    layout, ``candidates`` limit a dim to a set of axis tuples. ``zero`` lets training shard
    gradients and optimizer state over more axes than their param. With ``memory_budget`` (bytes
    per device) layouts that do not fit are excluded; if none fits, the error gives the smallest
    memory any layout reaches and the tensors that dominate it.
    """
    start = time.perf_counter()
    mesh_shape = dict(zip(mesh.axis_names, mesh.devices.shape)) if isinstance(mesh, Mesh) else dict(mesh)
    hw = get_hardware(hardware)
    constraints = Constraints.make(graph, mesh_shape, rules, pins, candidates)
    problem = build_problem(
        graph, mesh_shape, hw, train=train, constraints=constraints,
        optimizer_state_factor=optimizer_state_factor, zero=zero,
    )
    try:
        solution = solve_ilp(problem, memory_budget=memory_budget, time_limit=time_limit)
    except InfeasibleError:
        if memory_budget is None:
            raise
        raise _memory_infeasible(problem, memory_budget) from None
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
