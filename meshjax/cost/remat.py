"""Rematerialisation: what a repeated block keeps for its backward pass under each policy, and
what its backward pass recomputes.

A *unit* is a repeated block of the graph: a scan body, or a group of identical unrolled blocks
(tied to their first instance). Each unit runs under one policy:

- ``none``: every activation the backward pass reads is kept (:mod:`meshjax.cost.memory`).
- ``selective``: only the results of matmuls with a weight are kept; the attention core (the
  matmuls of two activations, softmax) and the elementwise ops are recomputed (Korthikanti et
  al. 2022).
- ``full``: only the unit's input is kept; the whole block is recomputed.

A recomputed op is re-run from the nearest kept values (or the unit's inputs) during the
backward pass; its forward compute and forward collectives run again, and the tensors it
recomputes live during one instance's backward pass (the *recompute working set*), each until
its op's backward has run (:func:`recompute_order`). The lowering
applies the same sets with ``jax.checkpoint`` and ``save_only_these_names``: the names it saves
are :func:`saved_names`, so what runs is what is priced.

Example::

    >>> import meshjax as mj
    >>> from meshjax import models
    >>> ex = models.example("gpt-tiny", abstract=True, scan_layers=True)
    >>> graph = mj.trace(ex.loss, ex.params, *ex.batch)
    >>> sorted(remat_effect(graph, "blocks", "selective").kept)
    ['blocks/attn/k', 'blocks/attn/out', 'blocks/attn/q', 'blocks/attn/v', 'blocks/carry', 'blocks/mlp/hidden']
    >>> sorted(remat_effect(graph, "blocks", "full").kept)
    ['blocks/carry']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from meshjax.cost.hardware import Hardware
from meshjax.cost.memory import extra_residuals, kept_by, kept_copies
from meshjax.cost.strategies import Strategy, op_strategies
from meshjax.errors import MeshjaxError
from meshjax.graph import Graph, Op

POLICIES = ("none", "selective", "full")
# Ops that only bring a value into a unit (a scan's carry and its slices of the stacked params):
# their results are the unit's inputs, which the backward pass always has.
_ENTRY = frozenset({"loop_carry", "slice"})


@dataclass(frozen=True)
class Unit:
    """A repeated block a remat policy applies to: its name, kind, the ops of one instance (the
    template's, for unrolled blocks) and the scope prefix that names them."""

    name: str
    kind: str  # "scan" | "unrolled"
    ops: tuple[str, ...]
    prefix: str


@dataclass(frozen=True)
class RematEffect:
    """What a policy does to one unit (per instance): ``kept`` tensor -> copies kept until the
    backward pass, ``recomputed`` ops re-run in the backward pass, ``working`` tensor -> copies
    the recomputation holds while one instance's backward runs."""

    kept: Mapping[str, int]
    recomputed: frozenset[str]
    working: Mapping[str, int]


def remat_units(graph: Graph) -> dict[str, Unit]:
    """Every unit of ``graph`` by name (a scan's scope, an unrolled group's stem)."""
    out = {}
    for block in graph.blocks.values():
        if block.kind == "scan":
            ops = tuple(op.name for op in graph.ops if op.block == block.name)
            out[block.name] = Unit(block.name, "scan", ops, block.name + "/")
        else:
            prefix = block.instances[0]
            ops = tuple(op.name for op in graph.ops if op.block is None and op.name.startswith(prefix))
            out[block.name] = Unit(block.name, "unrolled", ops, prefix)
    return out


def unit_of(graph: Graph) -> dict[str, str]:
    """Op name -> the unit it belongs to (every instance of an unrolled group included)."""
    units = remat_units(graph)
    out = {}
    for unit in units.values():
        block = graph.blocks[unit.name]
        if unit.kind == "scan":
            out.update({name: unit.name for name in unit.ops})
            continue
        for op in graph.ops:
            if op.block is None and any(op.name.startswith(p) for p in block.instances):
                out[op.name] = unit.name
    return out


def _data_dependent(graph: Graph) -> frozenset[str]:
    """Tensors whose value depends on an input (not only on params and constants)."""
    out = {t.name for t in graph.tensors.values() if t.role == "input"}
    changed = True
    while changed:
        changed = False
        for op in graph.ops:
            if op.output not in out and any(i in out for i in op.inputs):
                out.add(op.output)
                changed = True
    return frozenset(out)


def saveable(op: Op, graph: Graph, policy: str) -> bool:
    """Whether ``policy`` keeps ``op``'s result: ``selective`` keeps matmuls with a weight (one
    operand not computed from the inputs), ``full`` keeps nothing."""
    if policy == "none":
        return True
    if policy == "full":
        return False
    if policy != "selective":
        raise MeshjaxError(f"remat policy {policy!r}: expected one of {', '.join(POLICIES)}")
    if op.kind != "einsum":
        return False
    data = graph.__dict__.get("_data_dependent")
    if data is None:
        data = graph.__dict__["_data_dependent"] = _data_dependent(graph)
    return sum(name in data for name in op.inputs) == 1


def remat_effect(graph: Graph, unit: str, policy: str) -> RematEffect:
    """What ``policy`` keeps and recomputes in ``unit`` (see the module docstring)."""
    memo = graph.__dict__.setdefault("_remat_effects", {})
    if (unit, policy) not in memo:
        memo[(unit, policy)] = _effect(graph, unit, policy)
    return memo[(unit, policy)]


def _effect(graph: Graph, unit_name: str, policy: str) -> RematEffect:
    units = remat_units(graph)
    if unit_name not in units:
        raise MeshjaxError(f"remat: no repeated block {unit_name!r} (blocks: {', '.join(units) or 'none'})")
    if policy not in POLICIES:
        raise MeshjaxError(f"remat policy {policy!r}: expected one of {', '.join(POLICIES)}")
    unit = units[unit_name]
    inside = {graph.producer[name].output: graph.producer[name] for name in unit.ops}
    base = kept_copies(graph)
    if policy == "none":
        kept = {t: base[t] for t in inside if t in base}
        return RematEffect(kept, frozenset(), {})
    grads = graph.requires_grad
    # What the backward pass of the unit reads: residuals of its ops.
    residuals = set()
    for op in inside.values():
        if op.output in grads:
            residuals |= {t for t in kept_by(op, graph) if t in inside}
            if extra_residuals(op):
                residuals.add(op.output)
    saved = {t for t, op in inside.items() if op.kind not in _ENTRY and saveable(op, graph, policy)}
    entries = {t for t, op in inside.items() if op.kind in _ENTRY}
    # Recompute every residual not saved, from saved values and the unit's inputs.
    recomputed: set[str] = set()
    used_saved: set[str] = set()
    used_entries: set[str] = set()
    stack = [t for t in residuals if t not in saved and t not in entries]
    while stack:
        t = stack.pop()
        if t in recomputed:
            continue
        recomputed.add(t)
        for name in inside[t].inputs:
            if name in saved:
                used_saved.add(name)
            elif name in entries:
                used_entries.add(name)
            elif name in inside:
                stack.append(name)
    kept: dict[str, int] = {}
    for t in (residuals & saved) | used_saved:
        kept[t] = 1
    for t in (residuals & entries) | used_entries:
        if graph.tensors[t].role in ("activation", "output") and t in grads and graph.producer[t].kind == "loop_carry":
            kept[t] = 1  # the carry each iteration starts from; slices of params cost nothing
    # Recomputed tensors live while one instance's backward runs, as they would under none.
    working = {t: base[t] for t in recomputed if t in base}
    for t in recomputed:
        if t not in base and t in residuals:
            working[t] = 1
    return RematEffect(kept, frozenset(inside[t].name for t in recomputed), working)


def saved_names(graph: Graph, unit: str, policy: str, instance_prefix: str | None = None) -> tuple[str, ...]:
    """The tensor names ``jax.checkpoint`` saves for ``unit`` under ``policy`` (for the
    instance named by ``instance_prefix``, when the unit is an unrolled group)."""
    effect = remat_effect(graph, unit, policy)
    template = remat_units(graph)[unit].prefix
    names = sorted(effect.kept)
    if instance_prefix is not None and instance_prefix != template:
        names = [instance_prefix + n[len(template):] if n.startswith(template) else n for n in names]
    return tuple(names)


def kept_under(graph: Graph, remat: Mapping[str, str] | None) -> dict[str, int]:
    """:func:`~meshjax.cost.memory.kept_copies` under a policy per unit: tensor -> copies kept
    until the backward pass (every instance of a tied unrolled block counted by its own name)."""
    out = dict(kept_copies(graph))
    for unit_name, policy in (remat or {}).items():
        if policy == "none":
            continue
        effect = remat_effect(graph, unit_name, policy)
        made = _instances(graph, unit_name)
        for name, template in made:
            out.pop(name, None)
            if template in effect.kept:
                out[name] = effect.kept[template]
        # A checkpointed instance keeps what it reads from outside itself (its input).
        for name in _external_inputs(graph, unit_name):
            out[name] = max(out.get(name, 0), 1)
    return out


def _external_inputs(graph: Graph, unit_name: str) -> set[str]:
    """Activations an unrolled unit's instances read from outside themselves (a scan's carry
    is its ``loop_carry`` result, kept by :func:`remat_effect`)."""
    block = graph.blocks[unit_name]
    if block.kind != "unrolled":
        return set()
    out = set()
    for op in graph.ops:
        prefix = next((p for p in block.instances if op.name.startswith(p)), None)
        if prefix is None or op.block is not None:
            continue
        for name in op.inputs:
            t = graph.tensors[name]
            if not name.startswith(prefix) and t.role in ("activation", "output") and name in graph.requires_grad:
                out.add(name)
    return out


def working_under(graph: Graph, remat: Mapping[str, str] | None) -> dict[str, int]:
    """Tensor (of a unit's template instance) -> copies its recomputation holds at once."""
    out: dict[str, int] = {}
    for unit_name, policy in (remat or {}).items():
        if policy != "none":
            out.update(remat_effect(graph, unit_name, policy).working)
    return out


def recompute_order(graph: Graph, remat: Mapping[str, str] | None) -> list[tuple[str, ...]]:
    """Per rematerialised unit, the tensors its template's ops make, in forward order.

    The backward pass of a recomputed block runs its ops in reverse forward order: while op
    ``i``'s backward runs, the recomputed tensors of the ops up to ``i`` are live and those of
    the ops after it are freed already. So the block's peak is the largest, over ``i``, of
    what :func:`working_under` holds among the first ``i`` tensors plus op ``i``'s backward
    working set, not all of it plus the largest working set.

    >>> import meshjax as mj
    >>> from meshjax import models
    >>> ex = models.example("gpt-tiny", abstract=True, scan_layers=True)
    >>> graph = mj.trace(ex.loss, ex.params, *ex.batch)
    >>> (order,) = recompute_order(graph, {"blocks": "full"})
    >>> order.index("blocks/attn/q") < order.index("blocks/mlp/hidden")
    True
    """
    out = []
    units = remat_units(graph)
    for unit_name, policy in (remat or {}).items():
        if policy != "none":
            out.append(tuple(graph.producer[name].output for name in units[unit_name].ops))
    return out


def _instances(graph: Graph, unit_name: str) -> list[tuple[str, str]]:
    """(tensor name, its template's name) for every tensor any instance of the unit makes."""
    unit = remat_units(graph)[unit_name]
    block = graph.blocks[unit_name]
    template_outputs = {graph.producer[n].output for n in unit.ops}
    if unit.kind == "scan":
        return [(t, t) for t in template_outputs]
    out = []
    for prefix in block.instances:
        for t in template_outputs:
            out.append((prefix + t[len(unit.prefix):], t))
    return [(n, t) for n, t in out if n in graph.tensors]


def recompute_times(
    op: Op, graph: Graph, strategies: list[Strategy], mesh_shape: Mapping[str, int], hw: Hardware, cache: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, list]:
    """Per training strategy of ``op`` (one execution): the time of re-running its forward pass
    (compute and forward collectives, as the forward strategy with the same split runs them),
    the compute part of it, and the collectives it re-runs."""
    cache = {} if cache is None else cache
    key = ("forward strategies", op.name, op.index)
    if key not in cache:
        cache[key] = {(s.assign, s.result_layout): s for s in op_strategies(op, graph, mesh_shape, hw, train=False)}
    forward = cache[key]
    total, compute, colls = [], [], []
    for s in strategies:
        f = forward.get((s.assign, s.result_layout))
        if f is None:
            raise MeshjaxError(f"op {op.name!r}: strategy {s.label} has no forward-only counterpart to price its recomputation")
        f_compute, f_comm = f.compute_time, f.comm_time
        total.append(f_compute + f_comm)
        compute.append(f_compute)
        colls.append(f.collectives)
    return np.array(total), np.array(compute), colls
