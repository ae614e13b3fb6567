"""The plan users hold: a layout for every tensor, why, and what it is predicted to cost.

Example::

    >>> from meshjax import models
    >>> from meshjax.solve import solve
    >>> ex = models.example("mlp-tiny", abstract=True, batch=8192, embed=1024, mlp=4096)
    >>> graph = mj.trace(ex.loss, ex.params, *ex.batch)
    >>> plan = solve(graph, {"data": 4, "model": 2}, hardware="cpu-sim", train=True)
    >>> plan.specs["mlp/w_in"], plan.specs["x"]
    (P(None, 'model'), P('data',))
    >>> plan.rules                       # for nnx.logical_axis_rules, when uniform per name
    {'embed': (), 'mlp': ('model',), 'batch': ('data',)}
    >>> print(plan.summary())            # doctest: +ELLIPSIS
    mesh {'data': 4, 'model': 2} on cpu-sim: step ... ms (comm ... ms, compute ... ms), comm 25.17 MB, ...
    >>> from meshjax.devices import make_mesh
    >>> program = plan.program(ex.loss, make_mesh({"data": 4, "model": 2}))   # jax.jit, every tensor pinned
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jax.sharding import Mesh, PartitionSpec

from meshjax import devices, report
from meshjax.cost.hardware import Hardware
from meshjax.errors import InfeasibleError
from meshjax.graph import Graph
from meshjax.layout import Layout, Rules, rules_conflict, rules_of, spec_entry
from meshjax.optimizer import Optimizer
from meshjax.solver.evaluate import OpCost, StepTotals
from meshjax.solver.ilp import Solution
from meshjax.solver.problem import Problem


@dataclass(frozen=True)
class Settings:
    """What a plan was solved for: the hardware it was priced on, training or inference, the
    per-device memory budget (``None``: none), and in training the optimizer whose state each
    param keeps and whether that state may be sharded beyond its param (ZeRO-1)."""

    hardware: Hardware
    train: bool = False
    memory_budget: float | None = None
    optimizer: Optimizer | None = None
    zero: bool = False


@dataclass(frozen=True)
class Plan(StepTotals):
    """A frozen record of what was solved: a layout per tensor (and per op operand, per param's
    optimizer state), the settings, and the figures :func:`meshjax.solver.evaluate.evaluate`
    priced for the choice. The plan never prices anything itself: its step time is the ILP's
    objective and its memory the ILP's memory row."""

    graph: Graph
    mesh_shape: Mapping[str, int]
    settings: Settings
    layouts: Mapping[str, Layout]
    operand_layouts: Mapping[str, tuple[Layout, ...]]
    state_layouts: Mapping[str, Layout]
    op_costs: tuple[OpCost, ...]
    memory: Mapping[str, float]
    problem: Problem | None = field(default=None, compare=False, repr=False)
    solution: Solution | None = None
    solve_time_s: float = 0.0
    # Op name -> the layout an op computes its result in before a reduce-scatter or gather
    # moves it to its planned layout (pinned first when lowered).
    computed_layouts: Mapping[str, Layout] = field(default_factory=dict)
    remat: Mapping[str, str] = field(default_factory=dict)  # training: repeated block -> policy
    microbatches: int = 1  # training: ``graph`` is one of this many micro-batches of the step

    # --- what users read ---------------------------------------------------------------------
    @property
    def hardware(self) -> Hardware:
        return self.settings.hardware

    @property
    def train(self) -> bool:
        return self.settings.train

    @property
    def memory_budget(self) -> float | None:
        return self.settings.memory_budget

    @property
    def optimizer(self) -> Optimizer | None:
        return self.settings.optimizer

    @property
    def specs(self) -> dict[str, PartitionSpec]:
        return {name: layout.spec() for name, layout in self.layouts.items()}

    @property
    def param_specs(self) -> dict[str, PartitionSpec]:
        """Spec of every param, by tensor name (``block_0/mlp/w_in``)."""
        return {t.name: self.layouts[t.name].spec() for t in self.graph.params}

    @property
    def state_specs(self) -> dict[str, PartitionSpec]:
        """Spec of each param's gradient and optimizer state (every leaf of its Adam moments)."""
        return {name: layout.spec() for name, layout in self.state_layouts.items()}

    @property
    def rules(self) -> Rules | None:
        """Logical axis rules (dim name -> mesh axes) when the plan is uniform per name;
        ``None`` otherwise, and :meth:`rules_conflict` says which dim is split two ways."""
        return rules_of(self.graph, self.layouts)

    def rules_conflict(self) -> str | None:
        """Why :attr:`rules` is ``None``: the first dim split one way in one tensor and another
        way in another (``None`` when the plan has rules)."""
        return rules_conflict(self.layouts)

    def logical_axis_rules(self) -> list[tuple[str, Any]] | None:
        """``plan.rules`` in the form ``nnx.logical_axis_rules`` takes."""
        rules = self.rules
        if rules is None:
            return None
        return [(d, spec_entry(a)) for d, a in rules.items()]

    def memory_breakdown(self) -> dict[str, float]:
        """Predicted bytes per device by kind (:data:`meshjax.solver.evaluate.MEMORY_KINDS`) and
        their ``total``, as the solver counted them."""
        return dict(self.memory)

    @property
    def peak_memory_bytes(self) -> float:
        return self.memory["total"]

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

        shape = devices.mesh_shape(mesh)
        if shape != self.mesh_shape:
            raise InfeasibleError(f"plan is for mesh {self.mesh_shape}, got {shape}")
        return Program(
            fn, self.graph, mesh, dict(self.layouts), dict(self.operand_layouts), dict(self.computed_layouts),
            dict(self.remat),
        )

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
