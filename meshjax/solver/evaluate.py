"""The one evaluator: what each option of the decision problem costs, and what a choice costs.

:func:`build_problem <meshjax.solver.problem.build_problem>` prices every option with the
functions here (the ILP's coefficients: time, memory by kind, transient peak), and
:func:`evaluate` turns a choice into the figures a plan reports: per-op time rows with their
collectives (reshards into an op are charged to it; ZeRO-1 syncs and the host input feed are rows
of their own), comm bytes, and the memory breakdown. Both read the same arrays, so a plan's step
time is the ILP's objective and its memory the ILP's memory row, to rounding:

    evaluate(problem, choice).step_time_s == problem.total_time(choice)
    evaluate(problem, choice).memory["total"] == problem.memory(choice)

Memory kinds (bytes per device): ``params``, ``gradients``, ``optimizer_state`` (moments and the
fp32 master copy), ``inputs``, ``activations`` (training: kept for the backward pass;
inference: the largest working set) and, in training, ``backward_peak`` (the backward pass's
transient at its largest op); ``constants`` when the function closes over arrays; in training,
when non-zero, ``held_cotangents`` and ``backward_copies`` (:data:`HELD_KINDS`) and
``gradient_sync`` (:data:`SYNC_KINDS`). ``gradients`` are a scanned
layer's stacked weight gradients, held through the backward loop; a gradient that waits for the
step's all-reduce is the end-of-step sync's (``gradient_sync``), one that goes straight into its
optimizer update part of its op's ``backward_peak`` (:func:`meshjax.cost.memory.updated_gradients`).

A later decision (a rematerialisation policy, micro-batching) adds its terms the same way: a
function here that prices each option of a node (time, a ``parts`` entry per memory kind, a
peak), called by ``build_problem``; :func:`evaluate` then reports it with no change.

Example::

    >>> import jax.numpy as jnp, meshjax as mj
    >>> from meshjax.cost.hardware import PROFILES
    >>> from meshjax.solver.problem import build_problem
    >>> loss = lambda p, x: mj.sum(mj.einsum("b e, e m -> b m", x, p["w"]), "b m")
    >>> g = mj.trace(loss, {"w": mj.named(jnp.ones((4, 8)), "e m")}, mj.named(jnp.ones((2, 4)), "b e"))
    >>> problem = build_problem(g, {"x": 2}, PROFILES["h100-node"], train=True)
    >>> choice = [0] * len(problem.nodes)
    >>> ev = evaluate(problem, choice)
    >>> abs(ev.step_time_s - problem.total_time(choice)) < 1e-15, ev.memory["total"] == problem.memory(choice)
    (True, True)
    >>> ev.memory["optimizer_state"]           # Adam: two fp32 moments of the 4 x 8 weight
    256.0
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from meshjax.cost.collectives import Collective
from meshjax.cost.hardware import Hardware
from meshjax.cost.strategies import ParamOption, per_device_bytes, reshard, zero_sync_time
from meshjax.graph import Tensor
from meshjax.layout import Layout
from meshjax.optimizer import Optimizer

if TYPE_CHECKING:
    from meshjax.solver.problem import Problem

MEMORY_KINDS = ("params", "gradients", "optimizer_state", "inputs", "activations", "backward_peak")
# Kinds only the memory levers add (reported when non-zero): the float32 gradient accumulator of
# micro-batching, and what a rematerialised block has recomputed and still holds when its
# backward pass peaks (:func:`~meshjax.solver.problem.peak_rows`).
LEVER_KINDS = ("grad_accumulator", "recompute")
# Kinds the backward pass holds to its end, reported when non-zero, in training: operands it reads
# in another layout than they are kept in (an FSDP weight gathered again: ``backward_copies``),
# and, in a model of unrolled layers, the cotangents its weight gradients are made from
# (``held_cotangents``, :func:`meshjax.cost.memory.held_cotangent`).
HELD_KINDS = ("backward_copies", "held_cotangents")
# Reported when non-zero, in training: how much more than the backward pass's row a gradient
# all-reduce holds (``gradient_sync``: a scan trip's, or the end-of-step one's; the step's memory
# is the largest of the phases, :meth:`~meshjax.solver.problem.Problem.memory`).
SYNC_KINDS = ("gradient_sync",)
# The memory rows besides the backward pass's (``Node.sync`` columns): while a scan trip's
# combined gradient all-reduce runs, and while the end-of-step one runs.
SYNC_PHASES = ("loop_sync", "end_sync")


def sync_rows(node) -> np.ndarray:
    """A node's bytes per device in each of :data:`SYNC_PHASES`, options x phases. ``Node.sync``
    holds the loop sync's figure as a difference from the node's resident ``memory`` (what a
    trip's sync adds; a rematerialised block's recomputation is in no resident figure, it is
    freed by then), so that a later rescaling of
    ``memory`` (a pipeline's stage, :mod:`meshjax.cost.pipeline`) carries over, and the
    end-of-step sync's as it is."""
    if node.sync is None:
        return np.zeros((len(node.memory), len(SYNC_PHASES)))
    return np.column_stack([node.memory + node.sync[:, 0], node.sync[:, 1]])


@dataclass(frozen=True)
class OpCost:
    """Predicted cost of one row of the step: an op (all its instances and loop trips, with the
    reshards into it), a param's ZeRO-1 sync, or an input's host feed."""

    op: str
    kind: str
    strategy: str
    comm_time: float
    compute_time: float
    collectives: tuple[Collective, ...]


class StepTotals:
    """A step's totals, summed over its :class:`OpCost` rows (``self.op_costs``); the one
    definition :class:`Evaluation` and :class:`~meshjax.plan.Plan` share."""

    op_costs: tuple[OpCost, ...]

    @property
    def collectives(self) -> list[Collective]:
        return [c for row in self.op_costs for c in row.collectives]

    @property
    def comm_bytes(self) -> float:
        """Predicted comm bytes per step, defined as in :mod:`meshjax.hlo`."""
        return sum(c.comm_bytes for c in self.collectives)

    @property
    def comm_time_s(self) -> float:
        return sum(r.comm_time for r in self.op_costs)

    @property
    def compute_time_s(self) -> float:
        return sum(r.compute_time for r in self.op_costs)

    @property
    def step_time_s(self) -> float:
        return self.comm_time_s + self.compute_time_s


@dataclass(frozen=True)
class Evaluation(StepTotals):
    """What a choice costs: time rows, comm, and bytes per device by kind (``memory["total"]``)."""

    rows: tuple[OpCost, ...]
    memory: Mapping[str, float]

    @property
    def op_costs(self) -> tuple[OpCost, ...]:
        return self.rows


# --- pricing options (the ILP's coefficients) --------------------------------------------------


def price_param_options(
    tensor: Tensor, options: Sequence[ParamOption], mesh_shape: Mapping[str, int], hw: Hardware,
    optimizer: Optimizer, instances: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Time and memory parts of each (param layout, state layout) option in training.

    The gradient is computed in the param's layout (XLA materialises it whole before any
    scatter); the optimizer state (moments and fp32 master copy, :class:`Optimizer`) lives in the
    state layout, except what the optimizer keeps replicated (adafactor's row/column statistics).
    """
    sharded, replicated = optimizer.state_bytes(int(np.prod(tensor.shape)), tensor.dtype, tensor.shape)
    param = np.array([per_device_bytes(tensor, o.layout, mesh_shape) for o in options]) * instances
    state = np.array([sharded * per_device_bytes(tensor, o.state, mesh_shape) / tensor.nbytes + replicated for o in options])
    time = np.array([zero_sync_time(tensor, o, mesh_shape, hw) for o in options]) * instances
    return time, {"params": param, "gradients": param.copy(), "optimizer_state": state * instances}


def price_source_options(
    tensor: Tensor, layouts: Sequence[Layout], mesh_shape: Mapping[str, int], hw: Hardware, instances: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Time and memory of each layout of a param (inference) or an input. Inputs are fed from
    the host every step, so each device should receive only its shard."""
    nbytes = np.array([per_device_bytes(tensor, l, mesh_shape) for l in layouts]) * instances
    if tensor.role == "input":
        return nbytes / hw.host_bandwidth, {"inputs": nbytes}
    return np.zeros(len(layouts)), {"params" if tensor.role == "param" else "constants": nbytes}


def price_accumulation(
    tensor: Tensor, layouts: Sequence[Layout], time: np.ndarray, parts: dict[str, np.ndarray],
    mesh_shape: Mapping[str, int], k: int, instances: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A source's time and memory parts when the step runs ``k`` micro-batches: an input holds
    and is fed the whole batch (its tensor is one micro-batch's), a param adds a float32
    gradient accumulator in its layout (:func:`meshjax.microbatch.accumulator_bytes`)."""
    from meshjax.microbatch import accumulator_bytes

    parts = dict(parts)
    if tensor.role == "input":
        parts["inputs"] = parts["inputs"] * k
        return time * k, parts
    if tensor.role == "param":
        parts["grad_accumulator"] = np.array([accumulator_bytes(tensor, l, mesh_shape) for l in layouts]) * instances
    return time, parts


# --- a choice ----------------------------------------------------------------------------------


def evaluate(problem: Problem, choice: Sequence[int]) -> Evaluation:
    """The time rows and memory breakdown of ``choice`` (one option per node of ``problem``)."""
    incoming: dict[int, list[tuple[float, tuple[Collective, ...]]]] = defaultdict(list)
    memory: dict[str, float] = defaultdict(float)
    for e in problem.edges:
        a = e.src_group[choice[e.src]]
        b = e.dst_group[choice[e.dst]]
        if e.memory is not None:
            memory["backward_copies"] += float(e.memory[a, b])
        _, colls = reshard(
            e.tensor, e.src_layouts[a], e.dst_layouts[b], problem.mesh_shape, problem.hardware,
            train=problem.train, needs_grad=e.needs_grad, recompute=e.recompute,
        )
        if e.rerun:  # a rematerialised consumer's forward reshard runs again
            colls += reshard(e.tensor, e.src_layouts[a], e.dst_layouts[b], problem.mesh_shape, problem.hardware)[1]
        colls = tuple(Collective(c.kind, c.axes, c.nbytes, c.count * e.multiplicity, c.latency_share) for c in colls)
        incoming[e.dst].append((float(e.cost[a, b]), colls))
    rows = []
    peak = 0.0
    sync = np.zeros(len(SYNC_PHASES))
    for k, (node, c) in enumerate(zip(problem.nodes, choice)):
        for kind, values in node.parts.items():
            memory[kind] += float(values[c])
        sync += sync_rows(node)[c]
        peak = max(peak, float(node.peak[c]))
        option = node.options[c]
        if node.op is None:
            if node.time[c]:
                label = "host feed" if node.tensor.role == "input" else f"zero-1 sync {option}"
                rows.append(OpCost(node.key, node.tensor.role, label, float(node.time[c]), 0.0, ()))
            continue
        mult = node.multiplicity
        ran = option.collectives + (tuple(node.recompute_collectives[c]) if node.recompute_collectives is not None else ())
        colls = tuple(Collective(x.kind, x.axes, x.nbytes, x.count * mult, x.latency_share) for x in ran)
        compute = option.compute_time * mult
        if node.recompute_compute is not None:  # a rematerialised op computes its forward again
            compute += float(node.recompute_compute[c])
        # The node's time holds its own collectives and any self-edge (tied instances feeding
        # their own twin) folded into it.
        comm = float(node.time[c]) - compute
        for t, extra in incoming.get(k, []):
            comm += t
            colls += extra
        rows.append(OpCost(node.key, node.op.kind, option.label, comm, compute, colls))
    # A rematerialised block's backward transient is a shared row: the recomputed tensors live
    # at its owner's backward (``recompute``) and the owner's own peak.
    for row, value in problem.shared_peaks(choice).items():
        if value > peak:
            peak = value
            memory["recompute"] = value - float(problem.nodes[row].peak[choice[row]])
    if memory.get("recompute"):
        peak -= memory["recompute"]
    memory["backward_peak" if problem.train else "activations"] += peak
    out = {kind: memory.get(kind, 0.0) for kind in MEMORY_KINDS if problem.train or kind not in ("gradients", "backward_peak")}
    for kind in ("constants", *LEVER_KINDS, *HELD_KINDS):
        if memory.get(kind):
            out[kind] = memory[kind]
    backward = sum(out.values())
    if sync.max() > backward:
        out["gradient_sync"] = float(sync.max()) - backward
    out["total"] = sum(out.values())
    return Evaluation(tuple(rows), out)


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


def computed_layouts(problem: Problem, choice: Sequence[int]) -> dict[str, Layout]:
    """Op name -> the layout the op computes its result in, where the chosen strategy then
    reduce-scatters or gathers it into another (ops that compute in place are absent)."""
    graph = problem.graph
    out = {}
    for op in graph.ops:
        k = problem.node_of[op.output]
        strategy = problem.nodes[k].options[choice[k]]
        layout = strategy.computed_layout
        if layout is not None and layout.axes != strategy.result_layout.axes:
            out[op.name] = Layout(graph.tensors[op.output].dims, layout.axes)
    return out


def state_layouts(problem: Problem, choice: Sequence[int], layouts: Mapping[str, Layout]) -> dict[str, Layout]:
    """Layout of each param's optimizer state (and of its gradient once reduced): the param's
    own, or (ZeRO-1) one sharded over more mesh axes, where the update then runs."""
    out = {}
    for t in problem.graph.params:
        k = problem.node_of[t.name]
        option = problem.nodes[k].options[choice[k]]
        out[t.name] = Layout(t.dims, option.state.axes) if isinstance(option, ParamOption) else layouts[t.name]
    return out
