"""Layouts: which mesh axes split each dim of a tensor, as ``PartitionSpec`` and as rules.

A :class:`Layout` maps each dim of one tensor to a tuple of mesh axes (``()``: not split). A
layout *assignment* maps tensor names to layouts. Manual assignments come from
Mesh-TensorFlow-style rules (``"batch:data;mlp:model"``) plus per-tensor overrides.

Example::

    >>> layout = Layout(("batch", "embed"), (("data",), ()))
    >>> layout.spec()
    P('data',)
    >>> parse_rules("batch:data;mlp:model,seq=none")
    {'batch': ('data',), 'mlp': ('model',), 'seq': ()}
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from difflib import get_close_matches
from typing import Any

from jax.sharding import PartitionSpec

from meshjax.errors import LayoutError
from meshjax.graph import Graph, Tensor

Rules = dict[str, tuple[str, ...]]
MeshShape = Mapping[str, int]


@dataclass(frozen=True)
class Layout:
    """The mesh axes of every dim of one tensor, in the tensor's dim order."""

    dims: tuple[str, ...]
    axes: tuple[tuple[str, ...], ...]

    @classmethod
    def replicated(cls, dims: tuple[str, ...]) -> Layout:
        return cls(tuple(dims), tuple(() for _ in dims))

    @classmethod
    def from_mapping(cls, dims: tuple[str, ...], mapping: Mapping[str, Any]) -> Layout:
        """``Layout.from_mapping(("batch", "embed"), {"batch": "data"})``."""
        return cls(tuple(dims), tuple(axes_of(mapping.get(d)) for d in dims))

    @classmethod
    def from_spec(cls, dims: tuple[str, ...], spec: PartitionSpec) -> Layout:
        entries = tuple(spec) + (None,) * (len(dims) - len(spec))
        if len(entries) != len(dims):
            raise LayoutError(f"spec {spec} has more entries than dims {' '.join(dims)!r}")
        return cls(tuple(dims), tuple(axes_of(e) for e in entries))

    def of(self, dim: str) -> tuple[str, ...]:
        return self.axes[self.dims.index(dim)]

    @property
    def mapping(self) -> dict[str, tuple[str, ...]]:
        """Split dims only: ``{"batch": ("data",)}``."""
        return {d: a for d, a in zip(self.dims, self.axes) if a}

    @cached_property
    def used_axes(self) -> tuple[str, ...]:
        return tuple(a for axes in self.axes for a in axes)

    def spec(self) -> PartitionSpec:
        """The ``PartitionSpec``: ``None``, an axis name, or a tuple of axis names per dim."""
        entries = [spec_entry(a) for a in self.axes]
        while entries and entries[-1] is None:
            entries.pop()
        return PartitionSpec(*entries)

    def split_factor(self, dim: str, mesh_shape: MeshShape) -> int:
        return math.prod(mesh_shape[a] for a in self.of(dim))

    def shard_shape(self, shape: tuple[int, ...], mesh_shape: MeshShape) -> tuple[int, ...]:
        """Per-device shape (assumes the layout is valid)."""
        return tuple(s // math.prod(mesh_shape[a] for a in axes) for s, axes in zip(shape, self.axes))

    def __str__(self) -> str:
        return "[" + ", ".join(f"{d}:{'+'.join(a)}" if a else d for d, a in zip(self.dims, self.axes)) + "]"


def axes_of(entry: Any) -> tuple[str, ...]:
    """A ``PartitionSpec`` entry (``None``, an axis name or a sequence of them) as a tuple of axes.

    >>> axes_of(None), axes_of("data"), axes_of(["data", "model"])
    ((), ('data',), ('data', 'model'))
    """
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def spec_entry(axes: tuple[str, ...]) -> None | str | tuple[str, ...]:
    """The inverse of :func:`axes_of`: ``()`` -> ``None``, one axis -> its name, more -> a tuple.

    >>> spec_entry(()), spec_entry(("data",)), spec_entry(("data", "model"))
    (None, 'data', ('data', 'model'))
    """
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def validate(tensor: Tensor, layout: Layout, mesh_shape: MeshShape) -> None:
    """Raise :class:`LayoutError` naming the tensor, dim and axis of any problem."""
    if tuple(layout.dims) != tuple(tensor.dims):
        raise LayoutError(f"tensor {tensor.name!r}: layout dims {layout.dims} are not its dims {tensor.dims}")
    seen: dict[str, str] = {}
    for dim, size, axes in zip(tensor.dims, tensor.shape, layout.axes):
        for axis in axes:
            if axis not in mesh_shape:
                raise LayoutError(
                    f"tensor {tensor.name!r}, dim {dim!r}: unknown mesh axis {axis!r} "
                    f"(mesh axes: {', '.join(mesh_shape)})"
                )
            if axis in seen:
                raise LayoutError(
                    f"tensor {tensor.name!r}: mesh axis {axis!r} splits both dim {seen[axis]!r} and dim {dim!r}"
                )
            seen[axis] = dim
        factor = math.prod(mesh_shape[a] for a in axes)
        if size % factor:
            raise LayoutError(
                f"tensor {tensor.name!r}: dim {dim!r} of size {size} is not divisible by "
                f"{factor} (mesh axes {'+'.join(axes)})"
            )


# --- rules -----------------------------------------------------------------------------------

_RULE_START = re.compile(r"^\s*([A-Za-z_]\w*)\s*[:=]\s*(.*)$")


def parse_rules(rules: str | Mapping[str, Any] | None) -> Rules:
    """Parse ``"batch:data;mlp:model"``, ``"batch=data,mlp=model,seq=none"`` or a dict.

    A name may map to several axes: ``"batch:data+model"`` (or ``"batch:data,model"`` in the
    ``;``-separated form), each axis once. ``none`` means the dim is never split; an empty
    value (``"batch="``) is an error.
    """
    if rules is None:
        return {}
    if isinstance(rules, Mapping):
        return {str(k): axes_of(v) for k, v in rules.items()}
    out: Rules = {}
    current: str | None = None
    for token in re.split(r"[;,]", rules):
        if not token.strip():
            continue
        match = _RULE_START.match(token)
        if match:
            current, value = match.group(1), match.group(2)
            if current in out:
                raise LayoutError(f"rules {rules!r}: dim {current!r} has two rules")
            out[current] = ()
            if not value.strip():
                raise LayoutError(
                    f"rules {rules!r}: dim {current!r} has no axis after {token.strip()!r}; "
                    f"write {current}:none to keep it unsplit"
                )
        elif current is None:
            raise LayoutError(f"rules {rules!r}: {token.strip()!r} is not of the form dim:axis")
        else:
            value = token
        for axis in re.split(r"[+\s]+", value.strip()):
            if axis and axis.lower() != "none":
                if not re.match(r"^[A-Za-z_]\w*$", axis):
                    raise LayoutError(f"rules {rules!r}: {axis!r} is not a mesh axis name")
                if axis in out[current]:
                    raise LayoutError(f"rules {rules!r}: dim {current!r} uses mesh axis {axis!r} twice")
                out[current] = (*out[current], axis)
    return out


def format_rules(rules: Rules) -> str:
    """The inverse of :func:`parse_rules`: ``{"batch": ("data",)} -> "batch:data"``."""
    return ";".join(f"{d}:{'+'.join(a) if a else 'none'}" for d, a in rules.items())


def check_rules(rules: Rules, graph: Graph, mesh_shape: MeshShape) -> None:
    """Every rule names a dim some tensor has, and mesh axes that exist."""
    for dim, axes in rules.items():
        if dim not in graph.dim_names:
            close = get_close_matches(dim, sorted(graph.dim_names), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else f" (dims: {', '.join(sorted(graph.dim_names))})"
            raise LayoutError(f"rule for dim {dim!r}: no tensor has that dim{hint}")
        for axis in axes:
            if axis not in mesh_shape:
                close = get_close_matches(axis, list(mesh_shape), n=2)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                raise LayoutError(
                    f"rule {dim}:{axis}: unknown mesh axis {axis!r} ({hint}mesh axes: {', '.join(mesh_shape)})"
                )


def layout_from_rules(
    graph: Graph,
    mesh_shape: MeshShape,
    rules: str | Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Layout]:
    """A layout for every tensor: each dim split as the rules say, then per-tensor overrides
    (a ``PartitionSpec``, a :class:`Layout` or a ``{dim: axes}`` dict). Everything is validated.
    """
    rules = parse_rules(rules)
    check_rules(rules, graph, mesh_shape)
    layouts = {
        name: Layout(t.dims, tuple(rules.get(d, ()) for d in t.dims)) for name, t in graph.tensors.items()
    }
    for name, value in (overrides or {}).items():
        tensor = graph.tensor(name)
        layouts[name] = as_layout(tensor, value)
    for name, layout in layouts.items():
        validate(graph.tensors[name], layout, mesh_shape)
    return layouts


def as_layout(tensor: Tensor, value: Any) -> Layout:
    """A per-tensor override as a :class:`Layout`."""
    if isinstance(value, Layout):
        return value
    if isinstance(value, PartitionSpec):
        return Layout.from_spec(tensor.dims, value)
    if isinstance(value, Mapping):
        for dim in value:
            if dim not in tensor.dims:
                raise LayoutError(f"tensor {tensor.name!r} has no dim {dim!r} (dims: {' '.join(tensor.dims)})")
        return Layout.from_mapping(tensor.dims, value)
    raise LayoutError(f"tensor {tensor.name!r}: cannot read a layout from {value!r}")


def rules_conflict(layouts: Mapping[str, Layout]) -> str | None:
    """Why :func:`rules_of` finds no rules: the first dim split two ways, with a tensor of
    each (``None`` when every dim name is split one way)."""
    first: dict[str, tuple[tuple[str, ...], str]] = {}
    for name, layout in layouts.items():
        for dim, axes in zip(layout.dims, layout.axes):
            seen = first.setdefault(dim, (axes, name))
            if seen[0] != axes:
                how = lambda a: f"split over {'+'.join(a)}" if a else "not split"  # noqa: E731
                return (
                    f"dim {dim!r} is {how(seen[0])} in {seen[1]!r} but {how(axes)} in {name!r}: "
                    f"the plan is not one rule per dim name (use plan.specs per tensor)"
                )
    return None


def rules_of(graph: Graph, layouts: Mapping[str, Layout]) -> Rules | None:
    """Logical axis rules (name -> mesh axes) when every tensor splits each dim name the same
    way; ``None`` otherwise. Dims never split map to ``()``."""
    rules: Rules = {}
    for name, layout in layouts.items():
        for dim, axes in zip(layout.dims, layout.axes):
            if rules.setdefault(dim, axes) != axes:
                return None
    return rules
