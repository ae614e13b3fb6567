"""The decision problem the ILP and the exhaustive oracle both solve.

One *node* per decision: the layout of each param or input (a source), and the strategy of each
op (which fixes its result's layout). One *edge* per (producer, consumer, operand): the reshard
cost between the producer's result layout and the layout the consumer's strategy needs. In
training, a tensor is kept for the backward pass in the layout it was made in; a consumer whose
backward reads a resharded operand re-does the reshard there (FSDP re-gathers its weights), so
memory stays a sum over nodes.
Strategies and layouts are grouped by the layout they imply, so an edge's cost is a small matrix
over distinct layouts.

Repeated blocks cost nothing extra to solve: a scan body is in the graph once and its costs are
multiplied by the trip count; identical unrolled blocks are tied to their first instance, which
carries the costs of every instance.

Example::

    >>> from meshjax import models
    >>> from meshjax.cost.hardware import PROFILES
    >>> ex = models.example("mlp-tiny", abstract=True)
    >>> graph = mj.trace(ex.loss, ex.params, *ex.batch)
    >>> problem = build_problem(graph, {"data": 4, "model": 2}, PROFILES["h100-node"])
    >>> [node.key for node in problem.nodes][:4]       # params and inputs, then one node per op
    ['mlp/w_in', 'mlp/w_out', 'x', 'target']
    >>> problem.total_time([0] * len(problem.nodes)) > 0    # every node's first option
    True
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from meshjax.cost.hardware import Hardware
from meshjax.cost.memory import (
    backward_reads, backward_working_set, gradient_sync, held_cotangent, resident_copy, updated_gradients, working_set,
)
from meshjax.cost.remat import kept_under, recompute_order, recompute_times, remat_effect, unit_of, working_under
from meshjax.cost.strategies import ParamOption, Strategy, enumerate_layouts, op_strategies, per_device_bytes, reshard
from meshjax.cost.strategies import state_layouts
from meshjax.errors import InfeasibleError
from meshjax.graph import Graph, Op, Tensor
from meshjax.layout import Layout, MeshShape, Rules, as_layout, axes_of, check_rules, parse_rules
from meshjax.optimizer import Optimizer, get_optimizer
from meshjax.solver.evaluate import SYNC_PHASES, sync_rows, price_accumulation, price_param_options, price_source_options

@dataclass
class Constraints:
    """What the user fixed: dims split exactly as a rule says (``()``: never split), tensors
    pinned to a layout, and dims limited to a set of candidate axis tuples. ``avoid`` maps a
    tensor to mesh axes none of its layouts may use, as a source or as an op's result, nor the
    operands of the op that makes it (a pipeline's stages: their tensors stay off the stage
    axis, :func:`meshjax.cost.stage_boundary.off_stage`)."""

    rules: Rules = field(default_factory=dict)
    pins: dict[str, Layout] = field(default_factory=dict)
    candidates: dict[str, list[tuple[str, ...]]] = field(default_factory=dict)
    avoid: dict[str, frozenset[str]] = field(default_factory=dict)
    minor: frozenset[str] = frozenset()  # axes that, on a dim split over several, come last

    @classmethod
    def make(cls, graph: Graph, mesh_shape: MeshShape, rules=None, pins=None, candidates=None) -> Constraints:
        parsed = parse_rules(rules)
        check_rules(parsed, graph, mesh_shape)
        pinned = {name: as_layout(graph.tensor(name), value) for name, value in (pins or {}).items()}
        cands = {}
        for dim, options in (candidates or {}).items():
            cands[dim] = [axes_of(o) for o in options]
            check_rules({dim: tuple(a for axes in cands[dim] for a in axes)}, graph, mesh_shape)
        return cls(parsed, pinned, cands)

    def allows(self, layout: Layout, avoid: frozenset[str] = frozenset()) -> bool:
        for dim, axes in zip(layout.dims, layout.axes):
            if avoid and avoid.intersection(axes):
                return False
            if self.minor and len(axes) > 1 and any(a in self.minor for a in axes[:-1]):
                return False
            if dim in self.rules and self.rules[dim] != axes:
                return False
            if dim in self.candidates and axes not in self.candidates[dim]:
                return False
        return True


@dataclass
class Node:
    key: str
    tensor: Tensor  # the source tensor, or the op's result
    op: Op | None
    options: list  # Strategy (op) or Layout (source)
    result_layouts: list[Layout]
    time: np.ndarray  # per option, already times the multiplicity
    memory: np.ndarray  # per option: bytes per device this node keeps resident (the sum of parts)
    peak: np.ndarray  # per option: bytes of a transient (training: the backward's; inference: the op's working set)
    multiplicity: int
    members: list[str]  # every tensor name this node decides
    parts: dict[str, np.ndarray] = field(default_factory=dict)  # memory by kind (meshjax.solver.evaluate)
    recompute_compute: np.ndarray | None = None  # per option: compute time of the recomputation (in ``time``)
    recompute_collectives: list | None = None  # per option: forward collectives the recomputation re-runs (once)
    # Training, options x SYNC_PHASES: what this node holds while a scan trip's gradient
    # all-reduce runs (as a difference from ``memory``) and while the end-of-step one does (the
    # other memory rows, meshjax.solver.evaluate.sync_rows; meshjax.cost.memory.gradient_sync).
    # None: nothing.
    sync: np.ndarray | None = None
    # Training, in a rematerialised block: peak row -> per option, what this node adds to that
    # row (the backward pass's transient is also the largest row's sum over the nodes that
    # share it; see :func:`peak_rows`). None: nothing.
    shares: dict[int, np.ndarray] | None = None


@dataclass
class Edge:
    src: int
    dst: int
    operand: int
    tensor: Tensor
    src_group: np.ndarray  # option of src -> row
    dst_group: np.ndarray  # option of dst -> column
    src_layouts: list[Layout]
    dst_layouts: list[Layout]
    cost: np.ndarray  # rows x columns, times the multiplicity
    multiplicity: int
    needs_grad: bool = True
    recompute: bool = False  # the consumer's backward re-does the reshard (it reads the operand)
    rerun: bool = False  # the consumer is rematerialised: its forward reshard runs again
    # Training, rows x columns: bytes per device the pair keeps resident besides its nodes (the
    # copy of an operand the consumer's backward reads in another layout, _copy_held; None: nothing).
    memory: np.ndarray | None = None


@dataclass
class Problem:
    graph: Graph
    mesh_shape: dict[str, int]
    hardware: Hardware
    train: bool
    nodes: list[Node]
    edges: list[Edge]
    node_of: dict[str, int]  # tensor name -> node index
    optimizer: Optimizer | None = None  # training: what each param's state costs
    zero: bool = False  # training: optimizer state may be sharded over more axes than its param
    remat: dict[str, str] = field(default_factory=dict)  # training: repeated block -> policy
    microbatches: int = 1  # training: ``graph`` is one of this many micro-batches of the step

    def total_time(self, choice: Sequence[int]) -> float:
        t = sum(float(n.time[c]) for n, c in zip(self.nodes, choice))
        for e in self.edges:
            t += float(e.cost[e.src_group[choice[e.src]], e.dst_group[choice[e.dst]]])
        return t

    def memory(self, choice: Sequence[int]) -> float:
        """Bytes per device: the largest of the backward pass's (resident plus the largest
        transient: a node's peak, or a rematerialised block's shared row, :func:`peak_rows`)
        and the gradient syncs' (:meth:`sync_memory`)."""
        resident = sum(float(n.memory[c]) for n, c in zip(self.nodes, choice))
        resident += sum(float(e.memory[e.src_group[choice[e.src]], e.dst_group[choice[e.dst]]]) for e in self.edges if e.memory is not None)
        peak = max((float(n.peak[c]) for n, c in zip(self.nodes, choice)), default=0.0)
        peak = max(peak, *self.shared_peaks(choice).values(), 0.0)
        return float(max(resident + peak, *self.sync_memory(choice)))

    def shared_peaks(self, choice: Sequence[int]) -> dict[int, float]:
        """Each shared peak row's bytes under ``choice`` (:attr:`Node.shares`)."""
        out: dict[int, float] = defaultdict(float)
        for n, c in zip(self.nodes, choice):
            for row, values in (n.shares or {}).items():
                out[row] += float(values[c])
        return dict(out)

    def least_peak(self) -> float:
        """No choice has a backward transient (largest node peak or shared row) below this."""
        rows: dict[int, float] = defaultdict(float)
        for n in self.nodes:
            for row, values in (n.shares or {}).items():
                rows[row] += float(values.min())
        return max([float(n.peak.min()) for n in self.nodes] + list(rows.values()), default=0.0)

    def sync_memory(self, choice: Sequence[int]) -> np.ndarray:
        """Bytes per device in each of :data:`SYNC_PHASES`: while a scan trip's gradient
        all-reduce runs (what stays resident, less the backward's transients and what a
        rematerialised block recomputes, plus the trip's weight gradients being summed), and
        while the end-of-step one runs (params, optimizer state and inputs, the weight
        gradients being summed, partial sums and results, and the stacked gradients of
        scanned weights; the activations are freed by then)."""
        out = np.zeros(len(SYNC_PHASES))
        for n, c in zip(self.nodes, choice):
            out += sync_rows(n)[c]
        return out

    def layouts(self, choice: Sequence[int]) -> dict[str, Layout]:
        """The layout of every tensor of the graph under ``choice``."""
        out = {}
        for name, tensor in self.graph.tensors.items():
            node = self.nodes[self.node_of[name]]
            layout = node.result_layouts[choice[self.node_of[name]]]
            out[name] = Layout(tensor.dims, layout.axes)
        return out


def _grouped(layouts: list[Layout]) -> tuple[np.ndarray, list[Layout]]:
    distinct: dict[Layout, int] = {}
    groups = np.array([distinct.setdefault(l, len(distinct)) for l in layouts], dtype=np.int64)
    return groups, list(distinct)


def canonical_names(graph: Graph) -> dict[str, str]:
    """Tensor name -> the name of its twin in the first instance of an unrolled block."""
    out = {name: name for name in graph.tensors}
    for block in graph.blocks.values():
        if block.kind != "unrolled":
            continue
        template = block.instances[0]
        for name, tensor in graph.tensors.items():
            for prefix in block.instances[1:]:
                if name.startswith(prefix):
                    twin = template + name[len(prefix):]
                    other = graph.tensors.get(twin)
                    if other is not None and other.shape == tensor.shape and other.dims == tensor.dims:
                        out[name] = out.get(twin, twin)
                    break
    return out


def build_problem(
    graph: Graph,
    mesh_shape: MeshShape,
    hardware: Hardware,
    *,
    train: bool = False,
    constraints: Constraints | None = None,
    optimizer: Optimizer | str | None = None,
    zero: bool = False,
    remat: Mapping[str, str] | None = None,
    microbatches: int = 1,
    cache: dict | None = None,
    edges: bool = True,
) -> Problem:
    """Nodes, options, costs and edges for ``graph`` on a mesh of ``mesh_shape``, each option
    priced by :mod:`meshjax.solver.evaluate`.

    ``optimizer``: in training, the :class:`~meshjax.optimizer.Optimizer` (or its name) whose
    state each param keeps (default Adam, fp32 moments, fp32 master copy of low-precision params).
    ``zero``: in training, let optimizer state be sharded over more mesh axes than its param
    (ZeRO-1); sharding the param itself (FSDP / ZeRO-3) is always an option.
    ``remat``: in training, repeated block -> policy (:mod:`meshjax.cost.remat`).
    ``microbatches``: ``graph`` is one of that many micro-batches of the step
    (:mod:`meshjax.microbatch`): ops and reshards run that many times, the optimizer once.
    ``cache``: a dict shared by builds on the same mesh and hardware (other policies, other
    micro-batch counts) to reuse the strategies and reshard times priced before.
    ``edges=False`` prices the nodes only (enough for memory bounds; no reshard is priced).
    """
    mesh_shape = dict(mesh_shape)
    optimizer = get_optimizer(optimizer)
    constraints = constraints or Constraints()
    canon = canonical_names(graph)
    members: dict[str, list[str]] = defaultdict(list)
    for name, key in canon.items():
        members[key].append(name)

    nodes: list[Node] = []
    node_of: dict[str, int] = {}
    remat = {u: p for u, p in (remat or {}).items() if p != "none"} if train else {}
    kept = kept_under(graph, remat) if train else {}
    working = working_under(graph, remat)
    units = unit_of(graph) if remat else {}
    cache = {} if cache is None else cache
    recomputed: dict[str, np.ndarray] = {}  # node key -> per option, what one instance recomputes
    op_count: dict[str, int] = defaultdict(int)
    for op in graph.ops:
        op_count[canon[op.output]] += graph.trip_count(op.block)
    read_directly = {canon[name] for op in graph.ops if not op.facts.slices for name in op.inputs}

    for key, names in members.items():
        tensor = graph.tensors[key]
        op = graph.producer.get(key)
        pin = next((constraints.pins[n] for n in names if n in constraints.pins), None)
        avoid = constraints.avoid.get(key, frozenset())
        per_instance = len(names)
        if op is None:
            layouts = [l for l in enumerate_layouts(tensor, mesh_shape) if constraints.allows(l, avoid)]
            if pin is not None:
                layouts = [l for l in layouts if l == pin]
            if not layouts:
                raise InfeasibleError(f"tensor {key!r}: no layout meets the rules/pins ({_describe(constraints, tensor)})")
            if train and tensor.role == "param":
                # Gradient and optimizer state may be sharded over more axes than the param.
                options = [
                    ParamOption(layout, state)
                    for layout in layouts
                    for state in (state_layouts(tensor, layout, mesh_shape) if zero else [layout])
                ]
                time, parts = price_param_options(tensor, options, mesh_shape, hardware, optimizer, per_instance)
                if key in read_directly:  # its readers' backward peak or the end-of-step sync holds its gradient
                    parts["gradients"] = np.zeros(len(options))
                result_layouts = [o.layout for o in options]
            else:
                options = result_layouts = layouts
                time, parts = price_source_options(tensor, layouts, mesh_shape, hardware, per_instance)
            if microbatches > 1 and train:
                time, parts = price_accumulation(tensor, result_layouts, time, parts, mesh_shape, microbatches, per_instance)
            memory = sum(parts.values())
            sync = None
            if train:
                # At the end-of-step sync everything a source holds is alive.
                sync = np.stack([np.zeros(len(options)), memory], axis=1)
            nodes.append(Node(key, tensor, None, options, result_layouts, time, memory, np.zeros(len(options)), per_instance, names, parts,
                              sync=sync))
        else:
            if ("strategies", op.name, op.index, avoid) not in cache:
                # Enumerated without the avoided axes (the same strategies as enumerating all
                # and dropping those that use them, at a fraction of the work).
                cache[("strategies", op.name, op.index, avoid)] = op_strategies(op, graph, *without_axes(mesh_shape, hardware, avoid),
                                                                                train=train)
            strategies = [
                s
                for s in cache[("strategies", op.name, op.index, avoid)]
                if constraints.allows(s.result_layout, avoid) and all(constraints.allows(l, avoid) for l in s.operand_layouts)
                and (pin is None or s.result_layout == pin)
            ]
            if not strategies:
                raise InfeasibleError(f"op {op.name!r} ({op.kind}): no strategy meets the rules/pins ({_describe(constraints, tensor)})")
            if op.facts.slices and graph.tensors[op.inputs[0]].role in ("param", "input"):
                # A scan's slice of a stacked param or input is made in place, in the stacked
                # array's layout (the edge into it allows no reshard): ops that want it in
                # another layout reshard it themselves. A slice resharded in the loop, or a
                # stack resharded before it, is a new value that JAX keeps whole for the
                # backward pass (a second copy of every layer's weights); a slice in place is
                # read back from the stacked array (meshjax.lower leaves it unpinned).
                strategies = [s for s in strategies if s.computed_layout is None or s.computed_layout == s.result_layout] or strategies
            strategies = _cheapest_per_layouts(strategies)
            mult = op_count[key]
            act = np.array([per_device_bytes(tensor, s.result_layout, mesh_shape) for s in strategies])
            if train:
                # Saved activations stay resident; the backward pass also holds, at its peak, the
                # largest activation's cotangent and one temporary of its size, and a gradient
                # that goes straight into its update (meshjax.cost.memory.updated_gradients). A
                # gradient that waits for the step's all-reduce is the end-of-step sync's.
                instances = mult // graph.trip_count(op.block)
                not_summed = np.array([updated_gradients(op, graph, s, mesh_shape) for s in strategies])
                memory = act * mult * kept.get(key, 0)
                # One layer's worth, not every instance's (meshjax.cost.memory.held_cotangent).
                held = np.array([held_cotangent(op, graph, s.result_layout, mesh_shape, s.computed_layout) for s in strategies])
                # What one instance recomputes lives during part of its backward pass (peak_rows).
                recomputing = act * working.get(key, 0)
                peak = np.array([backward_working_set(op, graph, s.result_layout, s.operand_layouts, mesh_shape, s.computed_layout) for s in strategies])
                peak = peak + not_summed
            else:
                memory = recomputing = held = np.zeros(len(strategies))
                peak = np.array([working_set(op, graph, s.result_layout, s.operand_layouts, mesh_shape, s.computed_layout) for s in strategies])
            time = np.array([s.time for s in strategies]) * mult
            parts = {"activations": memory}
            if held.any():
                parts["held_cotangents"] = held
                memory = memory + held
            sync = None
            if train:
                in_loop, at_end = np.array([gradient_sync(op, graph, s, mesh_shape) for s in strategies]).reshape(-1, 2).T
                # One trip's sync holds the trip's summed gradients beside the loop's stacked
                # activations and the carry's cotangent (the backward loop's state); the
                # end-of-step one, the other weights' (and no activations).
                carried = act * instances if op.kind == "loop_carry" and graph.needs_grad(op.output) else 0.0
                sync = np.stack([in_loop * instances + carried, at_end * instances], axis=1)
            if recomputing.any():
                recomputed[key] = recomputing
            recompute, rerun_colls = None, None
            if units.get(op.name) in remat and op.name in remat_effect(graph, units[op.name], remat[units[op.name]]).recomputed:
                extra, recompute, rerun_colls = recompute_times(op, graph, strategies, mesh_shape, hardware, cache)
                time = time + extra * mult
                recompute = recompute * mult
            nodes.append(Node(key, tensor, op, strategies, [s.result_layout for s in strategies], time, memory,
                              peak, mult, names, parts, recompute, rerun_colls, sync))
        for name in names:
            node_of[name] = len(nodes) - 1
    if recomputed:
        peak_rows(nodes, [[node_of[t] for t in order if t in node_of] for order in recompute_order(graph, remat)],
                  {node_of[key]: values for key, values in recomputed.items()})

    if not edges:
        problem = Problem(graph, mesh_shape, hardware, train, nodes, [], node_of, optimizer if train else None, zero,
                          dict(remat), microbatches)
        _repeat(problem, microbatches)
        return problem

    edge_mult: dict[tuple[int, int, int, str], int] = defaultdict(int)
    for op in graph.ops:
        dst = node_of[op.output]
        for i, name in enumerate(op.inputs):
            edge_mult[(node_of[name], dst, i, canon[name])] += graph.trip_count(op.block)

    def reshard_time(tensor: Tensor, a: Layout, b: Layout, needs_grad: bool, recompute: bool, rerun: bool = False) -> float:
        key = ("reshard", tensor.dims, tensor.shape, tensor.dtype, a.axes, b.axes, needs_grad, recompute)  # q, k, v share
        if key not in cache:
            cache[key] = reshard(tensor, a, b, mesh_shape, hardware, train=train, needs_grad=needs_grad, recompute=recompute)[0]
        if not rerun:
            return cache[key]
        # A rematerialised consumer re-does its forward reshard.
        fwd = ("forward reshard", *key[1:6])
        if fwd not in cache:
            cache[fwd] = reshard(tensor, a, b, mesh_shape, hardware)[0]
        return cache[key] + cache[fwd]

    edges: list[Edge] = []
    for (src, dst, i, tname), mult in edge_mult.items():
        tensor = graph.tensors[tname]
        needs_grad = graph.needs_grad(tname)
        src_group, src_layouts = _grouped(nodes[src].result_layouts)
        dst_group, dst_layouts = _grouped([s.operand_layouts[i] for s in nodes[dst].options])
        src_layouts = [Layout(tensor.dims, l.axes) for l in src_layouts]
        consumer = nodes[dst].op
        recompute = train and backward_reads(consumer, i, graph)
        unit = units.get(consumer.name)
        # A rematerialised consumer re-does its forward reshard, unless its backward re-does it
        # anyway (``recompute``): XLA computes the two identical reshards of the backward once.
        rerun = not recompute and unit in remat and consumer.name in remat_effect(graph, unit, remat[unit]).recomputed
        in_place = consumer.facts.slices and tensor.role in ("param", "input")  # see the slice's strategies
        # One matrix per (tensor, layouts, consumer's index form): builds sharing ``cache``
        # (other micro-batch counts, policies) price each once.
        matrix_key = ("edge", tensor.dims, tensor.shape, tensor.dtype, tuple(l.axes for l in src_layouts),
                      tuple(l.axes for l in dst_layouts), needs_grad, recompute, rerun, in_place,
                      consumer.index if consumer.facts.reduction else None, i)
        if matrix_key not in cache:
            cache[matrix_key] = np.array(
                [
                    [
                        np.inf
                        if _gathers_before_reducing(consumer, i, a, b) or (in_place and a != b)
                        else reshard_time(tensor, a, b, needs_grad, recompute, rerun)
                        for b in dst_layouts
                    ]
                    for a in src_layouts
                ]
            )
        cost = cache[matrix_key] * mult
        if src == dst:
            node = nodes[src]
            node.time = node.time + cost[src_group, dst_group]
            continue
        memory = None
        if train and resident_copy(consumer, i, graph):
            memory = _copy_held(tensor, src_layouts, dst_layouts, mesh_shape) * (mult // graph.trip_count(consumer.block))
        edges.append(Edge(src, dst, i, tensor, src_group, dst_group, src_layouts, dst_layouts, cost, mult, needs_grad, recompute, rerun,
                          memory if memory is not None and memory.any() else None))
    problem = Problem(graph, mesh_shape, hardware, train, nodes, edges, node_of, optimizer if train else None, zero,
                      dict(remat), microbatches)
    _repeat(problem, microbatches)
    return problem


def without_axes(mesh_shape: MeshShape, hardware: Hardware, axes: frozenset[str]) -> tuple[dict[str, int], Hardware]:
    """The mesh less ``axes``, and ``hardware`` with every other axis on the link it has in the
    whole mesh (:meth:`Hardware.link` depends on the axes around it)."""
    if not axes:
        return dict(mesh_shape), hardware
    inner = {a: n for a, n in mesh_shape.items() if a not in axes}
    return inner, dataclasses.replace(hardware, axis_links={a: hardware.link(mesh_shape, a) for a in inner})


def peak_rows(nodes: list[Node], orders: Sequence[Sequence[int]], recomputed: Mapping[int, np.ndarray]) -> None:
    """Give the nodes of each rematerialised block the shared peak rows of its backward pass.

    ``orders``: per block, its nodes in forward order; ``recomputed``: node -> per option, what
    it recomputes for one instance. The backward pass runs the block's ops in reverse: while
    node ``i``'s backward runs, what the nodes up to ``i`` recomputed is live and what the nodes
    after it recomputed is freed. Row ``i`` (numbered by node ``i``'s index) sums that prefix
    and node ``i``'s own peak; the backward transient is the largest row or node peak. A node
    with no peak of its own needs no row, except the block's last (the whole block recomputed,
    live as its backward starts).

    >>> a = Node("a", None, None, [0], [None], np.zeros(1), np.zeros(1), np.array([5.0]), 1, ["a"])
    >>> b = Node("b", None, None, [0], [None], np.zeros(1), np.zeros(1), np.array([1.0]), 1, ["b"])
    >>> peak_rows([a, b], [[0, 1]], {0: np.array([10.0]), 1: np.array([2.0])})
    >>> a.shares, b.shares  # row 0: a's 10 + a's peak 5; row 1: a's 10 + b's 2 + b's peak 1
    ({0: array([15.]), 1: array([10.])}, {1: array([3.])})
    """
    for order in orders:
        order = list(dict.fromkeys(order))
        for position, k in enumerate(order):
            prefix = order[:position + 1]
            if not any(j in recomputed for j in prefix) or not (nodes[k].peak.any() or k == order[-1]):
                continue
            for j in prefix:
                if j == k:
                    values = recomputed.get(k, 0.0) + nodes[k].peak
                elif j in recomputed:
                    values = recomputed[j]
                else:
                    continue
                nodes[j].shares = nodes[j].shares or {}
                nodes[j].shares[k] = np.asarray(values, dtype=float)


def _repeat(problem: Problem, k: int) -> None:
    """Run every op and reshard of one micro-batch ``k`` times (sources are priced for the
    whole step by :func:`~meshjax.solver.evaluate.price_accumulation`)."""
    if k == 1:
        return
    for node in problem.nodes:
        if node.op is not None:
            node.time = node.time * k
            node.multiplicity *= k
            if node.recompute_compute is not None:
                node.recompute_compute = node.recompute_compute * k
    for e in problem.edges:
        e.cost = e.cost * k
        e.multiplicity *= k


def _cheapest_per_layouts(strategies: list[Strategy]) -> list[Strategy]:
    """Of strategies that take and give the same layouts (so cost the same memory and reshards),
    only the fastest can be optimal."""
    best: dict[tuple, Strategy] = {}
    for s in strategies:
        key = (s.result_layout, s.operand_layouts)
        if key not in best or s.time < best[key].time:
            best[key] = s
    return list(best.values())


def _copy_held(tensor: Tensor, src: Sequence[Layout], dst: Sequence[Layout], mesh_shape: Mapping[str, int]) -> np.ndarray:
    """Per (kept layout, operand layout): what an operand the consumer's backward reads in
    another layout than it is kept in costs the backward pass. The lowering re-does the
    reshard there (an FSDP weight gathered again), and XLA:CPU keeps the copy until the step's
    end (the gathered weights of ``gpt-small``'s MLPs stayed live through the optimizer
    update), so it is counted as resident."""
    b = np.array([per_device_bytes(tensor, l, mesh_shape) for l in dst])
    return np.array([[0.0 if a == d else nbytes for d, nbytes in zip(dst, b)] for a in src])


def _gathers_before_reducing(op: Op, operand: int, src: Layout, dst: Layout) -> bool:
    """XLA reduces a split dim locally and all-reduces the (smaller) result; it never gathers
    the operand first. Plans that would are not what runs, so they are excluded."""
    if not op.facts.reduction:
        return False
    reduced = set(op.index.reduced)
    loop_dims = op.index.operands[operand]
    for loop_dim, src_axes, dst_axes in zip(loop_dims, src.axes, dst.axes):
        if loop_dim in reduced and any(a not in dst_axes for a in src_axes):
            return True
    return False


def _describe(constraints: Constraints, tensor: Tensor) -> str:
    parts = [f"{d}:{'+'.join(constraints.rules[d]) or 'none'}" for d in tensor.dims if d in constraints.rules]
    parts += [f"{d} in {constraints.candidates[d]}" for d in tensor.dims if d in constraints.candidates]
    if tensor.name in constraints.pins:
        parts.append(f"pinned {constraints.pins[tensor.name]}")
    if tensor.name in constraints.avoid:
        parts.append(f"off {'+'.join(sorted(constraints.avoid[tensor.name]))}")
    return "; ".join(parts) or "no constraint on its dims: check divisibility by the mesh axes"
