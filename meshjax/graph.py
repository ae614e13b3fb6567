"""The traced graph: tensors (name, dims, shape, dtype, role) and the named ops between them.

Every op carries an :class:`IndexForm`, the one description of its semantics the rest of meshjax
reads: the op's loop (iteration) dims, which loop dim each axis of each operand and of the result
walks, which loop dims are summed away, and which must stay whole. An einsum, an elementwise op,
a reduction, a norm or a reshape all fit this form, so layouts, costs and the solver need no
per-op code.

Example::

    >>> from meshjax import models
    >>> ex = models.example("mlp-tiny", abstract=True)
    >>> g = mj.trace(ex.loss, ex.params, *ex.batch)
    >>> g.tensors["mlp/w_in"].dims, g.tensors["mlp/w_in"].role
    (('embed', 'mlp'), 'param')
    >>> [op.kind for op in g.ops][:2]
    ['einsum', 'gelu']
    >>> g.producer["mlp/hidden"].index.reduced     # the einsum sums over embed
    ('embed',)
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from meshjax.dtypes import is_floating, itemsize

ROLES = ("input", "param", "activation", "output", "constant")


@dataclass(frozen=True)
class Tensor:
    """One value of the program. ``block`` names the repeated block it lives in, if any."""

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    role: str
    block: str | None = None

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(self.dims, self.shape))

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)

    @property
    def floating(self) -> bool:
        """Whether gradients flow through this tensor's dtype (bfloat16 and float8 included)."""
        return is_floating(self.dtype)

    @cached_property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


@dataclass(frozen=True)
class IndexForm:
    """An op as a loop nest over named loop dims.

    - ``loop``: loop dim -> size.
    - ``operands[i][k]``: the loop dim that axis ``k`` of input ``i`` walks.
    - ``result[k]``: the loop dim that axis ``k`` of the output walks.
    - ``reduced``: loop dims summed (or max-ed) away; splitting one leaves partial results.
    - ``reduction``: ``"sum"``, ``"max"``, ``"lse"`` (log-sum-exp: two all-reduces, of the max
      and of the sum) or ``"xent"`` (cross-entropy: the log-sum-exp's two and the target's logit).
    - ``stats``: loop dims kept in the result whose splitting needs small all-reduces of
      per-row statistics (softmax, norms), with how many statistics.
    - ``whole``: loop dims that must not be split (minor dims of a reshape, a scan's ``layers``).
    - ``flops``: total floating-point work of the op.
    """

    loop: tuple[tuple[str, int], ...]
    operands: tuple[tuple[str, ...], ...]
    result: tuple[str, ...]
    reduced: tuple[str, ...] = ()
    reduction: str = "sum"
    stats: tuple[tuple[str, int], ...] = ()
    whole: tuple[str, ...] = ()
    flops: float = 0.0

    @property
    def loop_sizes(self) -> dict[str, int]:
        return dict(self.loop)

    @property
    def partial_results(self) -> int:
        """How many results of the result's size a split reduced dim leaves to combine, each
        with an all-reduce."""
        return _PARTIAL_RESULTS[self.reduction]


_PARTIAL_RESULTS = {"sum": 1, "max": 1, "lse": 2, "xent": 3}


@dataclass(frozen=True)
class OpFacts:
    """What the cost model needs to know of an op beyond its :class:`IndexForm`, declared by the
    op itself when it is emitted (:func:`meshjax.context.emit`).

    - ``saves``: positions of the operands its backward pass reads (kept until then);
    - ``saves_result``: its derivative is written in terms of its own result (softmax, exp,
      tanh), which is kept instead of its operands;
    - ``residuals``: how many more tensors of its result's size its backward keeps (JAX
      differentiates gelu's tanh approximation through ``tanh`` and keeps that value);
    - ``scan_residuals``: the same inside a scan, where every residual ``jax.vjp`` saves is
      stacked over the trips (unrolled, XLA fuses the cheap ones into the backward pass and
      keeps fewer); ``None``: as ``residuals``;
    - ``reduction``: a reduction (sum, max, log-sum-exp ...): XLA reduces a split dim locally and
      combines the smaller results; it never gathers the operand first;
    - ``slices``: its result is one trip's slice of its operand (a scan over a stacked weight):
      the backward reads the slice from the operand, never from a copy of its own;
    - ``also_saves_result``: its backward reads its result besides the operands in ``saves``
      (memory-efficient attention keeps q, k, v and its output); ``residuals`` may then be a
      fraction (attention's per-row log-sum-exp);
    - ``forward_scratch``, ``backward_scratch``: what its forward / backward pass holds while it
      runs beyond its result and operands, in multiples of its result's bytes per device
      (attention's float32 accumulator and score tiles);
    - ``holds_operand_gradients``: its backward holds the gradients of all its operands at once
      (a fused kernel's), in the layouts it computes in.

    >>> OpFacts.reading(2).saves
    (0, 1)
    """

    saves: tuple[int, ...] = ()
    saves_result: bool = False
    residuals: float = 0
    reduction: bool = False
    slices: bool = False
    scan_residuals: float | None = None
    also_saves_result: bool = False
    forward_scratch: float = 0.0
    backward_scratch: float = 0.0
    holds_operand_gradients: bool = False

    def residuals_in(self, scanned: bool) -> float:
        """Tensors of the result's size kept besides operands and result, in a scan or not."""
        return self.scan_residuals if scanned and self.scan_residuals is not None else self.residuals

    @classmethod
    def reading(cls, n_operands: int, **more) -> OpFacts:
        """An op whose backward reads all of its ``n_operands`` operands."""
        return cls(saves=tuple(range(n_operands)), **more)


LINEAR = OpFacts()  # a backward that reads nothing: additions, sums, reshapes, copies


@dataclass(frozen=True)
class Op:
    """A named op: ``output = kind(*inputs)``, with the facts it declared."""

    name: str
    kind: str
    inputs: tuple[str, ...]
    output: str
    index: IndexForm
    attrs: Mapping[str, object] = field(default_factory=dict)
    block: str | None = None
    facts: OpFacts = LINEAR


@dataclass(frozen=True)
class Block:
    """A repeated block: a scan body (traced once, run ``trip_count`` times) or a group of
    identical unrolled blocks (``instances`` are the scope prefixes, the first one is the
    template every other instance mirrors)."""

    name: str
    kind: str  # "scan" | "unrolled"
    trip_count: int
    instances: tuple[str, ...] = ()


@dataclass
class Graph:
    """Tensors, ops and repeated blocks of one traced function."""

    tensors: dict[str, Tensor]
    ops: list[Op]
    blocks: dict[str, Block] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    signature: object = None  # meshjax.trace.Signature: how (params, *args) leaves map to names
    out_tree: object = None  # the pytree structure of the outputs

    # --- lookups ----------------------------------------------------------------------------
    @cached_property
    def producer(self) -> dict[str, Op]:
        return {op.output: op for op in self.ops}

    @cached_property
    def consumers(self) -> dict[str, list[Op]]:
        out: dict[str, list[Op]] = defaultdict(list)
        for op in self.ops:
            for name in op.inputs:
                out[name].append(op)
        return dict(out)

    @cached_property
    def requires_grad(self) -> frozenset[str]:
        """Tensors whose value depends on a param through floating values: the ones a backward
        pass computes gradients of. A bool or integer tensor stops the chain (``cast(x > 0)``
        has no gradient, however it is used)."""
        differentiable = {n for n, t in self.tensors.items() if t.floating}
        out = {t.name for t in self.tensors.values() if t.role == "param"}
        changed = True
        while changed:  # loops (scan carries) need more than one topological pass
            changed = False
            for op in self.ops:
                if op.output in differentiable and op.output not in out and any(i in out for i in op.inputs):
                    out.add(op.output)
                    changed = True
        return frozenset(out)

    @cached_property
    def sliced_from(self) -> dict[str, str]:
        """Tensor -> the param or input it is a per-trip slice of (a scan's weight slice)."""
        return {
            op.output: op.inputs[0]
            for op in self.ops
            if op.facts.slices and self.tensors[op.inputs[0]].role in ("param", "input")
        }

    def needs_grad(self, name: str) -> bool:
        """Whether a backward pass computes a gradient of tensor ``name``: it depends on a param
        and its dtype is floating."""
        return name in self.requires_grad and self.tensors[name].floating

    def by_role(self, role: str) -> list[Tensor]:
        return [t for t in self.tensors.values() if t.role == role]

    @property
    def params(self) -> list[Tensor]:
        return self.by_role("param")

    @property
    def inputs(self) -> list[Tensor]:
        return self.by_role("input")

    @cached_property
    def dim_names(self) -> set[str]:
        return {d for t in self.tensors.values() for d in t.dims}

    def trip_count(self, block: str | None) -> int:
        """How many times a tensor or op of ``block`` is computed per step."""
        return 1 if block is None else self.blocks[block].trip_count

    def tensor(self, name: str) -> Tensor:
        """The tensor called ``name``; the error lists close names."""
        try:
            return self.tensors[name]
        except KeyError:
            from difflib import get_close_matches

            from meshjax.errors import TraceError

            close = get_close_matches(name, list(self.tensors), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TraceError(f"no tensor named {name!r} in the graph{hint}") from None

    def table(self, title: str = "graph"):
        """A rich table of the tensors."""
        from rich.table import Table

        table = Table(title=title)
        for col in ("tensor", "role", "dims", "shape", "dtype", "block"):
            table.add_column(col)
        for t in self.tensors.values():
            table.add_row(t.name, t.role, " ".join(t.dims), str(t.shape), t.dtype, t.block or "")
        return table


_INDEXED_SCOPE = re.compile(r"^(.*?)(\d+)$")


def find_unrolled_blocks(graph: Graph) -> dict[str, Block]:
    """Group identical unrolled blocks: scopes ``layer_0/``, ``layer_1/``... (or ``blocks/0/``)
    whose ops have the same kinds, index forms and tensor shapes, in the same order.

    Returns blocks named after the scope stem (``"layer_"``), instances in numeric order.
    """
    by_scope: dict[tuple[str, str], dict[int, list[Op]]] = defaultdict(lambda: defaultdict(list))
    for op in graph.ops:
        if op.block is not None:
            continue
        parts = op.name.split("/")
        for depth in range(len(parts) - 1):
            match = _INDEXED_SCOPE.match(parts[depth])
            if match:
                stem = "/".join(parts[:depth] + [match.group(1)])
                by_scope[(stem, str(depth))][int(match.group(2))].append(op)
                break

    def signature(prefix: str, ops: list[Op]):
        def local(name: str) -> str:
            # Names outside this instance (the previous block's output, a shared weight)
            # differ per instance by construction, so only their presence is compared.
            return name[len(prefix):] if name.startswith(prefix) else "<outside>"

        return tuple(
            (
                op.kind,
                op.index,
                tuple(local(i) for i in op.inputs),
                local(op.output),
                graph.tensors[op.output].shape,
            )
            for op in ops
        )

    blocks: dict[str, Block] = {}
    for (stem, _), groups in by_scope.items():
        if len(groups) < 2:
            continue
        indices = sorted(groups)
        prefixes = {i: f"{stem}{i}/" for i in indices}
        first = signature(prefixes[indices[0]], groups[indices[0]])
        same = [i for i in indices if signature(prefixes[i], groups[i]) == first]
        if len(same) >= 2:
            blocks[stem] = Block(
                name=stem,
                kind="unrolled",
                trip_count=len(same),
                instances=tuple(prefixes[i] for i in same),
            )
    return blocks
