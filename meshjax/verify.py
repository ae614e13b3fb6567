"""Verify a plan: compile it and put predicted collectives and memory beside XLA's, in total,
per collective kind and per op.

Per op: lowering runs every op under a ``jax.named_scope`` of its name, so each compiled
collective's ``op_name`` metadata names the op it came from (``jvp(block_0/mlp/out)`` forward,
``transpose(jvp(...))`` backward). When XLA combines collectives of several ops into one, the
metadata lists them all (``block_1/attn/(q)...:v)...:k)...``) and the combined bytes are shared
among those ops in proportion to their predicted bytes; such rows are marked ``combined``.

Example::

    >>> from meshjax import models
    >>> from meshjax.devices import make_mesh
    >>> from meshjax.solve import solve
    >>> ex = models.example("mlp-tiny", abstract=True, batch=8192, embed=1024, mlp=4096)
    >>> graph = mj.trace(ex.loss, ex.params, *ex.batch)
    >>> plan = solve(graph, {"data": 4, "model": 2}, hardware="cpu-sim", train=True)
    >>> check = verify(plan, ex.loss, make_mesh({"data": 4, "model": 2}), ex.params, *ex.batch)
    >>> check.comm_ratio          # compiled / predicted comm bytes
    1.0
    >>> check.compiled_by_kind == check.predicted_by_kind == {"all-reduce": 25165828.0}
    True
    >>> [(c.kind, c.axes) for c in check.compiled.collectives]   # Megatron's, then the gradient sync
    [('all-reduce', ('model',)), ('all-reduce', ('data',))]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from meshjax.cost.collectives import Collective, as_lowered
from meshjax.errors import InfeasibleError
from meshjax.hlo import CompiledReport, inspect_compiled
from meshjax.hlo.metadata import ops_named
from meshjax.layout import Layout
from meshjax.plan import Plan
from meshjax.train import make_train_step
from meshjax.units import format_bytes


@dataclass(frozen=True)
class OpComm:
    """One op's predicted and compiled comm bytes (all its instances and loop trips)."""

    op: str
    predicted_bytes: float
    compiled_bytes: float
    combined: bool  # some of the compiled bytes are a share of a collective XLA combined


COMM_BAND = (0.97, 1.03)
"""Compiled over predicted comm bytes a prediction must stay within."""
MEMORY_BAND = (0.90, 1.10)
"""Compiled over predicted memory per device a prediction must stay within."""

# Compile platforms whose XLA pipeline fuses an all-reduce and a slice into a reduce-scatter.
_FUSES_REDUCE_SCATTER = {"cpu": False}


@dataclass(frozen=True)
class Verification:
    """A plan beside what XLA compiled for it on ``platform`` (``jax.Device.platform``).

    Predicted collectives are compared as the compile target lowers them: a plan priced for
    hardware whose compiler fuses reduce-scatters (``h100-node``), compiled by XLA:CPU, which
    emits an all-reduce of the whole input instead, is compared with those all-reduces
    (:attr:`lowering_note` says so)."""

    plan: Plan
    compiled: CompiledReport
    platform: str = "cpu"

    @property
    def fuses_reduce_scatter(self) -> bool:
        return _FUSES_REDUCE_SCATTER.get(self.platform, True)

    def lowered(self, collectives) -> list[Collective]:
        """``collectives`` as the compile target emits them (see the class docstring)."""
        mesh = self.plan.mesh_shape
        return [as_lowered(c, mesh, fuses_reduce_scatter=self.fuses_reduce_scatter) for c in collectives]

    @property
    def predicted_collectives(self) -> list[Collective]:
        """The plan's collectives as the compile target lowers them."""
        return self.lowered(self.plan.collectives)

    @property
    def predicted_comm_bytes(self) -> float:
        """The plan's comm bytes as the compile target lowers its collectives."""
        return sum(c.comm_bytes for c in self.predicted_collectives)

    @property
    def lowering_note(self) -> str | None:
        """What the comparison re-priced for the compile target, if anything."""
        if self.fuses_reduce_scatter or not any(c.kind == "reduce-scatter" for c in self.plan.collectives):
            return None
        return (f"the plan's reduce-scatters are compared as the all-reduces XLA:{self.platform.upper()} "
                "emits for them (it does not fuse reduce-scatters)")

    @property
    def predicted_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for c in self.predicted_collectives:
            out[c.kind] += c.comm_bytes
        return dict(out)

    @property
    def compiled_by_kind(self) -> dict[str, float]:
        return {k: float(v["bytes"]) for k, v in self.compiled.by_kind().items()}

    @property
    def comm_ratio(self) -> float:
        """Compiled comm bytes over predicted (1.0 is a perfect prediction)."""
        predicted = self.predicted_comm_bytes
        if predicted == 0:
            return 1.0 if self.compiled.comm_bytes == 0 else float("inf")
        return self.compiled.comm_bytes / predicted

    @property
    def memory_ratio(self) -> float | None:
        """Compiled memory per device over predicted (None where XLA reports none)."""
        compiled = self.compiled.memory.get("peak_bytes")
        predicted = self.plan.peak_memory_bytes
        if compiled is None or not predicted:
            return None
        return compiled / predicted

    def out_of_band(self) -> str | None:
        """One line saying which of comm and memory is outside its band (:data:`COMM_BAND`,
        :data:`MEMORY_BAND`), or None when both hold."""
        parts = []
        lo, hi = COMM_BAND
        if not lo <= self.comm_ratio <= hi:
            parts.append(f"comm {self.compiled.comm_bytes:,.0f} B is {self.comm_ratio:.3f}x the predicted "
                         f"{self.predicted_comm_bytes:,.0f} B (band {lo:.2f}-{hi:.2f})")
        mem = self.memory_ratio
        lo, hi = MEMORY_BAND
        if mem is not None and not lo <= mem <= hi:
            parts.append(f"memory {self.compiled.memory['peak_bytes']:,.0f} B/device is {mem:.3f}x the predicted "
                         f"{self.plan.peak_memory_bytes:,.0f} B (band {lo:.2f}-{hi:.2f})")
        if not parts:
            return None
        return "compiled differs from the prediction: " + "; ".join(parts) + " (per-op table above)"

    def ratios_json(self) -> dict[str, Any]:
        """The comparison's ratios and bands, for a plan's JSON."""
        return {
            "predicted_comm_bytes": self.predicted_comm_bytes,
            "compiled_comm_bytes": self.compiled.comm_bytes,
            "comm_ratio": self.comm_ratio,
            "comm_band": list(COMM_BAND),
            "predicted_memory_bytes": self.plan.peak_memory_bytes,
            "compiled_memory_bytes": self.compiled.memory.get("peak_bytes"),
            "memory_ratio": self.memory_ratio,
            "memory_band": list(MEMORY_BAND),
            "within_band": self.out_of_band() is None,
            "lowering": self.lowering_note,
        }

    def per_op(self) -> list[OpComm]:
        """Predicted beside compiled comm bytes per op (tied unrolled instances count under the
        first one's name, as the plan's op costs do); compiled collectives whose metadata names
        no op come last under ``"(unattributed)"``."""
        plan = self.plan
        problem = plan.problem
        key_of = {
            op.output: problem.nodes[problem.node_of[op.output]].key if problem is not None else op.output
            for op in plan.graph.ops
        }
        predicted: dict[str, float] = defaultdict(float)
        for cost in plan.op_costs:
            predicted[cost.op] += sum(c.comm_bytes for c in self.lowered(cost.collectives))
        compiled: dict[str, float] = defaultdict(float)
        combined: set[str] = set()
        names = list(key_of)
        for c in self.compiled.collectives:
            ops = list(dict.fromkeys(key_of[n] for n in ops_named(c.op_name, names)))
            if not ops:
                compiled["(unattributed)"] += c.comm_bytes
                continue
            weights = [predicted.get(op, 0.0) for op in ops]
            total = sum(weights)
            for op, w in zip(ops, weights):
                compiled[op] += c.comm_bytes * (w / total if total else 1 / len(ops))
            if len(ops) > 1:
                combined.update(ops)
        rows = [
            OpComm(op, predicted.get(op, 0.0), compiled.get(op, 0.0), op in combined)
            for op in dict.fromkeys([*predicted, *compiled])
            if op != "(unattributed)" and (predicted.get(op) or compiled.get(op))
        ]
        if compiled.get("(unattributed)"):
            rows.append(OpComm("(unattributed)", 0.0, compiled["(unattributed)"], False))
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "comm_bytes": self.compiled.comm_bytes,
            "predicted_comm_bytes": self.predicted_comm_bytes,
            "collectives": self.compiled.by_kind(),
            "per_op": [row.__dict__ for row in self.per_op()],
            "memory": self.compiled.memory,
        }

    def table(self):
        """Predicted beside compiled, per collective kind, plus memory."""
        from rich.table import Table

        table = Table(title="predicted vs compiled")
        for col in ("", "predicted", "compiled"):
            table.add_column(col)
        pred, comp = self.predicted_by_kind, self.compiled_by_kind
        for kind in sorted(set(pred) | set(comp)):
            table.add_row(f"{kind} bytes", f"{pred.get(kind, 0):,.0f}", f"{comp.get(kind, 0):,.0f}")
        table.add_row("comm bytes", f"{self.predicted_comm_bytes:,.0f}", f"{self.compiled.comm_bytes:,.0f}")
        table.add_row(
            "memory bytes/device",
            f"{self.plan.peak_memory_bytes:,.0f}",
            f"{self.compiled.memory.get('peak_bytes', 0):,.0f}",
        )
        return table

    def op_table(self):
        """Predicted beside compiled comm bytes, per op."""
        from rich.table import Table

        table = Table(title="comm bytes per op", caption="combined: XLA merged this op's collective with others'")
        for col, justify in (("op", "left"), ("predicted", "right"), ("compiled", "right"), ("", "left")):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for row in self.per_op():
            table.add_row(row.op, f"{row.predicted_bytes:,.0f}", f"{row.compiled_bytes:,.0f}", "combined" if row.combined else "")
        return table


def verify(
    plan: Plan,
    fn: Callable,
    mesh: Mesh,
    params: Any,
    *args: Any,
    optimizer: optax.GradientTransformation | None = None,
) -> Verification:
    """Compile ``fn`` under ``plan`` and read what XLA made of it.

    An inference plan compiles ``fn``; a training plan compiles the whole training step
    (:func:`~meshjax.train.make_train_step`: loss, gradients and the optimizer update, params and
    optimizer state donated), so compiled memory counts everything the plan's memory does.
    ``optimizer`` defaults to the plan's (:class:`~meshjax.optimizer.Optimizer`: Adam with fp32
    moments and fp32 master weights unless solved otherwise), whose state the plan's memory counts.
    ``params`` and ``args`` may be abstract (``ShapeDtypeStruct`` leaves).
    """
    compiled = compile_plan(plan, fn, mesh, params, *args, optimizer=optimizer)
    return Verification(plan, inspect_compiled(compiled, mesh), platform_of(mesh))


def platform_of(mesh: Mesh) -> str:
    """The platform (``"cpu"``, ``"gpu"`` ...) ``mesh``'s devices compile for."""
    return mesh.devices.flat[0].platform


def compile_plan(
    plan: Plan,
    fn: Callable,
    mesh: Mesh,
    params: Any,
    *args: Any,
    optimizer: optax.GradientTransformation | None = None,
    pinned: Mapping[str, Layout] | None = None,
) -> jax.stages.Compiled:
    """The executable :func:`verify`, ``meshjax compare`` and the benchmarks read: ``fn`` for an
    inference plan, the whole training step (the plan's optimizer unless ``optimizer``) for a
    training plan. Every tensor and every op's operands are pinned as planned, unless ``pinned``
    names the only layouts to pin (a baseline that leaves the rest to XLA's sharding propagation)."""
    program = None
    if pinned is not None:
        from meshjax.lower import Program

        program = Program(fn, plan.graph, mesh, pinned)
    if not plan.train:
        return (program or plan.program(fn, mesh)).compile(params, *args)
    trainer = make_train_step(plan, fn, mesh, optimizer, program=program)
    trainer.check_structure(params)
    return trainer.lower(trainer.abstract_state(), *args).compile()


# Solves again at most this many times for a plan whose compiled step exceeds its budget.
BUDGET_ATTEMPTS = 3


@dataclass(frozen=True)
class BudgetTry:
    """One solve of a closed-loop budget: the budget the solver was given, and the bytes per
    device XLA compiled its plan to."""

    solved_for: float
    compiled: float


def keep_budget(
    plan: Plan, budget: float | None, measure: Callable[[Plan], float | None], resolve: Callable[[float], Plan],
    attempts: int = BUDGET_ATTEMPTS,
) -> tuple[Plan, tuple[BudgetTry, ...]]:
    """A plan whose *compiled* step fits ``budget``, and the solves that did not.

    ``measure(plan)`` compiles a plan and returns XLA's bytes per device (``None``: not known);
    ``resolve(b)`` solves the same problem under budget ``b``. While the compiled step exceeds
    ``budget``, the problem is solved again under the plan's predicted memory less the overshoot
    (``predicted * budget / compiled``: the next plan must be predicted that much leaner), at
    most ``attempts`` times; the last plan is returned whether it fits or not (its ``BudgetTry``
    list then ends above ``budget``). The memory model stays the one owner of the plan's figures:
    only the budget handed to the solver moves. When no layout meets the shrunk budget, a one-line
    :class:`~meshjax.errors.InfeasibleError` says so, with the solver's reason.

    >>> from types import SimpleNamespace as Plan
    >>> sizes = iter([120.0, 95.0])   # what "XLA" compiles each plan to
    >>> solve = lambda b: Plan(peak_memory_bytes=0.9 * b)
    >>> plan, tries = keep_budget(solve(100.0), 100.0, lambda p: next(sizes), solve)
    >>> round(plan.peak_memory_bytes, 1), [(t.solved_for, t.compiled) for t in tries]
    (67.5, [(100.0, 120.0)])
    """
    tries = []
    solved_for = budget
    for _ in range(attempts):
        compiled = measure(plan)
        if budget is None or compiled is None or compiled <= budget:
            return plan, tuple(tries)
        tries.append(BudgetTry(solved_for, compiled))
        solved_for = min(solved_for, plan.peak_memory_bytes) * budget / compiled
        try:
            plan = resolve(solved_for)
        except InfeasibleError as err:
            raise InfeasibleError(
                f"no plan compiles within {format_bytes(budget)} per device: the plan solved for {format_bytes(tries[-1].solved_for)} "
                f"compiled to {format_bytes(compiled)}, and under the budget less that overshoot: {err}"
            ) from None
    compiled = measure(plan)
    if compiled is not None and compiled > budget:
        tries.append(BudgetTry(solved_for, compiled))
    return plan, tuple(tries)
