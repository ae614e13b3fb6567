"""Replica groups: XLA's three syntaxes (explicit lists, iota tiles, mesh references) read into
tuples of partition ids, and mapped to the mesh axes whose coordinates vary inside each group.

>>> parse_replica_groups("{{0,1},{2,3}}", 4)
((0, 1), (2, 3))
>>> replica_groups_to_axes(((0, 1), (2, 3)), {"data": 2, "model": 2})
('model',)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from meshjax.hlo.text import matching, split_top_level

Groups = tuple[tuple[int, ...], ...]

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
    for item in split_top_level(match.group("axes")):
        name, size = item.rsplit("=", 1)
        names.append(name.strip().strip("'\""))
        dims.append(int(size))
    ids = match.group("ids")
    devices = _parse_device_ids(ids, dims) if ids else np.arange(math.prod(dims)).reshape(dims)
    refs = [_parse_axis_ref(r, names) for r in split_top_level(match.group("group_axes"))]

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
        inner = text[1 : matching(text, 0) - 1].strip()
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


def group_axes_are_exact(groups: Groups, axes: Sequence[str], mesh_shape: Mapping[str, int]) -> bool:
    return {frozenset(g) for g in groups} == _axes_groups(axes, mesh_shape)


def replica_groups_to_axes(groups: Groups, mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    """Mesh axes (in mesh order) whose coordinates vary within the groups.

    Partition id ``i`` sits at ``np.unravel_index(i, sizes)``. Singleton groups
    give ``()``. Groups that do not tile the mesh by whole axes (sub-axis or
    irregular groups) still get their varying axes.
    """
    return _varying_axes(groups, mesh_shape)


def pair_axes(pairs: Groups, mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    """Axes along which the source and target of collective-permute pairs differ."""
    names, dims = list(mesh_shape), list(mesh_shape.values())
    total = math.prod(dims)
    differ = [False] * len(dims)
    for pair in pairs:
        if len(pair) == 2 and all(0 <= i < total for i in pair):
            src, dst = _coords(pair, dims)
            differ = [d or bool(s != t) for d, s, t in zip(differ, src, dst)]
    return tuple(n for n, d in zip(names, differ) if d)


def groups_text(attrs: str) -> str | None:
    """Raw text of ``replica_groups=...`` (any syntax) or None."""
    start = attrs.find("replica_groups=")
    if start < 0:
        return None
    value = attrs[start + len("replica_groups=") :]
    if value.startswith("{"):
        return value[: matching(value, 0)]
    for regex in (_MESH_RG_RE, _MAXIMAL_RG_RE, _IOTA_RG_RE):
        if match := regex.match(value):
            return match.group(0)
    raise ValueError(f"unrecognised replica_groups syntax: {value[:120]!r}")


def source_target_pairs(attrs: str) -> Groups:
    match = re.search(r"source_target_pairs=(\{)", attrs)
    if not match:
        return ()
    value = attrs[match.start(1) : matching(attrs, match.start(1))]
    return tuple(tuple(_ints(p)) for p in re.findall(r"\{([^{}]*)\}", value[1:-1]))
