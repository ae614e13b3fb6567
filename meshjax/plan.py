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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jax.sharding import Mesh, PartitionSpec

from meshjax import report
from meshjax.cost.collectives import Collective
from meshjax.cost.hardware import Hardware
from meshjax.errors import InfeasibleError
from meshjax.graph import Graph
from meshjax.layout import Layout, Rules, rules_of
from meshjax.solver import evaluate
from meshjax.solver.evaluate import OpCost
from meshjax.solver.ilp import Solution
from meshjax.solver.problem import Problem


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
    remat: dict[str, str] = field(default_factory=dict)  # repeated block -> policy (training)
    microbatches: int = 1  # ``graph`` is one of this many micro-batches of the step
    optimizer_state_factor: float = 2.0

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
        """Layout of each param's optimizer state (and of its gradient once reduced)."""
        if self.problem is None or self.solution is None:
            return {t.name: self.layouts[t.name] for t in self.graph.params}
        return evaluate.state_layouts(self.problem, self.solution.choice, self.layouts)

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

    def memory_breakdown(self, optimizer_state_factor: float | None = None) -> dict[str, float]:
        """Predicted bytes per device by kind (see :func:`meshjax.solver.evaluate.memory_breakdown`)."""
        states = self.state_layouts if self.train else {}
        factor = self.optimizer_state_factor if optimizer_state_factor is None else optimizer_state_factor
        return evaluate.memory_breakdown(
            self.graph, self.mesh_shape, self.train, self.layouts, states, self.operand_layouts, factor,
            remat=self.remat, microbatches=self.microbatches,
        )

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
        return Program(fn, self.graph, mesh, self.layouts, self.operand_layouts, self.remat)

    @property
    def operand_layouts(self) -> dict[str, tuple[Layout, ...]]:
        """Op name -> the layout each operand is computed in, by the chosen strategy."""
        if self.problem is None or self.solution is None:
            return {}
        return evaluate.operand_layouts(self.problem, self.solution.choice)

    # --- output (meshjax.report) --------------------------------------------------------------
    def tensor_rows(self) -> list[dict[str, Any]]:
        return report.tensor_rows(self)

    def to_json(self) -> dict[str, Any]:
        return report.to_json(self)

    def dumps(self) -> str:
        return report.dumps(self)

    def table(self, roles: tuple[str, ...] = ("param", "input", "activation", "output")):
        """A rich table: every tensor with its dims, shape and spec."""
        return report.layout_table(self, roles)

    def cost_table(self, top: int = 20):
        """A rich table of the costliest ops."""
        return report.cost_table(self, top)

    def summary(self) -> str:
        return report.summary(self)


_MOVED_TO_SOLVE = ("solve", "search_meshes", "factorisations", "plan_from_choice")


def __getattr__(name: str) -> Any:
    # ``from meshjax.plan import solve`` predates meshjax.solve; solve imports this module.
    if name in _MOVED_TO_SOLVE:
        from meshjax import solve as _solve

        return getattr(_solve, name)
    raise AttributeError(f"module 'meshjax.plan' has no attribute {name!r}")
