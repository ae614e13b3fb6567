"""Read back what XLA compiled: collectives, memory and flops of a jitted program.

The collectives are read from the optimised HLO text (``compiled.as_text()``).
This module finds each collective, works out its replica groups, maps the
groups to mesh axes, and multiplies by how often its computation runs.

Comm bytes
----------
The whole project uses one definition of **comm bytes**: each collective's
*result* bytes per device (for a tuple-shaped result, the sum over its elements)
times the number of times it runs in one step, summed over all collectives.
"Times it runs" is the product of the trip counts of the ``while`` loops around
it (nested loops multiply). A collective outside any loop runs once. Each
branch of a ``conditional`` is counted as if it ran (an upper bound). Async
pairs (``all-reduce-start``/``-done``, ``async-start``/``async-done``, ...)
count as one collective.

Partition ids and mesh axes
---------------------------
In an SPMD program, replica-group ids are partition ids. ``jax.jit`` assigns
partition ``i`` to ``mesh.devices.flat[i]``, so partition ``i`` sits at mesh
coordinates ``np.unravel_index(i, mesh.devices.shape)``. A collective's
``axes`` are the mesh axes whose coordinates vary inside its groups. (Programs
are assumed to have one replica, so ids without ``use_global_device_ids`` are
read as partition ids too.)
``axes_exact`` is False when the groups are not exactly the full set of groups
formed by varying those axes (for example, when a collective spans only a
sub-axis).

Example
-------
>>> from jax.sharding import NamedSharding, PartitionSpec as P
>>> from meshjax.devices import make_mesh
>>> mesh = make_mesh({"data": 4, "model": 2})
>>> s = lambda *spec: NamedSharding(mesh, P(*spec))
>>> f = jax.jit(lambda x, w: x @ w, in_shardings=(s(None, "model"), s("model", None)), out_shardings=s())
>>> compiled = f.lower(jnp.ones((8, 16)), jnp.ones((16, 4))).compile()
>>> report = inspect_compiled(compiled, mesh)
>>> [(c.kind, c.axes, c.bytes_per_device, c.count) for c in report.collectives]   # f32[8,4] partial sums
[('all-reduce', ('model',), 128, 1)]
>>> report.comm_bytes
128
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshjax import devices
from meshjax.hlo.groups import (
    Groups,
    group_axes_are_exact,
    groups_text,
    pair_axes,
    parse_replica_groups,
    replica_groups_to_axes,
    source_target_pairs,
)
from meshjax.hlo.loops import run_counts
from meshjax.hlo.metadata import op_name_of
from meshjax.hlo.text import Instr, parse_module, shape_bytes, tuple_elements

# Opcode of a synchronous collective -> the kind we report.
_KINDS: dict[str, str] = {
    "all-reduce": "all-reduce",
    "all-gather": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-to-all": "all-to-all",
    "ragged-all-to-all": "all-to-all",
    "collective-permute": "collective-permute",
}
_START_KINDS: dict[str, str] = {f"{op}-start": kind for op, kind in _KINDS.items()}


# --------------------------------------------------------------------------- #
# Result types
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Collective:
    """One collective in the compiled program.

    ``bytes_per_device`` is the size of the op's result on one device. ``count``
    is how many times it runs per step (the product of the enclosing while-loop
    trip counts). ``trip_count_known`` is False when some enclosing loop's trip
    count could be neither read nor inferred (counted as 1). ``axes_exact`` is
    False when the groups are not exactly the groups formed by varying ``axes``.
    """

    kind: str
    bytes_per_device: int
    axes: tuple[str, ...]
    count: int
    groups: Groups
    name: str
    op_name: str = ""
    trip_count_known: bool = True
    axes_exact: bool = True

    @property
    def comm_bytes(self) -> int:
        """Result bytes per device times the number of runs per step."""
        return self.bytes_per_device * self.count


@dataclass(frozen=True)
class CompiledReport:
    """Collectives, memory and flops of one compiled program."""

    collectives: tuple[Collective, ...]
    memory: dict[str, int] = field(default_factory=dict)
    flops: float = 0.0

    @property
    def comm_bytes(self) -> int:
        """Total comm bytes per step (see the module docstring)."""
        return sum(c.comm_bytes for c in self.collectives)

    def by_kind(self) -> dict[str, dict[str, int]]:
        """kind -> {"count": total runs per step, "bytes": total comm bytes}."""
        out: dict[str, dict[str, int]] = {}
        for c in self.collectives:
            entry = out.setdefault(c.kind, {"count": 0, "bytes": 0})
            entry["count"] += c.count
            entry["bytes"] += c.comm_bytes
        return out

    def by_axes(self) -> dict[tuple[str, ...], int]:
        """Mesh axes -> total comm bytes over those axes."""
        out: dict[tuple[str, ...], int] = {}
        for c in self.collectives:
            out[c.axes] = out.get(c.axes, 0) + c.comm_bytes
        return out

    def table(self) -> Any:
        """A ``rich.table.Table`` listing the collectives."""
        from rich.table import Table

        table = Table(title="Collectives", caption=f"total comm bytes/step: {self.comm_bytes:,}")
        for col, justify in [
            ("kind", "left"),
            ("axes", "left"),
            ("bytes/device", "right"),
            ("count", "right"),
            ("comm bytes", "right"),
            ("op_name", "left"),
        ]:
            # XLA's metadata for a combined collective lists every op it came from: cut it short.
            long = col == "op_name"
            table.add_column(col, justify=justify, overflow="ellipsis" if long else "fold", no_wrap=long, max_width=60 if long else None)  # type: ignore[arg-type]
        for c in self.collectives:
            axes = ",".join(c.axes) if c.axes else "-"
            if not c.axes_exact:
                axes += " (partial)"
            count = str(c.count) if c.trip_count_known else f"{c.count}?"
            table.add_row(
                c.kind, axes, f"{c.bytes_per_device:,}", count, f"{c.comm_bytes:,}", c.op_name
            )
        return table


# --------------------------------------------------------------------------- #
# Collectives
# --------------------------------------------------------------------------- #
def _result_shape(instr: Instr, done_shapes: Mapping[str, str]) -> str:
    """Shape of a collective's result; for ``-start`` ops the ``-done`` shape."""
    if not instr.opcode.endswith("-start"):
        return instr.shape
    if instr.name in done_shapes:
        return done_shapes[instr.name]
    if instr.opcode == "all-reduce-start":
        return instr.shape  # all-reduce-start's result is the data itself
    # (operand(s), output, context...) for all-gather / collective-permute / async sugar.
    elements = tuple_elements(instr.shape)
    return elements[1] if len(elements) > 1 else instr.shape







def _remap(groups: Groups, partition_to_mesh: Sequence[int] | None) -> Groups:
    if partition_to_mesh is None:
        return groups
    n = len(partition_to_mesh)
    return tuple(tuple(partition_to_mesh[i] if 0 <= i < n else i for i in g) for g in groups)


def _collective(
    instr: Instr,
    kind: str,
    shape: str,
    runs: tuple[int, bool],
    mesh_shape: Mapping[str, int],
    partition_to_mesh: Sequence[int] | None,
) -> Collective:
    num_devices = math.prod(mesh_shape.values())
    if kind == "collective-permute":
        groups = _remap(source_target_pairs(instr.attrs), partition_to_mesh)
        axes, exact = pair_axes(groups, mesh_shape), True
    else:
        raw = groups_text(instr.attrs)
        groups = parse_replica_groups(raw if raw is not None else "{}", num_devices)
        groups = _remap(groups, partition_to_mesh)
        axes = replica_groups_to_axes(groups, mesh_shape)
        exact = group_axes_are_exact(groups, axes, mesh_shape)
    return Collective(
        kind=kind,
        bytes_per_device=shape_bytes(shape),
        axes=axes,
        count=runs[0],
        groups=groups,
        name=instr.name,
        op_name=op_name_of(instr.attrs),
        trip_count_known=runs[1],
        axes_exact=exact,
    )


def parse_collectives(
    hlo_text: str,
    mesh_shape: Mapping[str, int],
    *,
    partition_to_mesh: Sequence[int] | None = None,
) -> tuple[Collective, ...]:
    """Every collective reachable from ENTRY in optimised HLO text.

    ``mesh_shape`` maps mesh axis names to sizes, in mesh order. Replica-group
    ids are partition ids; ``partition_to_mesh[i]``, if given, is the flat mesh
    index of partition ``i`` (by default, partition ``i`` is mesh index ``i``).
    Collectives come out in computation order, then instruction order.
    """
    mesh_shape = dict(mesh_shape)
    comps = parse_module(hlo_text)
    runs = run_counts(comps)
    done_shapes = {
        i.operands[0]: i.shape
        for c in comps.values()
        for i in c.instrs
        if i.opcode.endswith("-done") and i.operands
    }
    out: list[Collective] = []
    for comp in comps.values():
        if comp.name not in runs:
            continue
        for instr in comp.instrs:
            kind = _KINDS.get(instr.opcode) or _START_KINDS.get(instr.opcode)
            if kind is None:
                continue
            shape = _result_shape(instr, done_shapes)
            out.append(
                _collective(instr, kind, shape, runs[comp.name], mesh_shape, partition_to_mesh)
            )
    return tuple(out)


# --------------------------------------------------------------------------- #
# Compiled executables
# --------------------------------------------------------------------------- #
def _memory(compiled: Any) -> dict[str, int]:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if stats is None:
        return {}
    fields = {
        "argument_bytes": "argument_size_in_bytes",
        "output_bytes": "output_size_in_bytes",
        "temp_bytes": "temp_size_in_bytes",
        "alias_bytes": "alias_size_in_bytes",
        "generated_code_bytes": "generated_code_size_in_bytes",
    }
    memory = {key: int(getattr(stats, attr, 0) or 0) for key, attr in fields.items()}
    memory["peak_bytes"] = (
        memory["argument_bytes"] + memory["output_bytes"] + memory["temp_bytes"] - memory["alias_bytes"]
    )
    return memory


def _flops(compiled: Any) -> float:
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return 0.0
    if cost is None:
        return 0.0
    entries = cost if isinstance(cost, (list, tuple)) else [cost]
    return float(sum(float(e.get("flops", 0.0)) for e in entries if isinstance(e, Mapping)))


def _partition_to_mesh(compiled: Any, mesh: Any) -> list[int] | None:
    """Flat mesh index of each partition, if the executable says otherwise than 0..n-1."""
    try:
        local = list(compiled.runtime_executable().local_devices())
    except Exception:
        return None
    flat = [d.id for d in np.asarray(mesh.devices).flat]
    ids = [d.id for d in local]
    if len(ids) != len(flat) or sorted(ids) != sorted(flat) or ids == flat:
        return None
    where = {device_id: i for i, device_id in enumerate(flat)}
    return [where[i] for i in ids]


def inspect_compiled(compiled: Any, mesh: Any) -> CompiledReport:
    """Collectives, memory and flops of a ``jax.stages.Compiled`` on ``mesh``."""
    hlo_text = compiled.as_text()
    if not hlo_text:
        raise ValueError("compiled.as_text() returned no HLO text")
    mesh_shape = devices.mesh_shape(mesh)
    collectives = parse_collectives(
        hlo_text, mesh_shape, partition_to_mesh=_partition_to_mesh(compiled, mesh)
    )
    return CompiledReport(collectives=collectives, memory=_memory(compiled), flops=_flops(compiled))
