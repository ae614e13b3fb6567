"""Exact reductions of a :class:`~meshjax.solver.problem.Problem`: smaller problems with the
same optimum, for :func:`~meshjax.solver.ilp.solve_ilp`.

Rules, each keeping some optimal choice:

- *Bounds*: an option with a forbidden reshard against every layout a neighbour can still
  take is in no choice; under a memory budget, neither is one whose memory, plus the least
  every other node keeps, exceeds the budget; given a :class:`Known` choice and a lower bound
  split over options and edges, neither is one whose share of the bound already exceeds it.
- *Dominance*: option ``p`` of a node is dominated by option ``q`` when ``q`` is no slower,
  keeps no more memory, has no larger peak, and on every incident edge costs no more against
  every layout the neighbour can still take (memory and peak count only when memory is
  bounded or minimised). Swapping ``p`` for ``q`` keeps any choice within the budget and does
  not slow it.
- *Merging*: two nodes become one whose options are the pairs of theirs, the edges between
  them folded into each pair's time. The rules above then prune the pairs; what survives
  carries exact memory sums, which the ILP's relaxation lacks when a budget binds (it mixes
  fast and lean layouts of separate nodes). An edge left with one layout at an end is folded
  into the other end's time.

Removing options can leave edge layout groups unused, which shortens neighbours' cost rows and
lets more options be compared, so pruning runs to a fixpoint.

Example::

    >>> from meshjax import models
    >>> from meshjax.cost.hardware import PROFILES
    >>> from meshjax.solver import build_problem, solve_ilp
    >>> ex = models.example("gpt-tiny", abstract=True, batch=32)
    >>> problem = build_problem(mj.trace(ex.loss, ex.params, *ex.batch), {"model": 8}, PROFILES["tpu-v5p"], train=True)
    >>> reduced = reduce_problem(problem, memory_budget=80e9)
    >>> len(reduced.problem.nodes) < len(problem.nodes)
    True
    >>> best = solve_ilp(reduced.problem, memory_budget=80e9)
    >>> choice = reduced.expand(best.choice)      # back to problem's options, at the same cost
    >>> abs(problem.total_time(choice) - best.objective) <= 1e-9 * best.objective
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from meshjax.errors import InfeasibleError
from meshjax.solver.evaluate import sync_rows
from meshjax.solver.problem import Problem

# The exhaustive oracle accepts memory up to budget * (1 + 1e-9); so do the bounds here.
BUDGET_TOLERANCE = 1e-9
_NOTHING_LEFT = "the layout ILP has no solution (every choice exceeds the memory budget or reshards in a forbidden way)"


@dataclass(frozen=True)
class Reduction:
    """A problem derived from an original one, and where each of its options came from:
    ``origin[k][n][s]`` is the original option of original node ``n`` that option ``s`` of
    node ``k`` stands for."""

    problem: Problem
    origin: tuple[dict[int, np.ndarray], ...]

    @classmethod
    def identity(cls, problem: Problem) -> Reduction:
        return cls(problem, tuple({k: np.arange(len(n.options))} for k, n in enumerate(problem.nodes)))

    def expand(self, choice: Sequence[int]) -> tuple[int, ...]:
        """A choice of this problem's options as a choice of the original's."""
        out: dict[int, int] = {}
        for parts, c in zip(self.origin, choice):
            for node, options in parts.items():
                out[node] = int(options[c])
        return tuple(out[k] for k in range(len(out)))

    def then(self, other: Reduction) -> Reduction:
        """``other`` (a reduction of ``self.problem``) as a reduction of the original."""
        origin = []
        for parts in other.origin:
            merged = {}
            for node, options in parts.items():
                for original, choices in self.origin[node].items():
                    merged[original] = choices[options]
            origin.append(merged)
        return Reduction(other.problem, tuple(origin))


def restrict(problem: Problem, kept: Sequence[np.ndarray]) -> Reduction:
    """``problem`` with node ``k`` limited to its options ``kept[k]``.

    >>> from meshjax import models
    >>> from meshjax.cost.hardware import PROFILES
    >>> from meshjax.solver import build_problem
    >>> ex = models.example("mlp-tiny", abstract=True)
    >>> problem = build_problem(mj.trace(ex.loss, ex.params, *ex.batch), {"data": 8}, PROFILES["h100-node"])
    >>> first = restrict(problem, [np.array([0]) for _ in problem.nodes]).problem
    >>> {len(node.options) for node in first.nodes}
    {1}
    """
    kept = [np.asarray(k, dtype=np.int64) for k in kept]
    nodes = [
        replace(
            n,
            options=[n.options[i] for i in keep],
            result_layouts=[n.result_layouts[i] for i in keep],
            time=n.time[keep],
            memory=n.memory[keep],
            peak=n.peak[keep],
            parts={kind: values[keep] for kind, values in n.parts.items()},
            sync=None if n.sync is None else n.sync[keep],
            shares=None if n.shares is None else {row: values[keep] for row, values in n.shares.items()},
        )
        for n, keep in zip(problem.nodes, kept)
    ]
    edges = [replace(e, src_group=e.src_group[kept[e.src]], dst_group=e.dst_group[kept[e.dst]]) for e in problem.edges]
    return Reduction(replace(problem, nodes=nodes, edges=edges), tuple({k: keep} for k, keep in enumerate(kept)))


@dataclass(frozen=True)
class Known:
    """A lower bound split over a problem, and a known choice: every choice costs at least some
    ``L`` plus the penalties (all >= 0) of its options and of its edges' layout pairs
    (:mod:`meshjax.solver.bound`), and one costs ``L + slack``. An option, or merged pair, whose
    penalties add up to more than ``slack`` is in no better choice."""

    node_penalty: Sequence[np.ndarray]  # per node, per option
    edge_penalty: Sequence[np.ndarray]  # per edge, like its cost
    slack: float


def reduce_problem(
    problem: Problem,
    *,
    memory_budget: float | None = None,
    objective: str = "time",
    max_pairs: int = 600,
    known: Known | None = None,
) -> Reduction:
    """Prune and merge ``problem`` (see the module docstring) into one with the same optimum.

    ``max_pairs``: merge adjacent nodes, fewest pairs first, while a merge has at most this
    many option pairs. ``memory_budget`` and ``objective`` as for
    :func:`~meshjax.solver.ilp.solve_ilp`: memory is compared only when it is bounded or
    minimised. Raises :class:`~meshjax.errors.InfeasibleError` when no choice is left.

    ``known``: also drop what the bound shows costs more than the known choice (an optimum
    costs no more, so one is kept).
    """
    graph = _Graph(problem, compare_memory=memory_budget is not None or objective == "memory", known=known)
    if memory_budget is not None and objective == "time":
        graph.budget = float(memory_budget) * (1 + BUDGET_TOLERANCE)
    graph.settle(graph.nodes)
    while len(graph.nodes) > 1:
        pairs, u, v = graph.cheapest_merge()
        if pairs > max_pairs:
            break
        graph.merge(u, v)
    return graph.to_reduction(problem)


@dataclass
class _Node:
    time: np.ndarray
    memory: np.ndarray
    peak: np.ndarray
    sync: np.ndarray  # options x phases: the gradient syncs' memory (Problem.sync_memory)
    penalty: np.ndarray  # see Known
    origin: dict[int, np.ndarray]  # node of the input problem -> its option, per option here
    template: int  # the input node whose other fields the output node copies
    # Shared peak row -> per option, this node's part of it (Node.shares); a row left to one
    # node is folded into its peak.
    shares: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def floor(self) -> tuple[float, float, np.ndarray]:
        """The least memory, the least peak and the least sync memory (per phase) any option of
        this node has."""
        return float(self.memory.min()), float(self.peak.min()), self.sync.min(axis=0)


@dataclass
class _Edge:
    a: int
    b: int
    ga: np.ndarray  # option of a -> row
    gb: np.ndarray  # option of b -> column
    cost: np.ndarray
    penalty: np.ndarray  # like cost; see Known
    template: int  # the input edge whose other fields the output edge copies
    memory: np.ndarray  # like cost: bytes per device the pair keeps resident (Edge.memory)

    def side(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(k's groups, the cost and the penalty with k's groups as rows, the other end)."""
        if self.a == k:
            return self.ga, self.cost, self.penalty, self.b
        return self.gb, self.cost.T, self.penalty.T, self.a

    def compact(self) -> None:
        """Drop the rows and columns no option maps to (every layout left is one an option takes)."""
        self.ga, rows = _used(self.ga, self.cost.shape[0])
        self.gb, cols = _used(self.gb, self.cost.shape[1])
        if rows is not None:
            self.cost, self.penalty, self.memory = self.cost[rows], self.penalty[rows], self.memory[rows]
        if cols is not None:
            self.cost, self.penalty, self.memory = self.cost[:, cols], self.penalty[:, cols], self.memory[:, cols]


def _used(groups: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``groups`` renumbered over the groups in use, and which those are (None: all of them)."""
    used = np.zeros(n, dtype=bool)
    used[groups] = True
    if used.all():
        return groups, None
    return (np.cumsum(used) - 1)[groups], used


class _Graph:
    """The working copy that pruning and merging edit in place."""

    def __init__(self, problem: Problem, compare_memory: bool, known: Known | None = None):
        self.compare_memory = compare_memory
        self.budget: float | None = None
        self.slack = math.inf if known is None else known.slack
        self.nodes = {
            k: _Node(
                np.asarray(n.time, dtype=float), np.asarray(n.memory, dtype=float), np.asarray(n.peak, dtype=float),
                sync_rows(n).astype(float),
                np.zeros(len(n.options)) if known is None else np.asarray(known.node_penalty[k], dtype=float),
                {k: np.arange(len(n.options))}, k,
                {row: np.asarray(values, dtype=float) for row, values in (n.shares or {}).items()},
            )
            for k, n in enumerate(problem.nodes)
        }
        # Shared peak row -> node -> the least that node adds to it.
        self.row_floors: dict[int, dict[int, float]] = {}
        for k, n in self.nodes.items():
            for row, values in n.shares.items():
                self.row_floors.setdefault(row, {})[k] = float(values.min())
        for k in self.nodes:
            self._fold(k)
        self.floors = {k: n.floor for k, n in self.nodes.items()}
        self.edges = {
            i: _Edge(
                e.src, e.dst, np.asarray(e.src_group), np.asarray(e.dst_group), np.asarray(e.cost, dtype=float),
                np.zeros(e.cost.shape) if known is None else np.asarray(known.edge_penalty[i], dtype=float), i,
                np.zeros(e.cost.shape) if e.memory is None else np.asarray(e.memory, dtype=float),
            )
            for i, e in enumerate(problem.edges)
        }
        self.incident: dict[int, set[int]] = {k: set() for k in self.nodes}
        for i, e in self.edges.items():
            self.incident[e.a].add(i)
            self.incident[e.b].add(i)
        for i in list(self.edges):
            self._tidy(i)

    # --- pruning -------------------------------------------------------------------------------
    def settle(self, todo: Iterable[int]) -> None:
        """Prune nodes until none changes; a pruned node's neighbours are looked at again."""
        todo = set(todo)
        while todo:
            todo.update(self._prune(todo.pop()))

    def _prune(self, k: int) -> set[int]:
        """Drop ``k``'s options that the bounds or dominance rule out; returns the neighbours
        that now see fewer of ``k``'s layouts (their own options may now be dominated)."""
        keep = self._within_bounds(k)
        if len(keep) > 1:
            keep = keep[_undominated(*self._features(k, keep))]
        if len(keep) == 0:
            raise InfeasibleError(_NOTHING_LEFT)
        if len(keep) == len(self.nodes[k].time):
            return set()
        return self._restrict(k, keep)

    def _within_bounds(self, k: int) -> np.ndarray:
        node = self.nodes[k]
        time = node.time.copy()
        penalty = node.penalty.copy()
        for i in self.incident[k]:
            groups, cost, edge_penalty, _ = self.edges[i].side(k)
            time += cost.min(axis=1)[groups]
            penalty += edge_penalty.min(axis=1)[groups]
        ok = np.isfinite(time) & (penalty <= self.slack)
        if self.budget is not None:
            others = [f for j, f in self.floors.items() if j != k]
            resident = sum(m for m, _, _ in others)
            peak = max((p for _, p, _ in others), default=0.0)
            own = node.peak
            for row, floors in self.row_floors.items():
                rest = sum(v for j, v in floors.items() if j != k)
                if row in node.shares:
                    own = np.maximum(own, node.shares[row] + rest)
                else:
                    peak = max(peak, rest)
            ok &= node.memory + resident + np.maximum(own, peak) <= self.budget
            ok &= (node.sync + sum(s for _, _, s in others) <= self.budget).all(axis=1)
        return np.flatnonzero(ok)

    def _features(self, k: int, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per option of ``keep``: its own values (time, and memory and peak when compared) and
        the id of its tuple of edge groups; per such tuple, the edge cost rows it brings."""
        node = self.nodes[k]
        own = [node.time[keep]]
        if self.compare_memory:
            own += [node.memory[keep], node.peak[keep], *node.sync[keep].T]
            own += [node.shares[row][keep] for row in sorted(node.shares)]
        key = np.zeros(len(keep), dtype=np.int64)
        groups, rows = [], []
        for i in sorted(self.incident[k]):
            g, cost, _, _ = self.edges[i].side(k)
            groups.append(g[keep])
            edge_memory = self.edges[i].memory if self.edges[i].a == k else self.edges[i].memory.T
            rows.append(np.hstack([cost, edge_memory]) if self.compare_memory and edge_memory.any() else cost)
            if key.max(initial=0) >= 2**62 // len(cost):
                key = np.unique(key, return_inverse=True)[1].ravel()  # renumber before it overflows
            key = key * len(cost) + groups[-1]
        if not groups:
            return np.stack(own, axis=1), key, np.zeros((1, 0))
        _, first, which = np.unique(key, return_index=True, return_inverse=True)
        table = np.hstack([r[g[first]] for g, r in zip(groups, rows)])
        return np.stack(own, axis=1), which.ravel(), table

    def _restrict(self, k: int, keep: np.ndarray) -> set[int]:
        node = self.nodes[k]
        node.time, node.memory, node.peak, node.penalty = node.time[keep], node.memory[keep], node.peak[keep], node.penalty[keep]
        node.sync = node.sync[keep]
        node.origin = {o: options[keep] for o, options in node.origin.items()}
        node.shares = {row: values[keep] for row, values in node.shares.items()}
        for row, values in node.shares.items():
            self.row_floors[row][k] = float(values.min())
        self.floors[k] = node.floor
        changed = set()
        for i in list(self.incident[k]):
            e = self.edges[i]
            if e.a == k:
                e.ga = e.ga[keep]
            else:
                e.gb = e.gb[keep]
            changed |= self._tidy(i)
        return changed

    def _tidy(self, i: int) -> set[int]:
        """Drop edge ``i``'s unused layouts, and the edge itself when one end has a single
        layout left (its cost is then the other end's own); returns the nodes to prune again."""
        e = self.edges[i]
        rows, cols = e.cost.shape
        e.compact()
        changed = ({e.b} if e.cost.shape[0] < rows else set()) | ({e.a} if e.cost.shape[1] < cols else set())
        if 1 not in e.cost.shape:
            return changed
        if e.cost.shape[0] == 1:
            node = self.nodes[e.b]
            node.time, node.penalty = node.time + e.cost[0, e.gb], node.penalty + e.penalty[0, e.gb]
            node.memory = node.memory + e.memory[0, e.gb]
            changed.add(e.b)
        else:
            node = self.nodes[e.a]
            node.time, node.penalty = node.time + e.cost[e.ga, 0], node.penalty + e.penalty[e.ga, 0]
            node.memory = node.memory + e.memory[e.ga, 0]
            changed.add(e.a)
        del self.edges[i]
        self.incident[e.a].discard(i)
        self.incident[e.b].discard(i)
        return changed

    # --- merging -------------------------------------------------------------------------------
    def cheapest_merge(self) -> tuple[int, int, int]:
        """(pairs, u, v) for the adjacent nodes with the fewest option pairs; a node with no
        edge left (shared memory is all that ties it) pairs with the smallest other node."""
        size = {k: len(n.time) for k, n in self.nodes.items()}
        candidates = [(size[e.a] * size[e.b], e.a, e.b) for e in self.edges.values()]
        lone = [k for k in self.nodes if not self.incident[k]]
        if lone:
            u = min(lone, key=size.get)
            v = min((k for k in self.nodes if k != u), key=size.get)
            candidates.append((size[u] * size[v], v, u))
        return min(candidates)

    def merge(self, u: int, v: int) -> None:
        """Replace ``u`` and ``v`` by one node over their option pairs, then prune around it."""
        U, V = self.nodes[u], self.nodes[v]
        i, j = np.divmod(np.arange(len(U.time) * len(V.time)), len(V.time))
        time = U.time[i] + V.time[j]
        penalty = U.penalty[i] + V.penalty[j]
        memory = U.memory[i] + V.memory[j]
        between = self.incident[u] & self.incident[v]
        for k in between:
            e = self.edges.pop(k)
            a, b = (i, j) if e.a == u else (j, i)
            time += e.cost[e.ga[a], e.gb[b]]
            penalty += e.penalty[e.ga[a], e.gb[b]]
            memory += e.memory[e.ga[a], e.gb[b]]
        ok = np.flatnonzero(np.isfinite(time) & (penalty <= self.slack))
        if len(ok) == 0:
            raise InfeasibleError(_NOTHING_LEFT)
        i, j = i[ok], j[ok]
        origin = {o: options[i] for o, options in U.origin.items()}
        origin.update({o: options[j] for o, options in V.origin.items()})
        shares = {row: values[i] for row, values in U.shares.items()}
        for row, values in V.shares.items():
            shares[row] = shares[row] + values[j] if row in shares else values[j]
            del self.row_floors[row][v]
        self.nodes[u] = _Node(time[ok], memory[ok], np.maximum(U.peak[i], V.peak[j]), U.sync[i] + V.sync[j], penalty[ok],
                              origin, U.template, shares)
        for row, values in shares.items():
            self.row_floors[row][u] = float(values.min())
        self._fold(u)
        self.floors[u] = self.nodes[u].floor
        del self.nodes[v], self.floors[v]
        self.incident[u] -= between
        for k in self.incident[u]:
            e = self.edges[k]
            if e.a == u:
                e.ga = e.ga[i]
            else:
                e.gb = e.gb[i]
        for k in self.incident.pop(v) - between:
            e = self.edges[k]
            if e.a == v:
                e.a, e.ga = u, e.ga[j]
            else:
                e.b, e.gb = u, e.gb[j]
            self.incident[u].add(k)
        todo = {u}
        for k in list(self.incident[u]):
            todo |= self._tidy(k)  # pairs with a forbidden reshard are gone
        self.settle(todo)

    def _fold(self, k: int) -> None:
        """Fold the shared peak rows only ``k`` still adds to into its own peak."""
        node = self.nodes[k]
        for row in [row for row in node.shares if self.row_floors[row].keys() == {k}]:
            node.peak = np.maximum(node.peak, node.shares.pop(row))
            del self.row_floors[row]

    # --- output --------------------------------------------------------------------------------
    def to_reduction(self, problem: Problem) -> Reduction:
        keys = sorted(self.nodes)
        index = {k: n for n, k in enumerate(keys)}
        nodes = []
        for k in keys:
            w = self.nodes[k]
            size = len(w.time)
            if w.origin.keys() == {k}:  # not merged: keep what the options are
                kept = w.origin[k]
                template = problem.nodes[k]
                options, layouts = [template.options[s] for s in kept], [template.result_layouts[s] for s in kept]
            else:
                options, layouts = list(range(size)), [None] * size
            nodes.append(replace(problem.nodes[w.template], options=options, result_layouts=layouts, time=w.time, memory=w.memory, peak=w.peak, parts={},
                                 sync=np.column_stack([w.sync[:, 0] - w.memory, w.sync[:, 1]]) if problem.train else None,
                                 shares=w.shares or None))
        edges = [
            replace(problem.edges[e.template], src=index[e.a], dst=index[e.b], src_group=e.ga, dst_group=e.gb, cost=e.cost,
                    memory=e.memory if e.memory.any() else None)
            for e in self.edges.values()
        ]
        return Reduction(replace(problem, nodes=nodes, edges=edges), tuple(self.nodes[k].origin for k in keys))


def _undominated(own: np.ndarray, signature: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Positions of the options no other option beats; of identical ones only the first survives.

    Option ``q`` is no worse than ``p`` when ``own[q] <= own[p]`` and the cost rows of ``q``'s
    signature are pointwise ``<=`` those of ``p``'s. ``q`` beats ``p`` when it is no worse and
    either ``p`` is worse than ``q`` or they tie and ``q`` comes first: a strict order, so every
    beaten option is beaten by a survivor.

    >>> _undominated(np.array([[1.0], [1.0], [0.5], [0.7]]), np.array([0, 0, 0, 1]), np.array([[1.0], [0.0]]))
    array([2, 3])
    """
    n = len(own)
    if table.shape[1]:
        rows_le = np.ones((len(table), len(table)), dtype=bool)
        for column in table.T:
            rows_le &= column[:, None] <= column[None, :]
        no_worse = rows_le[np.ix_(signature, signature)]  # no_worse[q, p]
    else:
        no_worse = np.ones((n, n), dtype=bool)
    for column in own.T:
        no_worse &= column[:, None] <= column[None, :]
    beats = no_worse & ~(no_worse.T & ~np.tri(n, k=-1, dtype=bool).T)
    return np.flatnonzero(~beats.any(axis=0))
