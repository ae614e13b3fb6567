"""What a choice of the decision problem costs: per-op time rows with their collectives, the
layout each op computes its operands in, each param's optimizer-state layout, and the memory
breakdown. The plan reports these; it never prices anything itself.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshjax.cost.collectives import Collective
from meshjax.cost.memory import backward_working_set, working_set
from meshjax.cost.remat import kept_under, working_under
from meshjax.cost.strategies import per_device_bytes, reshard
from meshjax.graph import Graph
from meshjax.layout import Layout
from meshjax.solver.problem import Problem


@dataclass(frozen=True)
class OpCost:
    """Predicted cost of one op (all its instances and loop trips), with the reshards into it."""

    op: str
    kind: str
    strategy: str
    comm_time: float
    compute_time: float
    collectives: tuple[Collective, ...]


def op_costs(problem: Problem, choice: tuple[int, ...]) -> list[OpCost]:
    """Per-op costs of a choice, each reshard charged to the op that needs it."""
    incoming: dict[int, list[tuple[float, tuple[Collective, ...]]]] = defaultdict(list)
    for e in problem.edges:
        a = e.src_group[choice[e.src]]
        b = e.dst_group[choice[e.dst]]
        _, colls = reshard(
            e.tensor, e.src_layouts[a], e.dst_layouts[b], problem.mesh_shape, problem.hardware,
            train=problem.train, needs_grad=e.needs_grad, recompute=e.recompute,
        )
        if e.rerun:  # a rematerialised consumer's forward reshard runs again
            colls += reshard(e.tensor, e.src_layouts[a], e.dst_layouts[b], problem.mesh_shape, problem.hardware)[1]
        incoming[e.dst].append((float(e.cost[a, b]), tuple(Collective(c.kind, c.axes, c.nbytes, c.count * e.multiplicity, c.latency_share) for c in colls)))
    out = []
    for k, (node, c) in enumerate(zip(problem.nodes, choice)):
        if node.op is None:
            continue
        s = node.options[c]
        mult = node.multiplicity
        ran = s.collectives + (tuple(node.recompute_collectives[c]) if node.recompute_collectives is not None else ())
        colls = tuple(Collective(x.kind, x.axes, x.nbytes, x.count * mult, x.latency_share) for x in ran)
        compute = s.compute_time * mult + (float(node.recompute_compute[c]) if node.recompute_compute is not None else 0.0)
        comm = s.comm_time * mult
        for t, extra in incoming.get(k, []):
            comm += t
            colls += extra
        # A self-edge (tied instances feeding their own twin) and a recomputation's collectives
        # were folded into the node's time.
        comm += float(node.time[c]) - s.time * mult - (compute - s.compute_time * mult)
        out.append(OpCost(node.key, node.op.kind, s.label, comm, compute, colls))
    return out



def recompute_flops(problem: Problem, choice: Sequence[int]) -> float:
    """Floating-point work per device the backward pass spends recomputing (rematerialised
    blocks' forward ops), per step."""
    total = 0.0
    for node, c in zip(problem.nodes, choice):
        if node.op is None or node.recompute_compute is None:
            continue
        split = math.prod(problem.mesh_shape[a] for _, axes in node.options[c].assign for a in axes)
        total += node.op.index.flops / split * node.multiplicity
    return total


def operand_layouts(problem: Problem, choice: Sequence[int]) -> dict[str, tuple[Layout, ...]]:
    """Op name -> the layout each operand is computed in, by the chosen strategy."""
    graph = problem.graph
    out = {}
    for op in graph.ops:
        k = problem.node_of[op.output]
        strategy = problem.nodes[k].options[choice[k]]
        out[op.name] = tuple(
            Layout(graph.tensors[name].dims, layout.axes)
            for name, layout in zip(op.inputs, strategy.operand_layouts)
        )
    return out


def state_layouts(problem: Problem, choice: Sequence[int], layouts: Mapping[str, Layout]) -> dict[str, Layout]:
    """Layout of each param's optimizer state (and of its gradient once reduced): the param's
    own, or (ZeRO-1) one sharded over more mesh axes, where the update then runs."""
    out = {}
    for t in problem.graph.params:
        k = problem.node_of[t.name]
        state = getattr(problem.nodes[k].options[choice[k]], "state", None)
        out[t.name] = Layout(t.dims, state.axes) if state is not None else layouts[t.name]
    return out


def memory_breakdown(
    graph: Graph,
    mesh_shape: Mapping[str, int],
    train: bool,
    layouts: Mapping[str, Layout],
    states: Mapping[str, Layout],
    operands: Mapping[str, tuple[Layout, ...]],
    optimizer_state_factor: float = 2.0,
    remat: Mapping[str, str] | None = None,
    microbatches: int = 1,
) -> dict[str, float]:
    """Predicted bytes per device by kind: params, grads, optimizer state, inputs, activations
    (in training, those kept for the backward pass, plus its peak). With ``remat`` (block ->
    policy), ``recompute`` is what a recomputing block holds for one instance; with
    ``microbatches`` (``graph`` is one micro-batch), ``grad_accumulator`` the summed gradients
    and ``inputs`` the whole batch."""
    from meshjax.microbatch import accumulator_bytes

    out: dict[str, float] = defaultdict(float)
    peak = 0.0
    kept = kept_under(graph, remat) if train else {}
    if train and remat:
        for name, copies in working_under(graph, remat).items():
            out["recompute"] += copies * per_device_bytes(graph.tensors[name], layouts[name], mesh_shape)
    for name, tensor in graph.tensors.items():
        b = per_device_bytes(tensor, layouts[name], mesh_shape)
        if tensor.role == "param":
            out["params"] += b
            if train:
                out["grads"] += b  # computed in the param's layout, whatever the state's
                out["optimizer_state"] += per_device_bytes(tensor, states[name], mesh_shape) * optimizer_state_factor
                if microbatches > 1:
                    out["grad_accumulator"] += accumulator_bytes(tensor, layouts[name], mesh_shape)
        elif tensor.role == "input":
            out["inputs"] += b * microbatches
        elif tensor.role != "constant":
            if train:
                out["activations"] += kept.get(name, 0) * b * graph.trip_count(tensor.block)
    transient = backward_working_set if train else working_set
    for op in graph.ops:
        op_operands = operands.get(op.name) or tuple(layouts[n] for n in op.inputs)
        peak = max(peak, transient(op, graph, layouts[op.output], op_operands, mesh_shape))
    out["backward_peak" if train else "activations"] = peak
    out["total"] = sum(out.values())
    return dict(out)
