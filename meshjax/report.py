"""How a plan reads: rows of tensors with their specs, rich tables of layouts and costs, a one-line
summary and the JSON document. Every figure comes from the :class:`~meshjax.plan.Plan` record.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from meshjax.layout import spec_entry
from meshjax.units import format_bytes

if TYPE_CHECKING:
    from meshjax.plan import Plan


def tensor_rows(plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for name, t in plan.graph.tensors.items():
        entries = [spec_entry(axes) for axes in plan.layouts[name].axes]
        rows.append(
            {
                "name": name,
                "dims": list(t.dims),
                "shape": list(t.shape),
                "role": t.role,
                "spec": [list(e) if isinstance(e, tuple) else e for e in entries],
            }
        )
    return rows

def to_json(plan: Plan) -> dict[str, Any]:
    return {
        "mesh": plan.mesh_shape,
        "hardware": plan.hardware.name,
        "train": plan.train,
        "settings": {
            "memory_budget": plan.memory_budget,
            "optimizer": str(plan.optimizer) if plan.optimizer is not None else None,
            "zero": plan.settings.zero,
        },
        "tensors": tensor_rows(plan),
        "rules": {d: list(a) for d, a in plan.rules.items()} if plan.rules is not None else None,
        "predicted": {
            "step_time_s": plan.step_time_s,
            "comm_time_s": plan.comm_time_s,
            "compute_time_s": plan.compute_time_s,
            "comm_bytes": plan.comm_bytes,
            "peak_memory_bytes": plan.peak_memory_bytes,
            "memory": plan.memory_breakdown(),
        },
        "remat": remat_json(plan),
        "microbatches": plan.microbatches,
        "solver": {
            "status": plan.solution.status if plan.solution else "manual",
            "gap": plan.solution.gap if plan.solution else 0.0,
        },
        "solve_time_s": plan.solve_time_s,
    }

def remat_json(plan: Plan) -> dict[str, str]:
    """Every repeated block with its rematerialisation policy (``none`` where none applies)."""
    from meshjax.cost.remat import remat_units

    if not plan.train:
        return {}
    return {unit: plan.remat.get(unit, "none") for unit in remat_units(plan.graph)}


def dumps(plan: Plan) -> str:
    return json.dumps(to_json(plan), indent=2)

def layout_table(plan: Plan, roles: tuple[str, ...] = ("param", "input", "activation", "output")):
    """A rich table: every tensor with its dims, shape and spec."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"layout on mesh {plan.mesh_shape} ({plan.hardware.name}{', train' if plan.train else ''})",
                  box=box.SIMPLE_HEAD)
    # Narrow terminals wrap names and dims rather than cut them: cut names would read alike
    # (block_0/attn/w_q and block_0/attn/w_k both as "block_0/attn/…").
    for col in ("tensor", "role", "dims", "per-device shape", "spec"):
        table.add_column(col, overflow="fold")
    for name, t in plan.graph.tensors.items():
        if t.role not in roles:
            continue
        layout = plan.layouts[name]
        shard = layout.shard_shape(t.shape, plan.mesh_shape)
        table.add_row(name, t.role, " ".join(t.dims), str(shard), str(layout.spec()))
    return table

def cost_table(plan: Plan, top: int = 20):
    """A rich table of the costliest ops."""
    from rich import box
    from rich.table import Table

    table = Table(title=f"predicted step {plan.step_time_s * 1e3:.3f} ms (comm {plan.comm_time_s * 1e3:.3f} ms)",
                  box=box.SIMPLE_HEAD)
    for col in ("op", "kind", "strategy", "comm ms", "compute ms", "collectives"):
        table.add_column(col, overflow="fold")
    for c in sorted(plan.op_costs, key=lambda c: -(c.comm_time + c.compute_time))[:top]:
        colls = ", ".join(f"{x.kind}[{'+'.join(x.axes)}] {x.nbytes:.3g}B x{x.count}" for x in c.collectives)
        table.add_row(c.op, c.kind, c.strategy, f"{c.comm_time * 1e3:.4f}", f"{c.compute_time * 1e3:.4f}", colls)
    return table

def summary(plan: Plan) -> str:
    mem = plan.memory_breakdown()
    return (
        f"mesh {plan.mesh_shape} on {plan.hardware.name}: step {plan.step_time_s * 1e3:.4f} ms "
        f"(comm {plan.comm_time_s * 1e3:.4f} ms, compute {plan.compute_time_s * 1e3:.4f} ms), "
        f"comm {format_bytes(plan.comm_bytes)}, memory {format_bytes(mem['total'])}/device, "
        f"solved in {plan.solve_time_s:.3f} s"
        + _levers(plan)
    )


def _levers(plan: Plan) -> str:
    if not plan.train:
        return ""
    remat = remat_json(plan)
    text = f"; micro-batches {plan.microbatches}"
    if remat:
        text += "; remat " + ", ".join(f"{unit}: {policy}" for unit, policy in remat.items())
    return text


