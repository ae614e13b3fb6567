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
::

    import jax, jax.numpy as jnp, rich
    from jax.sharding import NamedSharding, PartitionSpec as P
    from meshjax.inspect import inspect_compiled

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    s = lambda *spec: NamedSharding(mesh, P(*spec))
    f = jax.jit(lambda x, w: x @ w,
                in_shardings=(s(None, "model"), s("model", None)), out_shardings=s())
    compiled = f.lower(jnp.ones((8, 16)), jnp.ones((16, 4))).compile()
    report = inspect_compiled(compiled, mesh)
    [(c.kind, c.axes, c.bytes_per_device, c.count) for c in report.collectives]
    # -> [('all-reduce', ('model',), 128, 1)]     f32[8,4] partial sums, summed over "model"
    report.comm_bytes                             # -> 128
    rich.print(report.table())
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Collective",
    "CompiledReport",
    "inspect_compiled",
    "parse_collectives",
    "parse_replica_groups",
    "replica_groups_to_axes",
    "shape_bytes",
]

Groups = tuple[tuple[int, ...], ...]

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

# Attributes whose value names a single called computation.
_CALL_ATTRS = ("body", "condition", "to_apply", "calls", "true_computation", "false_computation")
# Attributes whose value is a {%a, %b} list of called computations.
_CALL_LIST_ATTRS = ("branch_computations", "called_computations")


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
# Shapes
# --------------------------------------------------------------------------- #
_DTYPE_BITS: dict[str, int] = {
    "pred": 8, "s8": 8, "u8": 8,
    "bf16": 16, "f16": 16, "s16": 16, "u16": 16,
    "f32": 32, "s32": 32, "u32": 32,
    "f64": 64, "s64": 64, "u64": 64, "c64": 64,
    "c128": 128,
    "s4": 4, "u4": 4, "s2": 2, "u2": 2, "s1": 1, "u1": 1,
    "token": 0,
}  # fmt: skip
_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")


def _dtype_bits(dtype: str) -> int:
    if dtype in _DTYPE_BITS:
        return _DTYPE_BITS[dtype]
    match = re.match(r"f(\d+)", dtype)  # f8e4m3fn, f8e5m2, f4e2m1fn, f6e3m2fn, ...
    if match:
        return int(match.group(1))
    raise ValueError(f"unknown HLO element type {dtype!r}")


def _array_bytes(dtype: str, dims: str) -> int:
    # "<=8" is a bounded dynamic dim (counted at its bound); "?" is unbounded (counted as 0).
    sizes = [int(re.sub(r"\D", "", d) or 0) for d in dims.split(",") if d.strip()]
    return math.ceil(math.prod(sizes) * _dtype_bits(dtype) / 8)


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string; tuples sum their elements. Layouts are ignored."""
    shape = re.sub(r"\{[^{}]*\}", "", shape)  # drop layouts, which may contain T(8,128)
    return sum(_array_bytes(dtype, dims) for dtype, dims in _ARRAY_RE.findall(shape))


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at ``text[start]``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack: list[str] = []
    for i in range(start, len(text)):
        ch = text[i]
        if ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced brackets in {text[start:start + 80]!r}")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return [p.strip() for p in parts]


def _tuple_elements(shape: str) -> list[str]:
    """Top-level elements of a tuple shape, or ``[shape]`` for an array shape."""
    shape = shape.strip()
    if not shape.startswith("("):
        return [shape]
    return _split_top_level(shape[1 : _matching(shape, 0) - 1])


# --------------------------------------------------------------------------- #
# Replica groups
# --------------------------------------------------------------------------- #
def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


def _iota(reshape_dims: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
    """XLA iota tile assignment: iota over ``reshape_dims``, transposed by ``perm``."""
    arr = np.arange(math.prod(reshape_dims)).reshape(reshape_dims)
    return arr.transpose(perm) if perm is not None else arr


_IOTA_RG_RE = re.compile(r"\[([\d,\s]*)\]\s*<=\s*\[([\d,\s]*)\](?:\s*T\(([\d,\s]*)\))?")
_MESH_RG_RE = re.compile(
    r"mesh\[(?P<axes>[^\]]*)\]"
    r"(?:\s*,\s*device_ids=\((?P<ids>(?:[^()]|\([^()]*\))*)\))?"
    r"\s*\{(?P<group_axes>[^}]*)\}"
)
_MAXIMAL_RG_RE = re.compile(r"maximal_mesh\[device_id=(\d+)\](?:\s*\{[^}]*\})?")


def _parse_iota_groups(match: re.Match[str]) -> Groups:
    shape = _ints(match.group(1))
    reshape_dims = _ints(match.group(2))
    perm = _ints(match.group(3)) if match.group(3) else None
    arr = _iota(reshape_dims, perm).reshape(shape)
    return tuple(tuple(int(x) for x in row) for row in arr.reshape(shape[0], -1))


def _parse_device_ids(text: str, mesh_dims: Sequence[int]) -> np.ndarray:
    """``device_ids=(...)`` of a mesh: ``[4,2]T(1,0)`` (iota form) or ``0,2,1,3``."""
    text = text.strip()
    iota = re.fullmatch(r"\[([\d,\s]*)\](?:\s*T\(([\d,\s]*)\))?", text)
    if iota:
        perm = _ints(iota.group(2)) if iota.group(2) else None
        return _iota(_ints(iota.group(1)), perm).reshape(mesh_dims)
    return np.array(_ints(text), dtype=np.int64).reshape(mesh_dims)


def _parse_axis_ref(text: str, names: list[str]) -> tuple[int, int | None, int | None]:
    """``'a'`` -> (index of a, None, None); ``'a':(2)4`` -> (index of a, pre_size 2, size 4)."""
    match = re.fullmatch(r"\s*'?([^':]+?)'?\s*(?::\((\d+)\)(\d+))?\s*", text)
    if not match or match.group(1) not in names:
        raise ValueError(f"bad mesh axis reference {text!r} (mesh axes {names})")
    index = names.index(match.group(1))
    if match.group(2) is None:
        return index, None, None
    return index, int(match.group(2)), int(match.group(3))


def _split_axis(
    size: int, refs: list[tuple[int, int | None, int | None]]
) -> tuple[list[int], list[int]]:
    """Factor one mesh axis for its axis refs.

    Returns the reshape of the axis (major to minor) and, for each ref in the
    order given, the index of its factor. A sub-axis ``(pre)k`` is the factor of
    size ``k`` with ``pre`` elements of the axis above it (more major).
    """
    if len(refs) == 1 and refs[0][1] is None:
        return [size], [0]
    order = sorted(range(len(refs)), key=lambda i: refs[i][1] or 1)
    dims: list[int] = []
    position: dict[int, int] = {}
    prefix = 1
    for i in order:
        pre, k = refs[i][1] or 1, refs[i][2] or size
        if pre != prefix:
            dims.append(pre // prefix)
            prefix = pre
        position[i] = len(dims)
        dims.append(k)
        prefix *= k
    if prefix != size:
        dims.append(size // prefix)
    return dims, [position[i] for i in range(len(refs))]


def _parse_mesh_groups(match: re.Match[str]) -> Groups:
    """The ``mesh[...] {axes}`` form: devices grouped by the listed mesh axes."""
    names, dims = [], []
    for item in _split_top_level(match.group("axes")):
        name, size = item.rsplit("=", 1)
        names.append(name.strip().strip("'\""))
        dims.append(int(size))
    ids = match.group("ids")
    devices = _parse_device_ids(ids, dims) if ids else np.arange(math.prod(dims)).reshape(dims)
    refs = [_parse_axis_ref(r, names) for r in _split_top_level(match.group("group_axes"))]

    reshape: list[int] = []
    grouped: list[int] = [0] * len(refs)
    for axis, size in enumerate(dims):
        mine = [i for i, r in enumerate(refs) if r[0] == axis]
        axis_dims, positions = _split_axis(size, [refs[i] for i in mine]) if mine else ([size], [])
        for i, pos in zip(mine, positions):
            grouped[i] = len(reshape) + pos
        reshape.extend(axis_dims)
    rest = [d for d in range(len(reshape)) if d not in grouped]
    group_size = math.prod(reshape[d] for d in grouped)
    arr = devices.reshape(reshape).transpose(rest + grouped).reshape(-1, group_size)
    return tuple(tuple(int(x) for x in row) for row in arr)


def parse_replica_groups(text: str, num_devices: int) -> Groups:
    """Explicit device-id groups for an HLO ``replica_groups`` value.

    Accepted forms (with or without a leading ``replica_groups=``):

    * explicit ``{{0,2,4,6},{1,3,5,7}}``; ``{}`` means one group of all devices;
    * iota ``[2,4]<=[8]`` or ``[4,2]<=[2,4]T(1,0)``: iota over the ``<=`` dims,
      transposed by ``T(...)``, reshaped to ``[num_groups, group_size]``;
    * mesh-axes ``mesh['x'=4,'y'=2] {'x'}``, optionally with
      ``, device_ids=([4,2]T(1,0))`` or ``, device_ids=(0,2,...)`` and sub-axes
      such as ``{'x':(1)2}``;
    * ``maximal_mesh[device_id=3] {}``: the single device.
    """
    text = text.strip()
    if text.startswith("replica_groups="):
        text = text[len("replica_groups=") :].strip()
    if text.startswith("{"):
        inner = text[1 : _matching(text, 0) - 1].strip()
        if not inner:
            return (tuple(range(num_devices)),)
        return tuple(tuple(_ints(g)) for g in re.findall(r"\{([^{}]*)\}", inner))
    if match := _MAXIMAL_RG_RE.match(text):
        return ((int(match.group(1)),),)
    if match := _MESH_RG_RE.match(text):
        return _parse_mesh_groups(match)
    if match := _IOTA_RG_RE.match(text):
        return _parse_iota_groups(match)
    raise ValueError(f"unrecognised replica_groups syntax: {text[:120]!r}")


def _coords(ids: Iterable[int], dims: Sequence[int]) -> np.ndarray:
    return np.array([np.unravel_index(i, dims) for i in ids]).reshape(-1, len(dims))


def _varying_axes(groups: Groups, mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    names, dims = list(mesh_shape), list(mesh_shape.values())
    total = math.prod(dims)
    varying = [False] * len(dims)
    for group in groups:
        coords = _coords([i for i in group if 0 <= i < total], dims)
        if len(coords) > 1:
            for a in range(len(dims)):
                varying[a] |= bool(np.any(coords[:, a] != coords[0, a]))
    return tuple(n for n, v in zip(names, varying) if v)


def _axes_groups(axes: Sequence[str], mesh_shape: Mapping[str, int]) -> set[frozenset[int]]:
    """All groups formed by varying ``axes`` (and fixing the other mesh axes)."""
    names, dims = list(mesh_shape), list(mesh_shape.values())
    ids = np.arange(math.prod(dims)).reshape(dims)
    moved = [names.index(a) for a in axes]
    rest = [a for a in range(len(dims)) if a not in moved]
    group_size = math.prod(dims[a] for a in moved)
    rows = ids.transpose(rest + moved).reshape(-1, group_size)
    return {frozenset(int(x) for x in row) for row in rows}


def _groups_are_exact(groups: Groups, axes: Sequence[str], mesh_shape: Mapping[str, int]) -> bool:
    return {frozenset(g) for g in groups} == _axes_groups(axes, mesh_shape)


def replica_groups_to_axes(groups: Groups, mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    """Mesh axes (in mesh order) whose coordinates vary within the groups.

    Partition id ``i`` sits at ``np.unravel_index(i, sizes)``. Singleton groups
    give ``()``. Groups that do not tile the mesh by whole axes (sub-axis or
    irregular groups) still get their varying axes.
    """
    return _varying_axes(groups, mesh_shape)


def _pair_axes(pairs: Groups, mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    """Axes along which the source and target of collective-permute pairs differ."""
    names, dims = list(mesh_shape), list(mesh_shape.values())
    total = math.prod(dims)
    differ = [False] * len(dims)
    for pair in pairs:
        if len(pair) == 2 and all(0 <= i < total for i in pair):
            src, dst = _coords(pair, dims)
            differ = [d or bool(s != t) for d, s, t in zip(differ, src, dst)]
    return tuple(n for n, d in zip(names, differ) if d)


# --------------------------------------------------------------------------- #
# HLO text -> computations and instructions
# --------------------------------------------------------------------------- #
@dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    operand_text: str
    attrs: str  # text after the operand list (raw, including quoted strings)


@dataclass
class _Computation:
    name: str
    is_entry: bool
    instrs: list[_Instr] = field(default_factory=list)


_COMP_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(|\{)")
_INSTR_HEAD_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')


def _parse_instr(line: str) -> _Instr | None:
    head = _INSTR_HEAD_RE.match(line)
    if not head:
        return None
    pos = head.end()
    if pos >= len(line):
        return None
    if line[pos] == "(":
        end = _matching(line, pos)
    else:
        end = pos
        while end < len(line) and not line[end].isspace():
            end += 1
    shape = line[pos:end]
    op = re.match(r"\s*([\w\-]+)\(", line[end:])
    if not op:
        return None
    open_paren = end + op.end() - 1
    close = _matching(line, open_paren)
    operand_text = line[open_paren + 1 : close - 1]
    operands = re.findall(r"%([\w.\-]+)", operand_text) or [
        p.split()[-1] for p in _split_top_level(operand_text) if p
    ]
    return _Instr(head.group(1), shape, op.group(1), operands, operand_text, line[close:])


def _parse_module(hlo_text: str) -> dict[str, _Computation]:
    comps: dict[str, _Computation] = {}
    current: _Computation | None = None
    for line in hlo_text.splitlines():
        if current is None:
            if line and not line[0].isspace() and line.rstrip().endswith("{"):
                header = _COMP_HEADER_RE.match(line)
                if header and not line.startswith("HloModule"):
                    current = _Computation(header.group(2), bool(header.group(1)))
                    comps[current.name] = current
            continue
        if line.strip() == "}" and not line[0].isspace():
            current = None
            continue
        instr = _parse_instr(line)
        if instr is not None:
            current.instrs.append(instr)
    return comps


def _callees(instr: _Instr) -> list[str]:
    """Computations an instruction calls (async-done/update repeat the start's)."""
    if instr.opcode.endswith("-done") or instr.opcode.endswith("-update"):
        return []
    attrs = _STRING_RE.sub('""', instr.attrs)
    names = re.findall(rf"(?<![\w.\-])(?:{'|'.join(_CALL_ATTRS)})=%?([\w.\-]+)", attrs)
    for body in re.findall(rf"(?<![\w.\-])(?:{'|'.join(_CALL_LIST_ATTRS)})=\{{([^}}]*)\}}", attrs):
        names += [n.strip().lstrip("%") for n in body.split(",") if n.strip()]
    return names


# --------------------------------------------------------------------------- #
# While-loop trip counts and how often each computation runs
# --------------------------------------------------------------------------- #
_KNOWN_TRIP_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')


def _reachable(comps: Mapping[str, _Computation], root: str) -> list[_Computation]:
    seen, stack, out = {root}, [root], []
    while stack:
        comp = comps[stack.pop()]
        out.append(comp)
        for instr in comp.instrs:
            for callee in _callees(instr):
                if callee in comps and callee not in seen:
                    seen.add(callee)
                    stack.append(callee)
    return out


def _infer_trip_count(comps: Mapping[str, _Computation], condition: str) -> int | None:
    """Trip count of ``i < N``-style loops from the condition's single int constant.

    Assumes the induction variable starts at 0 and steps by 1 (what ``fori_loop``
    and ``scan`` produce); gives up (None) unless exactly one compare and one
    integer scalar constant are found.
    """
    if condition not in comps:
        return None
    instrs = [i for c in _reachable(comps, condition) for i in c.instrs]
    compares = [i for i in instrs if i.opcode == "compare"]
    constants = {
        int(i.operand_text)
        for i in instrs
        if i.opcode == "constant"
        and re.fullmatch(r"[su](8|16|32|64)\[\]", i.shape.split("{")[0])
        and re.fullmatch(r"-?\d+", i.operand_text.strip())
    }
    if len(compares) != 1 or len(constants) != 1:
        return None
    direction = re.search(r"direction=(\w+)", compares[0].attrs)
    (bound,) = constants
    if direction and direction.group(1) in ("LT", "GT", "NE"):
        return max(bound, 0)
    if direction and direction.group(1) in ("LE", "GE"):
        return max(bound + 1, 0)
    return None


def _trip_count(instr: _Instr, comps: Mapping[str, _Computation]) -> tuple[int, bool]:
    """(trip count, known) of a while instruction."""
    known = _KNOWN_TRIP_RE.search(instr.attrs)
    if known:
        return int(known.group(1)), True
    cond = re.search(r"(?<![\w.\-])condition=%?([\w.\-]+)", instr.attrs)
    inferred = _infer_trip_count(comps, cond.group(1)) if cond else None
    if inferred is not None:
        return inferred, True
    return 1, False


def _run_counts(comps: Mapping[str, _Computation]) -> dict[str, tuple[int, bool]]:
    """computation -> (runs per step, all enclosing trip counts known), from ENTRY."""
    entry = next((c.name for c in comps.values() if c.is_entry), None)
    if entry is None:
        raise ValueError("HLO text has no ENTRY computation")
    callers: dict[str, list[tuple[str, int, bool]]] = {}
    for comp in _reachable(comps, entry):
        for instr in comp.instrs:
            factor, known = (1, True)
            if instr.opcode == "while":
                factor, known = _trip_count(instr, comps)
            for callee in _callees(instr):
                callers.setdefault(callee, []).append((comp.name, factor, known))

    memo: dict[str, tuple[int, bool]] = {entry: (1, True)}

    def runs(name: str) -> tuple[int, bool]:
        if name not in memo:
            total, all_known = 0, True
            for caller, factor, known in callers.get(name, []):
                n, k = runs(caller)
                total += n * factor
                all_known &= k and known
            memo[name] = (total, all_known)
        return memo[name]

    return {c.name: runs(c.name) for c in _reachable(comps, entry)}


# --------------------------------------------------------------------------- #
# Collectives
# --------------------------------------------------------------------------- #
def _result_shape(instr: _Instr, done_shapes: Mapping[str, str]) -> str:
    """Shape of a collective's result; for ``-start`` ops the ``-done`` shape."""
    if not instr.opcode.endswith("-start"):
        return instr.shape
    if instr.name in done_shapes:
        return done_shapes[instr.name]
    if instr.opcode == "all-reduce-start":
        return instr.shape  # all-reduce-start's result is the data itself
    # (operand(s), output, context...) for all-gather / collective-permute / async sugar.
    elements = _tuple_elements(instr.shape)
    return elements[1] if len(elements) > 1 else instr.shape


def _groups_attr(attrs: str) -> str | None:
    """Raw text of ``replica_groups=...`` (any syntax) or None."""
    start = attrs.find("replica_groups=")
    if start < 0:
        return None
    value = attrs[start + len("replica_groups=") :]
    if value.startswith("{"):
        return value[: _matching(value, 0)]
    for regex in (_MESH_RG_RE, _MAXIMAL_RG_RE, _IOTA_RG_RE):
        if match := regex.match(value):
            return match.group(0)
    raise ValueError(f"unrecognised replica_groups syntax: {value[:120]!r}")


def _source_target_pairs(attrs: str) -> Groups:
    match = re.search(r"source_target_pairs=(\{)", attrs)
    if not match:
        return ()
    value = attrs[match.start(1) : _matching(attrs, match.start(1))]
    return tuple(tuple(_ints(p)) for p in re.findall(r"\{([^{}]*)\}", value[1:-1]))


def _op_name(attrs: str) -> str:
    match = re.search(r'op_name="((?:[^"\\]|\\.)*)"', attrs)
    return match.group(1) if match else ""


def _remap(groups: Groups, partition_to_mesh: Sequence[int] | None) -> Groups:
    if partition_to_mesh is None:
        return groups
    n = len(partition_to_mesh)
    return tuple(tuple(partition_to_mesh[i] if 0 <= i < n else i for i in g) for g in groups)


def _collective(
    instr: _Instr,
    kind: str,
    shape: str,
    runs: tuple[int, bool],
    mesh_shape: Mapping[str, int],
    partition_to_mesh: Sequence[int] | None,
) -> Collective:
    num_devices = math.prod(mesh_shape.values())
    if kind == "collective-permute":
        groups = _remap(_source_target_pairs(instr.attrs), partition_to_mesh)
        axes, exact = _pair_axes(groups, mesh_shape), True
    else:
        raw = _groups_attr(instr.attrs)
        groups = parse_replica_groups(raw if raw is not None else "{}", num_devices)
        groups = _remap(groups, partition_to_mesh)
        axes = replica_groups_to_axes(groups, mesh_shape)
        exact = _groups_are_exact(groups, axes, mesh_shape)
    return Collective(
        kind=kind,
        bytes_per_device=shape_bytes(shape),
        axes=axes,
        count=runs[0],
        groups=groups,
        name=instr.name,
        op_name=_op_name(instr.attrs),
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
    comps = _parse_module(hlo_text)
    run_counts = _run_counts(comps)
    done_shapes = {
        i.operands[0]: i.shape
        for c in comps.values()
        for i in c.instrs
        if i.opcode.endswith("-done") and i.operands
    }
    out: list[Collective] = []
    for comp in comps.values():
        if comp.name not in run_counts:
            continue
        for instr in comp.instrs:
            kind = _KINDS.get(instr.opcode) or _START_KINDS.get(instr.opcode)
            if kind is None:
                continue
            shape = _result_shape(instr, done_shapes)
            out.append(
                _collective(instr, kind, shape, run_counts[comp.name], mesh_shape, partition_to_mesh)
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
        devices = list(compiled.runtime_executable().local_devices())
    except Exception:
        return None
    flat = [d.id for d in np.asarray(mesh.devices).flat]
    ids = [d.id for d in devices]
    if len(ids) != len(flat) or sorted(ids) != sorted(flat) or ids == flat:
        return None
    where = {device_id: i for i, device_id in enumerate(flat)}
    return [where[i] for i in ids]


def inspect_compiled(compiled: Any, mesh: Any) -> CompiledReport:
    """Collectives, memory and flops of a ``jax.stages.Compiled`` on ``mesh``."""
    hlo_text = compiled.as_text()
    if not hlo_text:
        raise ValueError("compiled.as_text() returned no HLO text")
    mesh_shape = dict(zip(mesh.axis_names, np.asarray(mesh.devices).shape))
    collectives = parse_collectives(
        hlo_text, mesh_shape, partition_to_mesh=_partition_to_mesh(compiled, mesh)
    )
    return CompiledReport(collectives=collectives, memory=_memory(compiled), flops=_flops(compiled))
