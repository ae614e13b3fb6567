"""Verify a plan: compile it and put predicted collectives and memory beside XLA's.

Example::

    >>> check = verify(plan, loss, mesh, params, *batch)       # doctest: +SKIP
    >>> check.comm_ratio          # compiled / predicted comm bytes
    1.0
    >>> console.print(check.table())
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from meshjax.errors import TraceError
from meshjax.inspect import CompiledReport, inspect_compiled
from meshjax.named import NamedArray
from meshjax.plan import Plan
from meshjax.train import make_train_step


def _is_named(x: Any) -> bool:
    return isinstance(x, NamedArray)


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

    def to_json(self) -> dict[str, Any]:
        return {
            "comm_bytes": self.compiled.comm_bytes,
            "predicted_comm_bytes": self.plan.comm_bytes,
            "collectives": self.compiled.by_kind(),
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
    ``optimizer`` defaults to Adam, whose two moments the plan's optimizer-state memory assumes.
    ``params`` and ``args`` may be abstract (``ShapeDtypeStruct`` leaves).
    """
    if plan.train:
        trainer = make_train_step(plan, fn, mesh, optimizer or optax.adam(1e-3))
        state = trainer.abstract_state()
        if jax.tree_util.tree_structure(params, is_leaf=_is_named) != jax.tree_util.tree_structure(
            state.params, is_leaf=_is_named
        ):
            raise TraceError("params do not have the structure the plan was made for")
        compiled = trainer.lower(state, *args).compile()
    else:
        compiled = plan.program(fn, mesh).compile(params, *args)
    return Verification(plan, inspect_compiled(compiled, mesh))
