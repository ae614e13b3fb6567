"""What a pipeline adds to one stage's plan: the bubble, the point-to-point sends between
stages, the activations every stage holds, and the memory the solver must see.

One stage's layouts are solved on :func:`meshjax.pipeline.stage_graph.stage_graph`, whose scan
already runs ``(L/p)(m + p - 1)`` times: the time slots of the bubble are paid there, as the SPMD
program pays them (every stage computes in every slot). This module prices the rest, for the
program :mod:`meshjax.pipeline.lower` builds:

- per time slot, one collective-permute over the stage axis of one micro-batch's carry forward,
  and one of its gradient backward: ``2 (m + p - 1)`` sends at the stage axis's link speed
  (1F1B: ``2 (m + p - 2)``, see :func:`p2p_sends`);
- the scan's output leaves the last stage by one all-reduce over the stage axis (1F1B: one per
  micro-batch, of its rows), and its gradient reaches every stage's embedding by another;
- with ``remat`` (1F1B always) each stage keeps only its input per micro-batch in flight and
  recomputes its forward in the backward pass: activations of one micro-batch instead of all of
  them, for one more forward of the stage's ops (a third of their compute); GPipe keeps
  ``m + p - 1`` inputs, 1F1B ``min(m, 2p - 1)`` (:attr:`Pipeline.held
  <meshjax.pipeline.schedule.Pipeline.held>`);
- the bubble fraction ``(p - 1)/(m + p - 1)``, the same for both schedules.

Example::

    >>> from meshjax.pipeline import Pipeline
    >>> p2p_sends(Pipeline(stages=8, microbatches=32))       # forward + backward, per step
    78
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from meshjax.cost.collectives import Collective, collective_time, time_of
from meshjax.cost.hardware import Hardware
from meshjax.cost.stage_boundary import in_stage
from meshjax.cost.strategies import per_device_bytes
from meshjax.graph import Graph
from meshjax.layout import Layout
from meshjax.pipeline.schedule import Pipeline
from meshjax.solver.problem import Problem

RECOMPUTE_SHARE = 1.0 / 3.0  # a training op's forward is a third of its forward + backward flops


def p2p_sends(pipe: Pipeline) -> int:
    """Collective-permutes over the stage axis per step: GPipe one per time slot each way; 1F1B
    none from the last slot that makes an activation or a cotangent (nothing reads them),
    ``2 (m + p - 2)``.

    >>> p2p_sends(Pipeline(stages=4, microbatches=8, schedule="1f1b"))
    20
    """
    if pipe.stages == 1:
        return 0
    return 2 * pipe.iterations if pipe.schedule == "gpipe" else 2 * (pipe.iterations - 1)


def carry_names(graph: Graph, block: str) -> tuple[list[str], list[str]]:
    """``(inputs, outputs)`` of the scan ``block``: the tensors entering its carry and the final
    carries leaving it (the loop's ``loop_carry`` and ``scan_carry`` ops)."""
    inputs = [op.inputs[0] for op in graph.ops if op.kind == "loop_carry" and op.block == block]
    outputs = [op.output for op in graph.ops if op.kind == "scan_carry" and graph.producer[op.inputs[0]].block == block]
    return inputs, outputs


def replica_axes(graph: Graph, layouts: Mapping[str, Layout], block: str, pipe: Pipeline) -> tuple[str, ...]:
    """The data-parallel axes of every stage: the leading axes of the scan carry's
    ``pipe.batch_dim`` that no stacked layer param is split over. The lowering runs one replica
    of each stage per shard of them (:func:`meshjax.pipeline.lower.pipelined_scan`), so each
    accumulates its own weight gradients over the time slots and they are summed over these
    axes once per step, after the loop."""
    carries = [op.output for op in graph.ops if op.kind == "loop_carry" and op.block == block]
    used = {a for t in graph.params if pipe.dim in t.dims and t.name in layouts for ax in layouts[t.name].axes for a in ax}
    out: tuple[str, ...] | None = None
    for name in carries:
        layout = layouts[name]
        axes = layout.axes[layout.dims.index(pipe.batch_dim)] if pipe.batch_dim in layout.dims else ()
        prefix = []
        for a in axes:
            if a in used or a == pipe.axis:
                break
            prefix.append(a)
        if out is not None:  # the common leading run of every carry's axes
            prefix = [a for i, a in enumerate(prefix) if i < len(out) and out[: i + 1] == tuple(prefix[: i + 1])]
        out = tuple(prefix)
    return out or ()


def runs_head_per_replica(replicas: Sequence[str], head_layouts: Iterable[Layout]) -> bool:
    """Whether 1F1B runs its head (what comes after the pipelined scan) once per data-parallel
    replica, each on its own copy of the head's weights (:mod:`meshjax.pipeline.one_f_one_b`):
    when there are replicas and no weight the head reads is split over one of their axes (a
    replica cannot hold its own copy of such a weight)."""
    return bool(replicas) and not any(set(layout.used_axes) & set(replicas) for layout in head_layouts)


def compute_bound(graph: Graph, block: str, mesh_shape: Mapping[str, int], hardware: Hardware, pipe: Pipeline, train: bool = True) -> float:
    """A lower bound on the step time of ``pipe`` from the stage graph ``graph``: its flops (with
    remat, the stage's forward once more) split perfectly over the stage's devices at peak, with
    no communication. The micro-batch search skips counts whose bound exceeds a plan it has.
    ``mesh_shape`` is the whole mesh: the scan's ops split over one stage's devices, the rest
    over all of them (:mod:`meshjax.cost.stage_boundary`)."""
    devices = math.prod(mesh_shape.values())
    stage = math.prod(n for a, n in mesh_shape.items() if a != pipe.axis)
    total = 0.0
    for op in graph.ops:
        dtype = graph.tensors[op.output].dtype
        flops = op.index.flops * graph.trip_count(op.block) * (3 if train else 1)
        if op.block == block and pipe.remat and train:
            flops *= 1 + RECOMPUTE_SHARE
        total += flops / hardware.peak_flops(dtype if dtype != "bool" else "float32") / (stage if op.block == block else devices)
    return total


def prepare_problem(problem: Problem, block: str, pipe: Pipeline) -> None:
    """Make the solver's memory row and weight-gradient syncs the pipeline's (in place).

    The stage graph keeps every time slot's activations, as the lowered GPipe program does.
    With ``pipe.remat`` (1F1B always) a stage keeps ``pipe.held`` micro-batches of its input
    carry through the backward pass, and one micro-batch's activations of its layers only
    while one slot's backward recomputes them (:func:`_transient`). 1F1B runs the head and
    loss per micro-batch (the stage graph's :data:`~meshjax.pipeline.stage_graph.AFTER`
    block) in the same slot: their activations join the stage's transient row; its float32
    weight-gradient accumulators are resident (:func:`_stage_weight_buffers`). The
    micro-batched input buffer and the output (GPipe) or input-gradient (1F1B) buffer, a
    whole-batch carry each, are charged to the scan's final carry. Weight gradients are summed
    over the data axes once per step (:func:`_reduce_weight_gradients_once`)."""
    from meshjax.pipeline.stage_graph import AFTER

    if not problem.train:
        return
    _reduce_weight_gradients_once(problem, block, pipe.iterations, pipe)
    if pipe.schedule == "1f1b":  # the head runs per data replica too (one_f_one_b)
        _reduce_weight_gradients_once(problem, AFTER, pipe.microbatches, pipe)
    if pipe.remat:
        _rerun_forward_collectives(problem, block, pipe.axis)
    carries = []
    for node in problem.nodes:
        if node.op is None:
            if pipe.stages > 1 and node.tensor.role == "param" and pipe.dim in node.tensor.dims:
                carries.append((node, _stage_weight_buffers(node, problem.mesh_shape, pipe)))
            continue
        # In-stage bytes: the pipeline's buffers hold the carry off the stage axis.
        act = _array([per_device_bytes(node.tensor, in_stage(layout, pipe.axis), problem.mesh_shape) for layout in node.result_layouts])
        if node.op.block == block and pipe.remat:
            _scale(node, 1 / pipe.iterations)
            if node.op.kind == "loop_carry":
                carries.append((node, pipe.held * act))
            continue
        whole = 1  # the final carry's size over the whole batch's
        if node.op.block == AFTER:
            _scale(node, 1 / pipe.microbatches)
            whole = pipe.microbatches
        if node.op.kind == "scan_carry" and pipe.stages > 1 and _reads_block(problem.graph, node.op, block):
            carries.append((node, BUFFERS * whole * act))
    if pipe.schedule == "1f1b":
        # One time slot runs the head's vjp and the stage's recomputed backward; XLA interleaves
        # them (measured on XLA:CPU: the head's logits are live while the recompute's stacked
        # residuals fill), so their activations share one transient row.
        _transient(problem, lambda op: op.block in (block, AFTER))
    elif pipe.remat:
        _transient(problem, lambda op: op.block == block)
    for node, values in carries:  # kept stage inputs and the loop's buffers: through the backward pass
        _add(node, values)


def _stage_weight_buffers(node, mesh_shape: Mapping[str, int], pipe: Pipeline):
    """1F1B's float32 accumulators of a stacked layer param's gradients over the time slots
    (``one_f_one_b``), beside the gradient the gradients row counts. GPipe accumulates in the
    backward loop's carry, in the param's dtype: nothing more. (Each data replica's copy of
    the stage's weights, ``lower.replicated_stages``, is not counted: on ``2x2x2`` it put GPipe
    with stage remat further below its compiled memory, 0.87x at ``m = 4``.)"""
    if pipe.schedule != "1f1b":
        return _array([0.0] * len(node.result_layouts))
    own = _array([per_device_bytes(node.tensor, layout, mesh_shape) for layout in node.result_layouts])
    return own * 4 / node.tensor.itemsize


def _transient(problem: Problem, member) -> None:
    """Make the activations of the nodes whose op is a ``member`` live only while their own
    backward runs, instead of through the whole backward pass: a stage recomputed in one time
    slot (stage remat, and 1F1B) holds one micro-batch's activations of its ``L/p`` layers
    (the inner scan's stacked residuals, allocated whole) during that slot's backward only, and
    1F1B's head and loss keep theirs within the slot that runs their ``vjp``. Each such node's
    activations leave its resident memory for a shared peak row (:attr:`Node.shares
    <meshjax.solver.problem.Node.shares>`) per member with a backward peak: all the members'
    activations plus that member's peak. The step's memory is then the resident bytes plus the
    largest transient, so the head's backward peak and a stage's recomputed slot do not add."""
    members = [k for k, n in enumerate(problem.nodes) if n.op is not None and member(n.op)]
    if not members:
        return
    held = {}
    for k in members:
        node = problem.nodes[k]
        values = node.parts.get("activations", 0.0) * np.ones(len(node.options))
        held[k] = values
        node.memory = node.memory - values
        node.parts = {**node.parts, "activations": node.parts.get("activations", 0.0) - values}
    owners = [k for k in members if problem.nodes[k].peak.any()] or members[-1:]
    for owner in owners:
        for k in members:
            node = problem.nodes[k]
            values = held[k] + (node.peak if k == owner else 0.0)
            node.shares = dict(node.shares or {})
            node.shares[owner] = node.shares.get(owner, 0.0) + values


def _scale(node, factor: float) -> None:
    node.memory = node.memory * factor
    node.parts = {kind: values * factor for kind, values in node.parts.items()}


def _reduce_weight_gradients_once(problem: Problem, block: str, trips: int, pipe: Pipeline) -> None:
    """The lowering's data-parallel replicas (:func:`replica_axes`) each accumulate their stage's
    weight gradients over the ``m + p - 1`` slots (``trips``; 1F1B's head, the
    :data:`~meshjax.pipeline.stage_graph.AFTER` block, over its ``m``) and sum them once after
    the loop: a layer's weight-gradient all-reduce over the axes of the micro-batch's batch dim
    runs once per step, not once per slot. Each such collective of ``block``'s ops is charged
    ``1/trips`` of its bytes per trip (the same bytes in total as one sum per layer), in time
    and in the collectives the plan reports."""
    for node in problem.nodes:
        if node.op is None or node.op.block != block:
            continue
        for c, strategy in enumerate(node.options):
            batch_axes = set(dict(strategy.assign).get(pipe.batch_dim, ()))
            colls, saved = [], 0.0
            for coll in strategy.collectives:
                if _is_weight_gradient(coll) and batch_axes and set(coll.axes) <= batch_axes:
                    once = dataclasses.replace(coll, nbytes=coll.nbytes / trips)
                    saved += time_of(coll, problem.mesh_shape, problem.hardware) - time_of(once, problem.mesh_shape, problem.hardware)
                    coll = once
                colls.append(coll)
            if saved:
                node.options[c] = dataclasses.replace(strategy, collectives=tuple(colls), comm_time=strategy.comm_time - saved)
                node.time[c] -= saved * node.multiplicity


def _rerun_forward_collectives(problem: Problem, block: str, axis: str) -> None:
    """Stage remat recomputes the stage's forward in the backward pass, its collectives (a
    tensor-parallel layer's sums) included: charge each of the scan's ops its forward
    collectives once more per trip (the recomputed flops are :func:`pipeline_cost`'s). The
    scan's ops are off the stage ``axis``: their forward strategies are found without it."""
    from meshjax.cost.remat import recompute_times
    from meshjax.solver.problem import without_axes

    cache: dict = {}
    mesh_shape, hardware = without_axes(problem.mesh_shape, problem.hardware, frozenset({axis}))
    for node in problem.nodes:
        if node.op is None or node.op.block != block or node.recompute_collectives is not None:
            continue
        total, compute, colls = recompute_times(node.op, problem.graph, list(node.options), mesh_shape, hardware, cache)
        node.time = node.time + (total - compute) * node.multiplicity
        node.recompute_collectives = colls


def _is_weight_gradient(coll: Collective) -> bool:
    """A scanned layer's weight-gradient all-reduce (:func:`meshjax.cost.strategies.op_strategies`
    gives those, and only those, a share of the latency)."""
    return coll.kind == "all-reduce" and coll.latency_share < 1.0


def _add(node, values) -> None:
    """Further activation memory of a node (its options' bytes per device)."""
    node.memory = node.memory + values
    node.parts = {**node.parts, "activations": node.parts.get("activations", 0.0) + values}


BUFFERS = 2  # the micro-batched input and output of the pipelined scan, a whole-batch carry each


def _reads_block(graph: Graph, op, block: str) -> bool:
    producer = graph.producer.get(op.inputs[0])
    return producer is not None and producer.block == block


def _array(values):
    import numpy as np

    return np.asarray(values, dtype=float)


@dataclass(frozen=True)
class PipelineCost:
    """A pipeline's predicted step: the stage plan's time plus what the pipeline adds."""

    pipeline: Pipeline
    stage_time_s: float  # the stage plan's step (all m + p - 1 slots, and the parts outside)
    recompute_time_s: float  # remat: the stage's forward once more
    p2p_time_s: float
    boundary_time_s: float
    collectives: tuple[Collective, ...]  # over the stage axis
    memory_bytes: float  # per device: the solver's memory row (the pipeline's buffers included)
    buffer_bytes: float
    outside_time_s: float  # embedding, head and loss: their layouts may split them over the stage axis

    @property
    def step_time_s(self) -> float:
        return self.stage_time_s + self.recompute_time_s + self.p2p_time_s + self.boundary_time_s

    @property
    def comm_bytes(self) -> float:
        return sum(c.comm_bytes for c in self.collectives)

    @property
    def bubble_fraction(self) -> float:
        return self.pipeline.bubble_fraction

    def to_json(self) -> dict:
        return {
            **self.pipeline.to_json(),
            "bubble_fraction": self.bubble_fraction,
            "step_time_s": self.step_time_s,
            "stage_time_s": self.stage_time_s,
            "recompute_time_s": self.recompute_time_s,
            "p2p_time_s": self.p2p_time_s,
            "boundary_time_s": self.boundary_time_s,
            "outside_time_s": self.outside_time_s,
            "p2p_sends": p2p_sends(self.pipeline),
            "stage_axis_comm_bytes": self.comm_bytes,
            "memory_bytes": self.memory_bytes,
        }


def pipeline_cost(
    stage_plan,
    block: str,
    pipe: Pipeline,
    mesh_shape: Mapping[str, int],
    hardware: Hardware,
    memory_bytes: float,
) -> PipelineCost:
    """Price ``pipe`` around ``stage_plan`` (solved on the stage graph; ``mesh_shape`` is the
    whole mesh, stage axis included; ``memory_bytes`` the solver's memory row of the choice)."""
    from meshjax.pipeline.stage_graph import AFTER

    graph = stage_plan.graph
    stage_mesh = stage_plan.mesh_shape
    layouts: Mapping[str, Layout] = stage_plan.layouts
    inputs, outputs = carry_names(graph, block)
    # The carry leaves every slot in its final layout, held off the stage axis
    # (meshjax.cost.stage_boundary); whole-batch bytes per device / m (a 1F1B stage graph has
    # the final carry at a micro-batch's size).
    full_out = sum(
        per_device_bytes(graph.tensors[n], in_stage(layouts[n], pipe.axis), stage_mesh) * (pipe.microbatches if graph.tensors[n].block == AFTER else 1)
        for n in outputs
    )
    full_in = sum(per_device_bytes(graph.tensors[n], in_stage(layouts[n], pipe.axis), stage_mesh) for n in inputs)
    micro = full_out / pipe.microbatches
    axis = (pipe.axis,)
    colls: list[Collective] = []
    p2p = boundary = 0.0
    if pipe.stages > 1:
        # The scan's output leaves the last stage whole (GPipe) or per micro-batch (1F1B).
        leaving = (full_out, 1) if pipe.schedule == "gpipe" else (micro, pipe.microbatches)
        colls.append(Collective("collective-permute", axis, micro, p2p_sends(pipe)))
        colls.append(Collective("all-reduce", axis, *leaving))
        colls.append(Collective("all-reduce", axis, full_in, 1))
        p2p = p2p_sends(pipe) * collective_time("collective-permute", micro, axis, mesh_shape, hardware)
        boundary = leaving[1] * collective_time("all-reduce", leaving[0], axis, mesh_shape, hardware)
        boundary += collective_time("all-reduce", full_in, axis, mesh_shape, hardware)
    inside = {op.name for op in graph.ops if op.block == block}
    recompute = sum(c.compute_time for c in stage_plan.op_costs if c.op in inside) * RECOMPUTE_SHARE if pipe.remat else 0.0
    outside = sum(c.comm_time + c.compute_time for c in stage_plan.op_costs if c.op not in inside)
    buffers = BUFFERS * full_out if pipe.stages > 1 else 0.0  # already in the solver's row
    return PipelineCost(
        pipeline=pipe,
        stage_time_s=stage_plan.step_time_s,
        recompute_time_s=recompute,
        p2p_time_s=p2p,
        boundary_time_s=boundary,
        collectives=tuple(colls),
        memory_bytes=memory_bytes,
        buffer_bytes=buffers,
        outside_time_s=outside,
    )


__all__ = ["BUFFERS", "PipelineCost", "RECOMPUTE_SHARE", "carry_names", "compute_bound", "replica_axes", "p2p_sends", "pipeline_cost", "prepare_problem"]
