"""Verify a plan: compile it and put predicted collectives and memory beside XLA's, in total,
per collective kind and per op.

Per op: lowering runs every op under a ``jax.named_scope`` of its name, so each compiled
collective's ``op_name`` metadata names the op it came from (``jvp(block_0/mlp/out)`` forward,
``transpose(jvp(...))`` backward). When XLA combines collectives of several ops into one, the
metadata lists them all (``block_1/attn/(q)...:v)...:k)...``) and the combined bytes are shared
among those ops in proportion to their predicted bytes; such rows are marked ``combined``.

Example::

    >>> check = verify(plan, loss, mesh, params, *batch)       # doctest: +SKIP
    >>> check.comm_ratio          # compiled / predicted comm bytes
    1.0
    >>> console.print(check.table())
    >>> [row for row in check.per_op() if row.compiled_bytes != row.predicted_bytes]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from meshjax.hlo import CompiledReport, inspect_compiled
from meshjax.hlo.metadata import ops_named
from meshjax.plan import Plan
from meshjax.train import make_train_step


@dataclass(frozen=True)
class OpComm:
    """One op's predicted and compiled comm bytes (all its instances and loop trips)."""

    op: str
    predicted_bytes: float
    compiled_bytes: float
    combined: bool  # some of the compiled bytes are a share of a collective XLA combined


@dataclass(frozen=True)
class Verification:
    plan: Plan
    compiled: CompiledReport

    @property
    def predicted_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for c in self.plan.collectives:
            out[c.kind] += c.comm_bytes
        return dict(out)

    @property
    def compiled_by_kind(self) -> dict[str, float]:
        return {k: float(v["bytes"]) for k, v in self.compiled.by_kind().items()}

    @property
    def comm_ratio(self) -> float:
        """Compiled comm bytes over predicted (1.0 is a perfect prediction)."""
        predicted = self.plan.comm_bytes
        if predicted == 0:
            return 1.0 if self.compiled.comm_bytes == 0 else float("inf")
        return self.compiled.comm_bytes / predicted

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
            predicted[cost.op] += sum(c.comm_bytes for c in cost.collectives)
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
            "predicted_comm_bytes": self.plan.comm_bytes,
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
        table.add_row("comm bytes", f"{self.plan.comm_bytes:,.0f}", f"{self.compiled.comm_bytes:,.0f}")
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
    return Verification(plan, inspect_compiled(compiled, mesh))


def compile_plan(
    plan: Plan,
    fn: Callable,
    mesh: Mesh,
    params: Any,
    *args: Any,
    optimizer: optax.GradientTransformation | None = None,
) -> jax.stages.Compiled:
    """The executable :func:`verify` reads: ``fn`` for an inference plan, the whole training
    step (the plan's optimizer unless ``optimizer``) for a training plan."""
    if not plan.train:
        return plan.program(fn, mesh).compile(params, *args)
    trainer = make_train_step(plan, fn, mesh, optimizer)
    trainer.check_structure(params)
    return trainer.lower(trainer.abstract_state(), *args).compile()
